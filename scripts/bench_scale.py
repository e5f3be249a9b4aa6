#!/usr/bin/env python3
"""Scale-out benchmark: the read path on PostgreSQL vs SQLite, and the hot queries at scale.

Part 1 (one run, interleaved): two `versionstore serve` processes, one on SQLite, one on a
throwaway PostgreSQL cluster, each with the same asset of 10 versions; a concurrent client
calls `resources/...?versions=true` and `download_backup` on each in turn. Reported: req/s,
p50, and the PostgreSQL/SQLite ratio (the issue's target is >= 0.8).

Part 2: N assets (`--assets`, default 10M; --quick 200k) generated in PostgreSQL with
generate_series (one version each, 1% deleted), then EXPLAIN ANALYZE and the p50 of the hot
queries: an asset's versions (`versions=true`), the asset by name, and the first page of
`search status=deleted`; with table and index bytes per asset, projected to 100M.

The client shares the machine with the servers: ratios are indicative; on a shared machine,
say so. Needs initdb/pg_ctl (PATH or /usr/lib/postgresql/*/bin).
"""

import argparse
import asyncio
import base64
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import aiohttp  # noqa: E402
import asyncpg  # noqa: E402
from benchlib import download_backup_url  # noqa: E402

from tests.servers import PostgresServer, free_port, wait_http_ready  # noqa: E402

CLOUD, KEY, SECRET = "bench", "111222333444555", "benchsecret"
BASIC = "Basic " + base64.b64encode(f"{KEY}:{SECRET}".encode()).decode()


def log(message: str) -> None:
    print(message, flush=True)


class Serve:
    def __init__(self, tmp: Path, name: str, metadata_url: str | None) -> None:
        self.data = tmp / name
        self.env = {**os.environ, "PYTHONPATH": str(ROOT), "VERSIONSTORE_VERIFY_INTERVAL": "0"}
        if metadata_url:
            self.env["VERSIONSTORE_METADATA_URL"] = metadata_url
        self.name = name
        self.port = free_port()
        self.log = open(tmp / f"{name}.log", "wb")  # noqa: SIM115
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        cli = [sys.executable, "-m", "versionstore"]
        subprocess.run([*cli, "cloud", "create", CLOUD, "--api-key", KEY, "--api-secret", SECRET, "--data-dir", str(self.data)],
                       env=self.env, check=True, capture_output=True)
        self.proc = subprocess.Popen([*cli, "serve", "--data-dir", str(self.data), "--port", str(self.port)],
                                     env=self.env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        if not wait_http_ready(self.proc, f"{self.base}/healthz"):
            raise RuntimeError(f"{self.name} did not start; see {self.log.name}")

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=30)
        self.log.close()


async def make_versions(serve: Serve, count: int) -> dict[str, str]:
    async with aiohttp.ClientSession(headers={"Authorization": BASIC}) as session:
        body: dict[str, Any] = {}
        for n in range(count):
            form = aiohttp.FormData()
            form.add_field("public_id", "bench/v10")
            form.add_field("backup", "true")
            form.add_field("file", f"version {n} {os.urandom(8).hex()}".encode(), filename="v.txt")
            async with session.post(f"{serve.base}/v1_1/{CLOUD}/raw/upload", data=form) as resp:
                body = await resp.json()
                assert resp.status == 200, body
        return {"asset_id": body["asset_id"], "version_id": body["version_id"]}


async def hammer(url: str, seconds: float, concurrency: int, headers: dict[str, str]) -> dict[str, float]:
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def worker(session: aiohttp.ClientSession) -> None:
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            async with session.get(url) as resp:
                await resp.read()
                if resp.status != 200:
                    raise RuntimeError(f"{url}: {resp.status}")
            latencies.append(time.perf_counter() - started)

    async with aiohttp.ClientSession(headers=headers) as session:
        begun = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        elapsed = time.perf_counter() - begun
    return {"rps": len(latencies) / elapsed, "p50_ms": statistics.median(latencies) * 1000}


def download_url(serve: Serve, ids: dict[str, str]) -> str:
    return download_backup_url(f"{serve.base}/v1_1/{CLOUD}", ids["asset_id"], ids["version_id"], KEY, SECRET)


async def read_path(tmp: Path, pg: PostgresServer, args: argparse.Namespace) -> dict[str, Any]:
    servers = [Serve(tmp, "sqlite", None), Serve(tmp, "postgresql", pg.url(pg.new_database(migrated=False)))]
    results: dict[str, dict[str, list[dict[str, float]]]] = {}
    try:
        for serve in servers:
            serve.start()
        ids = {s.name: await make_versions(s, 10) for s in servers}
        cases = {
            "versions=true": lambda s: (f"{s.base}/v1_1/{CLOUD}/resources/raw/upload/bench/v10?versions=true", {"Authorization": BASIC}),
            "download_backup": lambda s: (download_url(s, ids[s.name]), {}),
        }
        for s in servers:  # warm up
            for case in cases.values():
                await hammer(*case(s)[:1], 1, args.concurrency, case(s)[1])
        for run in range(args.runs):
            for case_name, case in cases.items():
                for s in servers:
                    url, headers = case(s)
                    figures = await hammer(url, args.seconds, args.concurrency, headers)
                    results.setdefault(case_name, {}).setdefault(s.name, []).append(figures)
                    log(f"  run {run + 1} {case_name:>16} {s.name:>10}: {figures['rps']:7.0f} req/s  p50 {figures['p50_ms']:6.2f} ms")
    finally:
        for s in servers:
            s.stop()
    summary = {}
    for case_name, by_backend in results.items():
        rps = {b: statistics.median(r["rps"] for r in runs) for b, runs in by_backend.items()}
        summary[case_name] = {**rps, "ratio": rps["postgresql"] / rps["sqlite"]}
        log(f"{case_name}: PostgreSQL/SQLite = {summary[case_name]['ratio']:.2f} "
            f"({rps['postgresql']:.0f} vs {rps['sqlite']:.0f} req/s)")
    return summary


GENERATE = """
INSERT INTO clouds (name, api_key, api_secret, created_at) VALUES ('scale', 'scalekey', 's', 0);
INSERT INTO assets (pk, cloud, asset_id, resource_type, type, public_id, status, digest, format, bytes, version,
                    version_id, created_at, uploaded_at, deleted_at)
SELECT g, 'scale', 'a' || g, 'image', 'upload', 'lib/' || g, CASE WHEN g % 100 = 0 THEN 'deleted' ELSE 'live' END,
       md5(g::text), 'jpg', 1000 + g % 5000, 1700000000 + g, 'v' || g, 1700000000 + g, 1700000000 + g,
       CASE WHEN g % 100 = 0 THEN 1700000000 + g END
FROM generate_series(1, {n}) AS g;
INSERT INTO versions (pk, cloud, asset_pk, version_id, version, digest, bytes, format, backed_up, created_at)
SELECT g, 'scale', g, 'v' || g, 1700000000 + g, md5(g::text), 1000 + g % 5000, 'jpg', 1, 1700000000 + g
FROM generate_series(1, {n}) AS g;
SELECT setval(pg_get_serial_sequence('assets', 'pk'), {n} + 1, false);
SELECT setval(pg_get_serial_sequence('versions', 'pk'), {n} + 1, false);
ANALYZE;
"""

HOT_QUERIES = {
    # MetadataStore.versions: what versions=true reads
    "versions=true": ("SELECT version_id, version, digest, bytes FROM versions WHERE asset_pk = $1 ORDER BY version, pk",
                      lambda n, i: [(i * 7919) % n + 1]),
    "asset by name": ("SELECT pk, generation FROM assets WHERE cloud = 'scale' AND resource_type = 'image' AND type = 'upload' "
                      "AND public_id = $1", lambda n, i: [f"lib/{(i * 7919) % n + 1}"]),
    # search expression=status=deleted, first page in the default order (newest first)
    "search status=deleted": ("SELECT pk, public_id FROM assets WHERE cloud = 'scale' AND (status = $1) "
                              "ORDER BY created_at DESC, pk DESC LIMIT 11", lambda n, i: ["deleted"]),
}


async def at_scale(pg: PostgresServer, args: argparse.Namespace) -> dict[str, Any]:
    from versionstore.metadata import MetadataStore

    name = pg.new_database(migrated=False)
    url = pg.url(name)
    await (await MetadataStore.open(url)).close()
    conn = await asyncpg.connect(url)
    try:
        started = time.perf_counter()
        await conn.execute(GENERATE.format(n=args.assets))
        log(f"generated {args.assets} assets and versions in {time.perf_counter() - started:.0f} s")
        report: dict[str, Any] = {"assets": args.assets, "queries": {}}
        for label, (sql, params) in HOT_QUERIES.items():
            plan = await conn.fetch("EXPLAIN (ANALYZE, BUFFERS) " + sql, *params(args.assets, 1))
            times = []
            for i in range(200):
                t = time.perf_counter()
                await conn.fetch(sql, *params(args.assets, i))
                times.append((time.perf_counter() - t) * 1000)
            report["queries"][label] = {"p50_ms": statistics.median(times), "plan": [r[0] for r in plan]}
            log(f"{label}: p50 {statistics.median(times):.3f} ms\n    " + "\n    ".join(r[0] for r in plan))
        sizes = await conn.fetch(
            "SELECT relname, pg_table_size(oid), pg_indexes_size(oid) FROM pg_class WHERE relname IN ('assets', 'versions')"
        )
        report["bytes_per_asset"] = {r[0]: {"table": r[1] / args.assets, "indexes": r[2] / args.assets} for r in sizes}
        total = sum(v["table"] + v["indexes"] for v in report["bytes_per_asset"].values())
        report["projected_100m_gib"] = total * 100e6 / (1 << 30)
        log(f"bytes per asset (one version): {json.dumps(report['bytes_per_asset'])}; projected at 100M assets: "
            f"{report['projected_100m_gib']:.0f} GiB (tables and indexes)")
        return report
    finally:
        await conn.close()
        pg.drop_database(name)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="200k assets, 1 run of 2 s per case (a smoke check)")
    parser.add_argument("--assets", type=int, help="assets generated for part 2 (default 10M; --quick 200k)")
    parser.add_argument("--runs", type=int, help="interleaved runs per case (default 3; --quick 1)")
    parser.add_argument("--seconds", type=float, help="seconds per run (default 10; --quick 2)")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--skip-read-path", action="store_true")
    parser.add_argument("--skip-scale", action="store_true")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    args.assets = args.assets or (200_000 if args.quick else 10_000_000)
    args.runs = args.runs or (1 if args.quick else 3)
    args.seconds = args.seconds or (2.0 if args.quick else 10.0)
    pg = PostgresServer()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        try:
            pg.start()
            if not args.skip_read_path:
                results["read_path"] = asyncio.run(read_path(Path(tmp), pg, args))
            if not args.skip_scale:
                results["at_scale"] = asyncio.run(at_scale(pg, args))
        finally:
            pg.stop()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
