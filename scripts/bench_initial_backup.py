#!/usr/bin/env python3
"""Initial-backup benchmark: our initial backup versus restic and `cp -r`, side by side in one run.

The script generates a synthetic media library at run time (default 2,000 files of random
bytes, about 10 GiB: 70 % images of 50 KiB-2 MiB, 25 % large images of 2-20 MiB, 5 % videos of
20-100 MiB, sizes log-uniform in each band, fixed seed) and measures, in this order:

1. `cp -r LIB COPY && sync`: a plain copy on the same disk, flushed (first run only).
2. `restic backup LIB` to a local repository made by `restic init` in the temp dir (restic's
   defaults; each first run into a new repository, the re-runs on the last one, like a user would).
3. The server job: the library is first loaded into a versionstore environment with automatic
   backup off (concurrent `curl -F ... -F backup=false` uploads: setup, reported, not timed);
   then automatic backup is turned on (`versionstore cloud set demo --auto-backup on`, applied
   to the running server) and `POST operations/initial_backup` is timed until
   `GET operations/initial_backup/<id>` says `completed`.
4. Script source mode: `versionstore initial-backup --source LIB` (the batch client) against a
   second server with automatic backup on and an empty environment (fresh data dir).
5. The floor (first run only; --skip-floor skips it): `scripts/batch_floor.py --source LIB`, a
   plain pipeline doing per file only what a Cloudinary-compatible backup must (below), at the
   batch client's concurrency. "script vs floor" is the script's first-run time over the
   floor's. Not a lower bound: versionstore's server writes large bodies with O_DIRECT and
   spends less CPU per byte than the floor's.

Then the re-runs: every tool again with nothing changed, then 5 % of the files (about 5 % of
the bytes) get new random bytes (same sizes) and every tool runs again (restic and the script
re-read LIB with the same repository / state file; for the server job the changed files are
first uploaded with `backup=false`, as setup). `sync; echo 3 > /proc/sys/vm/drop_caches` runs before every timed
run when it is writable (root), so each starts from a cold page cache; the report says when
that was not possible.

Throughput is always library bytes / wall time (MB = 10^6 bytes), also for the re-runs, so
the re-run rows read as "how fast a whole library is checked". Ratios compare throughputs:
"vs restic" is against restic's run of the same kind, "vs cp" against cp's (first) run.
The first runs of `cp -r`, restic and the script are repeated (--first-runs, default 3, each
from an empty repository / environment, the tools interleaved so drift lands on all of them) and
their medians are compared: restic's first run alone varied by 15 % between runs on one quiet
machine. The server job, the floor and the re-runs run once. The "others" column is the share
of the machine's CPU capacity used during the run by anything but the measured tool and
server (other processes, kernel writeback, steal); on a shared VM, --quiet-wait waits before
each timed run for the machine to go idle, and the summary warns about runs that were not.

Read the ratios with what each tool does to the bytes:
- the server job with local stores on one filesystem hard-links each current original from
  the primary store into the backup store (docs/design.md: bytes are written once), so it
  reads and writes no file contents: its time is metadata (one SQLite transaction with
  `synchronous=FULL` per asset, a link, a chmod and a directory fsync);
- script source mode lists the assets by public_id, and uploads every byte of a new file over
  HTTP with sendfile (the client hashes a file only when the server has the asset; the
  server's digest of a new one is recorded): the server spools, MD5- and BLAKE3-hashes and
  fsyncs each file, links it into the primary and backup stores (a directory fsync each) and
  commits its metadata. Its timeline (uploads in flight, sending vs waiting for the answer)
  is printed under its runs;
- restic reads, chunks (content-defined), SHA-256-hashes, compresses (repository v2 default
  `--compression auto`) and encrypts everything, and writes pack files, fsyncing each pack
  file and its directory, not each source file;
- `cp -r` copies the bytes and one `sync` flushes them at the end (no per-file fsync);
- the floor sends every byte over HTTP with sendfile, as multipart/form-data like the script;
  its bare aiohttp server streams the part through one worker thread per upload that MD5-
  (the etag) and BLAKE3-hashes and writes it, then fdatasyncs the file, renames it to its
  BLAKE3 name and fsyncs the directory. No metadata, no second store, no lookups: what is left
  is receiving, hashing and durably naming the bytes. Its wall time runs from listing LIB to
  the last answer (no interpreter or server start-up; the script's includes its start-up).

    .venv/bin/python scripts/bench_initial_backup.py                 # full: 2,000 files, ~10 GiB
    .venv/bin/python scripts/bench_initial_backup.py --scale 0.05    # 100 files, ~0.5 GiB
    .venv/bin/python scripts/bench_initial_backup.py --files 300 --skip-restic --keep
    .venv/bin/python scripts/bench_initial_backup.py --quiet-wait 300 --json out.json   # on a shared VM

Requires curl; restic for its column (`apt-get update && apt-get install -y restic`; without
it, or with --skip-restic, that column and its targets are skipped). Everything lives in one
temp dir (library, copy, restic repository, both data dirs), on the disk of --tmp-dir, and is
removed on exit unless --keep. Needs about 5.5x the library size free on that disk (4.5x with --skip-floor).
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import blake3
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchlib.py sits next to this script, whatever the cwd
from benchlib import (
    MiB,
    Server,
    add_load_option,
    check_load,
    children_cpu,
    curl_json,
    free_port,
    interrupt_on_sigterm,
    log,
    machine_busy,
    remove_temp_dir,
    run_bench,
    stop_servers,
    write_json,
)

CLOUD = "demo"
API_KEY = "key123"
API_SECRET = "secret456"
BASIC = "Basic " + base64.b64encode(f"{API_KEY}:{API_SECRET}".encode()).decode()
KiB = 1 << 10
GiB = 1 << 30
RESTIC_PASSWORD = "bench-initial-backup"

DEFAULT_FILES = 2000
# (share of files, folder, extension, resource type, smallest, largest): sizes log-uniform in the band.
MIX = (
    (0.70, "photos", "jpg", "image", 50 * KiB, 2 * MiB),
    (0.25, "large", "png", "image", 2 * MiB, 20 * MiB),
    (0.05, "videos", "mp4", "video", 20 * MiB, 100 * MiB),
)
SUBFOLDERS = 16
CHANGED_SHARE = 0.05
NOISY = 0.15  # warn when other work used more than this share of the CPUs during a timed run
QUIET = 0.10  # --quiet-wait: a machine this busy (share of the CPUs) counts as quiet

TARGETS = {
    "first_vs_restic": 2.0,  # first run >= 2x restic's throughput
    "first_vs_cp_stretch": 0.9,  # stretch: >= 0.9x cp -r
    "rerun_vs_restic": 1.0,  # unchanged and 5 %-changed runs no slower than restic's
}

#: Printed under the targets: what each tool does to the bytes, so the ratios are read honestly.
READING = (
    "Read the ratios with what each tool does to the bytes:",
    "- server job: local stores on one filesystem, so it hard-links each current original from the primary store into the",
    "  backup store (docs/design.md: bytes are written once). No byte is read or copied; per asset it costs a link, a chmod,",
    "  a directory fsync and one SQLite commit (synchronous=FULL). With a backup target on another filesystem or in a bucket",
    "  it would copy every byte.",
    "- script --source: lists the assets, sends every byte of a new file over HTTP with sendfile (hashed by the client only",
    "  when the server has the asset); the server spools, hashes and fsyncs each file, links it into the primary and backup",
    "  stores (a directory fsync each) and commits.",
    "- restic: reads, chunks, SHA-256-hashes, compresses (default: auto) and encrypts every byte; fsyncs each pack file and its",
    "  directory, not each source file.",
    "- cp -r: copies the bytes, no fsync per file; one sync(1) at the end is included in its time.",
    "- floor (scripts/batch_floor.py): sends every byte over HTTP with sendfile like the script; a bare aiohttp server, one",
    "  worker thread per upload, MD5- and BLAKE3-hashes and writes it, fdatasyncs the file, renames it to its BLAKE3 name and",
    "  fsyncs the directory. No metadata, second store or lookups; buffered writes (not a lower bound). Its time excludes",
    "  start-up; script vs floor = the script's time / the floor's.",
)

TOOLS = ("cp", "restic", "job", "script", "floor")
TOOL_NAMES = {"cp": "cp -r + sync", "restic": "restic backup", "job": "server job", "script": "script --source",
              "floor": "floor"}
FLOOR = Path(__file__).resolve().parent / "batch_floor.py"
RUNS = ("first", "unchanged", "changed")
RUN_NAMES = {"first": "first", "unchanged": "unchanged", "changed": "5% changed"}


# --- small helpers (log, free_port, Server, CPU accounting, ...: benchlib.py) -------------------


def drop_caches() -> str | None:
    """Flush dirty pages and drop the page cache; None when done, else why not."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as handle:
            handle.write("3\n")
    except OSError as exc:
        return f"{type(exc).__name__}: {exc.strerror or exc}"
    return None


def upload_timeline(path: Path) -> dict[str, Any] | None:
    """The batch client's uploads (its VERSIONSTORE_INITIAL_BACKUP_TIMELINE file): how many were
    in flight for what share of the time, and per size band how long sending took and how long the
    answer took after the last byte (the server finishing: hashing, fsyncs, links, commit)."""
    try:
        uploads = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        return None
    if not uploads:
        return None
    events = sorted([(u["start"], 1) for u in uploads] + [(u["end"], -1) for u in uploads])
    shares: dict[int, float] = {}
    level, last = 0, events[0][0]
    for moment, step in events:
        shares[level] = shares.get(level, 0.0) + moment - last
        level, last = level + step, moment
    span = max(last - events[0][0], 1e-9)
    bands: dict[str, dict[str, Any]] = {}
    for band, small in (("< 2 MiB", True), (">= 2 MiB", False)):
        group = [u for u in uploads if (u["bytes"] < 2 * MiB) == small and u.get("sent") is not None]
        if group:
            bands[band] = {"uploads": len(group),
                           "send_ms": round(1000 * sum(u["sent"] - u["start"] for u in group) / len(group), 1),
                           "answer_wait_ms": round(1000 * sum(u["end"] - u["sent"] for u in group) / len(group), 1)}
    in_flight = ", ".join(f"{k}: {v / span:.0%}" for k, v in sorted(shares.items()) if v / span >= 0.005)
    return {"uploads": len(uploads), "span_s": round(span, 3), "in_flight": in_flight, "bands": bands}


def fmt_bytes(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / MiB:.1f} MiB" if n >= MiB else f"{n / KiB:.0f} KiB"


@dataclass(frozen=True)
class LibFile:
    relative: str
    size: int
    resource_type: str

    @property
    def public_id(self) -> str:
        # Cloudinary's convention (and the batch client's): image and video IDs have no extension.
        return self.relative.rsplit(".", 1)[0]


@dataclass
class Measurement:
    seconds: float
    tool_cpu: float | None = None  # the tool's own processes (cp + sync, restic, the client)
    server_cpu: float | None = None  # the versionstore server, for the job and script columns
    cold: bool = False
    note: str = ""
    others: float | None = None  # share of the machine's CPU capacity used by anything but the measured processes
    load: float | None = None  # 1-minute load average when the run started


@dataclass
class Results:
    library_bytes: int = 0
    library_files: int = 0
    changed_files: int = 0
    changed_bytes: int = 0
    setup: dict[str, float] = field(default_factory=dict)
    runs: dict[str, dict[str, Measurement]] = field(default_factory=dict)  # the median of each run's samples
    samples: dict[str, dict[str, list[Measurement]]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    timelines: dict[str, dict[str, Any]] = field(default_factory=dict)  # the batch client's uploads, per run
    cold_cache: str | None = None  # None when dropping caches works, else why not

    def add(self, tool: str, run: str, m: Measurement) -> None:
        """One more sample of (tool, run); the run's figure is the median sample (the lower of the
        two middle ones for an even count: a measured run, not an average of two)."""
        samples = self.samples.setdefault(tool, {}).setdefault(run, [])
        samples.append(m)
        middle = statistics.median_low(x.seconds for x in samples)
        self.runs.setdefault(tool, {})[run] = next(x for x in samples if x.seconds == middle)

    def spread(self, tool: str, run: str) -> str:
        """'median of 3 (5.91-6.40 s)', or '' for a run measured once."""
        samples = self.samples.get(tool, {}).get(run, [])
        if len(samples) < 2:
            return ""
        seconds = sorted(x.seconds for x in samples)
        return f"median of {len(samples)} ({seconds[0]:.2f}-{seconds[-1]:.2f} s)"


@dataclass
class Start:
    """What a timed run starts from: cache state, the machine's busy CPU and its load."""

    cold: bool
    busy: float = field(default_factory=machine_busy)
    load: float = field(default_factory=lambda: os.getloadavg()[0])
    wall: float = field(default_factory=time.perf_counter)

    def measurement(self, tool_cpu: float | None = None, server_cpu: float | None = None, note: str = "") -> Measurement:
        elapsed = time.perf_counter() - self.wall
        ours = (tool_cpu or 0.0) + (server_cpu or 0.0)
        others = max(0.0, machine_busy() - self.busy - ours) / ((os.cpu_count() or 1) * elapsed)
        return Measurement(elapsed, tool_cpu=tool_cpu, server_cpu=server_cpu, cold=self.cold, note=note, others=others,
                           load=self.load)


# --- the benchmark ----------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.root = Path(tempfile.mkdtemp(prefix="versionstore-bench-ib-", dir=args.tmp_dir))
        self.lib = self.root / "library"
        self.python = sys.executable
        self.results = Results()
        self.servers: list[Server] = []
        self.files: list[LibFile] = []
        self.versions: dict[str, str] = {"versionstore": "?", "restic": "?"}
        self.changed: list[LibFile] = []
        self.job_server: Server | None = None
        self.job_data = self.root / "data-job"
        self.script_server: Server | None = None
        self.script_data = self.root / "data-script"
        self.floor_data = self.root / "data-floor"
        self.restic_repo = self.root / "restic-repo"
        self.state_file = self.root / "initial-backup-state.jsonl"
        self.restic_env = dict(os.environ, RESTIC_PASSWORD=RESTIC_PASSWORD, RESTIC_CACHE_DIR=str(self.root / "restic-cache"))

    # -- lifecycle --

    def cleanup(self) -> None:
        stop_servers(self.servers)
        remove_temp_dir(self.root, self.args.keep)

    def cli(self, *argv: str, data_dir: Path) -> str:
        out = subprocess.run([self.python, "-m", "versionstore", *argv, "--data-dir", str(data_dir)],
                             check=True, capture_output=True, text=True)
        return out.stdout

    def start_server(self, name: str, data_dir: Path, auto_backup: bool) -> Server:
        self.cli("cloud", "create", CLOUD, "--api-key", API_KEY, "--api-secret", API_SECRET,
                 "--auto-backup", "on" if auto_backup else "off", data_dir=data_dir)
        port = free_port()
        server = Server(name, [self.python, "-m", "versionstore", "serve", "--data-dir", str(data_dir),
                               "--host", "127.0.0.1", "--port", str(port), "--workers", str(self.args.server_workers)],
                        port, self.root / f"{name}.log",
                        stop_timeout=30.0)
        self.servers.append(server)
        server.start()
        return server

    @staticmethod
    def base(server: Server) -> str:
        return f"http://127.0.0.1:{server.port}/v1_1/{CLOUD}"

    def wait_quiet(self) -> None:
        """With --quiet-wait: wait (up to that long) for a 2 s window in which the machine is
        mostly idle, so other work on a shared VM does not land on a measured run."""
        if self.args.quiet_wait <= 0:
            return
        capacity = os.cpu_count() or 1
        deadline = time.monotonic() + self.args.quiet_wait
        started = time.monotonic()
        while True:
            busy0 = machine_busy()
            time.sleep(2.0)
            share = (machine_busy() - busy0) / (2.0 * capacity)
            if share < QUIET or time.monotonic() >= deadline:
                break
        waited = time.monotonic() - started
        if waited > 2.5 or share >= QUIET:
            log(f"  (waited {waited:.0f}s for a quiet machine: {share:.0%} of the CPUs busy just before this run)")

    def start(self) -> Start:
        """Right before a timed run: a cold page cache when possible (always flushes dirty pages)."""
        self.wait_quiet()
        if self.args.warm:
            os.sync()
            return Start(cold=False)
        why = drop_caches()
        if why is not None and self.results.cold_cache is None:
            self.results.cold_cache = why
            log(f"  note: cannot drop the page cache ({why}); runs start with a warm cache")
        return Start(cold=why is None)

    # -- the library --

    def plan_library(self) -> None:
        rng = random.Random(self.args.seed)
        n = self.args.files
        counts = [round(n * share) for share, *_ in MIX[:-1]]
        counts.append(max(0, n - sum(counts)))
        files: list[LibFile] = []
        for count, (_, folder, ext, rtype, low, high) in zip(counts, MIX, strict=True):
            for i in range(count):
                size = int(math.exp(rng.uniform(math.log(low), math.log(high))))
                files.append(LibFile(f"{folder}/{i % SUBFOLDERS:02d}/{folder[:-1]}-{i:05d}.{ext}", size, rtype))
        self.files = files
        self.results.library_files = len(files)
        self.results.library_bytes = sum(f.size for f in files)

    def write_file(self, f: LibFile, generation: int) -> None:
        """Random-looking, incompressible bytes (BLAKE3 XOF of seed, path and generation): fast
        to make and unique per file and generation, so nothing dedups."""
        path = self.lib / f.relative
        path.parent.mkdir(parents=True, exist_ok=True)
        xof = blake3.blake3(f"{self.args.seed}:{f.relative}:{generation}".encode())
        block = 8 * MiB
        with open(path, "wb") as handle:
            for offset in range(0, f.size, block):
                handle.write(xof.digest(length=min(block, f.size - offset), seek=offset))

    def make_library(self) -> None:
        r = self.results
        log(f"generating the library: {r.library_files} files, {fmt_bytes(r.library_bytes)} in {self.lib} ...")
        started = time.perf_counter()
        for f in self.files:
            self.write_file(f, 0)
        os.sync()
        r.setup["generate_library"] = time.perf_counter() - started
        for share, folder, ext, _, low, high in MIX:
            group = [f for f in self.files if f.relative.startswith(folder + "/")]
            log(f"  {folder:<7} {len(group):5d} .{ext} files ({share:.0%}), {fmt_bytes(low)}-{fmt_bytes(high)}: "
                f"{fmt_bytes(sum(f.size for f in group))}")
        log(f"  took {r.setup['generate_library']:.1f}s")

    def change_library(self) -> None:
        # 5 % of the files; of a few hundred seeded random draws, the one whose bytes are closest
        # to 5 % of the library's (one 100 MiB video more or less would skew a small run).
        rng = random.Random(self.args.seed + 1)
        k = max(1, round(len(self.files) * CHANGED_SHARE))
        goal = self.results.library_bytes * CHANGED_SHARE
        draws = (rng.sample(self.files, k) for _ in range(500))
        self.changed = sorted(min(draws, key=lambda d: abs(sum(f.size for f in d) - goal)), key=lambda f: f.relative)
        for f in self.changed:
            self.write_file(f, 1)  # same size, new bytes, new mtime
        os.sync()
        self.results.changed_files = k
        self.results.changed_bytes = sum(f.size for f in self.changed)
        log(f"changed {k} files ({fmt_bytes(self.results.changed_bytes)}, "
            f"{self.results.changed_bytes / self.results.library_bytes:.1%} of the bytes): new random bytes, same sizes")

    # -- cp -r --

    def run_cp(self) -> None:
        target = self.root / "copy"
        cpu0 = children_cpu()
        start = self.start()
        subprocess.run(["cp", "-r", str(self.lib), str(target)], check=True)
        subprocess.run(["sync"], check=True)  # cp does not fsync; flush the copy like the service would
        m = start.measurement(tool_cpu=children_cpu() - cpu0, note="one sync(1) at the end")
        self.results.add("cp", "first", m)
        self.report_run("cp", "first", m)
        shutil.rmtree(target)
        os.sync()

    # -- restic --

    def restic(self, *argv: str, timeout: float | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["restic", "-r", str(self.restic_repo), *argv], env=self.restic_env,
                              capture_output=True, text=True, timeout=timeout, check=False)

    def init_restic(self) -> None:
        """An empty repository (an earlier first run's, and its cache, removed first)."""
        shutil.rmtree(self.restic_repo, ignore_errors=True)
        shutil.rmtree(self.root / "restic-cache", ignore_errors=True)
        os.sync()
        out = self.restic("init")
        if out.returncode != 0:
            raise RuntimeError(f"restic init failed: {out.stdout}\n{out.stderr}")

    def run_restic(self, run: str) -> None:
        cpu0 = children_cpu()
        start = self.start()
        extra = ["--compression", self.args.restic_compression] if self.args.restic_compression else []
        out = self.restic(*extra, "backup", "--json", str(self.lib))
        cpu = children_cpu() - cpu0
        if out.returncode != 0:
            raise RuntimeError(f"restic backup failed (rc={out.returncode}): {out.stderr[-2000:]}")
        summary: dict[str, Any] = next((json.loads(line) for line in reversed(out.stdout.splitlines())
                        if line.startswith("{") and '"summary"' in line), {})
        note = (f"new {summary.get('files_new')}, changed {summary.get('files_changed')}, unmodified "
                f"{summary.get('files_unmodified')}, added {fmt_bytes(summary.get('data_added', 0))}")
        m = start.measurement(tool_cpu=cpu, note=note)
        self.results.add("restic", run, m)
        self.report_run("restic", run, m)

    # -- the server job --

    def upload(self, server: Server, f: LibFile) -> None:
        out = subprocess.run(
            ["curl", "-sS", "--max-time", "600", "-u", f"{API_KEY}:{API_SECRET}",
             "-F", f"file=@{self.lib / f.relative};type=application/octet-stream", "-F", f"public_id={f.public_id}",
             "-F", "backup=false", "-o", "-", "-w", "\n%{http_code}", f"{self.base(server)}/{f.resource_type}/upload"],
            capture_output=True, check=False,
        )
        result, body = curl_json(out, f"upload of {f.relative}", limit=300)
        if result.get("bytes") != f.size or result.get("backup"):
            raise RuntimeError(f"unexpected upload result for {f.relative}: {body[:300]}")

    def load(self, server: Server, files: list[LibFile], label: str) -> float:
        """Concurrent curl uploads with backup=false: setup, not a measured run."""
        size = sum(f.size for f in files)
        started = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(self.args.load_concurrency) as pool:
            for future in concurrent.futures.as_completed([pool.submit(self.upload, server, f) for f in files]):
                future.result()
        elapsed = time.perf_counter() - started
        self.results.setup[label] = elapsed
        log(f"  setup: uploaded {len(files)} files ({fmt_bytes(size)}) with backup=false, {self.args.load_concurrency} "
            f"concurrent curl uploads, in {elapsed:.1f}s ({size / 1e6 / elapsed:.0f} MB/s; not timed as a run)")
        return elapsed

    def api(self, server: Server, method: str, path: str, data: bytes | None = None) -> dict[str, Any]:
        request = urllib.request.Request(f"{self.base(server)}/{path}", data=data, method=method,
                                         headers={"Authorization": BASIC})
        with urllib.request.urlopen(request, timeout=60) as resp:
            return dict(json.loads(resp.read()))

    def start_job_server(self) -> None:
        self.job_server = self.start_server("server-job", self.job_data, auto_backup=False)
        log(f"  server for the job column: {self.job_data} (automatic backup off)")
        self.load(self.job_server, self.files, "load_library")
        self.cli("cloud", "set", CLOUD, "--auto-backup", "on", data_dir=self.job_data)  # applies to the running server
        settings = self.api(self.job_server, "GET", "versionstore/settings")
        if not settings.get("auto_backup"):
            raise RuntimeError(f"automatic backup did not turn on: {settings}")

    def run_job(self, run: str, expect_processed: int) -> None:
        server = self.job_server
        assert server is not None
        cpu0 = server.cpu()
        start = self.start()
        job_id = self.api(server, "POST", "operations/initial_backup", data=b"")["id"]
        while True:
            body = self.api(server, "GET", f"operations/initial_backup/{job_id}")
            if body["status"] in ("completed", "failed"):
                break
            time.sleep(self.args.poll)
        cpu = server.cpu() - cpu0
        if body["status"] != "completed" or body["processed_assets_count"] != expect_processed:
            raise RuntimeError(f"initial backup job {job_id}: expected {expect_processed} processed, got {body}")
        note = (f"processed {body['processed_assets_count']} ({fmt_bytes(body['bytes'])}), already backed up "
                f"{body['already_backed_up_count']}; links, no byte copy")
        m = start.measurement(server_cpu=cpu, note=note)
        self.results.add("job", run, m)
        self.report_run("job", run, m)

    # -- script source mode --

    def client_argv(self) -> list[str]:
        argv = [self.python, "-m", "versionstore", "initial-backup", "--source", str(self.lib),
                "--state-file", str(self.state_file), "--no-progress"]
        if self.args.client_concurrency:
            argv += ["--concurrency", str(self.args.client_concurrency)]
        return argv

    def client_available(self) -> str | None:
        out = subprocess.run([self.python, "-m", "versionstore", "initial-backup", "--help"], capture_output=True,
                             text=True, check=False)
        if out.returncode != 0 or "--source" not in out.stdout:
            return "`versionstore initial-backup --source` is not available in this checkout"
        return None

    def start_script_server(self) -> None:
        """A server on an empty data dir (an earlier first run's server, data and state file removed)."""
        if self.script_server is not None:
            self.script_server.stop()
            self.servers.remove(self.script_server)
            shutil.rmtree(self.script_data, ignore_errors=True)
            self.state_file.unlink(missing_ok=True)
            os.sync()
        self.script_server = self.start_server("server-script", self.script_data, auto_backup=True)
        log(f"  server for the script column: {self.script_data} (automatic backup on, empty environment)")

    def run_script(self, run: str) -> None:
        server = self.script_server
        assert server is not None
        report = self.root / f"initial-backup-{run}.json"
        timeline = self.root / f"initial-backup-{run}.timeline.jsonl"
        timeline.unlink(missing_ok=True)  # the client appends: an earlier first run's lines must not count
        env = dict(os.environ, CLOUDINARY_URL=f"cloudinary://{API_KEY}:{API_SECRET}@{CLOUD}"
                                              f"?upload_prefix=http://127.0.0.1:{server.port}",
                   VERSIONSTORE_INITIAL_BACKUP_TIMELINE=str(timeline))
        cpu0, scpu0 = children_cpu(), server.cpu()
        start = self.start()
        out = subprocess.run([*self.client_argv(), "--report-json", str(report)], env=env, capture_output=True,
                             text=True, check=False)
        cpu, scpu = children_cpu() - cpu0, server.cpu() - scpu0
        (self.root / f"initial-backup-{run}.log").write_text(out.stdout + out.stderr)
        if out.returncode != 0:
            raise RuntimeError(f"initial-backup --source failed (rc={out.returncode}):\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
        m = start.measurement(tool_cpu=cpu, server_cpu=scpu, note=self.summarise_report(report))
        self.results.add("script", run, m)
        self.report_run("script", run, m)
        if (lanes := upload_timeline(timeline)) is not None:
            self.results.timelines[run] = lanes
            log(f"    uploads in flight (share of the time from the first upload to the last answer): {lanes['in_flight']}; "
                + "; ".join(f"{band}: {b['uploads']} uploads, sending {b['send_ms']} ms, then waiting "
                            f"{b['answer_wait_ms']} ms for the answer (means)" for band, b in lanes["bands"].items()))

    # -- the floor --

    def run_floor(self) -> None:
        """scripts/batch_floor.py on the library, cold cache, at the script's concurrency. Its wall and
        CPU cover listing LIB to the last answer; the run's `others` share is judged over the whole
        process (start-ups included, with their CPU counted as the floor's own)."""
        argv = [self.python, str(FLOOR), "--source", str(self.lib), "--data-dir", str(self.floor_data)]
        if self.args.client_concurrency:
            argv += ["--concurrency", str(self.args.client_concurrency)]
        start = self.start()
        out = subprocess.run(argv, capture_output=True, text=True, check=False)
        (self.root / "floor.log").write_text(out.stdout + out.stderr)
        if out.returncode != 0:
            raise RuntimeError(f"batch_floor.py failed (rc={out.returncode}):\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
        floor: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
        if floor["files"] != len(self.files) or floor["bytes"] != self.results.library_bytes:
            raise RuntimeError(f"batch_floor.py sent {floor['files']} files, {floor['bytes']} bytes: not the library")
        whole = start.measurement(tool_cpu=floor["client_cpu_total_s"], server_cpu=floor["server_cpu_total_s"])
        m = replace(whole, seconds=floor["wall_s"], tool_cpu=floor["client_cpu_s"], server_cpu=floor["server_cpu_s"],
                    note=f"{floor['concurrency']} in flight; server CPU {floor['server_loop_cpu_s']:.1f}s on its event loop, the rest "
                         f"in upload workers; start-up excluded ({whole.seconds:.2f}s with it)")
        self.results.add("floor", "first", m)
        self.report_run("floor", "first", m)
        shutil.rmtree(self.floor_data)
        os.sync()

    @staticmethod
    def summarise_report(path: Path) -> str:
        """The client's own counts, whatever their names: the numeric top-level fields."""
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return "no report"
        counts = data.get("counts", data) if isinstance(data, dict) else {}
        if not isinstance(counts, dict):
            return ""
        parts = [f"{k} {v}" for k, v in counts.items() if isinstance(v, int) and not isinstance(v, bool) and v]
        return ", ".join(parts[:6])

    # -- report --

    def report_run(self, tool: str, run: str, m: Measurement) -> None:
        mbs = self.results.library_bytes / 1e6 / m.seconds
        cpu = " ".join(f"{k} CPU {v:.1f}s" for k, v in (("tool", m.tool_cpu), ("server", m.server_cpu)) if v is not None)
        cpu += f" ({((m.tool_cpu or 0) + (m.server_cpu or 0)) / ((os.cpu_count() or 1) * m.seconds):.0%} of the CPUs)"
        log(f"  {TOOL_NAMES[tool]:<16} {RUN_NAMES[run]:<10} {m.seconds:8.2f}s {mbs:9.1f} MB/s  {cpu}  "
            f"{'cold' if m.cold else 'warm'} cache, others {_pct(m.others)} of the CPUs, load {m.load:.1f}  {m.note}")

    def ratio(self, tool: str, run: str, base_tool: str, base_run: str) -> float | None:
        ours = self.results.runs.get(tool, {}).get(run)
        base = self.results.runs.get(base_tool, {}).get(base_run)
        if ours is None or base is None:
            return None
        return base.seconds / ours.seconds  # throughput ratio (same bytes)

    def script_vs_floor(self) -> float | None:
        """The script's first-run time over the floor's (2.00 = twice the least a compatible backup takes)."""
        return self.ratio("floor", "first", "script", "first")  # the script's seconds over the floor's

    def report(self) -> bool:
        r = self.results
        ok = True
        write_json(self.args.json, {
            "args": vars(self.args), "library_bytes": r.library_bytes, "library_files": r.library_files,
            "changed_files": r.changed_files, "changed_bytes": r.changed_bytes, "setup": r.setup,
            "cold_cache": r.cold_cache, "skipped": r.skipped, "client_timelines": r.timelines,
            "script_vs_floor": self.script_vs_floor(),
            "runs": {t: {k: vars(m) for k, m in runs.items()} for t, runs in r.runs.items()},
            "samples": {t: {k: [vars(m) for m in ms] for k, ms in runs.items()} for t, runs in r.samples.items()}})
        if not check_load(self.args.allow_load):  # ratios beside heavy outside load mean nothing
            return False
        unchecked = 0
        log("")
        log("=" * 110)
        log(f"SUMMARY: {r.library_files} files, {fmt_bytes(r.library_bytes)} ({r.library_bytes / 1e6:.0f} MB); 5% run: "
            f"{r.changed_files} files changed ({fmt_bytes(r.changed_bytes)}); {os.cpu_count()} CPUs, "
            f"{psutil.virtual_memory().total / GiB:.1f} GiB RAM; page cache: "
            + ("dropped before every timed run" if r.cold_cache is None and not self.args.warm
               else f"warm ({r.cold_cache or '--warm'})"))
        log(f"versionstore {self.versions['versionstore']}; {self.versions['restic']}")
        log("=" * 110)
        log(f"{'tool':<17}{'run':<12}{'seconds':>9}{'MB/s':>10}{'vs restic':>11}{'vs cp':>8}{'tool CPU':>10}"
            f"{'server CPU':>12}{'others':>8}   notes")
        for tool in TOOLS:
            if tool in r.skipped:
                log(f"{TOOL_NAMES[tool]:<17}{'-':<12}{'skipped: ' + r.skipped[tool]:>40}")
                continue
            for run in RUNS:
                m = r.runs.get(tool, {}).get(run)
                if m is None:
                    continue
                vs_restic = self.ratio(tool, run, "restic", run)
                vs_cp = self.ratio(tool, run, "cp", "first")
                log(f"{TOOL_NAMES[tool]:<17}{RUN_NAMES[run]:<12}{m.seconds:9.2f}{r.library_bytes / 1e6 / m.seconds:10.1f}"
                    f"{_x(vs_restic):>11}{_x(vs_cp):>8}{_s(m.tool_cpu):>10}{_s(m.server_cpu):>12}{_pct(m.others):>8}   "
                    + "; ".join(x for x in (r.spread(tool, run), m.note) if x))
        log("(others: share of the machine's CPU capacity used during the run by anything but the measured tool and server: "
            "other processes, kernel writeback, steal)")
        if (vs_floor := self.script_vs_floor()) is not None:
            script, floor = r.runs["script"]["first"], r.runs["floor"]["first"]
            log(f"script vs floor (first run, time over time): {vs_floor:.2f}x ({script.seconds:.2f}s against {floor.seconds:.2f}s; "
                f"CPU: client {_s(script.tool_cpu)} against {_s(floor.tool_cpu)}, server {_s(script.server_cpu)} against "
                f"{_s(floor.server_cpu)})")
        # Sub-second runs are left out: CPU accounting ticks make their share too coarse to mean much.
        busy = [(t, run, m.others) for t, runs in r.runs.items() for run, m in runs.items()
                if (m.others or 0) > NOISY and m.seconds >= 1.0]
        if busy:
            log("WARNING: the machine was busy with other work during " + ", ".join(
                f"{TOOL_NAMES[t]} {RUN_NAMES[run]} ({_pct(o)})" for t, run, o in busy) + "; those figures are pessimistic")
        log("")
        setup = ", ".join(f"{k.replace('_', ' ')} {v:.1f}s" for k, v in r.setup.items())
        log(f"setup (not timed as runs): {setup}")
        log("")
        log("TARGETS")

        def check(label: str, value: float | None, target: float, stretch: bool = False) -> None:
            nonlocal ok, unchecked
            if value is None:
                log(f"  {label:<58} n/a")
                unchecked += 0 if stretch else 1
                return
            good = value >= target
            if not stretch:
                ok &= good
            log(f"  {label:<58} {value:6.2f}x  (>= {target}x)  {'PASS' if good else 'FAIL'}{' (stretch)' if stretch else ''}")

        for tool in ("job", "script"):
            if tool in r.skipped:
                log(f"  {TOOL_NAMES[tool]}: skipped ({r.skipped[tool]})")
                continue
            name = TOOL_NAMES[tool]
            check(f"{name}: first run vs restic", self.ratio(tool, "first", "restic", "first"), TARGETS["first_vs_restic"])
            check(f"{name}: first run vs cp -r (stretch)", self.ratio(tool, "first", "cp", "first"),
                  TARGETS["first_vs_cp_stretch"], stretch=True)
            check(f"{name}: unchanged re-run vs restic's", self.ratio(tool, "unchanged", "restic", "unchanged"),
                  TARGETS["rerun_vs_restic"])
            check(f"{name}: 5%-changed run vs restic's", self.ratio(tool, "changed", "restic", "changed"),
                  TARGETS["rerun_vs_restic"])
        log("")
        for line in READING:
            log(line)
        log("")
        if not ok:
            log("SOME TARGETS MISSED")
        elif unchecked:
            log(f"ALL CHECKED TARGETS MET ({unchecked} not checked: a column was skipped)")
        else:
            log("ALL TARGETS MET")
        return ok

    # -- the order of things --

    def tool_versions(self) -> dict[str, str]:
        repo = Path(__file__).resolve().parent.parent
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False)
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, check=False)
        restic = "restic not used"
        if "restic" not in self.results.skipped and shutil.which("restic"):
            restic = subprocess.run(["restic", "version"], capture_output=True, text=True, check=False).stdout.strip()
        commit = head.stdout.strip() or "unknown"
        return {"versionstore": f"at {commit}{' (with local changes)' if dirty.stdout.strip() else ''}", "restic": restic}

    def check_space(self) -> None:
        need = int(self.results.library_bytes * (4.5 if self.args.skip_floor else 5.5)) + 2 * GiB
        free = shutil.disk_usage(self.root).free
        log(f"temp dir {self.root}: {fmt_bytes(free)} free on its filesystem (device {os.stat(self.root).st_dev:#x}; "
            f"the repo is on {os.stat(Path(__file__).resolve().parent).st_dev:#x}); this run needs about {fmt_bytes(need)}")
        if free < need:
            raise SystemExit(f"error: not enough free space in {self.root} ({fmt_bytes(free)} < {fmt_bytes(need)}); "
                             "use a smaller --scale or another --tmp-dir")

    def run(self) -> bool:
        a = self.args
        r = self.results
        self.plan_library()
        self.check_space()
        if a.skip_restic:
            r.skipped["restic"] = "--skip-restic"
        elif shutil.which("restic") is None:
            r.skipped["restic"] = "restic not installed (apt-get update && apt-get install -y restic)"
            log(f"note: {r.skipped['restic']}; that column is skipped")
        if (why := self.client_available()) is not None:
            r.skipped["script"] = why
            log(f"note: {why}; that column is skipped")
        if a.skip_floor:
            r.skipped["floor"] = "--skip-floor"
        self.versions = self.tool_versions()
        self.make_library()

        for turn in range(a.first_runs):
            log(f"[1] first runs ({turn + 1} of {a.first_runs})" if a.first_runs > 1 else "[1] first runs")
            self.run_cp()
            if "restic" not in r.skipped:
                self.init_restic()
                self.run_restic("first")
            if "script" not in r.skipped:
                self.start_script_server()
                self.run_script("first")
        self.start_job_server()
        self.run_job("first", expect_processed=len(self.files))
        if "floor" not in r.skipped:
            self.run_floor()

        log("[2] re-runs, nothing changed")
        if "restic" not in r.skipped:
            self.run_restic("unchanged")
        self.run_job("unchanged", expect_processed=0)
        if "script" not in r.skipped:
            self.run_script("unchanged")

        log(f"[3] re-runs, {CHANGED_SHARE:.0%} of the files changed")
        self.change_library()
        if "restic" not in r.skipped:
            self.run_restic("changed")
        if "script" not in r.skipped:
            self.run_script("changed")
        assert self.job_server is not None
        self.load(self.job_server, self.changed, "upload_changed")
        self.run_job("changed", expect_processed=len(self.changed))
        return self.report()


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}s"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    add_load_option(parser)
    parser.add_argument("--scale", type=float, default=1.0,
                        help="fraction of the default library (2,000 files, ~10 GiB); 0.05 = 100 files, ~0.5 GiB")
    parser.add_argument("--files", type=int, help="number of files (overrides --scale; sizes follow the same mix)")
    parser.add_argument("--seed", type=int, default=20261125, help="seed of the sizes, the bytes and the changed files")
    parser.add_argument("--skip-restic", action="store_true", help="skip the restic column")
    parser.add_argument("--first-runs", type=int, default=3,
                        help="first runs of cp -r, restic and the script, compared by their medians (default 3)")
    parser.add_argument("--skip-floor", action="store_true",
                        help="skip the floor column (scripts/batch_floor.py: the least any compatible backup does)")
    parser.add_argument("--server-workers", type=int, default=1,
                        help="`serve --workers N` for the servers (default 1; their CPU is summed over the processes)")
    parser.add_argument("--warm", action="store_true", help="do not drop the page cache before timed runs")
    parser.add_argument("--load-concurrency", type=int, default=4,
                        help="concurrent curl uploads that load the library into the job's server (setup)")
    parser.add_argument("--client-concurrency", type=int, default=None,
                        help="--concurrency of `versionstore initial-backup` (default: the client's own)")
    parser.add_argument("--quiet-wait", type=float, default=0.0,
                        help="before each timed run, wait up to this many seconds for the machine to be idle (shared VMs)")
    parser.add_argument("--restic-compression", choices=("auto", "off", "max"),
                        help="restic's --compression (default: restic's own, auto on new repositories)")
    parser.add_argument("--poll", type=float, default=0.05, help="seconds between polls of the job's status")
    parser.add_argument("--tmp-dir", default=None,
                        help="where the temp dir goes (default: $TMPDIR or /tmp); keep it on the service's data disk")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (library, repos, data dirs, logs)")
    parser.add_argument("--json", help="also write the raw results to this file")
    args = parser.parse_args(argv)
    if args.first_runs < 1:
        parser.error("--first-runs must be at least 1")
    if args.files is None:
        args.files = max(20, round(DEFAULT_FILES * args.scale))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    missing = [tool for tool in ("curl", "cp", "sync") if shutil.which(tool) is None]
    if missing:
        print(f"error: missing tool(s): {', '.join(missing)}", file=sys.stderr)
        return 2
    bench = Bench(args)
    interrupt_on_sigterm()
    return run_bench(bench)


if __name__ == "__main__":
    sys.exit(main())
