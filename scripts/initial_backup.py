#!/usr/bin/env python3
"""Back up existing assets (issue 4): the same program as `versionstore initial-backup`.

Usage and options: docs/initial-backup.md, or `scripts/initial_backup.py --help`.
Runs from any directory with any Python 3.11: it imports this checkout's code, and when the
interpreter lacks the dependencies it runs itself again with the checkout's `.venv` python
(which `scripts/serve.sh` or `scripts/test.sh` builds).
"""

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"


def _in_venv() -> bool:
    return Path(sys.prefix).resolve() == VENV.resolve()


def run() -> int:
    sys.path.insert(0, str(ROOT))
    try:
        from versionstore.backup_client import main
    except ModuleNotFoundError as exc:
        python = VENV / "bin" / "python"
        if python.exists() and not _in_venv():
            os.execv(python, [str(python), str(Path(__file__).resolve()), *sys.argv[1:]])
        print(f"error: {exc.name} is missing for {sys.executable}: build {VENV} first (scripts/serve.sh or "
              "scripts/test.sh do), or run `versionstore initial-backup` where versionstore is installed", file=sys.stderr)
        return 2
    return main()


if __name__ == "__main__":
    sys.exit(run())
