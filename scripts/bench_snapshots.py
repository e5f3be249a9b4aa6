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

Then, on real stores (a local primary and backup store, bytes uploaded through the service):

5. restore throughput: the `point_in_time_restore` job restoring a snapshot of `--restore-assets`
   assets into another environment (assets/s and MB/s),
6. a restore drill of the same snapshot (every item restored into a scratch environment, read
   back and compared; then removed): its time and throughput.

The machine's load during the run is printed, and the figures are refused (exit 1) when
processes outside the benchmark used much CPU (benchlib.check_load; `--allow-load` shows them
as indicative).

    .venv/bin/python scripts/bench_snapshots.py            # 100,000 assets, 3 runs; restore 2,000 x 64 KiB
    .venv/bin/python scripts/bench_snapshots.py --quick    # 20,000 assets, 1 run; restore 300 x 64 KiB
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import add_load_option, check_load, watch_load  # noqa: E402

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


# --- restore throughput and drills (real stores) ------------------------------------------------


async def measure_restore(root: Path, assets: int, size: int) -> dict[str, float]:
    """Upload `assets` files of `size` bytes into one environment, snapshot it, then time the
    point-in-time restore job into a second environment and a drill of the whole snapshot."""
    import os

    from versionstore import bootstrap, drills
    from versionstore.config import Config
    from versionstore.models import Job
    from versionstore.service import UploadRequest, VersionService
    from versionstore.snapshots import Snapshots
    from versionstore.targets import BackupTargets

    config = Config(data_dir=root / "stores")
    config.data_dir.mkdir(parents=True)
    config.spool_dir.mkdir(parents=True, exist_ok=True)
    meta = await bootstrap.open_metadata(config)
    primary = bootstrap.open_primary(config)
    targets = BackupTargets(meta, bootstrap.open_backup(config))
    service = VersionService(meta, primary, targets, config.spool_dir, config.max_upload_bytes)
    figures: dict[str, float] = {"bytes": float(assets * size)}
    try:
        source = await meta.create_cloud("bench-src", "ks", "ss", True)
        target = await meta.create_cloud("bench-dst", "kd", "sd", True)
        for i in range(assets):
            spool = service.new_spool()
            await spool.write(os.urandom(size))
            request = UploadRequest(cloud=source, resource_type="raw" if i % 2 else "image", public_id=f"lib/{i:06d}", backup=True)
            await service.upload(request, await spool.finish())
        snapshot = await Snapshots(service).create(source.name, note=None)
        selection = pitr.Selection(source.name, snapshot_id=snapshot.id, target_cloud=target.name)
        job = await pitr.start(meta, selection, pitr.job_params(selection, "leave", False), None)
        assert job is not None
        started = time.perf_counter()
        await pitr.PointInTimeRestore(service).run(job)
        figures["restore_seconds"] = time.perf_counter() - started
        done = await meta.get_job(source.name, job.id)
        assert done is not None and done.progress["restored"] == assets, done.progress
        drill = Job(id=new_hex_id(), cloud=source.name, kind=drills.KIND, status="active", created_at=time.time(),
                    params=drills.job_params({"sample_fraction": 1.0}, snapshot_id=snapshot.id, created_by="bench"))
        assert await meta.create_job(drill) is not None
        started = time.perf_counter()
        await drills.DrillJob(service).run(drill)
        figures["drill_seconds"] = time.perf_counter() - started
        checked = await meta.get_job(source.name, drill.id)
        assert checked is not None and checked.progress["result"] == "passed", checked.progress
        figures["drill_checked"] = checked.progress["items_checked"]
    finally:
        await targets.close()
        await primary.close()
        await meta.close()
    return figures


def print_restore(figures: dict[str, float], assets: int, size: int) -> None:
    megabytes = figures["bytes"] / 1e6
    print(f"restore of a {assets}-asset snapshot ({size >> 10} KiB each, {megabytes:.1f} MB) into another environment:")
    for name, what in (("restore_seconds", "point_in_time_restore job"), ("drill_seconds", "drill (restore + read back + cleanup)")):
        seconds = figures[name]
        print(f"  {what:40s} {seconds:7.3f} s   {assets / seconds:8.1f} assets/s   {megabytes / seconds:7.2f} MB/s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="20,000 assets, 1 run")
    parser.add_argument("--assets", type=int, default=100_000)
    parser.add_argument("--versions", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--restore-assets", type=int, help="assets restored and drilled (default 2,000; --quick 300; 0: skip)")
    parser.add_argument("--restore-kib", type=int, default=64, help="size of each restored asset in KiB")
    add_load_option(parser)
    args = parser.parse_args()
    watch_load()
    assets, runs = (20_000, 1) if args.quick else (args.assets, args.runs)
    restore_assets = args.restore_assets if args.restore_assets is not None else 300 if args.quick else 2_000
    with tempfile.TemporaryDirectory(prefix="bench-snapshots-") as tmp:
        times = asyncio.run(measure(Path(tmp), assets, args.versions, runs))
        restored = asyncio.run(measure_restore(Path(tmp), restore_assets, args.restore_kib << 10)) if restore_assets else None
    if not check_load(args.allow_load):
        return 1
    print(f"{assets} assets x {args.versions} versions, {runs} run(s), medians:")
    for name, values in times.items():
        limit = " (target < 5 s)" if name in ("snapshot", "pitr_dry_run_at") else ""
        print(f"  {name:24s} {statistics.median(values):7.3f} s   {assets / statistics.median(values):10.0f} assets/s{limit}")
    if restored is not None:
        print_restore(restored, restore_assets, args.restore_kib << 10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
