#!/usr/bin/env python3
"""Core performance benchmark for versionstore, with baselines measured in the same run.

Everything runs on this machine, side by side, and every figure is reported as a ratio
against a baseline measured in the same run (medians of N runs):

1. Upload with backup of a large file (1 GiB by default) through a streaming HTTP client
   (`curl -F file=@... -u key:secret`), versus the limit of a Cloudinary-compatible upload on
   this machine: the slower of `cp` of the same file on the same disk followed by `sync` of
   the copy (the service fsyncs, so the baseline does too) and one core's MD5 over the same
   bytes (the `etag` is an MD5, a serial hash). Best of N against best of N, and medians;
   the server's CPU per GiB is reported beside the MD5 CPU per GiB of the same run.
   Beside it, per run, the ceiling of any aiohttp server here: the same curl upload into a bare
   aiohttp handler that reads the body with `readany()` and drops it, and one that also runs MD5
   over it on a thread; and the service's CPU per thread (event loop, workers) during the upload.
2. Peak RSS growth of the service process during that upload (psutil sampling).
3. Read path under load (`wrk`, 64 connections): `GET resources/raw/upload/<id>?versions=true`
   for assets with 10 and 1,000 versions, and a signed `download_backup` of a small revision,
   versus a bare aiohttp JSON handler served by a separate process started by this script.

The script creates a temporary data dir (and the test file, on the same disk), starts and
stops every server itself on 127.0.0.1 with free ports, and removes everything on exit.

    .venv/bin/python scripts/bench_core.py            # full: 1 GiB, 3 runs, 10 s wrk runs
    .venv/bin/python scripts/bench_core.py --quick    # 128 MiB, 1 run, 3 s wrk runs

Requires `wrk` (`apt-get update && apt-get install -y wrk`) and `curl`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import blake3
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchlib.py sits next to this script, whatever the cwd
from benchlib import (
    MiB,
    RssSampler,
    Server,
    add_load_option,
    check_load,
    children_cpu,
    curl_json,
    download_backup_url,
    fold_profile,
    free_port,
    interrupt_on_sigterm,
    log,
    machine_busy,
    median,
    print_profile,
    process_cpu,
    remove_temp_dir,
    run_bench,
    stop_servers,
    write_json,
    write_random_file,
)

CLOUD = "demo"
API_KEY = "key123"
API_SECRET = "secret456"
BASIC = "Basic " + base64.b64encode(f"{API_KEY}:{API_SECRET}".encode()).decode()

TARGETS = {
    "upload_ratio": 0.8,  # of the limit: min(cp + sync, one core's MD5)
    "upload_ratio_stretch": 0.95,
    "cpu_beyond_md5_s_per_gib": 1.0,
    "others_share_max": 0.10,  # other processes' share of the CPUs during an upload above which its ratio is not judged
    "rss_growth_mib": 100,
    "rps_ratio": 0.3,
    "p99_ms": 20.0,
    "p99_1000_ms": 100.0,
}

# The wrk Lua script: machine-readable summary (latency in microseconds).
WRK_LUA = textwrap.dedent(
    """
    done = function(summary, latency, requests)
      local e = summary.errors
      io.write(string.format(
        "WRKJSON {\\"requests\\": %d, \\"duration_us\\": %d, \\"p50_us\\": %d, \\"p90_us\\": %d, " ..
        "\\"p99_us\\": %d, \\"max_us\\": %d, \\"mean_us\\": %f, \\"err_connect\\": %d, \\"err_read\\": %d, " ..
        "\\"err_write\\": %d, \\"err_status\\": %d, \\"err_timeout\\": %d}\\n",
        summary.requests, summary.duration, latency:percentile(50), latency:percentile(90),
        latency:percentile(99), latency.max, latency.mean, e.connect, e.read, e.write, e.status, e.timeout))
    end
    """
)

# The baselines: a bare aiohttp JSON handler, same event loop policy and run_app settings as
# `versionstore serve` (access log off); and two bare upload sinks, the ceiling of any aiohttp
# server on this machine for row 1's curl upload (the same multipart body): `/sink` reads the
# body with `request.content.readany()` and drops it, `/sink-md5` also runs MD5 over it on one
# worker thread (4 MiB hand-offs, the next block received while the last one is hashed).
BARE_SERVER = textwrap.dedent(
    """
    import asyncio
    import hashlib
    import sys
    from aiohttp import web

    async def handler(request):
        return web.json_response({"status": "ok", "public_id": "bench", "versions": []})

    async def sink(request):
        size = 0
        while chunk := await request.content.readany():
            size += len(chunk)
        return web.json_response({"bytes": size})

    def md5_all(hasher, chunks):
        for chunk in chunks:
            hasher.update(chunk)

    async def sink_md5(request):
        hasher, loop = hashlib.md5(usedforsecurity=False), asyncio.get_running_loop()
        size, block, held, job = 0, [], 0, None
        while chunk := await request.content.readany():
            size += len(chunk)
            block.append(chunk)
            held += len(chunk)
            if held >= 4 << 20:
                if job is not None:
                    await job
                job, block, held = loop.run_in_executor(None, md5_all, hasher, block), [], 0
        if job is not None:
            await job
        md5_all(hasher, block)
        return web.json_response({"bytes": size, "md5": hasher.hexdigest()})

    app = web.Application(client_max_size=1 << 40)
    app.router.add_post("/sink", sink)
    app.router.add_post("/sink-md5", sink_md5)
    app.router.add_get("/{tail:.*}", handler)
    workers = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    if workers == 1:
        web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)
    else:  # as `serve --workers N`: bind once, fork N processes accepting on the inherited socket
        import os, signal, socket
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", int(sys.argv[1])))
        sock.listen(128)
        children = []
        for _ in range(workers):
            pid = os.fork()
            if pid == 0:
                web.run_app(app, sock=sock, print=None, access_log=None)
                os._exit(0)
            children.append(pid)
        def stop(*_):
            for pid in children:
                os.kill(pid, signal.SIGINT)
        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGTERM, stop)
        for pid in children:
            while True:
                try:
                    os.waitpid(pid, 0)
                    break
                except InterruptedError:
                    continue
    """
)


# --- small helpers (log, free_port, median, Server, RssSampler, ...: benchlib.py) ---------------


#: The bare aiohttp upload sinks of BARE_SERVER, measured beside every upload of row 1.
SINKS = ("sink", "sink-md5")


def thread_cpu(proc: psutil.Process) -> dict[int, tuple[float, float]]:
    """(user, system) CPU seconds of each thread of `proc` so far (/proc/<pid>/task)."""
    return {t.id: (t.user_time, t.system_time) for t in proc.threads()}


def loop_cpu(proc: psutil.Process) -> float:
    """CPU seconds so far of the event-loop thread (the main thread) of `proc`, or with worker
    processes (`--workers N`: children of `proc`), of theirs together."""
    total = 0.0
    for worker in proc.children() or [proc]:
        try:
            total += sum(thread_cpu(worker).get(worker.pid, (0.0, 0.0)))
        except psutil.Error:
            continue
    return total


def _suffix(args: argparse.Namespace, workers: int) -> str:
    """The case-name suffix of a worker count: none for the first of --workers, else `@wN`."""
    return "" if workers == args.workers[0] else f"@w{workers}"


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- the benchmark ----------------------------------------------------------------------------


@dataclass
class Results:
    cp_seconds: list[float] = field(default_factory=list)
    upload_seconds: list[float] = field(default_factory=list)
    upload_server_cpu: list[float] = field(default_factory=list)
    md5_seconds: list[float] = field(default_factory=list)  # one core's MD5 of the test file (wall)
    md5_cpu: list[float] = field(default_factory=list)  # ... and its CPU seconds
    load_avg: list[float] = field(default_factory=list)  # 1-minute load average before each upload
    others_share: list[float] = field(default_factory=list)  # machine CPU used by other processes during each upload
    rss_growth: list[int] = field(default_factory=list)
    rss_baseline: list[int] = field(default_factory=list)
    wrk: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    hash_mb_s: dict[str, float] = field(default_factory=dict)
    # The service's CPU during each upload per thread (seconds): the event loop (user, system), the workers.
    loop_user: list[float] = field(default_factory=list)
    loop_system: list[float] = field(default_factory=list)
    workers_cpu: list[float] = field(default_factory=list)
    # The bare aiohttp sinks (same curl body): wall and server CPU seconds per run, by sink.
    sink_seconds: dict[str, list[float]] = field(default_factory=dict)
    sink_cpu: dict[str, list[float]] = field(default_factory=dict)
    # --timeline: the spool's record of each upload (versionstore/spool_lanes.py): lanes' busy shares.
    timelines: list[dict[str, Any]] = field(default_factory=list)


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.root = Path(tempfile.mkdtemp(prefix="versionstore-bench-", dir=args.tmp_dir))
        self.data_dir = self.root / "data"
        self.work = self.root / "work"
        self.work.mkdir()
        self.big = self.work / "big.bin"
        self.python = sys.executable
        self.results = Results()
        self.servers: list[Server] = []
        self.service: Server | None = None
        self.against: Server | None = None  # --against: the same service from another source tree
        self.bare: Server | None = None
        # --workers N,M: the service and the bare handler with each number of processes (the
        # first is `service`/`bare`; the others' cases are suffixed `@wN`).
        self.services: dict[int, Server] = {}
        self.bares: dict[int, Server] = {}
        self.lag_file = self.root / "loop-lag.jsonl"
        self.timeline_file = self.root / "spool-timeline.jsonl"
        self.lua = self.work / "report.lua"
        self.lua.write_text(WRK_LUA)

    # -- lifecycle --

    def cleanup(self) -> None:
        stop_servers(self.servers)
        remove_temp_dir(self.root, self.args.keep)

    def start_servers(self) -> None:
        subprocess.run(
            [self.python, "-m", "versionstore", "cloud", "create", CLOUD, "--api-key", API_KEY, "--api-secret",
             API_SECRET, "--data-dir", str(self.data_dir)],
            check=True, stdout=subprocess.DEVNULL,
        )
        for n in self.args.workers:
            service = self.services[n] = self.service_server(f"versionstore{_suffix(self.args, n)}",
                                                             self.root / f"service-w{n}.log", n)
            self.servers.append(service)
            service.start()
        self.service = self.services[self.args.workers[0]]
        if self.args.against:  # a second process on the same data dir, running the other tree's code
            tree = Path(self.args.against).resolve()
            self.against = self.service_server("versionstore@against", self.root / "against.log", self.args.workers[0])
            self.against.env, self.against.cwd = {"PYTHONPATH": str(tree)}, tree
            self.servers.append(self.against)
            self.against.start()
        bare_script = self.work / "bare_server.py"
        bare_script.write_text(BARE_SERVER)
        for n in self.args.workers:  # the baseline gets as many processes as the service, or the ratio is unfair
            bare_port = free_port()
            bare = self.bares[n] = Server(f"bare-aiohttp{_suffix(self.args, n)}",
                                          [self.python, str(bare_script), str(bare_port), str(n)],
                                          bare_port, self.root / f"bare-w{n}.log", health="/ping")
            self.servers.append(bare)
            bare.start()
        self.bare = self.bares[self.args.workers[0]]

    def service_server(self, name: str, log_path: Path, workers: int = 1) -> Server:
        port = free_port()
        argv = [self.python, "-m", "versionstore", "serve", "--data-dir", str(self.data_dir), "--host", "127.0.0.1",
                "--port", str(port)]
        if workers > 1:
            argv += ["--workers", str(workers)]
        if self.args.loop_lag:  # the same command under the event-loop lag probe (scripts/loop_lag.py)
            argv[1:3] = [str(Path(__file__).resolve().parent / "loop_lag.py"), str(self.lag_file), "versionstore"]
        server = Server(name, argv, port, log_path)
        if self.args.timeline:  # the spool writes one JSON line per spool file (versionstore/spool_lanes.py)
            server.env = {"VERSIONSTORE_SPOOL_TIMELINE": str(self.timeline_file)}
        return server

    def lag_signal(self, server: Server) -> list[int]:
        """--loop-lag: ask the service's event loops (its workers' with --workers) to write what
        they saw since the last signal; the pids asked."""
        proc = psutil.Process(server.pid)
        pids = [child.pid for child in proc.children()] or [server.pid]
        for pid in pids:
            os.kill(pid, signal.SIGUSR1)
        return pids

    def lag_read(self, pids: list[int]) -> dict[str, Any]:
        """The last record of each of `pids` in the lag file, merged: the largest lateness of the
        millisecond timer, how often it was later than 1/5/20 ms, and the slow callbacks."""
        time.sleep(0.3)  # the loops write at their next pass
        last: dict[int, dict[str, Any]] = {}
        for line in self.lag_file.read_text().splitlines():
            record = json.loads(line)
            if record["pid"] in pids:
                last[record["pid"]] = record
        merged: dict[str, Any] = {"late_max_ms": 0.0, "late_over_ms": {}, "slow_callbacks": {}, "ticks": 0}
        for record in last.values():
            merged["late_max_ms"] = max(merged["late_max_ms"], record["late_max_ms"])
            merged["ticks"] += record["ticks"]
            for limit, count in record["late_over_ms"].items():
                merged["late_over_ms"][limit] = merged["late_over_ms"].get(limit, 0) + count
            for what, slow in record["slow_callbacks"].items():
                entry = merged["slow_callbacks"].setdefault(what, {"count": 0, "total_ms": 0.0, "max_ms": 0.0})
                entry["count"] += slow["count"]
                entry["total_ms"] += slow["total_ms"]
                entry["max_ms"] = max(entry["max_ms"], slow["max_ms"])
        return merged

    @property
    def base(self) -> str:
        assert self.service is not None
        return self.base_of(self.service)

    @staticmethod
    def base_of(server: Server) -> str:
        return f"http://127.0.0.1:{server.port}/v1_1/{CLOUD}"

    # -- 1 & 2: large upload vs cp --

    def make_big_file(self) -> None:
        log(f"generating {self.args.size_mib} MiB of random bytes in {self.big} ...")
        write_random_file(self.big, self.args.size_mib * MiB)

    def _perturb(self) -> None:
        """New leading bytes: every upload gets a new digest, so every run does the full
        work (spool, fsync, link into both stores) instead of finding the blob already stored."""
        with open(self.big, "r+b") as handle:
            handle.write(os.urandom(32))
            handle.flush()
            os.fsync(handle.fileno())

    def run_cp(self, index: int) -> float:
        target = self.work / f"copy-{index}.bin"
        os.sync()  # start from a clean slate: no dirty pages from earlier runs
        started = time.perf_counter()
        subprocess.run(["cp", str(self.big), str(target)], check=True)
        subprocess.run(["sync", str(target)], check=True)  # fsync(2) of the copy, like the service
        elapsed = time.perf_counter() - started
        target.unlink()
        return elapsed

    def run_md5(self) -> tuple[float, float]:
        """(wall, CPU) seconds of one core's MD5 over the test file, read as `md5sum` reads it
        (from the page cache after the runs before): the serial work the `etag` needs."""
        block = bytearray(4 * MiB)
        view = memoryview(block)
        hasher = hashlib.md5(usedforsecurity=False)
        started, cpu = time.perf_counter(), time.thread_time()
        with open(self.big, "rb", buffering=0) as handle:
            while n := handle.readinto(block):
                hasher.update(view[:n])
        return time.perf_counter() - started, time.thread_time() - cpu

    def curl_upload(self, url: str, index: int) -> tuple[float, dict[str, Any]]:
        """Row 1's upload (the SDKs' field order: the file last) to `url`: seconds, JSON answer."""
        started = time.perf_counter()
        out = subprocess.run(
            ["curl", "-sS", "--max-time", str(self.args.upload_timeout), "-u", f"{API_KEY}:{API_SECRET}",
             "-F", f"public_id=bench/big-{index}", "-F", "backup=true",
             "-F", f"file=@{self.big};type=application/octet-stream", "-o", "-", "-w", "\n%{http_code}", url],
            capture_output=True, check=False,
        )
        elapsed = time.perf_counter() - started
        return elapsed, curl_json(out)[0]

    def run_upload(self, index: int) -> tuple[float, int, int, float]:
        assert self.service is not None
        self._perturb()
        os.sync()
        self.results.load_avg.append(os.getloadavg()[0])
        proc = psutil.Process(self.service.pid)
        cpu_before, threads_before = process_cpu(proc), thread_cpu(proc)
        sampler = RssSampler(self.service.pid)
        sampler.start()
        busy, ours = machine_busy(), children_cpu() + time.process_time()
        elapsed, result = self.curl_upload(f"{self.base}/raw/upload", index)
        sampler.stop()
        cpu = process_cpu(proc) - cpu_before
        self._split_threads(proc, threads_before)
        # Whatever the machine did beside the server, curl and this script: other tenants' load.
        others = machine_busy() - busy - cpu - (children_cpu() + time.process_time() - ours)
        self.results.others_share.append(max(0.0, others) / (elapsed * (os.cpu_count() or 1)))
        if result.get("bytes") != self.args.size_mib * MiB or not result.get("backup"):
            raise RuntimeError(f"unexpected upload result: {json.dumps(result)[:500]}")
        if self.args.timeline:
            self.read_timeline(elapsed)
        return elapsed, sampler.growth, sampler.baseline, cpu

    def read_timeline(self, elapsed: float) -> None:
        """--timeline: the spool's record of the upload just made (the last line of the file)."""
        lines = self.timeline_file.read_text().splitlines() if self.timeline_file.exists() else []
        if not lines:
            log("   (no spool timeline: the service predates --timeline)")
            return
        record = json.loads(lines[-1])
        record["upload_s"] = elapsed
        self.results.timelines.append(record)
        lanes = record["lanes"]
        parts = [f"{name} busy {lane['busy_s']:.2f}s (CPU {lane.get('cpu_s', 0.0):.2f}s) = {lane['busy_of_life']:.0%} "
                 f"of the spool's {record['life_s']:.2f}s ({lane['busy_of_span']:.0%} of its own span, {lane['jobs']} jobs)"
                 for name, lane in sorted(lanes.items())]
        log("   timeline: " + "; ".join(parts))
        for name in ("md5", "write", "loop_wait"):
            if lanes.get(name, {}).get("slices"):
                log(f"   {name:>9} busy per tenth of the spool's life: "
                    + " ".join(f"{share:4.0%}" for share in lanes[name].get("slices", [])))

    def _split_threads(self, proc: psutil.Process, before: dict[int, tuple[float, float]]) -> None:
        """The upload's CPU by thread: the event loop (the main thread) and the worker threads."""
        r = self.results
        loop_user = loop_system = workers = 0.0
        for tid, (user, system) in thread_cpu(proc).items():
            user0, system0 = before.get(tid, (0.0, 0.0))
            if tid == proc.pid:
                loop_user, loop_system = user - user0, system - system0
            else:
                workers += user - user0 + system - system0
        r.loop_user.append(loop_user)
        r.loop_system.append(loop_system)
        r.workers_cpu.append(workers)

    def run_sinks(self, index: int) -> None:
        """The same upload into the bare aiohttp sinks: what any aiohttp server reaches here."""
        assert self.bare is not None
        proc = psutil.Process(self.bare.pid)
        for name in SINKS:
            os.sync()
            cpu_before = process_cpu(proc)
            elapsed, result = self.curl_upload(f"http://127.0.0.1:{self.bare.port}/{name}", index)
            cpu = process_cpu(proc) - cpu_before
            if result.get("bytes", 0) < self.args.size_mib * MiB:
                raise RuntimeError(f"unexpected sink result: {result}")
            self.results.sink_seconds.setdefault(name, []).append(elapsed)
            self.results.sink_cpu.setdefault(name, []).append(cpu)

    def bench_upload(self) -> None:
        size_mb = self.args.size_mib * MiB / 1e6
        r = self.results
        for i in range(self.args.runs):
            cp = self.run_cp(i)
            md5, md5_cpu = self.run_md5()
            r.md5_seconds.append(md5)
            r.md5_cpu.append(md5_cpu)
            up, growth, baseline, cpu = self.run_upload(i)
            r.cp_seconds.append(cp)
            r.upload_seconds.append(up)
            r.rss_growth.append(growth)
            r.rss_baseline.append(baseline)
            r.upload_server_cpu.append(cpu)
            self.run_sinks(i)
            limit = max(cp, md5)
            log(f"  run {i + 1}: cp+sync {cp:6.2f}s ({size_mb / cp:7.1f} MB/s) | MD5 {md5:5.2f}s "
                f"({size_mb / md5:6.1f} MB/s) | upload {up:6.2f}s ({size_mb / up:7.1f} MB/s, "
                f"{limit / up:.2f}x of the limit) | server CPU {cpu:5.2f}s (MD5 {md5_cpu:.2f}s; loop "
                f"{r.loop_user[-1]:.2f} user + {r.loop_system[-1]:.2f} sys, workers {r.workers_cpu[-1]:.2f}) | "
                f"RSS +{growth / MiB:.1f} MiB (from {baseline / MiB:.1f} MiB) | load {r.load_avg[-1]:.1f}, "
                f"others {r.others_share[-1]:.0%} of the CPUs")
            for name in SINKS:
                wall, sink_cpu = r.sink_seconds[name][-1], r.sink_cpu[name][-1]
                log(f"         bare aiohttp /{name}: {wall:6.2f}s ({size_mb / wall:7.1f} MB/s), server CPU {sink_cpu:5.2f}s")

    def bench_hashes(self) -> None:
        """Single-thread speed of the upload path's two hashes (MD5 is the etag, BLAKE3 the
        content address), in memory: the ceiling each puts on an upload's throughput."""
        data = os.urandom(64 * MiB)
        for name, make in (("md5", lambda: hashlib.md5(usedforsecurity=False)), ("blake3", blake3.blake3)):
            speeds = []
            for _ in range(max(3, self.args.runs)):
                started = time.perf_counter()
                make().update(data)
                speeds.append(len(data) / 1e6 / (time.perf_counter() - started))
            self.results.hash_mb_s[name] = median(speeds)
            log(f"  {name:>6}: {self.results.hash_mb_s[name]:8.1f} MB/s (one thread, 64 MiB in memory)")

    # -- 3: read path under wrk --

    async def _make_versions(self, public_id: str, count: int) -> dict[str, Any]:
        import aiohttp

        headers = {"Authorization": BASIC}
        async with aiohttp.ClientSession(headers=headers) as session:
            last: dict[str, Any] = {}
            for n in range(count):
                form = aiohttp.FormData()
                form.add_field("public_id", public_id)
                form.add_field("backup", "true")
                form.add_field("file", f"{public_id} version {n} {os.urandom(8).hex()}\n".encode(),
                               filename="v.txt", content_type="text/plain")
                async with session.post(f"{self.base}/raw/upload", data=form) as resp:
                    if resp.status != 200:
                        raise RuntimeError(f"version upload failed: {resp.status} {await resp.text()}")
                    last = await resp.json()
            async with session.get(f"{self.base}/resources/raw/upload/{public_id}", params={"versions": "true"}) as resp:
                body = await resp.json()
                if len(body.get("versions", [])) != count:
                    raise RuntimeError(f"{public_id}: expected {count} versions, got {len(body.get('versions', []))}")
            return {"asset_id": last["asset_id"], "version_id": last["version_id"], "bytes": len(json.dumps(body))}

    def download_url(self, asset_id: str, version_id: str) -> str:
        # Signed for one hour: long enough for every wrk run of this script.
        return download_backup_url(self.base, asset_id, version_id, API_KEY, API_SECRET)

    def wrk(self, url: str, headers: dict[str, str], duration: int) -> dict[str, Any]:
        argv = ["wrk", "-t", str(self.args.threads), "-c", str(self.args.connections), "-d", f"{duration}s",
                "--timeout", "5s", "-s", str(self.lua)]
        for key, value in headers.items():
            argv += ["-H", f"{key}: {value}"]
        argv.append(url)
        out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60, check=False)
        line = next((ln for ln in out.stdout.splitlines() if ln.startswith("WRKJSON ")), None)
        if out.returncode != 0 or line is None:
            raise RuntimeError(f"wrk failed (rc={out.returncode}): {out.stdout}\n{out.stderr}")
        data = json.loads(line[len("WRKJSON "):])
        data["rps"] = data["requests"] / (data["duration_us"] / 1e6)
        errors = sum(data[k] for k in ("err_connect", "err_read", "err_write", "err_status", "err_timeout"))
        data["errors"] = errors
        if data["err_status"]:
            raise RuntimeError(f"wrk saw {data['err_status']} non-2xx responses for {url}: fix the benchmark")
        return data

    def bench_reads(self) -> dict[str, Any]:
        assert self.bare is not None
        info: dict[str, Any] = {}
        started = time.perf_counter()
        small = asyncio.run(self._make_versions("bench/v10", 10))
        many = asyncio.run(self._make_versions("bench/v-many", self.args.many_versions))
        info["setup_seconds"] = time.perf_counter() - started
        info["v10_body_bytes"] = small["bytes"]
        info["many_body_bytes"] = many["bytes"]
        log(f"  made {10 + self.args.many_versions} small versions in {info['setup_seconds']:.1f}s; response bodies "
            f"{small['bytes']} B (10 versions) and {many['bytes']} B ({self.args.many_versions} versions)")
        assert self.service is not None
        auth = {"Authorization": BASIC}
        cases: dict[str, tuple[str, dict[str, str], Server]] = {}
        for n, bare in self.bares.items():
            cases[f"bare{_suffix(self.args, n)}"] = (f"http://127.0.0.1:{bare.port}/ping", {}, bare)
        serving = [(_suffix(self.args, n), server) for n, server in self.services.items()]
        for suffix, server in [*serving, ("@against", self.against)]:
            if server is None:
                continue
            base = self.base_of(server)
            cases.update({
                f"versions_10{suffix}": (f"{base}/resources/raw/upload/bench/v10?versions=true", auth, server),
                f"versions_{self.args.many_versions}{suffix}": (
                    f"{base}/resources/raw/upload/bench/v-many?versions=true", auth, server),
                f"download_backup{suffix}": (
                    download_backup_url(base, small["asset_id"], small["version_id"], API_KEY, API_SECRET), {}, server),
            })
        # Warm up each endpoint (connections, caches), then interleave the measured runs so
        # that drift (thermal, page cache, noisy neighbours) hits every case alike.
        for url, headers, _ in cases.values():
            self.wrk(url, headers, self.args.warmup)
        for i in range(self.args.runs):
            for name, (url, headers, server) in cases.items():
                proc = psutil.Process(server.pid)
                probed = self.args.loop_lag and not name.startswith("bare")
                if probed:
                    self.lag_signal(server)
                cpu_before, loop_before = server.cpu(), loop_cpu(proc)
                data = self.wrk(url, headers, self.args.duration)
                # Server CPU per request: steadier than req/s when the machine is shared; and
                # the event loop thread's share (the rest is worker threads).
                requests = max(data["requests"], 1)
                data["cpu_us"] = (server.cpu() - cpu_before) / requests * 1e6
                data["loop_cpu_us"] = (loop_cpu(proc) - loop_before) / requests * 1e6
                if probed:
                    data["loop_lag"] = self.lag_read(self.lag_signal(server))
                self.results.wrk.setdefault(name, []).append(data)
                log(f"  run {i + 1} {name:>16}: {data['rps']:8.0f} req/s  p50 {data['p50_us'] / 1000:7.2f} ms  "
                    f"p99 {data['p99_us'] / 1000:7.2f} ms  server CPU {data['cpu_us']:5.0f} us/req "
                    f"(loop thread {data['loop_cpu_us']:3.0f})  errors {data['errors']}")
                if probed:
                    self.log_lag(data["loop_lag"], data["max_us"] / 1000)
        if self.args.profile:
            self.profile_reads(cases)
        return info

    @staticmethod
    def log_lag(lag: dict[str, Any], wrk_max_ms: float) -> None:
        over = lag["late_over_ms"]
        log(f"      loop lag: 1 ms timer late by up to {lag['late_max_ms']:.1f} ms (wrk's max latency {wrk_max_ms:.1f} ms); "
            f"late > 1/5/20 ms {over.get('1', 0)}/{over.get('5', 0)}/{over.get('20', 0)} of {lag['ticks']} ticks")
        for what, slow in sorted(lag["slow_callbacks"].items(), key=lambda kv: -kv[1]["total_ms"])[:5]:
            log(f"        callback > 1 ms: {slow['count']:5d} x, {slow['total_ms']:8.1f} ms in all, max {slow['max_ms']:6.1f} ms  {what}")

    def profile_reads(self, cases: dict[str, tuple[str, dict[str, str], Server]]) -> None:
        """--profile DIR: one more wrk run per case with py-spy sampling the server (raw folded
        stacks in DIR/<case>.txt), and the functions where the request's CPU goes."""
        out_dir = Path(self.args.profile)
        out_dir.mkdir(parents=True, exist_ok=True)
        spy = shutil.which("py-spy") or str(Path(self.python).parent / "py-spy")
        duration = self.args.duration
        for name, (url, headers, server) in cases.items():  # the bare handler too: aiohttp's own share
            out = out_dir / f"{name.replace('@', '-')}.txt"
            argv = [spy, "record", "-p", str(server.pid), "-r", str(self.args.profile_rate), "-d", str(duration),
                    "--nonblocking", "--format", "raw", "--nolineno", "-o", str(out)]
            if psutil.Process(server.pid).children():  # --workers N: sample the workers, not the supervisor
                argv.append("--subprocesses")
            sampler = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            time.sleep(0.5)  # py-spy attaches before the load starts
            proc = psutil.Process(server.pid)
            loop_before = loop_cpu(proc)
            data = self.wrk(url, headers, duration)
            request_us = (loop_cpu(proc) - loop_before) / max(data["requests"], 1) * 1e6
            _, err = sampler.communicate(timeout=duration + 60)
            if sampler.returncode != 0 or not out.exists():
                raise RuntimeError(f"py-spy failed (rc={sampler.returncode}): {err.decode(errors='replace')[-2000:]}")
            log(f"  profile {name}: {data['rps']:.0f} req/s under py-spy, {request_us:.0f} us of event-loop thread CPU "
                f"per request; {out}")
            print_profile(fold_profile(out, within="_run_once"), request_us, self.args.profile_top)

    # -- report --

    def report(self, read_info: dict[str, Any]) -> bool:
        r = self.results
        a = self.args
        ok = True

        def verdict(good: bool) -> str:
            nonlocal ok
            ok &= good
            return "MET" if good else "MISSED"

        log("")
        log("=" * 78)
        log(f"SUMMARY (medians of {a.runs} run(s); machine: {os.cpu_count()} CPUs, "
            f"{psutil.virtual_memory().total / (1 << 30):.1f} GiB RAM)")
        log("=" * 78)
        write_json(a.json, {"args": vars(a), "results": r.__dict__, "read_info": read_info})
        if not check_load(a.allow_load):  # ratios measured beside heavy outside load mean nothing
            return False
        if r.upload_seconds:
            ok &= self.report_upload()
            log(f"   hashes    : MD5 {r.hash_mb_s['md5']:.0f} MB/s, BLAKE3 {r.hash_mb_s['blake3']:.0f} MB/s "
                "(one thread each, 64 MiB in memory; the upload runs MD5 beside BLAKE3 + write)")
            growth = median([g / MiB for g in r.rss_growth])
            peak = max(g / MiB for g in r.rss_growth)
            log(f"2. service RSS growth during the upload: median {growth:.1f} MiB, max {peak:.1f} MiB "
                f"(baseline {median([b / MiB for b in r.rss_baseline]):.1f} MiB)   target < 100 MiB: "
                f"{verdict(peak < TARGETS['rss_growth_mib'])}")
        if r.wrk:
            log(f"3. wrk -t{a.threads} -c{a.connections} -d{a.duration}s (wrk and the servers share "
                f"{os.cpu_count()} CPUs; service and bare handler with {a.workers[0]} process(es)"
                + "".join(f", `@w{n}`: {n}" for n in a.workers[1:]) + ")")
            log(f"   {'case':<18}{'req/s':>10}{'ratio':>8}{'p50 ms':>9}{'p99 ms':>9}{'CPU us/req':>12}   targets")
            for name, runs in r.wrk.items():
                workers = name.rpartition("@w")[2] if "@w" in name else ""
                bare = median([d["rps"] for d in r.wrk["bare" + (f"@w{workers}" if workers else "")]])
                rps = median([d["rps"] for d in runs])
                p50 = median([d["p50_us"] / 1000 for d in runs])
                p99 = median([d["p99_us"] / 1000 for d in runs])
                cpu = median([d["cpu_us"] for d in runs])
                if name.startswith("bare"):
                    note = "(baseline)"
                elif workers or a.workers[0] > 1:
                    note = f"({workers or a.workers[0]} processes, against a bare handler with as many: not judged)"
                elif name.endswith("@against"):
                    note = f"(--against {a.against}: not judged)"
                elif name.startswith("versions_") and name != "versions_10":
                    note = f"p99 < 100 ms: {verdict(p99 < TARGETS['p99_1000_ms'])}"
                else:
                    note = (f">= 0.3x: {verdict(rps / bare >= TARGETS['rps_ratio'])}, "
                            f"p99 < 20 ms: {verdict(p99 < TARGETS['p99_ms'])}")
                log(f"   {name:<18}{rps:10.0f}{rps / bare:7.2f}x{p50:9.2f}{p99:9.2f}{cpu:12.0f}   {note}")
            log(f"   (response bodies: {read_info['v10_body_bytes']} B for 10 versions, "
                f"{read_info['many_body_bytes']} B for {a.many_versions}; with {a.connections} connections a p99 under "
                f"{TARGETS['p99_ms']:.0f} ms needs more than {a.connections / TARGETS['p99_ms'] * 1000:.0f} req/s: Little's law)")
        log("")
        log("ALL TARGETS MET" if ok else "SOME TARGETS MISSED")
        return ok

    def report_upload(self) -> bool:
        """Row 1: the upload against the limit of a Cloudinary-compatible upload, best of N
        against best of N (as issue 10 asks) and medians; server CPU per GiB beyond MD5."""
        r, a = self.results, self.args
        size_mb, gib = a.size_mib * MiB / 1e6, a.size_mib / 1024
        cp_best, cp_median = min(r.cp_seconds), median(r.cp_seconds)
        md5_best, md5_median = min(r.md5_seconds), median(r.md5_seconds)
        up_best, up_median = min(r.upload_seconds), median(r.upload_seconds)
        limit_best, limit_median = max(cp_best, md5_best), max(cp_median, md5_median)
        ratio_best, ratio_median = limit_best / up_best, limit_median / up_median
        cpu_per_gib = median(r.upload_server_cpu) / gib
        md5_cpu_per_gib = median(r.md5_cpu) / gib
        beyond = cpu_per_gib - md5_cpu_per_gib
        met = ratio_best >= TARGETS["upload_ratio"]
        cpu_met = beyond <= TARGETS["cpu_beyond_md5_s_per_gib"]
        busy = max(r.others_share) > TARGETS["others_share_max"]
        log(f"1. upload {a.size_mib} MiB with backup (curl -F, Basic auth, MD5 etag on) vs the limit = the slower "
            "of cp + sync (same disk) and one core's MD5 of the same bytes")
        log(f"   {'':12}{'best':>16}{'median':>16}")
        for name, best, mid in (("cp + sync", cp_best, cp_median), ("MD5, 1 core", md5_best, md5_median),
                                ("limit", limit_best, limit_median), ("upload", up_best, up_median)):
            log(f"   {name:<12}{best:7.2f} s {size_mb / best:5.0f} MB/s{mid:7.2f} s {size_mb / mid:5.0f} MB/s")
        stretch = "met" if ratio_best >= TARGETS["upload_ratio_stretch"] else "not met"
        verdict = "NOT JUDGED (other load, below)" if busy else "MET" if met else "MISSED"
        log(f"   ratio     : {ratio_best:.3f}x of the limit (best of {a.runs} vs best of {a.runs}; medians "
            f"{ratio_median:.2f}x)   target >= {TARGETS['upload_ratio']}x: {verdict} "
            f"(stretch {TARGETS['upload_ratio_stretch']}x {stretch})")
        log(f"   server CPU: {cpu_per_gib:.2f} s/GiB, of which MD5 {md5_cpu_per_gib:.2f} s/GiB (measured above): "
            f"{beyond:.2f} s/GiB beyond MD5   target <= {TARGETS['cpu_beyond_md5_s_per_gib']}: "
            f"{'MET' if cpu_met else 'MISSED'}")
        log(f"   per thread: event loop {median(r.loop_user) / gib:.2f} s user + {median(r.loop_system) / gib:.2f} s system "
            f"per GiB, worker threads {median(r.workers_cpu) / gib:.2f} s per GiB (MD5, BLAKE3, writes)")
        self.report_sinks(up_best)
        self.report_timelines()
        loads = ", ".join(f"{x:.1f}" for x in r.load_avg)
        shares = ", ".join(f"{x:.0%}" for x in r.others_share)
        log(f"   load      : 1-min load average {loads} before each upload; other processes used {shares} of the "
            f"{os.cpu_count()} CPUs during them" + (f" (> {TARGETS['others_share_max']:.0%}: the wall-clock ratio is "
                                                    "not judged; re-run on a quiet machine)" if busy else ""))
        return met and cpu_met and not busy

    def report_timelines(self) -> None:
        """--timeline: per lane, the median share of the spool file's life it was busy, and its CPU
        per GiB; idle time in the MD5 lane is what keeps the upload from MD5's pace."""
        records = self.results.timelines
        if not records:
            return
        gib = self.args.size_mib / 1024
        lanes = sorted({name for record in records for name in record["lanes"]})
        parts = []
        for name in lanes:
            found = [record["lanes"][name] for record in records if name in record["lanes"]]
            parts.append(f"{name} {median([lane['busy_of_life'] for lane in found]):.0%} busy "
                         f"({median([lane.get('cpu_s', 0.0) for lane in found]) / gib:.2f} CPU-s/GiB)")
        life = median([record["life_s"] for record in records])
        log(f"   lanes     : of the spool file's life (median {life:.2f} s): " + ", ".join(parts)
            + "; loop_wait = the event loop waiting for a lane (the memory bound), close = the final fsync")

    def report_sinks(self, upload_best: float) -> None:
        """The ceiling: the same curl upload into bare aiohttp handlers (no spool, no BLAKE3)."""
        r, a = self.results, self.args
        size_mb, gib = a.size_mib * MiB / 1e6, a.size_mib / 1024
        for name in SINKS:
            best, mid = min(r.sink_seconds[name]), median(r.sink_seconds[name])
            what = "readany(), dropped" if name == "sink" else "readany() + MD5 on a thread"
            log(f"   bare aiohttp /{name} ({what}): best {best:.2f} s = {size_mb / best:.0f} MB/s (median "
                f"{size_mb / mid:.0f} MB/s), server CPU {median(r.sink_cpu[name]) / gib:.2f} s/GiB; the upload "
                f"reaches {best / upload_best:.2f}x of it")
        # What no version of the service can go below here, beyond MD5: receiving the body as any
        # aiohttp server does, and BLAKE3 (the content address) over it; the spool write comes on top.
        blake3_s_per_gib = (1 << 30) / 1e6 / r.hash_mb_s["blake3"]
        sink = median(r.sink_cpu["sink"]) / gib
        log(f"   floor     : beyond MD5, the bare sink's {sink:.2f} s/GiB + BLAKE3's {blake3_s_per_gib:.2f} s/GiB (one "
            f"thread, measured above) = {sink + blake3_s_per_gib:.2f} s/GiB before the spool file is written")

    def run(self) -> bool:
        log(f"temp dir {self.root} (data dir and test file on the same filesystem)")
        self.start_servers()
        if not self.args.skip_upload:
            self.make_big_file()
            log("[0] hash speeds")
            self.bench_hashes()
            log(f"[1/2] upload vs cp, {self.args.runs} run(s) each, interleaved")
            self.bench_upload()
            self.big.unlink()
        info: dict[str, Any] = {}
        if not self.args.skip_reads:
            log("[3] read path under wrk")
            info = self.bench_reads()
        return self.report(info)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, 1 run, short wrk runs (a smoke check)")
    parser.add_argument("--runs", type=int, help="runs per measurement (default 3; --quick 1)")
    parser.add_argument("--size-mib", type=int, help="upload size in MiB (default 1024; --quick 128)")
    parser.add_argument("--duration", type=int, help="seconds per wrk run (default 10; --quick 3)")
    parser.add_argument("--warmup", type=int, help="seconds of wrk warm-up per endpoint (default 2; --quick 1)")
    parser.add_argument("--many-versions", type=int, help="versions of the large-history asset (default 1000; --quick 200)")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--workers", default="1", metavar="N[,M...]",
                        help="processes of the service (`serve --workers N`) AND of the bare handler (bound once, forked N "
                             "times): `2` runs both with 2; `1,2` measures both counts interleaved in the same runs (the "
                             "second's cases suffixed @w2). Rows with more than one process are reported, not judged")
    parser.add_argument("--threads", type=int, default=2, help="wrk threads (default 2)")
    parser.add_argument("--upload-timeout", type=int, default=600, help="curl --max-time for one upload")
    parser.add_argument("--tmp-dir", default=None, help="where the temp dir goes (default: $TMPDIR or /tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs, data) afterwards")
    parser.add_argument("--json", help="also write the raw results to this file")
    parser.add_argument("--skip-reads", action="store_true", help="rows 1 and 2 only (no wrk runs)")
    parser.add_argument("--skip-upload", action="store_true", help="row 3 only (the read path; no upload, no big file)")
    parser.add_argument("--against", metavar="TREE",
                        help="also serve the same data dir from another source tree (PYTHONPATH=TREE, e.g. a `git archive` "
                             "of the commit before a change) and measure its read path interleaved with this one's")
    parser.add_argument("--profile", metavar="DIR",
                        help="after the measured runs, one wrk run per service case under py-spy: raw folded stacks in "
                             "DIR/<case>.txt and the top functions (indicative: sampling costs the server CPU)")
    parser.add_argument("--loop-lag", action="store_true",
                        help="run the service under scripts/loop_lag.py and print, per measured run, how late a 1 ms "
                             "timer ran in its event loop and which callbacks held the loop over 1 ms (the probe costs "
                             "the service a few percent: not for the judged figures)")
    parser.add_argument("--timeline", action="store_true",
                        help="row 1: the service records each spool file's lanes (MD5, BLAKE3 + write, flushes) and the "
                             "event loop's waits for them (VERSIONSTORE_SPOOL_TIMELINE); printed per upload")
    parser.add_argument("--profile-rate", type=int, default=500, help="py-spy samples per second (default 500)")
    parser.add_argument("--profile-top", type=int, default=25, help="functions listed per profile (default 25)")
    add_load_option(parser)
    args = parser.parse_args(argv)
    try:
        args.workers = [int(n) for n in str(args.workers).split(",")]
    except ValueError:
        parser.error("--workers takes numbers: 2 or 1,2")
    if any(n < 1 for n in args.workers) or len(set(args.workers)) != len(args.workers):
        parser.error("--workers: distinct numbers of at least 1")
    quick = args.quick
    defaults = {"runs": (3, 1), "size_mib": (1024, 128), "duration": (10, 3), "warmup": (2, 1),
                "many_versions": (1000, 200)}
    for name, (full, small) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, small if quick else full)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    missing = [tool for tool in ("wrk", "curl", "cp", "sync") if shutil.which(tool) is None]
    if missing:
        print(f"error: missing tool(s): {', '.join(missing)}", file=sys.stderr)
        if "wrk" in missing:
            print("install wrk with:  apt-get update && apt-get install -y wrk   (or build it from "
                  "https://github.com/wg/wrk)", file=sys.stderr)
        return 2
    bench = Bench(args)
    interrupt_on_sigterm()
    return run_bench(bench)


if __name__ == "__main__":
    sys.exit(main())
