#!/usr/bin/env python3
"""Compare the per-file times of test runs written by `pytest --file-times=PATH` (tests/timing.py).

    scripts/test_times.py before.json [after.json ...]

One column of seconds per run, files ordered by their largest total; the last line sums them.
Several runs of each side, interleaved, say more than one on a shared machine.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.timing import summarize  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="JSON files written by pytest --file-times=PATH")
    parser.add_argument("--top", type=int, default=40, help="files to show (default 40)")
    args = parser.parse_args()
    runs = [summarize(json.loads(path.read_text())) for path in args.runs]
    names = sorted({name for run in runs for name in run}, key=lambda name: -max(run.get(name, {}).get("total", 0.0) for run in runs))
    print("  ".join(f"{path.stem[:12]:>12}" for path in args.runs) + "  file")
    for name in names[: args.top]:
        print("  ".join(f"{run[name]['total']:12.1f}" if name in run else f"{'-':>12}" for run in runs) + f"  {name}")
    print("  ".join(f"{sum(row['total'] for row in run.values()):12.1f}" for run in runs) + "  (all files)")


if __name__ == "__main__":
    main()
