#!/usr/bin/env python3
"""Snapshot and point-in-time dry-run cost at library scale (issue 12 targets: < 5 s each at
100,000 assets).

Builds a metadata store with N assets under one prefix (each with `--versions` versions,
written in bulk straight into SQLite: the benchmark measures the snapshot, not uploads), then
times, as medians of interleaved runs:

1. `MetadataStore.create_snapshot` of the whole environment (one INSERT ... SELECT),
2. `pitr.dry_run` over the prefix at a time between the versions (every asset "to restore"),
3. `pitr.dry_run` from the snapshot just taken (every asset "unchanged"),
4. a snapshot's `unique_bytes` (what `GET snapshots/<id>` computes).

    .venv/bin/python scripts/bench_snapshots.py            # 100,000 assets, 3 runs
    .venv/bin/python scripts/bench_snapshots.py --quick    # 20,000 assets, 1 run
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from versionstore import pitr  # noqa: E402
from versionstore.ids import new_hex_id  # noqa: E402
from versionstore.metadata import MetadataStore  # noqa: E402
from versionstore.snapshot_records import Snapshot  # noqa: E402

CLOUD = "bench"


def populate(db_path: Path, assets: int, versions: int, t0: float) -> float:
    """Bulk rows: asset i has versions at t0 + k*1000 + i/assets; returns a time between the
    first and second version of every asset."""
    db = sqlite3.connect(db_path)
    with db:
        asset_rows, version_rows = [], []
        for i in range(assets):
            ids = [new_hex_id() for _ in range(versions)]
            digest = f"{i:063x}f"
            asset_rows.append((i + 1, CLOUD, new_hex_id(), "image", "upload", f"lib/{i:07d}", "live", digest, "png", 1000, ids[-1],
                               int(t0) + versions, t0, t0))
            for k, vid in enumerate(ids):
                created = t0 + k * 1000 + i / assets
                version_rows.append((CLOUD, i + 1, vid, int(created), f"{i:060x}{k:04x}" if k < versions - 1 else digest,
                                     1000, "png", 1, created))
        db.executemany(
            "INSERT INTO assets (pk, cloud, asset_id, resource_type, type, public_id, status, digest, format, bytes, version_id, "
            "version, created_at, uploaded_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", asset_rows,
        )
        db.executemany(
            "INSERT INTO versions (cloud, asset_pk, version_id, version, digest, bytes, format, backed_up, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", version_rows,
        )
    db.close()
    return t0 + 500


async def measure(root: Path, assets: int, versions: int, runs: int) -> dict[str, list[float]]:
    meta = await MetadataStore.open(root / "metadata.sqlite3")
    await meta.create_cloud(CLOUD, "k", "s", True)
    await meta.close()
    at = populate(root / "metadata.sqlite3", assets, versions, time.time() - 10 * 86400)
    meta = await MetadataStore.open(root / "metadata.sqlite3")
    times: dict[str, list[float]] = {"snapshot": [], "pitr_dry_run_at": [], "pitr_dry_run_snapshot": [], "unique_bytes": []}
    try:
        for _ in range(runs):
            started = time.perf_counter()
            snap = await meta.create_snapshot(Snapshot(new_hex_id(), CLOUD, "manual", "running", None, "", "bench", created_at=time.time()))
            times["snapshot"].append(time.perf_counter() - started)
            assert snap.asset_count == assets, snap
            started = time.perf_counter()
            diff = await pitr.dry_run(meta, pitr.Selection(CLOUD, "lib/", at), limit=100)
            times["pitr_dry_run_at"].append(time.perf_counter() - started)
            assert diff["counts"]["restore"] == assets, diff["counts"]
            started = time.perf_counter()
            diff = await pitr.dry_run(meta, pitr.Selection(CLOUD, "lib/", snapshot_id=snap.id), limit=100)
            times["pitr_dry_run_snapshot"].append(time.perf_counter() - started)
            assert diff["counts"]["unchanged"] == assets, diff["counts"]
            started = time.perf_counter()
            await meta.snapshot_unique_bytes(CLOUD, [snap.id])
            times["unique_bytes"].append(time.perf_counter() - started)
    finally:
        await meta.close()
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="20,000 assets, 1 run")
    parser.add_argument("--assets", type=int, default=100_000)
    parser.add_argument("--versions", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    assets, runs = (20_000, 1) if args.quick else (args.assets, args.runs)
    with tempfile.TemporaryDirectory(prefix="bench-snapshots-") as tmp:
        times = asyncio.run(measure(Path(tmp), assets, args.versions, runs))
    print(f"{assets} assets x {args.versions} versions, {runs} run(s), medians:")
    for name, values in times.items():
        limit = " (target < 5 s)" if name in ("snapshot", "pitr_dry_run_at") else ""
        print(f"  {name:24s} {statistics.median(values):7.3f} s   {assets / statistics.median(values):10.0f} assets/s{limit}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
