#!/usr/bin/env python3
"""Verify throughput: bytes verified per second by `versionstore verify` vs a bare BLAKE3 of the
same files, measured in the same run (medians of N runs, interleaved, warm page cache).

The script builds a library in a temporary data dir (the embedded default: primary and backup
on one filesystem), with a mix of sizes, then measures:

1. the verify pass in-process (`verify.Scrubber`, unthrottled: what the CLI runs),
2. `versionstore verify --quiet` as a process (adds interpreter start-up and the report),
3. the baseline: `b3sum` over the revision files when it is installed, otherwise a plain
   Python `blake3.blake3(max_threads=AUTO).update_mmap` of each file (said in the output).

    .venv/bin/python scripts/bench_verify.py            # 1 GiB, 3 runs
    .venv/bin/python scripts/bench_verify.py --quick    # 256 MiB, 1 run
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import blake3

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from benchlib import add_load_option, check_load, watch_load  # noqa: E402

from versionstore import layout, verify  # noqa: E402
from versionstore.blobstore import open_store  # noqa: E402
from versionstore.config import Config  # noqa: E402
from versionstore.metadata import MetadataStore  # noqa: E402
from versionstore.service import UploadRequest, VersionService  # noqa: E402
from versionstore.targets import BackupTargets  # noqa: E402

MiB = 1 << 20
CLOUD = "bench"
#: (share of the total, size of each file): many images, some photos, a few videos.
MIX = [(0.2, 200 << 10), (0.4, 4 * MiB), (0.4, 32 * MiB)]


async def build(config: Config, total: int) -> list[Path]:
    meta = await MetadataStore.open(config.db_path)
    primary = open_store(config.primary_url)
    targets = BackupTargets(meta, open_store(config.backup_url))
    service = VersionService(meta, primary, targets, config.spool_dir, config.max_upload_bytes)
    cloud = await meta.create_cloud(CLOUD, "k", "s", True)
    paths = []
    try:
        for share, size in MIX:
            for n in range(max(1, int(total * share) // size)):
                spool = service.new_spool()
                await spool.write(os.urandom(size))
                spooled = await spool.finish()
                await service.upload(UploadRequest(cloud, "raw", public_id=f"f{size}-{n}"), spooled)
                local = targets.default.local_path(layout.revision_key(CLOUD, spooled.digest))
                assert local is not None
                paths.append(Path(local))
    finally:
        await targets.close()
        await primary.close()
        await meta.close()
    return paths


async def scrub(config: Config) -> tuple[float, int]:
    meta = await MetadataStore.open(config.db_path)
    primary = open_store(config.primary_url)
    targets = BackupTargets(meta, open_store(config.backup_url))
    service = VersionService(meta, primary, targets, config.spool_dir, config.max_upload_bytes)
    try:
        cloud = await meta.get_cloud(CLOUD)
        assert cloud is not None
        started = time.perf_counter()
        report = await verify.Scrubber(service).run(cloud)
        elapsed = time.perf_counter() - started
        assert report.problem_count == 0, report.as_dict()
        return elapsed, report.bytes
    finally:
        await targets.close()
        await primary.close()
        await meta.close()


def baseline(paths: list[Path]) -> tuple[float, str]:
    tool = shutil.which("b3sum")
    started = time.perf_counter()
    if tool:
        subprocess.run([tool, *map(str, paths)], check=True, capture_output=True)
        return time.perf_counter() - started, "b3sum"
    for path in paths:
        hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
        hasher.update_mmap(str(path))
        hasher.hexdigest()
    return time.perf_counter() - started, "python blake3 update_mmap (b3sum not installed)"


def cli(data_dir: Path) -> float:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "versionstore", "verify", "--quiet", "--data-dir", str(data_dir)],
                            capture_output=True, text=True, env=env)
    elapsed = time.perf_counter() - started
    assert result.returncode == 0, result.stdout + result.stderr
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="256 MiB, 1 run")
    parser.add_argument("--total-mib", type=int, help="library size in MiB (default 1024; --quick 256)")
    parser.add_argument("--runs", type=int, help="runs per measurement (default 3; --quick 1)")
    add_load_option(parser)
    args = parser.parse_args()
    watch_load()
    total = (args.total_mib or (256 if args.quick else 1024)) * MiB
    runs = args.runs or (1 if args.quick else 3)
    tmp = Path(tempfile.mkdtemp(prefix="versionstore-bench-verify-"))
    try:
        config = Config(data_dir=tmp / "data", verify_interval=0)
        config.spool_dir.mkdir(parents=True)
        paths = asyncio.run(build(config, total))
        size = sum(p.stat().st_size for p in paths)
        print(f"library: {len(paths)} revisions, {size / MiB:.0f} MiB in {tmp} (warm page cache)", flush=True)
        base_t, verify_t, cli_t, name = [], [], [], ""
        for run in range(1, runs + 1):
            seconds, name = baseline(paths)
            base_t.append(seconds)
            seconds, verified = asyncio.run(scrub(config))
            verify_t.append(seconds)
            assert verified == size, (verified, size)
            cli_t.append(cli(config.data_dir))
            print(f"  run {run}: baseline {size / MiB / base_t[-1]:8.0f} MiB/s | verify {size / MiB / verify_t[-1]:8.0f} MiB/s"
                  f" | CLI {size / MiB / cli_t[-1]:8.0f} MiB/s", flush=True)
        b, v, c = (statistics.median(t) for t in (base_t, verify_t, cli_t))
        ratio = b / v
        if not check_load(args.allow_load):
            return 1
        print(f"\nbaseline ({name}): {size / MiB / b:.0f} MiB/s")
        print(f"verify (in-process Scrubber): {size / MiB / v:.0f} MiB/s, ratio {ratio:.2f}x   target >= 0.8x: "
              f"{'MET' if ratio >= 0.8 else 'MISSED'}")
        print(f"versionstore verify (process, incl. start-up): {size / MiB / c:.0f} MiB/s, ratio {b / c:.2f}x")
        return 0 if ratio >= 0.8 else 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
