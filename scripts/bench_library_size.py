#!/usr/bin/env python3
"""Request cost against library size (issue 10, "Cost must not grow with the library").

For each size (assets in one environment) the script builds a library with rows as the
service writes them, serves it with `versionstore serve` and drives it over HTTP (aiohttp,
the wire the SDKs speak), one request at a time, while a second client polls `/healthz`
to catch event-loop stalls. It prints p50/p99 per request kind and the worst `/healthz`
latency seen while that kind ran, then a restart: time to the first `/healthz` answer and the
worst stall in the seconds after.

How the library is made (fast, and faithful):
1. `versionstore cloud create` migrates an empty data dir; the service then writes reference
   rows itself (a new asset, a re-upload, a tags update, a delete with backup).
2. Rows for N assets are generated in the same shape: 1-3 versions per asset (each with its
   own bytes, BLAKE3 and MD5 of those bytes), 5% deleted with backup (kept as reservations),
   0-2 tags from a vocabulary of 1,000 plus `xyz` on 0.5%, a context entry on half, folders
   of 100 assets. Before inserting, every generated row is checked against the service's
   rows: the same columns, and in each column only value types the service itself wrote
   (the script stops if not).
3. Bulk insert through the schema (sqlite3, indexes dropped during the load and re-created
   from their own DDL), and with `--blobs` (default) one file per version in the backup store
   and one per live asset in the primary store, at the keys the service uses.

    .venv/bin/python scripts/bench_library_size.py --quick                       # 10k, few requests
    .venv/bin/python scripts/bench_library_size.py --sizes 10000,100000,1000000  # the issue's table
    .venv/bin/python scripts/bench_library_size.py --sizes 100000 --no-blobs --gc-probe  # + slow collections, loop stalls

Everything runs on 127.0.0.1 on free ports in a temporary directory, removed on exit (`--keep`
keeps it). The machine's load is printed before and after: on a shared machine the figures
are indicative only.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import gc
import hashlib
import json
import os
import random
import re
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import blake3

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchlib.py sits next to this script
from benchlib import (
    Server,
    add_load_option,
    check_load,
    free_port,
    interrupt_on_sigterm,
    log,
    remove_temp_dir,
    stop_servers,
    watch_load,
    write_json,
)

CLOUD = "bench"
API_KEY = "benchkey"
API_SECRET = "benchsecret"
BASIC = {"Authorization": "Basic " + base64.b64encode(f"{API_KEY}:{API_SECRET}".encode()).decode()}
FOLDER_SIZE = 100
#: With --gc-probe the service also runs its stall log (VERSIONSTORE_STALL_LOG_MS) at the issue's limit.
STALL_LOG_MS = 50.0
TAGS = 1000
YEAR = 365 * 86400.0


def sign(params: dict[str, Any]) -> dict[str, Any]:
    """Cloudinary's upload signature (SHA-1 of the sorted parameters and the secret)."""
    params = {"timestamp": str(int(time.time())), **params}
    text = "&".join(f"{k}={v}" for k, v in sorted(params.items()) if k not in ("file", "api_key", "resource_type") and v != "")
    return {**params, "signature": hashlib.sha1((text + API_SECRET).encode()).hexdigest(), "api_key": API_KEY}


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] if ordered else float("nan")


# --- the library --------------------------------------------------------------------------------


def _content(asset: int, version: int) -> bytes:
    return f"asset {asset} version {version} ".encode() * 2


@dataclass
class Library:
    """Generated rows (as dicts keyed by column) for `size` assets."""

    size: int
    cloud: str
    assets: list[dict[str, Any]] = field(default_factory=list)
    versions: list[dict[str, Any]] = field(default_factory=list)
    tags: list[dict[str, Any]] = field(default_factory=list)
    context: list[dict[str, Any]] = field(default_factory=list)
    blobs: list[tuple[str, bytes, bool]] = field(default_factory=list)  # (digest, bytes, live original)
    tag_status: bool = True  # asset_tags has `live` (schema migration 19; False: code from before)

    def generate(self, first_pk: int, first_version_pk: int, rng: random.Random) -> None:
        start = time.time() - YEAR
        version_pk = first_version_pk
        for i in range(self.size):
            pk = first_pk + i
            created = start + YEAR * i / self.size
            deleted = i % 20 == 7
            count = 1 + i % 3
            current: dict[str, Any] = {}
            for v in range(count):
                data = _content(pk, v)
                made = created + v * 60.0
                current = {
                    "pk": version_pk, "cloud": self.cloud, "asset_pk": pk, "version_id": rng.randbytes(16).hex(),
                    "version": int(made), "digest": blake3.blake3(data).hexdigest(), "bytes": len(data), "format": "jpg",
                    "backed_up": 1, "restored_from": None, "created_at": made, "backup_job": None, "width": None,
                    "height": None, "original_filename": f"photo{pk}", "md5": hashlib.md5(data).hexdigest(),
                }
                self.versions.append(current)
                self.blobs.append((current["digest"], data, not deleted and v == count - 1))
                version_pk += 1
            tags = [f"tag{rng.randrange(TAGS)}" for _ in range(i % 3)] + (["xyz"] if i % 200 == 3 else [])
            tags = list(dict.fromkeys(tags))
            context = {"k": f"v{i % 100}"} if i % 2 else {}
            self.assets.append({
                "pk": pk, "cloud": self.cloud, "asset_id": rng.randbytes(16).hex(), "resource_type": "image",
                "type": "upload", "public_id": f"f{i // FOLDER_SIZE}/a{i}", "status": "deleted" if deleted else "live",
                "digest": current["digest"], "format": "jpg", "bytes": current["bytes"], "width": None, "height": None,
                "version": current["version"], "version_id": current["version_id"], "original_filename": f"photo{pk}",
                "tags": json.dumps(tags), "context": json.dumps(context), "metadata": "{}", "created_at": created,
                "uploaded_at": current["created_at"], "deleted_at": current["created_at"] + 1 if deleted else None,
                "generation": count - 1 + int(deleted), "detached_from": None, "md5": current["md5"],
            })
            status = {"live": int(not deleted)} if self.tag_status else {}
            self.tags.extend({"cloud": self.cloud, "tag": t, "asset_pk": pk, "created_at": created, **status} for t in tags)
            self.context.extend({"cloud": self.cloud, "key": k, "value": v, "asset_pk": pk} for k, v in context.items())


TABLES = {"assets": "assets", "versions": "versions", "tags": "asset_tags", "context": "asset_context"}


def _tables(db: sqlite3.Connection) -> dict[str, str]:
    """The tables to fill; without the side tables (code from before schema migration 9, for a
    before/after comparison) tags and context live in the asset rows only."""
    present = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    return {attr: table for attr, table in TABLES.items() if table in present}


def check_shapes(db: sqlite3.Connection, library: Library) -> None:
    """Every generated row has the columns of the table and, per column, only value types the
    service wrote in its own rows (None included only where the service wrote None)."""
    for attr, table in _tables(db).items():
        columns = [row[1] for row in db.execute(f"PRAGMA table_info({table})")]
        seen: dict[str, set[type]] = {c: set() for c in columns}
        for row in db.execute(f"SELECT {', '.join(columns)} FROM {table}"):
            for column, value in zip(columns, row, strict=True):
                seen[column].add(type(value))
        for row in getattr(library, attr)[:5000]:
            if sorted(row) != sorted(columns):
                raise SystemExit(f"{table}: generated columns {sorted(row)} != schema {sorted(columns)}")
            for column, value in row.items():
                if type(value) not in seen[column]:
                    raise SystemExit(f"{table}.{column}: generated {type(value).__name__}, the service wrote {seen[column]}")
    log("   generated rows match the service's own rows (columns and value types per column)")


def bulk_load(path: Path, library: Library) -> None:
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA synchronous = OFF")
    db.execute("PRAGMA journal_mode = OFF")  # a throwaway load: no WAL copy of every page (the service turns WAL back on)
    indexes = db.execute("SELECT name, sql FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL").fetchall()
    db.execute("BEGIN")
    for name, _ in indexes:
        db.execute(f"DROP INDEX {name}")
    for attr, table in _tables(db).items():
        rows = getattr(library, attr)
        if rows:
            columns = list(rows[0])
            db.executemany(
                f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})",
                [tuple(r[c] for c in columns) for r in rows],
            )
    for _, sql in indexes:
        db.execute(sql)
    db.execute("COMMIT")
    db.close()


def write_blobs(data_dir: Path, library: Library) -> None:
    """Each version's bytes in the backup store, each live asset's original in the primary."""
    made: set[Path] = set()
    for digest, data, live in library.blobs:
        fan = f"{digest[:2]}/{digest[2:4]}/{digest}"
        for root, wanted in ((data_dir / "backup" / CLOUD / "blobs", True), (data_dir / "primary" / CLOUD / "originals", live)):
            if not wanted:
                continue
            target = root / fan
            if target.parent not in made:
                target.parent.mkdir(parents=True, exist_ok=True)
                made.add(target.parent)
            target.write_bytes(data)


def settle() -> None:
    """Flush the setup's writes (the bulk load runs with `synchronous = OFF`; the blob files are
    gigabytes of dirty pages) before the service starts: measured while the kernel still writes
    them back, every fsync of a row and every read the service makes waits behind the setup's
    writeback, and the rows measure the setup instead of the library's size."""
    started = time.perf_counter()
    os.sync()
    log(f"   setup flushed to disk (sync) in {time.perf_counter() - started:.1f} s")


# --- driving it -----------------------------------------------------------------------------------


class Stalls:
    """Polls /healthz back to back; the worst latency since the last reset is a stall.

    This process's own garbage collections delay the poller as much as the service's would:
    `own_gc` is the worst of them since the reset (the script freezes the generated library
    once it is loaded, so they stay short; docs/performance.md, "This round: GC")."""

    def __init__(self, session: aiohttp.ClientSession, base: str) -> None:
        self.session, self.base, self.worst, self.own_gc = session, base, 0.0, 0.0
        self.task: asyncio.Task[None] | None = None
        self._gc_started = 0.0

    def _own_gc(self, phase: str, _info: dict[str, Any]) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
        else:
            self.own_gc = max(self.own_gc, time.perf_counter() - self._gc_started)

    async def _run(self) -> None:
        while True:
            started = time.perf_counter()
            async with self.session.get(f"{self.base}/healthz") as response:
                await response.read()
            self.worst = max(self.worst, time.perf_counter() - started)
            await asyncio.sleep(0.005)

    def __enter__(self) -> Stalls:
        self.worst = self.own_gc = 0.0
        gc.callbacks.append(self._own_gc)
        self.task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.task is not None
        self.task.cancel()
        gc.callbacks.remove(self._own_gc)


@dataclass
class Row:
    name: str
    key: str  # stable across sizes and runs (the name may hold a folder): the --json rows' id
    times: list[float] = field(default_factory=list)
    stall: float = 0.0
    own_gc: float = 0.0  # this script's worst garbage collection while the row ran (Stalls)
    note: str = ""
    #: With --gc-probe: the service's collections over the threshold while the row ran, as
    #: (generation, ms); None without the probe.
    collections: list[tuple[int, float]] | None = None
    #: With --gc-probe: the service's event-loop stalls over STALL_LOG_MS while the row ran, as
    #: (ms, the innermost frames the stall log caught); None without the probe.
    loop_stalls: list[tuple[float, str]] | None = None

    def record(self) -> dict[str, Any]:
        """The row in --json: p50/p99 and the worst /healthz in milliseconds, and every time;
        with --gc-probe the slow collections (worst, its generation, how many) and the loop stalls
        the service logged (how many, the worst, its innermost frame)."""
        record = {"key": self.key, "name": self.name, "p50_ms": percentile(self.times, 0.5) * 1000,
                  "p99_ms": percentile(self.times, 0.99) * 1000, "stall_ms": self.stall * 1000,
                  "client_gc_ms": self.own_gc * 1000, "note": self.note,
                  "times_ms": [t * 1000 for t in self.times]}
        if self.collections is not None:
            worst = max(self.collections, key=lambda c: c[1], default=None)
            record.update(gc_slow=len(self.collections), gc_worst_ms=worst[1] if worst else 0.0,
                          gc_worst_generation=worst[0] if worst else None)
        if self.loop_stalls is not None:
            slowest = max(self.loop_stalls, default=None)
            record.update(loop_stalls=len(self.loop_stalls), loop_stall_worst_ms=slowest[0] if slowest else 0.0,
                          loop_stall_worst_in=slowest[1] if slowest else None)
        return record

    def gc_text(self) -> str:
        if self.collections is None:
            return ""
        if not self.collections:
            return "  gc: none slow" + self.stall_text()
        generation, ms = max(self.collections, key=lambda c: c[1])
        return f"  gc: {len(self.collections)} slow, worst {ms:.1f} ms (generation {generation})" + self.stall_text()

    def stall_text(self) -> str:
        if not self.loop_stalls:
            return ""
        ms, where = max(self.loop_stalls)
        return f"; stall log: {len(self.loop_stalls)} over {STALL_LOG_MS:g} ms, worst {ms:.1f} ms in {where}"


class GcLog:
    """The service's slow collections (VERSIONSTORE_GC_LOG_MS, versionstore/gclog.py), read
    from its log: `mark()` before a row, `since(mark)` after it. The service logs each one
    just after it ends, from its event loop, so one at a row's very end may count for the next."""

    LINE = re.compile(rb"gc: generation (\d) collection took ([\d.]+) ms")
    #: The stall log's line (versionstore/stall_log.py) and the stack logged under it.
    STALL = re.compile(rb"stall: the event loop was blocked for ([\d.]+) ms(.*?)(?=\n\d{4}-\d\d-\d\d |\Z)", re.S)

    def __init__(self, path: Path) -> None:
        self.path = path

    def mark(self) -> int:
        return self.path.stat().st_size if self.path.exists() else 0

    async def since(self, mark: int) -> tuple[list[tuple[int, float]], list[tuple[float, str]]]:
        """The slow collections, as (generation, ms), and the loop stalls, as (ms, where)."""
        await asyncio.sleep(0.1)  # let the service log a collection or stall that ended with the last response
        with open(self.path, "rb") as log_file:
            log_file.seek(mark)
            text = log_file.read()
        return ([(int(m[1]), float(m[2])) for m in self.LINE.finditer(text)],
                [(float(m[1]), _innermost(m[2])) for m in self.STALL.finditer(text)])


def _innermost(stack: bytes) -> str:
    """The stall log's innermost frame, as `file:line function`; what the log said without a stack."""
    frames = re.findall(rb'File "([^"]+)", line (\d+), in (\S+)', stack)
    if not frames:
        used = re.search(rb"CPU meanwhile: [^\n]*?(?=; \d+ ms into it|\n|$)", stack)
        return f"(no stack: the watcher could not run; {used[0].decode() if used else 'the GIL was held or no CPU was free'})"
    path, line, function = frames[-1]
    return f"{path.decode().rsplit('/', 2)[-1]}:{line.decode()} {function.decode()}"


class Driver:
    def __init__(self, session: aiohttp.ClientSession, base: str, library: Library, requests: int, rng: random.Random,
                 gc_log: GcLog | None = None) -> None:
        self.session, self.base, self.library, self.requests, self.rng = session, base, library, requests, rng
        self.gc_log = gc_log
        self.live = [a for a in library.assets if a["status"] == "live"]
        self.rng.shuffle(self.live)
        self.elapsed = 0.0  # the last call's latency

    async def call(self, method: str, path: str, **kwargs: Any) -> Any:
        """One request; `self.elapsed` is its latency: from sending to the response's last byte.
        Decoding the JSON is the client's work and stays outside (a 500-item page is ~350 KB)."""
        started = time.perf_counter()
        async with self.session.request(method, f"{self.base}/v1_1/{CLOUD}/{path}", **kwargs) as response:
            raw = await response.read()
        self.elapsed = time.perf_counter() - started
        body = json.loads(raw)
        if response.status != 200:
            raise RuntimeError(f"{method} {path}: {response.status} {body}")
        return body

    async def timed(self, row: Row, make: Any, stalls: Stalls) -> None:
        for i in range(self.requests):
            await make(i)
            row.times.append(self.elapsed)
        row.stall, row.own_gc = stalls.worst, stalls.own_gc

    async def run(self, stalls: Stalls) -> list[Row]:
        rows: list[Row] = []
        upload_targets = self.live[: self.requests]
        destroy_targets = self.live[self.requests : 2 * self.requests]

        async def upload(i: int) -> None:
            form = aiohttp.FormData()
            for key, value in sign({"public_id": upload_targets[i]["public_id"], "overwrite": "true"}).items():
                form.add_field(key, value)
            form.add_field("file", os.urandom(2048), filename="new.jpg", content_type="image/jpeg")
            await self.call("POST", "image/upload", data=form)

        async def destroy(i: int) -> None:
            await self.call("POST", "image/destroy", data=sign({"public_id": destroy_targets[i]["public_id"]}))

        def search(body: dict[str, Any]) -> Any:
            return lambda i: self.call("POST", "resources/search", headers=BASIC, json=body)

        folder = f"f{self.library.size // FOLDER_SIZE // 2}/"
        kinds: list[tuple[str, str, Any]] = [
            ("upload", "upload: new version of an existing asset", upload),
            ("destroy", "destroy: live asset with backup", destroy),
            ("search_tags", "search tags=xyz", search({"expression": "tags=xyz"})),
            ("search_sorted", "search all live, sort_by created_at desc", search({"sort_by": [{"created_at": "desc"}]})),
            ("search_prefix", f"search public_id prefix ({folder}*)", search({"expression": f"public_id={folder}*"})),
            ("search_deleted", "search status=deleted, created_at desc",
             search({"expression": "status=deleted", "sort_by": [{"created_at": "desc"}]})),
            ("versions", "versions=true", lambda i: self.call(
                "GET", f"resources/image/upload/{self.live[-1 - i]['public_id']}", headers=BASIC, params={"versions": "true"})),
        ]
        for key, name, make in kinds:
            row = Row(name, key)
            mark = self.gc_log.mark() if self.gc_log else 0
            with stalls:
                await self.timed(row, make, stalls)
            if self.gc_log:
                row.collections, row.loop_stalls = await self.gc_log.since(mark)
            rows.append(row)
        mark = self.gc_log.mark() if self.gc_log else 0
        rows.append(await self.deep_listing(stalls))
        if self.gc_log:
            rows[-1].collections, rows[-1].loop_stalls = await self.gc_log.since(mark)
        return rows

    async def deep_listing(self, stalls: Stalls) -> Row:
        """Pages of 500 followed by cursor; the deep pages are those after the first few."""
        row = Row("listing, 500 per page, deep pages (keyset cursor)", "listing")
        pages = max(self.requests, min(200, self.library.size // 500))
        cursor = None
        times: list[float] = []
        with stalls:
            for _ in range(pages):
                params = {"max_results": "500", **({"next_cursor": cursor} if cursor else {})}
                body = await self.call("GET", "resources/image/upload", headers=BASIC, params=params)
                times.append(self.elapsed)
                cursor = body.get("next_cursor")
                if not cursor:
                    break
            row.stall, row.own_gc = stalls.worst, stalls.own_gc
        # The deep half of the pages actually fetched (a small library has fewer than `pages`).
        row.times = times[len(times) // 2:]
        row.note = f"pages {len(times) // 2 + 1}-{len(times)}"
        return row


async def restart_row(server: Server, watch: float, gc_log: GcLog | None = None) -> Row:
    """Time from start to the first /healthz answer, then the worst stall in `watch` seconds
    (with --gc-probe: and what the service logged of its collections and loop stalls)."""
    row = Row(f"restart: first /healthz, worst stall in {watch:.0f} s", "restart")
    server.stop()
    mark = gc_log.mark() if gc_log else 0
    started = time.perf_counter()
    server.start(timeout=600)
    row.times.append(time.perf_counter() - started)
    async with aiohttp.ClientSession() as session:
        stalls = Stalls(session, f"http://127.0.0.1:{server.port}")
        with stalls:
            await asyncio.sleep(watch)
        row.stall, row.own_gc = stalls.worst, stalls.own_gc
    if gc_log:
        row.collections, row.loop_stalls = await gc_log.since(mark)
    return row


# --- one size -----------------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.python = sys.executable
        self.root = Path(tempfile.mkdtemp(prefix="bench-libsize-"))
        self.servers: list[Server] = []
        self.failed = False

    def cli(self, data_dir: Path, *argv: str) -> None:
        subprocess.run([self.python, "-m", "versionstore", *argv, "--data-dir", str(data_dir)], check=True, stdout=subprocess.DEVNULL)

    def server(self, data_dir: Path) -> Server:
        port = free_port()
        gc_probe = {} if self.args.gc_probe is None else {
            "VERSIONSTORE_GC_LOG_MS": f"{self.args.gc_probe:g}", "VERSIONSTORE_STALL_LOG_MS": f"{STALL_LOG_MS:g}"}
        server = Server("versionstore", [self.python, "-m", "versionstore", "serve", "--data-dir", str(data_dir),
                                         "--host", "127.0.0.1", "--port", str(port)], port, self.root / "service.log",
                        env=gc_probe or None)
        self.servers.append(server)
        return server

    async def reference_rows(self, base: str) -> None:
        """Rows the service writes itself, for check_shapes (a new asset with tags and
        context, a re-upload, a tags update, a delete with backup)."""
        async with aiohttp.ClientSession() as session:
            for public_id, data in (("ref/a", b"one"), ("ref/a", b"two"), ("ref/b", b"three"), ("ref/c", b"four")):
                form = aiohttp.FormData()
                for key, value in sign({"public_id": public_id, "overwrite": "true", "tags": "t1,t2", "context": "k=v"}).items():
                    form.add_field(key, value)
                form.add_field("file", data, filename="x.jpg", content_type="image/jpeg")
                async with session.post(f"{base}/v1_1/{CLOUD}/image/upload", data=form) as response:
                    assert response.status == 200, await response.text()
            async with session.post(f"{base}/v1_1/{CLOUD}/resources/image/upload/ref/b", headers=BASIC, data={"tags": "t3"}) as r:
                assert r.status == 200, await r.text()
            async with session.post(f"{base}/v1_1/{CLOUD}/image/destroy", data=sign({"public_id": "ref/c"})) as response:
                assert response.status == 200, await response.text()

    async def one_size(self, size: int) -> list[Row]:
        data_dir = self.root / f"data-{size}"
        self.cli(data_dir, "cloud", "create", CLOUD, "--api-key", API_KEY, "--api-secret", API_SECRET)
        server = self.server(data_dir)
        server.start()
        await self.reference_rows(f"http://127.0.0.1:{server.port}")
        server.stop()
        path = data_dir / "metadata.sqlite3"
        db = sqlite3.connect(path)
        (digest,) = db.execute("SELECT digest FROM assets WHERE public_id = 'ref/a'").fetchone()
        for store in ("backup/bench/blobs", "primary/bench/originals"):  # write_blobs' keys are the service's
            assert (data_dir / store / digest[:2] / digest[2:4] / digest).is_file(), (store, digest)
        first_pk = db.execute("SELECT MAX(pk) FROM assets").fetchone()[0] + 1
        first_version = db.execute("SELECT MAX(pk) FROM versions").fetchone()[0] + 1
        started = time.perf_counter()
        library = Library(size, CLOUD, tag_status="live" in [row[1] for row in db.execute("PRAGMA table_info(asset_tags)")])
        library.generate(first_pk, first_version, random.Random(size))
        check_shapes(db, library)
        db.close()
        bulk_load(path, library)
        log(f"   {size:,} assets, {len(library.versions):,} versions, {len(library.tags):,} tags loaded "
            f"in {time.perf_counter() - started:.1f} s")
        gc.collect()
        gc.freeze()  # the library's millions of dicts: out of this process's collections (Stalls.own_gc)
        blobs = size in self.args.blob_sizes
        if blobs:
            started = time.perf_counter()
            write_blobs(data_dir, library)
            log(f"   {len(library.blobs):,} blob files written in {time.perf_counter() - started:.1f} s")
        settle()
        server.start(timeout=600)
        base = f"http://127.0.0.1:{server.port}"
        async with aiohttp.ClientSession() as session:
            gc_log = GcLog(self.root / "service.log") if self.args.gc_probe is not None else None
            driver = Driver(session, base, library, self.args.requests, random.Random(size + 1), gc_log)
            gc.freeze()  # and the driver's lists of those rows
            rows = await driver.run(Stalls(session, base))
        if blobs:
            rows.append(await restart_row(server, self.args.watch, gc_log))
        server.stop()
        gc.unfreeze()
        return rows

    async def main(self) -> None:
        log(f"load average before: {os.getloadavg()}  (cores: {os.cpu_count()})")
        results: dict[int, list[Row]] = {}
        errors: dict[int, str] = {}
        try:
            for size in self.args.sizes:
                log(f"== {size:,} assets" + (" (with blob files)" if size in self.args.blob_sizes else " (no blob files)"))
                try:
                    results[size] = await self.one_size(size)
                except Exception as exc:  # the other sizes still run; the size is reported as failed
                    errors[size] = f"{type(exc).__name__}: {exc}"
                    log(f"   FAILED: {errors[size]}")
                    stop_servers(self.servers)
                    continue
                for row in results[size]:
                    log(f"   {row.name:55} p50 {percentile(row.times, 0.5) * 1000:8.1f} ms  p99 "
                        f"{percentile(row.times, 0.99) * 1000:8.1f} ms  worst /healthz {row.stall * 1000:7.1f} ms "
                        f"(client gc {row.own_gc * 1000:.0f} ms) {row.note}"
                        f"{row.gc_text()}")
        finally:
            stop_servers(self.servers)
            remove_temp_dir(self.root, self.args.keep)
        log(f"load average after: {os.getloadavg()}")
        self.failed = bool(errors)
        write_json(self.args.json, {"args": vars(self.args), "errors": errors,
                                    "sizes": {str(size): [row.record() for row in rows] for size, rows in results.items()}})
        if not check_load(self.args.allow_load):  # latencies beside heavy outside load mean nothing
            self.failed = True
            return
        if results:
            self.table(results)

    def table(self, results: dict[int, list[Row]]) -> None:
        sizes = list(results)
        log("\n| p50 (p99) ms; worst /healthz ms | " + " | ".join(f"{s:,} assets" for s in sizes) + " |")
        log("|---|" + "---|" * len(sizes))
        names: dict[str, str] = {}  # by key, in order; the restart row only where a size had blob files
        for rows in results.values():
            names.update((row.key, names.get(row.key, row.name)) for row in rows)
        for key, name in names.items():
            cells = []
            for size in sizes:
                r = next((row for row in results[size] if row.key == key), None)
                cells.append("-" if r is None else
                             f"{percentile(r.times, 0.5) * 1000:.1f} ({percentile(r.times, 0.99) * 1000:.1f}); {r.stall * 1000:.0f}")
            name = "restart: ms to first /healthz; worst stall" if key == "restart" else name
            log(f"| {name} | " + " | ".join(cells) + " |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default=None, help="comma-separated asset counts (default 10000,100000,1000000; quick: 10000)")
    parser.add_argument("--quick", action="store_true", help="10k assets, 10 requests per kind, 5 s restart watch")
    parser.add_argument("--requests", type=int, default=None, help="sequential requests per kind (default 50; quick 10)")
    parser.add_argument("--watch", type=float, default=None, help="seconds of /healthz polling after a restart (default 30)")
    parser.add_argument("--no-blobs", dest="blobs", action="store_false", help="no blob files (and no restart row)")
    parser.add_argument("--blob-sizes", default=None, metavar="N[,M...]",
                        help="write blob files (and measure the restart) at these sizes only (default: every size; "
                             "e.g. --sizes 10000,100000,1000000 --blob-sizes 1000000)")
    parser.add_argument("--json", help="also write the raw results (per size, per row: p50/p99/worst /healthz ms) to this file")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--gc-probe", type=float, nargs="?", const=20.0, default=None, metavar="MS",
                        help="run the service with VERSIONSTORE_GC_LOG_MS=MS (default 20) and report, per row, its "
                             "collections over MS: how many, the worst and its generation (docs/operations.md); "
                             f"also its event-loop stalls over {STALL_LOG_MS:g} ms with where the loop was (VERSIONSTORE_STALL_LOG_MS)")
    add_load_option(parser)
    args = parser.parse_args(argv)
    args.sizes = [int(s) for s in (args.sizes or ("10000" if args.quick else "10000,100000,1000000")).split(",")]
    args.blob_sizes = [] if not args.blobs else args.sizes if args.blob_sizes is None else [int(s) for s in args.blob_sizes.split(",")]
    if not set(args.blob_sizes) <= set(args.sizes):
        parser.error("--blob-sizes: each must be one of --sizes")
    args.requests = args.requests or (10 if args.quick else 50)
    args.watch = args.watch if args.watch is not None else (5.0 if args.quick else 30.0)
    interrupt_on_sigterm()
    watch_load()
    bench = Bench(args)
    asyncio.run(bench.main())
    return 1 if bench.failed else 0


if __name__ == "__main__":
    sys.exit(main())
