#!/usr/bin/env python3
"""Scale-out benchmark: the read path on PostgreSQL vs SQLite, the hot queries at scale, and
what a second server process adds.

Part 1, read path (interleaved rounds in one run): `versionstore serve` on SQLite and on a
throwaway PostgreSQL cluster, each with the same asset of 10 versions; a concurrent client
(wrk when installed, else aiohttp) calls `resources/...?versions=true` and `download_backup`
on each in turn. Reported: req/s, p50, the CPU per request of the server's processes (and of
the PostgreSQL cluster, for PostgreSQL), and the PostgreSQL/SQLite ratios of both (target
>= 0.8); under outside load the CPU ratio is the steadier one.
`--baseline DIR` serves the same backends a second time from another checkout of the code
(e.g. `git worktree add /tmp/base <commit>`), in the same rounds: before/after in one run.
`--small-uploads` adds a write case (16 clients uploading 1 KiB files: commits per second);
`--durable` runs the cluster with fsync and synchronous_commit on, as in production (the
tests' settings skip the flush, which is what concurrent commits queue for).

Part 2, at scale: N assets (`--assets`, default 10M; --quick 200k) generated in PostgreSQL
with generate_series, in the shape the service writes (bench_library_size.py's library: 1-3
versions each, 5% deleted, 0-2 tags of 1,000 plus `xyz` on 0.5%, a context entry on half,
folders of 100; the side tables and every index of schema.sql). Then the hot reads, called
through MetadataStore as the service calls them: p50 of each, and EXPLAIN ANALYZE of the exact
statements they sent; the table and index bytes per asset, projected to 100M assets; then the
p50 of `versions=true` and of `search status=deleted` (following next_cursor) over HTTP, one
request at a time, against a `versionstore serve` on the generated database. The cluster runs
with wal_level=minimal, so the load (one transaction) skips the WAL. `--nice` runs it under
`nice -n 19 ionice -c3` on a machine others use; `--keep` leaves the cluster and the database
(the URL and the stop command are printed) and `--database-url URL` measures that database
again without generating it.

Part 3, workers (`--workers-compare`): `serve --workers 2` vs 1 on SQLite (`--workers-pg`:
on PostgreSQL too): the read path, and 8 concurrent 64 MiB uploads (`--uploads`,
`--upload-mib`), interleaved.

The client shares the machine's cores with the servers (and PostgreSQL): ratios are
indicative; the machine's load is printed and ratios are refused under heavy outside load
unless --allow-load. Needs initdb/pg_ctl (PATH or /usr/lib/postgresql/*/bin).

    .venv/bin/python scripts/bench_scale.py --quick --allow-load              # a smoke run
    .venv/bin/python scripts/bench_scale.py --skip-scale --baseline /tmp/base # part 1, before/after
    .venv/bin/python scripts/bench_scale.py --skip-read-path --assets 10000000 --shared-buffers 2GB --keep
    .venv/bin/python scripts/bench_scale.py --skip-read-path --assets 10000000 --database-url postgresql://...
    .venv/bin/python scripts/bench_scale.py --skip-read-path --skip-scale --workers-compare
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import aiohttp  # noqa: E402
import asyncpg  # noqa: E402
import psutil  # noqa: E402
from benchlib import (  # noqa: E402
    MiB,
    add_load_option,
    check_load,
    curl_json,
    download_backup_url,
    interrupt_on_sigterm,
    watch_load,
    write_random_file,
)

from tests.servers import PostgresServer, free_port, wait_http_ready  # noqa: E402

CLOUD, KEY, SECRET = "bench", "111222333444555", "benchsecret"
BASIC = "Basic " + base64.b64encode(f"{KEY}:{SECRET}".encode()).decode()
WRK_LUA = """
done = function(summary, latency, requests)
  io.write(string.format("WRKJSON {\\"requests\\": %d, \\"duration_us\\": %d, \\"p50_us\\": %d, \\"non2xx\\": %d}\\n",
    summary.requests, summary.duration, latency:percentile(50), summary.errors.status))
end
"""


def log(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S', time.gmtime())} {message}", flush=True)


# --- servers ----------------------------------------------------------------------------------


class Serve:
    """`versionstore serve` from the code at `root`, on its own data directory and database."""

    def __init__(self, tmp: Path, name: str, metadata_url: str | None, *, root: Path = ROOT, workers: int = 1,
                 create_cloud: bool = True) -> None:
        self.name = name
        self.root = root
        self.create_cloud = create_cloud
        self.data = tmp / name.replace(" ", "_")
        self.env = {**os.environ, "PYTHONPATH": str(root), "VERSIONSTORE_VERIFY_INTERVAL": "0"}
        if metadata_url:
            self.env["VERSIONSTORE_METADATA_URL"] = metadata_url
        self.workers = workers
        self.port = free_port()
        self.log = open(tmp / f"{name.replace(' ', '_')}.log", "wb")  # noqa: SIM115
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Run from `root` (`python -m` puts the working directory first on the path: run from
        another checkout, a baseline server would run this checkout's code)."""
        cli = [sys.executable, "-m", "versionstore"]
        loaded = subprocess.run([sys.executable, "-c", "import versionstore; print(versionstore.__file__)"],
                                env=self.env, cwd=self.root, check=True, capture_output=True, text=True).stdout.strip()
        if not Path(loaded).resolve().is_relative_to(self.root.resolve()):
            raise RuntimeError(f"{self.name}: versionstore would be loaded from {loaded}, not from {self.root}")
        if self.create_cloud:
            subprocess.run([*cli, "cloud", "create", CLOUD, "--api-key", KEY, "--api-secret", SECRET, "--data-dir", str(self.data)],
                           env=self.env, cwd=self.root, check=True, capture_output=True)
        self.proc = subprocess.Popen([*cli, "serve", "--data-dir", str(self.data), "--port", str(self.port),
                                      "--workers", str(self.workers)],
                                     env=self.env, cwd=self.root, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        if not wait_http_ready(self.proc, f"{self.base}/healthz"):
            raise RuntimeError(f"{self.name} did not start; see {self.log.name}")

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api(self) -> str:
        return f"{self.base}/v1_1/{CLOUD}"

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=90)
        self.log.close()

    def cpu(self, pg: PostgresServer | None) -> tuple[float, float]:
        """CPU seconds so far of this server's processes, and of the PostgreSQL cluster when it
        uses one (only one server is driven at a time: the cluster's time is this server's)."""
        assert self.proc is not None
        database = 0.0
        if pg is not None and "VERSIONSTORE_METADATA_URL" in self.env:
            database = tree_cpu(int((pg.data / "postmaster.pid").read_text().split()[0]))
        return tree_cpu(self.proc.pid), database


def tree_cpu(pid: int) -> float:
    """User + system CPU seconds of a process and its live descendants."""
    total = 0.0
    root = psutil.Process(pid)
    for proc in [root, *root.children(recursive=True)]:
        try:
            times = proc.cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system
    return total


def start_all(servers: Sequence[Serve]) -> None:
    for serve in servers:
        serve.start()


def stop_all(servers: Sequence[Serve]) -> None:
    for serve in servers:
        try:
            serve.stop()
        except Exception as exc:  # keep stopping the others
            log(f"warning: stopping {serve.name}: {exc}")


# --- load generation ---------------------------------------------------------------------------


async def make_versions(serve: Serve, count: int) -> dict[str, str]:
    async with aiohttp.ClientSession(headers={"Authorization": BASIC}) as session:
        body: dict[str, Any] = {}
        for n in range(count):
            form = aiohttp.FormData()
            form.add_field("public_id", "bench/v10")
            form.add_field("backup", "true")
            form.add_field("file", f"version {n} {os.urandom(8).hex()}".encode(), filename="v.txt")
            async with session.post(f"{serve.api}/raw/upload", data=form) as resp:
                body = await resp.json()
                assert resp.status == 200, body
        return {"asset_id": body["asset_id"], "version_id": body["version_id"]}


async def hammer_aiohttp(url: str, seconds: float, concurrency: int, headers: dict[str, str]) -> dict[str, float]:
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
    return {"rps": len(latencies) / elapsed, "p50_ms": statistics.median(latencies) * 1000, "requests": len(latencies)}


async def small_uploads(serve: Serve, seconds: float, concurrency: int) -> dict[str, float]:
    """`concurrency` clients uploading 1 KiB of new bytes each time, to new public ids, for
    `seconds`: the write path's rate of metadata commits (`--small-uploads`)."""
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def worker(session: aiohttp.ClientSession, n: int) -> None:
        while time.perf_counter() < deadline:
            form = aiohttp.FormData()
            form.add_field("public_id", f"bench/small-{n}-{os.urandom(6).hex()}")
            form.add_field("file", os.urandom(1024), filename="s.bin")
            started = time.perf_counter()
            async with session.post(f"{serve.api}/raw/upload", data=form) as resp:
                body = await resp.read()
                if resp.status != 200:
                    raise RuntimeError(f"upload: {resp.status} {body[:300]!r}")
            latencies.append(time.perf_counter() - started)

    async with aiohttp.ClientSession(headers={"Authorization": BASIC}) as session:
        begun = time.perf_counter()
        await asyncio.gather(*(worker(session, n) for n in range(concurrency)))
        elapsed = time.perf_counter() - begun
    return {"rps": len(latencies) / elapsed, "p50_ms": statistics.median(latencies) * 1000, "requests": len(latencies)}


async def hammer_wrk(url: str, seconds: float, concurrency: int, headers: dict[str, str], lua: Path) -> dict[str, float]:
    argv = ["wrk", "-t", "1", "-c", str(concurrency), "-d", f"{max(1, round(seconds))}s", "--timeout", "5s", "-s", str(lua)]
    for key, value in headers.items():
        argv += ["-H", f"{key}: {value}"]
    proc = await asyncio.create_subprocess_exec(*argv, url, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    line = next((ln for ln in out.decode().splitlines() if ln.startswith("WRKJSON ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed (rc={proc.returncode}): {out.decode()}\n{err.decode()}")
    data = json.loads(line[len("WRKJSON "):])
    if data["non2xx"]:
        raise RuntimeError(f"wrk saw {data['non2xx']} non-2xx answers from {url}")
    return {"rps": data["requests"] / (data["duration_us"] / 1e6), "p50_ms": data["p50_us"] / 1000, "requests": data["requests"]}


Hammer = Callable[[str, float, int, dict[str, str]], Awaitable[dict[str, float]]]


def hammer_for(args: argparse.Namespace, tmp: Path) -> Hammer:
    if args.client == "aiohttp" or (args.client == "auto" and shutil.which("wrk") is None):
        log("client: aiohttp (in this process)")
        return hammer_aiohttp
    lua = tmp / "report.lua"
    lua.write_text(WRK_LUA)
    log("client: wrk, one thread")
    return lambda url, seconds, concurrency, headers: hammer_wrk(url, seconds, concurrency, headers, lua)


async def read_rounds(
    servers: Sequence[Serve], args: argparse.Namespace, hammer: Hammer, pg: PostgresServer
) -> dict[str, dict[str, float]]:
    """Interleaved rounds of both read cases on every server; {case: {server: median req/s}},
    and {case + " CPU": {server: median CPU µs per request}} (the server's processes and, on
    PostgreSQL, the cluster's): throughput under outside load says little, CPU per request
    says what a CPU-bound machine would do."""
    ids = {s.name: await make_versions(s, 10) for s in servers}
    cases: dict[str, Callable[[Serve, float], Awaitable[dict[str, float]]]] = {
        "versions=true": lambda s, seconds: hammer(
            f"{s.api}/resources/raw/upload/bench/v10?versions=true", seconds, args.concurrency, {"Authorization": BASIC}),
        "download_backup": lambda s, seconds: hammer(
            download_backup_url(s.api, ids[s.name]["asset_id"], ids[s.name]["version_id"], KEY, SECRET), seconds, args.concurrency, {}),
    }
    if args.small_uploads:
        cases["1 KiB uploads"] = lambda s, seconds: small_uploads(s, seconds, args.concurrency)
    for s in servers:  # warm up: connections, prepared statements, caches
        for case in cases.values():
            await case(s, 1)
    results: dict[str, dict[str, list[dict[str, float]]]] = {}
    for run in range(args.runs):
        for case_name, case in cases.items():
            for s in servers if run % 2 == 0 else servers[::-1]:  # whichever runs first tends to look costlier
                server, database = s.cpu(pg)
                figures = await case(s, args.seconds)
                server_after, database_after = s.cpu(pg)
                requests = max(1, figures["requests"])
                figures["db_cpu_us"] = (database_after - database) / requests * 1e6
                figures["cpu_us"] = (server_after - server) / requests * 1e6 + figures["db_cpu_us"]
                results.setdefault(case_name, {}).setdefault(s.name, []).append(figures)
                log(f"  run {run + 1} {case_name:>16} {s.name:>22}: {figures['rps']:7.0f} req/s  p50 {figures['p50_ms']:6.2f} ms  "
                    f"CPU {figures['cpu_us']:5.0f} µs/request (database {figures['db_cpu_us']:4.0f})")
    summary = {}
    for case, by in results.items():
        summary[case] = {name: statistics.median(r["rps"] for r in runs) for name, runs in by.items()}
        summary[f"{case} CPU"] = {name: statistics.median(r["cpu_us"] for r in runs) for name, runs in by.items()}
    return summary


def ratio_lines(summary: dict[str, dict[str, float]], pairs: Sequence[tuple[str, str]]) -> list[str]:
    """`top / bottom` of each pair for each case; for CPU per request the inverse (bottom's
    cost over top's), so every ratio reads as "top's throughput relative to bottom's"."""
    lines = []
    for case_name, rate in summary.items():
        cpu = case_name.endswith(" CPU")
        unit = "µs/request" if cpu else "MB/s" if "MiB uploads" in case_name else "req/s"
        for top, bottom in pairs:
            if top in rate and bottom in rate:
                ratio = rate[bottom] / rate[top] if cpu else rate[top] / rate[bottom]
                lines.append(f"{case_name}: {top} / {bottom} = {ratio:.2f} ({rate[top]:.0f} vs {rate[bottom]:.0f} {unit})")
    return lines


# --- part 1: the read path ---------------------------------------------------------------------


async def read_path(tmp: Path, pg: PostgresServer, args: argparse.Namespace, hammer: Hammer) -> tuple[dict[str, Any], list[str]]:
    roots = [("", ROOT)] + ([(" (baseline)", Path(args.baseline).resolve())] if args.baseline else [])
    servers = []
    for suffix, root in roots:
        servers.append(Serve(tmp, f"sqlite{suffix}", None, root=root))
        servers.append(Serve(tmp, f"postgresql{suffix}", pg.url(pg.new_database(migrated=False)), root=root))
    try:
        start_all(servers)
        summary = await read_rounds(servers, args, hammer, pg)
    finally:
        stop_all(servers)
    pairs = [("postgresql", "sqlite")]
    if args.baseline:
        pairs += [("postgresql (baseline)", "sqlite (baseline)"), ("postgresql", "postgresql (baseline)"),
                  ("sqlite", "sqlite (baseline)")]
    return summary, ratio_lines(summary, pairs)


# --- part 3: --workers 2 vs 1 ---------------------------------------------------------------------


async def upload_round(serve: Serve, files: list[Path], timeout: float) -> float:
    """Every file uploaded at once (curl, Basic auth, backup on); seconds until the last answered."""
    for path in files:  # new leading bytes: a new digest, so every round stores every byte
        with open(path, "r+b") as handle:
            handle.write(os.urandom(32))
    started = time.perf_counter()
    procs = [
        await asyncio.create_subprocess_exec(
            "curl", "-sS", "--max-time", str(timeout), "-u", f"{KEY}:{SECRET}", "-F", f"file=@{path};type=application/octet-stream",
            "-F", f"public_id=bench/upload-{n}", "-F", "backup=true", "-o", "-", "-w", "\n%{http_code}", f"{serve.api}/raw/upload",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        for n, path in enumerate(files)
    ]
    outcomes = [await proc.communicate() for proc in procs]
    elapsed = time.perf_counter() - started
    for proc, (out, err) in zip(procs, outcomes, strict=True):
        result, body = curl_json(subprocess.CompletedProcess([], proc.returncode or 0, out, err))
        if not result.get("backup"):
            raise RuntimeError(f"upload without backup: {body[:300]}")
    return elapsed


async def workers_compare(tmp: Path, pg: PostgresServer, args: argparse.Namespace, hammer: Hammer) -> tuple[dict[str, Any], list[str]]:
    servers = [Serve(tmp, "sqlite w1", None), Serve(tmp, "sqlite w2", None, workers=2)]
    if args.workers_pg:
        servers += [Serve(tmp, f"postgresql w{n}", pg.url(pg.new_database(migrated=False)), workers=n) for n in (1, 2)]
    files = [tmp / f"upload-{n}.bin" for n in range(args.uploads)]
    for path in files:
        write_random_file(path, args.upload_mib * MiB)
    try:
        start_all(servers)
        summary = await read_rounds(servers, args, hammer, pg)
        seconds: dict[str, list[float]] = {}
        for run in range(args.runs):
            for s in servers:
                elapsed = await upload_round(s, files, args.upload_timeout)
                seconds.setdefault(s.name, []).append(elapsed)
                log(f"  run {run + 1} {args.uploads} x {args.upload_mib} MiB uploads {s.name:>14}: {elapsed:6.2f} s "
                    f"({args.uploads * args.upload_mib * MiB / 1e6 / elapsed:6.1f} MB/s)")
    finally:
        stop_all(servers)
    key = f"{args.uploads} concurrent {args.upload_mib} MiB uploads"
    summary[key] = {name: args.uploads * args.upload_mib * MiB / 1e6 / statistics.median(t) for name, t in seconds.items()}
    pairs = [("sqlite w2", "sqlite w1"), ("postgresql w2", "postgresql w1")]
    return summary, ratio_lines(summary, pairs)


# --- part 2: at scale ----------------------------------------------------------------------------

#: The library, in the shape of bench_library_size.py's (which checks its rows against rows the
#: service wrote): asset g has 1 + g % 3 versions, the last one current; 5% deleted (with their
#: versions kept, as a delete with backup leaves them); 0-2 tags of 1,000 plus `xyz` on 0.5%;
#: `{"k": "v<g % 100>"}` on odd assets; folders `f<g / 100>/`; created over the year before
#: 2023-11-14 in row order. Hex ids and digests, JSON text written as json.dumps writes it.
_CURRENT = "g % 3"
GENERATE = [
    "INSERT INTO clouds (name, api_key, api_secret, auto_backup, created_at) VALUES ('scale', 'scalekey', 's', 1, 0)",
    f"""
    INSERT INTO assets (pk, cloud, asset_id, resource_type, type, public_id, status, digest, format, bytes, width, height,
                        version, version_id, original_filename, tags, context, metadata, created_at, uploaded_at,
                        deleted_at, generation, detached_from, md5)
    SELECT g, 'scale', md5('a' || g), 'image', 'upload', 'f' || (g / 100) || '/a' || g,
           CASE WHEN g % 20 = 7 THEN 'deleted' ELSE 'live' END,
           md5('d' || g || ':' || {_CURRENT}) || md5('D' || g || ':' || {_CURRENT}), 'jpg', 1000 + (g * 3 + {_CURRENT}) % 5000,
           NULL, NULL, (c + {_CURRENT} * 60)::bigint, md5('v' || g || ':' || {_CURRENT}), 'photo' || g,
           '[' || concat_ws(', ', CASE WHEN g % 3 >= 1 THEN '"tag' || (g * 7919) % 1000 || '"' END,
                                 CASE WHEN g % 3 = 2 THEN '"tag' || (g * 7919 + 104729) % 1000 || '"' END,
                                 CASE WHEN g % 200 = 3 THEN '"xyz"' END) || ']',
           CASE WHEN g % 2 = 1 THEN '{{"k": "v' || g % 100 || '"}}' ELSE '{{}}' END, '{{}}',
           c, c + {_CURRENT} * 60, CASE WHEN g % 20 = 7 THEN c + {_CURRENT} * 60 + 1 END,
           {_CURRENT} + CASE WHEN g % 20 = 7 THEN 1 ELSE 0 END, NULL, md5('m' || g || ':' || {_CURRENT})
    FROM (SELECT g, 1668384000 + 31536000.0 * g / {{n}} AS c FROM generate_series(1::bigint, {{n}}) AS g) AS s
    """,
    """
    INSERT INTO versions (cloud, asset_pk, version_id, version, digest, bytes, format, backed_up, restored_from, created_at,
                          backup_job, width, height, original_filename, md5)
    SELECT 'scale', g, md5('v' || g || ':' || v), (c + v * 60)::bigint, md5('d' || g || ':' || v) || md5('D' || g || ':' || v),
           1000 + (g * 3 + v) % 5000, 'jpg', 1, NULL, c + v * 60, NULL, NULL, NULL, 'photo' || g, md5('m' || g || ':' || v)
    FROM (SELECT g, 1668384000 + 31536000.0 * g / {n} AS c FROM generate_series(1::bigint, {n}) AS g) AS s
    CROSS JOIN LATERAL generate_series(0, g % 3) AS v
    ORDER BY g, v
    """,
    """
    INSERT INTO asset_tags (cloud, tag, asset_pk, created_at, live)
    SELECT 'scale', t, g, 1668384000 + 31536000.0 * g / {n}, CASE WHEN g % 20 = 7 THEN 0 ELSE 1 END
    FROM generate_series(1::bigint, {n}) AS g
    CROSS JOIN LATERAL (VALUES (CASE WHEN g % 3 >= 1 THEN 'tag' || (g * 7919) % 1000 END),
                               (CASE WHEN g % 3 = 2 THEN 'tag' || (g * 7919 + 104729) % 1000 END),
                               (CASE WHEN g % 200 = 3 THEN 'xyz' END)) AS tags (t)
    WHERE t IS NOT NULL
    """,
    "INSERT INTO asset_context (cloud, key, value, asset_pk) "
    "SELECT 'scale', 'k', 'v' || g % 100, g FROM generate_series(1::bigint, {n}) AS g WHERE g % 2 = 1",
    "SELECT setval(pg_get_serial_sequence('assets', 'pk'), {n} + 1, false)",
]
LIBRARY_TABLES = ["assets", "versions", "asset_tags", "asset_context"]


async def generate(conn: asyncpg.Connection, n: int) -> dict[str, float]:
    """The library, loaded with its secondary indexes and unique constraints dropped and then
    re-created from their own definitions (the end state is schema.sql's); seconds per step.
    One transaction that starts by truncating the tables: on a cluster with wal_level=minimal
    (main() starts it so) the rows and the index builds then skip the WAL."""
    steps: dict[str, float] = {}
    async with conn.transaction():
        await _load(conn, n, steps)
    await conn.execute("SET session_replication_role = DEFAULT")
    started = time.perf_counter()
    for table in LIBRARY_TABLES:
        log(f"   vacuum analyze {table}")
        await conn.execute(f"VACUUM (ANALYZE) {table}")  # what autovacuum does to a settled table
    steps["vacuum analyze"] = time.perf_counter() - started
    return steps


async def _load(conn: asyncpg.Connection, n: int, steps: dict[str, float]) -> None:
    await conn.execute(f"TRUNCATE {', '.join(LIBRARY_TABLES)} CASCADE")
    indexes = await conn.fetch(
        "SELECT i.indexrelid::regclass::text, pg_get_indexdef(i.indexrelid) FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid "
        "WHERE c.relname = ANY($1::text[]) AND NOT EXISTS (SELECT 1 FROM pg_constraint k WHERE k.conindid = i.indexrelid)",
        LIBRARY_TABLES,
    )
    # Unique and primary keys no foreign key depends on (the assets pk stays: rows come in its order).
    constraints = await conn.fetch(
        "SELECT k.conrelid::regclass::text, k.conname, pg_get_constraintdef(k.oid) FROM pg_constraint k "
        "JOIN pg_class c ON c.oid = k.conrelid WHERE c.relname = ANY($1::text[]) AND k.contype IN ('u', 'p') "
        "AND NOT EXISTS (SELECT 1 FROM pg_constraint f WHERE f.contype = 'f' AND f.conindid = k.conindid)",
        LIBRARY_TABLES,
    )
    await conn.execute("SET session_replication_role = replica")  # no foreign-key triggers during the load
    await conn.execute("SET maintenance_work_mem = '1GB'")
    for table, name, _ in constraints:
        await conn.execute(f'ALTER TABLE {table} DROP CONSTRAINT "{name}"')
    for name, _ in indexes:
        await conn.execute(f"DROP INDEX {name}")
    for statement in GENERATE:
        table = statement.split("INSERT INTO ", 1)[-1].split()[0] if "INSERT INTO" in statement else "setval"
        log(f"   {table}: loading")
        started = time.perf_counter()
        await conn.execute(statement.replace("{n}", str(n)))
        steps[table] = time.perf_counter() - started
        log(f"   {table}: {steps[table]:.0f} s")
    started = time.perf_counter()
    for table, name, definition in constraints:
        log(f"   constraint {name}")
        await conn.execute(f'ALTER TABLE {table} ADD CONSTRAINT "{name}" {definition}')
    for name, definition in indexes:
        log(f"   index {name}")
        await conn.execute(definition)
    steps["indexes"] = time.perf_counter() - started


class Recording:
    """A gateway that notes the statements sent through it (for EXPLAIN) and passes them on."""

    def __init__(self, gate: Any) -> None:
        self.gate = gate
        self.seen: list[tuple[str, list[Any]]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.gate, name)

    async def one(self, sql: str, args: Sequence[Any] = ()) -> Any:
        self.seen.append((sql, list(args)))
        return await self.gate.one(sql, args)

    async def all(self, sql: str, args: Sequence[Any] = ()) -> list[Any]:
        self.seen.append((sql, list(args)))
        return list(await self.gate.all(sql, args))

    async def scan(self, sql: str, args: Sequence[Any] = ()) -> list[Any]:
        self.seen.append((sql, list(args)))
        return list(await self.gate.scan(sql, args))


def hot_reads(n: int) -> dict[str, Callable[[Any, int], Awaitable[Any]]]:
    """The reads the service makes on its hot paths, as it makes them (i varies the asset)."""
    from versionstore import queries

    def asset(i: int) -> int:
        return (i * 7919) % n + 1

    def created(g: int) -> float:
        return 1668384000 + 31536000.0 * g / n

    def search(expression: str | Callable[[int], str], sort_by: object = None,
               after: Callable[[int], tuple[Any, ...]] | None = None) -> Callable[[Any, int], Awaitable[Any]]:
        async def call(meta: Any, i: int) -> Any:  # a search request: its page, then its count
            query = queries.search_query(expression(i) if callable(expression) else expression, sort_by, 50)
            found = await meta.find_assets("scale", query.page(51, after(i) if after else None))
            return found, await meta.count_assets("scale", query, queries.COUNT_CEILING + 1)

        return call

    def deleted_in_the_middle(i: int) -> tuple[Any, ...]:  # a deleted asset's (created_at, pk): a deep next_cursor
        g = middle - middle % 20 + 7 - 20 * i
        return created(g), g

    middle = n // 2
    deep = queries.listing_query("image", "upload", [], None, 500, by_public_id=False)
    return {
        "versions=true's read (the asset with its versions key)": lambda meta, i: meta.get_asset_keyed(
            "scale", "image", "upload", f"f{asset(i) // 100}/a{asset(i)}"),
        "versions of an asset (a versions=true cache miss)": lambda meta, i: meta.versions(asset(i)),
        "asset by name": lambda meta, i: meta.get_asset("scale", "image", "upload", f"f{asset(i) // 100}/a{asset(i)}"),
        "download_backup's read": lambda meta, i: meta.downloadable(
            "scale", _md5(f"a{asset(i)}"), _md5(f"v{asset(i)}:{asset(i) % 3}")),
        "search status=deleted, newest first": search("status=deleted", [{"created_at": "desc"}]),
        "search status=deleted, newest first, a deep keyset page": search(
            "status=deleted", [{"created_at": "desc"}], deleted_in_the_middle),
        "search tags=xyz": search("tags=xyz"),
        "search public_id prefix (a folder)": search(lambda i: f"public_id=f{asset(i) // 100}/*"),
        "listing, deep keyset page of 500": lambda meta, i: meta.find_assets(
            "scale", deep.page(501, (created(middle + i), middle + i))),
    }


def _md5(text: str) -> str:
    import hashlib

    return hashlib.md5(text.encode()).hexdigest()


async def at_scale(pg: PostgresServer | None, tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Part 2 on a new database of `args.assets` generated assets, or (`--database-url`) on one
    a previous `--keep` run left, as it is. With --keep the new database is not dropped."""
    from versionstore.metadata import MetadataStore
    from versionstore.pg import SERVER_SETTINGS, PgGateway

    name = None
    if args.database_url:
        url = args.database_url
    else:
        assert pg is not None
        name = pg.new_database(migrated=False)
        url = pg.url(name)
    gate = Recording(await PgGateway.open(url))
    meta = MetadataStore(gate)
    conn = await asyncpg.connect(url, server_settings=SERVER_SETTINGS)  # EXPLAIN plans as the service's connections do
    try:
        report: dict[str, Any] = {"assets": args.assets, "queries": {}}
        if name is not None:
            log(f"generating {args.assets:,} assets in {url}")
            started = time.perf_counter()
            steps = await generate(conn, args.assets)
            report["generate_seconds"] = total = time.perf_counter() - started
            report["steps"] = steps
            log(f"generated {args.assets:,} assets in {total:.0f} s ({', '.join(f'{k} {v:.0f} s' for k, v in steps.items())})")
        await check_library(meta, conn)
        for label, read in hot_reads(args.assets).items():
            report["queries"][label] = await measure_read(label, read, meta, gate, conn, args.samples)
        report["sizes"] = await sizes(conn, args.assets)
        if args.http_samples:
            report["http"] = await over_http(tmp, url, args.assets, args.http_samples)
        return report
    finally:
        await conn.close()
        await meta.close()
        if name is not None:
            if args.keep:
                log(f"kept the database: {url}")
            else:
                assert pg is not None
                pg.drop_database(name)


async def measure_read(label: str, read: Callable[[Any, int], Awaitable[Any]], meta: Any, gate: Recording,
                       conn: asyncpg.Connection, samples: int) -> dict[str, Any]:
    """p50/p99 of `read` through MetadataStore, the database's own execution time of the
    statements it sent, and their plans (EXPLAIN ANALYZE, BUFFERS) for the last call."""
    from versionstore.dialect import placeholders

    for i in range(20):  # warm: the connection's prepared statements, the pages touched
        await read(meta, i)
    times, calls = [], []
    for i in range(samples):
        gate.seen.clear()
        t = time.perf_counter()
        await read(meta, i)
        times.append((time.perf_counter() - t) * 1000)
        calls.append(list(gate.seen))
    # The database's own time per call (its statements' Execution Time), which the
    # client-side figure adds scheduling to on a busy machine.
    executed = []
    for call in calls[:: max(1, len(calls) // 40)]:
        total = 0.0
        for sql, sql_args in call:
            plan = await conn.fetch("EXPLAIN (ANALYZE, TIMING OFF) " + placeholders(sql), *sql_args)
            total += next(float(r[0].split()[2]) for r in plan if r[0].startswith("Execution Time"))
        executed.append(total)
    plans = []
    for sql, sql_args in gate.seen:
        plans.append([r[0] for r in await conn.fetch("EXPLAIN (ANALYZE, BUFFERS) " + placeholders(sql), *sql_args)])
    p50 = statistics.median(times)
    result = {"p50_ms": p50, "p99_ms": sorted(times)[int(len(times) * 0.99)], "executed_p50_ms": statistics.median(executed),
              "statements": [sql for sql, _ in gate.seen], "plans": plans}
    log(f"{label}: p50 {p50:.3f} ms, p99 {result['p99_ms']:.3f} ms through MetadataStore "
        f"({len(gate.seen)} statement(s)); in the database p50 {statistics.median(executed):.3f} ms")
    for (sql, _), plan in zip(gate.seen, plans, strict=True):
        log(f"    {sql}\n      " + "\n      ".join(plan))
    return result


async def over_http(tmp: Path, url: str, n: int, samples: int) -> dict[str, Any]:
    """p50 of `versions=true` and of `search status=deleted` (newest first, each page the next
    keyset page of the one before: `next_cursor`) over HTTP, one request at a time, against a
    `versionstore serve` on the generated database (the `scale` environment GENERATE made)."""
    serve = Serve(tmp, "serve at scale", url, create_cloud=False)
    serve.start()
    auth = "Basic " + base64.b64encode(b"scalekey:s").decode()
    api = f"{serve.base}/v1_1/scale"
    results: dict[str, Any] = {}
    try:
        async with aiohttp.ClientSession(headers={"Authorization": auth}) as session:

            async def versions(i: int) -> None:
                g = (i * 7919) % n + 1
                g += g % 20 == 7  # a live asset (every 20th, from the 7th, is deleted)
                async with session.get(f"{api}/resources/image/upload/f{g // 100}/a{g}?versions=true") as resp:
                    body = await resp.json()
                    assert resp.status == 200 and len(body["versions"]) == 1 + g % 3, (resp.status, body)

            cursor: list[str | None] = [None]

            async def search(i: int) -> None:
                query: dict[str, Any] = {"expression": "status=deleted", "sort_by": [{"created_at": "desc"}], "max_results": 50}
                if cursor[0]:
                    query["next_cursor"] = cursor[0]
                async with session.post(f"{api}/resources/search", json=query) as resp:
                    body = await resp.json()
                    assert resp.status == 200 and body["resources"], (resp.status, body)
                cursor[0] = body.get("next_cursor")  # after the last page: the first again

            for label, call in (("versions=true", versions), ("search status=deleted, next keyset page", search)):
                for i in range(20):
                    await call(i)
                times = []
                cpu = serve.cpu(None)[0]
                for i in range(samples):
                    t = time.perf_counter()
                    await call(20 + i)
                    times.append((time.perf_counter() - t) * 1000)
                cpu_ms = (serve.cpu(None)[0] - cpu) / samples * 1000  # less load-sensitive than the wall clock
                results[label] = {"p50_ms": statistics.median(times), "p99_ms": sorted(times)[int(len(times) * 0.99)],
                                  "serve_cpu_ms": cpu_ms}
                log(f"over HTTP, {label}: p50 {results[label]['p50_ms']:.2f} ms, p99 {results[label]['p99_ms']:.2f} ms "
                    f"({samples} requests one at a time; serve's CPU {cpu_ms:.2f} ms per request)")
    finally:
        serve.stop()
    return results


async def check_library(meta: Any, conn: asyncpg.Connection) -> None:
    """The generated rows read back through MetadataStore as rows the service wrote would."""
    from versionstore import queries

    g = 5  # three versions, two tags, a context entry
    asset = await meta.get_asset("scale", "image", "upload", f"f0/a{g}")
    versions = await meta.versions(g)
    assert asset is not None and asset.live and len(versions) == 3 and versions[-1].version_id == asset.version_id, (asset, versions)
    assert asset.tags and asset.context == {"k": f"v{g}"} and asset.digest == versions[-1].digest, asset
    side = await conn.fetch("SELECT tag, created_at, live FROM asset_tags WHERE asset_pk = $1 ORDER BY tag", g)
    assert [(r[0], r[1], r[2]) for r in side] == [(t, asset.created_at, 1) for t in sorted(asset.tags)], "asset_tags out of step"
    gone = await conn.fetchval("SELECT COUNT(*) FROM asset_tags t JOIN assets a ON a.pk = t.asset_pk "
                               "WHERE t.asset_pk < 20000 AND t.live <> CASE WHEN a.status = 'live' THEN 1 ELSE 0 END")
    assert gone == 0, "asset_tags.live out of step with the asset status"
    deleted = await meta.find_assets("scale", queries.search_query("status=deleted", None, 5).page(5, None))
    assert len(deleted) == 5 and all(not a.live and a.deleted_at for a in deleted)
    found = await meta.downloadable("scale", asset.asset_id, asset.version_id)
    assert found is not None and found.version.digest == asset.digest and not found.pending, found
    log(f"   generated rows read back through MetadataStore (asset f0/a{g}, its versions, tags, deleted, download)")


async def sizes(conn: asyncpg.Connection, n: int) -> dict[str, Any]:
    rows = await conn.fetch(
        "SELECT c.relname, c.reltuples::bigint, pg_table_size(c.oid), pg_indexes_size(c.oid) FROM pg_class c "
        "WHERE c.relname = ANY($1::text[]) ORDER BY c.relname", LIBRARY_TABLES,
    )
    per_asset = {r[0]: {"rows": r[1] / n, "table": r[2] / n, "indexes": r[3] / n} for r in rows}
    total = sum(v["table"] + v["indexes"] for v in per_asset.values())
    out = {"per_asset": per_asset, "bytes_per_asset": total, "projected_100m_gib": total * 100e6 / (1 << 30),
           "database_bytes": await conn.fetchval("SELECT pg_database_size(current_database())")}
    for table, v in per_asset.items():
        log(f"  {table:>14}: {v['rows']:.2f} rows, {v['table']:.0f} B table + {v['indexes']:.0f} B indexes per asset")
    log(f"bytes per asset: {total:.0f}; projected at 100M assets: {out['projected_100m_gib']:.0f} GiB (tables and indexes); "
        f"database now {out['database_bytes'] / (1 << 30):.1f} GiB")
    return out


# --- main ----------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="200k assets, 1 run of 2 s per case, 16 MiB uploads (a smoke check)")
    parser.add_argument("--assets", type=int, help="assets generated for part 2 (default 10M; --quick 200k)")
    parser.add_argument("--samples", type=int, default=200, help="calls per hot read in part 2")
    parser.add_argument("--runs", type=int, help="interleaved runs per case (default 3; --quick 1)")
    parser.add_argument("--seconds", type=float, help="seconds per run (default 10; --quick 2)")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--client", choices=("auto", "wrk", "aiohttp"), default="auto")
    parser.add_argument("--baseline", help="part 1: also serve from the checkout in this directory (before/after in one run)")
    parser.add_argument("--small-uploads", action="store_true",
                        help="part 1: also a case of concurrent 1 KiB uploads (the write path's commits; req/s = uploads/s)")
    parser.add_argument("--durable", action="store_true",
                        help="the cluster with fsync and synchronous_commit on (the tests' cluster has them off), "
                             "so commits cost what they cost in production")
    parser.add_argument("--skip-read-path", action="store_true")
    parser.add_argument("--skip-scale", action="store_true")
    parser.add_argument("--workers-compare", action="store_true", help="part 3: serve --workers 2 vs 1")
    parser.add_argument("--workers-pg", action="store_true", help="part 3 on PostgreSQL too")
    parser.add_argument("--uploads", type=int, default=8, help="part 3: concurrent uploads")
    parser.add_argument("--upload-mib", type=int, help="part 3: MiB per upload (default 64; --quick 16)")
    parser.add_argument("--upload-timeout", type=float, default=600)
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--nice", action="store_true",
                        help="start PostgreSQL under `nice -n 19 ionice -c3` (a long part 2 on a machine others use)")
    parser.add_argument("--shared-buffers", default="32MB", help="PostgreSQL's shared_buffers (default: the tests' 32MB)")
    parser.add_argument("--keep", action="store_true",
                        help="part 2: keep the generated database and leave the cluster running (its URL and how to stop it "
                             "are printed), for --database-url")
    parser.add_argument("--database-url", help="part 2 on this database (a --keep run's, generated with the same --assets): "
                                               "no generation; the cluster is not started unless part 1 or 3 runs")
    parser.add_argument("--http-samples", type=int, default=200,
                        help="part 2: requests per read over HTTP to a serve on the generated database (0: none)")
    add_load_option(parser)
    args = parser.parse_args()
    args.assets = args.assets or (200_000 if args.quick else 10_000_000)
    args.runs = args.runs or (1 if args.quick else 3)
    args.seconds = args.seconds or (2.0 if args.quick else 10.0)
    args.upload_mib = args.upload_mib or (16 if args.quick else 64)
    return args


def main() -> int:
    args = parse_args()
    interrupt_on_sigterm()  # `timeout` ends a run as Ctrl-C does: servers stopped, cluster too unless --keep
    watch_load()
    # wal_level=minimal: the generation's rows and index builds skip the WAL (see generate()).
    options = (f"-c shared_buffers={args.shared_buffers} -c wal_level=minimal -c max_wal_senders=0 "
               "-c max_wal_size=8GB -c checkpoint_timeout=1h")
    if args.durable:
        options += " -c fsync=on -c synchronous_commit=on -c full_page_writes=on"
    needs_cluster = not args.skip_read_path or args.workers_compare or (not args.skip_scale and not args.database_url)
    pg = PostgresServer(options=options, launcher=["nice", "-n", "19", "ionice", "-c3"] if args.nice else [])
    if not needs_cluster:
        shutil.rmtree(pg.root, ignore_errors=True)  # made by the constructor, never started
    results: dict[str, Any] = {}
    ratios: list[str] = []
    keep = False
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp_dir:
        tmp = Path(tmp_dir)
        try:
            if needs_cluster:
                pg.start()
                log(f"PostgreSQL cluster in {pg.data}, port {pg.port}")
            hammer = hammer_for(args, tmp)
            if not args.skip_read_path:
                results["read_path"], lines = asyncio.run(read_path(tmp, pg, args, hammer))
                ratios += lines
            if args.workers_compare:
                results["workers"], lines = asyncio.run(workers_compare(tmp, pg, args, hammer))
                ratios += lines
            if not args.skip_scale:
                keep = args.keep and not args.database_url
                results["at_scale"] = asyncio.run(at_scale(pg if needs_cluster else None, tmp, args))
        except KeyboardInterrupt:
            log("interrupted")
            raise
        finally:
            if keep:
                log(f"kept the cluster; stop it with: {' '.join(pg._run_as)} {pg.bin / 'pg_ctl'} -D {pg.data} -m fast stop "
                    f"&& rm -rf {pg.root}")
            elif needs_cluster:
                pg.stop()
    ok = check_load(args.allow_load)
    if ok:
        for line in ratios:
            log(line)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
