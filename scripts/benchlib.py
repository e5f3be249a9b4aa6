"""Helpers shared by the benchmark scripts (scripts/bench_*.py).

Scripts-level code only: nothing here imports the versionstore package, so the baselines the
benchmarks measure never depend on the package's internals. The scripts import it with
`from benchlib import ...`; each puts its own directory on sys.path first, so that works from
any working directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import psutil

MiB = 1 << 20


# --- small helpers ----------------------------------------------------------------------------


def log(message: str) -> None:
    print(message, flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def write_random_file(path: Path, size: int, block: int = 8 * MiB) -> None:
    """`size` random bytes (nothing dedups or compresses), written in blocks and fsynced."""
    with open(path, "wb") as handle:
        written = 0
        while written < size:
            n = min(block, size - written)
            handle.write(os.urandom(n))
            written += n
        handle.flush()
        os.fsync(handle.fileno())


# --- CPU accounting ---------------------------------------------------------------------------


def process_cpu(proc: psutil.Process) -> float:
    """User + system CPU seconds of one process so far."""
    times = proc.cpu_times()
    return float(times.user + times.system)


def children_cpu() -> float:
    """User + system CPU seconds of all waited-for child processes so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def machine_busy() -> float:
    """CPU seconds the whole machine has been busy (all processes, the kernel, and steal: time
    the hypervisor gave to other guests)."""
    t = psutil.cpu_times()
    return sum(getattr(t, name, 0.0) for name in ("user", "nice", "system", "irq", "softirq", "steal"))


# --- load outside the benchmark ---------------------------------------------------------------

#: Outside load (CPU used by processes outside the benchmark's own process tree, steal
#: included), as a share of the machine's CPUs, above which ratios are not reported: on the
#: 2-CPU reference machine 0.25 is half a core, averaged over the run (why: docs/performance.md,
#: "Benchmarks under outside load").
OUTSIDE_LOAD_MAX = 0.25


def _tree_cpu(root: psutil.Process) -> float:
    """CPU seconds of `root` and its live descendants, with the children each has waited for
    (so a process that exited during the run still counts as the benchmark's own)."""
    total = 0.0
    for proc in [root, *root.children(recursive=True)]:
        try:
            t = proc.cpu_times()
        except psutil.Error:
            continue
        total += t.user + t.system + t.children_user + t.children_system
    return total


@dataclass
class LoadReport:
    seconds: float
    outside_cores: float  # average CPUs busy outside the benchmark's tree
    worst_outside_cores: float  # the worst sampling interval
    own_cores: float
    load_average_max: float  # 1-minute load average (it counts the benchmark's own processes too)

    @property
    def heavy(self) -> bool:
        return self.outside_cores > OUTSIDE_LOAD_MAX * (os.cpu_count() or 1)

    def line(self) -> str:
        cpus = os.cpu_count() or 1
        return (f"machine load during the run ({self.seconds:.0f} s, {cpus} CPUs): outside the benchmark "
                f"{self.outside_cores:.2f} CPUs on average (worst {self.worst_outside_cores:.2f}; limit "
                f"{OUTSIDE_LOAD_MAX * cpus:.2f}), the benchmark itself {self.own_cores:.2f} CPUs, "
                f"1-min load average up to {self.load_average_max:.2f}")


class LoadWatch(threading.Thread):
    """Samples, every `interval` seconds, the machine's busy CPU time, the CPU time of this
    process's tree (servers, wrk, curl, ... started by the benchmark) and the load average;
    outside load is the difference of the first two."""

    def __init__(self, interval: float = 1.0) -> None:
        super().__init__(daemon=True, name="load watch")
        self.interval = interval
        self.me = psutil.Process()
        self.started = time.monotonic()
        self.machine0, self.own0 = machine_busy(), _tree_cpu(self.me)
        self.last = (self.started, self.machine0, self.own0)
        self.worst = 0.0
        self.load_max = os.getloadavg()[0]
        self._stop_event = threading.Event()

    def sample(self) -> tuple[float, float, float]:
        now, machine, own = time.monotonic(), machine_busy(), _tree_cpu(self.me)
        then, machine_then, own_then = self.last
        if now - then > 0:
            self.worst = max(self.worst, max(0.0, (machine - machine_then) - (own - own_then)) / (now - then))
        self.last = (now, machine, own)
        self.load_max = max(self.load_max, os.getloadavg()[0])
        return now, machine, own

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            self.sample()

    def report(self) -> LoadReport:
        """The run so far (sampling goes on)."""
        now, machine, own = self.sample()
        seconds = max(now - self.started, 1e-9)
        outside = max(0.0, (machine - self.machine0) - (own - self.own0))
        return LoadReport(seconds, outside / seconds, self.worst, (own - self.own0) / seconds, self.load_max)

    def stop(self) -> None:
        self._stop_event.set()


_watch: LoadWatch | None = None


def watch_load(interval: float = 1.0) -> LoadWatch:
    """Start sampling the machine's load (once per process; `run_bench` does it for its scripts)."""
    global _watch
    if _watch is None:
        _watch = LoadWatch(interval)
        _watch.start()
    return _watch


def add_load_option(parser: Any) -> None:
    parser.add_argument("--allow-load", action="store_true",
                        help=f"report ratios even when processes outside the benchmark used more than "
                             f"{OUTSIDE_LOAD_MAX * 100:.0f}%% of the CPUs during the run (they are then indicative only)")


def check_load(allow_load: bool = False) -> bool:
    """Call right before ratios are printed: prints the machine's load during the run, and
    False (after `not reported: outside load X`) when outside load was heavy, unless
    `allow_load`. The script then exits non-zero without printing its ratios."""
    report = watch_load().report()
    log(report.line())
    if not report.heavy:
        return True
    if allow_load:
        log(f"WARNING: outside load {report.outside_cores:.2f} CPUs: ratios below are indicative only (--allow-load)")
        return True
    log(f"not reported: outside load {report.outside_cores:.2f} CPUs (limit {OUTSIDE_LOAD_MAX * (os.cpu_count() or 1):.2f}); "
        "rerun on a quiet machine, or pass --allow-load to see indicative ratios")
    return False


def load_record() -> dict[str, Any]:
    """The machine's load during the run so far, as `check_load` judges it, for a --json file."""
    report = watch_load().report()
    return {"seconds": report.seconds, "outside_cores": report.outside_cores,
            "worst_outside_cores": report.worst_outside_cores, "own_cores": report.own_cores,
            "load_average_max": report.load_average_max, "cpus": os.cpu_count() or 1,
            "limit_cores": OUTSIDE_LOAD_MAX * (os.cpu_count() or 1), "heavy": report.heavy}


def write_json(path: str | None, payload: dict[str, Any]) -> None:
    """Write a benchmark's raw results with the run's load (`load`) to `path` (when given).
    Called before `check_load`, so a run refused for outside load still leaves its figures on
    record: scripts/bench_issue10.py prints them as NOT JUDGED instead of losing them."""
    if not path:
        return
    Path(path).write_text(json.dumps({**payload, "load": load_record()}, indent=2, default=str))
    log(f"raw results written to {path}")


# --- HTTP -------------------------------------------------------------------------------------


def wait_http_ready(proc: subprocess.Popen[bytes], url: str, timeout: float, interval: float) -> bool:
    """Poll `url` until it answers 200 (True), while `proc` lives: False once it has exited or
    `timeout` seconds have passed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status == 200:
                    return True
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        time.sleep(interval)
    return False


def curl_json(out: subprocess.CompletedProcess[bytes], what: str = "upload", limit: int = 500) -> tuple[dict[str, Any], str]:
    """The parsed JSON body, and the body, of a `curl ... -o - -w '\\n%{http_code}'` run;
    RuntimeError (naming `what`, with `limit` characters of the body) unless it answered 200."""
    body, _, status = out.stdout.decode(errors="replace").rpartition("\n")
    if out.returncode != 0 or status != "200":
        raise RuntimeError(f"{what} failed: curl rc={out.returncode} status={status} {body[:limit]} {out.stderr!r}")
    result: dict[str, Any] = json.loads(body)
    return result, body


def download_backup_url(base: str, asset_id: str, version_id: str, api_key: str, api_secret: str) -> str:
    """A signed `download_backup` URL of one revision (signed now)."""
    timestamp = str(int(time.time()))
    to_sign = f"asset_id={asset_id}&timestamp={timestamp}&version_id={version_id}"
    signature = hashlib.sha1((to_sign + api_secret).encode()).hexdigest()
    return (f"{base}/download_backup?asset_id={asset_id}&version_id={version_id}"
            f"&timestamp={timestamp}&signature={signature}&api_key={api_key}")


# --- profiles ---------------------------------------------------------------------------------


@dataclass
class Folded:
    """A py-spy `--format raw` profile folded by function: samples in all, samples whose
    innermost Python frame is the function (self), and samples with it anywhere on the stack
    (inclusive; a recursive function counts once per sample)."""

    samples: int
    own: dict[str, int]
    inclusive: dict[str, int]


def fold_profile(path: Path, within: str = "") -> Folded:
    """Read a py-spy raw profile (`frame;frame;... count` per line, frames `name (file:line)`),
    keeping only the stacks that contain `within` (e.g. the event loop's `_run_once`: py-spy
    counts threads blocked on a queue as busy)."""
    samples, own, inclusive = 0, {}, {}  # type: ignore[var-annotated]
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit() or within not in stack:
            continue
        count = int(count_text)
        frames = [_function(frame) for frame in stack.split(";")]
        samples += count
        own[frames[-1]] = own.get(frames[-1], 0) + count
        for name in set(frames):
            inclusive[name] = inclusive.get(name, 0) + count
    return Folded(samples, own, inclusive)


def _function(frame: str) -> str:
    """`name (path/file.py:123)` -> `name (path/file.py)`: one entry per function."""
    name, sep, where = frame.partition(" (")
    return f"{name} ({where.rsplit(':', 1)[0].rstrip(')')})" if sep else frame


def print_profile(folded: Folded, request_us: float, top: int = 20) -> None:
    """The `top` functions by self and by inclusive samples, each share also as microseconds of
    the request's CPU (`request_us`: the server's CPU per request in the profiled run)."""
    for title, counts in (("self", folded.own), ("inclusive", folded.inclusive)):
        log(f"   top {top} functions by {title} samples ({folded.samples} samples, {request_us:.0f} us of CPU per request):")
        for name, count in sorted(counts.items(), key=lambda item: -item[1])[:top]:
            share = count / max(folded.samples, 1)
            log(f"     {share:6.1%} {share * request_us:6.1f} us  {name}")


# --- processes --------------------------------------------------------------------------------


@dataclass
class Server:
    """A child on a fixed port in its own session, output to a log file, healthy when `health`
    answers 200; stopped with SIGINT, killed if it is still there after `stop_timeout` seconds."""

    name: str
    argv: list[str]
    port: int
    log_path: Path
    health: str = "/healthz"
    stop_timeout: float = 10.0
    proc: subprocess.Popen[bytes] | None = None
    #: Variables added to this process's environment for the child, and its working directory
    #: (`python -m` imports from the working directory first: another tree needs both).
    env: dict[str, str] | None = None
    cwd: Path | None = None

    def start(self, timeout: float = 30.0) -> None:
        out = open(self.log_path, "ab")
        env = {**os.environ, **self.env} if self.env else None
        self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env,
                                     cwd=self.cwd)
        out.close()
        if wait_http_ready(self.proc, f"http://127.0.0.1:{self.port}{self.health}", timeout, interval=0.1):
            return
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited early; see {self.log_path}:\n{self.log_path.read_text()[-2000:]}")
        raise RuntimeError(f"{self.name} did not become healthy within {timeout}s")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=self.stop_timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def cpu(self) -> float:
        """User + system CPU seconds of the process and its worker processes (`--workers`) so far."""
        return _tree_cpu(psutil.Process(self.pid))


class RssSampler(threading.Thread):
    """Samples a process's RSS every `interval` seconds until stopped (a subclass samples more
    by extending `sample`)."""

    def __init__(self, pid: int, interval: float = 0.01) -> None:
        super().__init__(daemon=True)
        self.process = psutil.Process(pid)
        self.interval = interval
        self.baseline = self.process.memory_info().rss
        self.peak = self.baseline
        self.samples = 0
        self._stop_event = threading.Event()

    def sample(self) -> None:
        self.peak = max(self.peak, self.process.memory_info().rss)
        self.samples += 1

    def run(self) -> None:
        while not self._stop_event.is_set():
            try:
                self.sample()
            except psutil.Error:
                break
            self._stop_event.wait(self.interval)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()

    @property
    def growth(self) -> int:
        return int(self.peak - self.baseline)


# --- a timeline of one process: CPU per thread, bytes written ---------------------------------


def _thread_cpu() -> dict[int, float]:
    """CPU seconds of each thread of this process so far (schedstat: nanoseconds)."""
    found: dict[int, float] = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            found[int(task.name)] = int((task / "schedstat").read_text().split()[0]) / 1e9
        except (OSError, ValueError, IndexError):
            continue
    return found


def _dirtied_bytes() -> int:
    """Bytes this process wrote into the page cache so far (/proc/self/io write_bytes)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("write_bytes:"):
            return int(line.split()[1])
    return 0


def _device_written() -> int:
    """Bytes written to the machine's disks so far (/proc/diskstats, whole devices only)."""
    total = 0
    for line in Path("/proc/diskstats").read_text().splitlines():
        fields = line.split()
        name = fields[2]
        if name.startswith(("loop", "ram", "zram")) or not Path(f"/sys/block/{name}").exists():
            continue
        total += int(fields[9]) * 512
    return total


def _group(name: str) -> str:
    """A thread's pool name without its number (`archive-md5_0` -> `archive-md5`)."""
    head, _, tail = name.rpartition("_")
    return head if head and tail.isdigit() else name


class Timeline(threading.Thread):
    """Every `interval` seconds: the CPU each group of this process's threads used (named by
    Python's thread names; threads Python does not know, like BLAKE3's native pool, are
    `native`), the bytes the process dirtied and the bytes the disks wrote. `table()` prints
    one row per interval, in cores (1.00 = one CPU busy the whole interval) and MiB/s."""

    def __init__(self, interval: float = 0.1) -> None:
        super().__init__(daemon=True, name="timeline")
        self.interval = interval
        self.rows: list[tuple[float, dict[str, float], float, float]] = []
        self.marks: list[tuple[float, str]] = []
        self._stop_event = threading.Event()
        self._t0 = time.monotonic()
        self._last = (self._t0, _thread_cpu(), _dirtied_bytes(), _device_written())

    def mark(self, label: str) -> None:
        self.marks.append((time.monotonic() - self._t0, label))

    def _sample(self) -> None:
        now, cpu, dirtied, device = time.monotonic(), _thread_cpu(), _dirtied_bytes(), _device_written()
        then, cpu_then, dirtied_then, device_then = self._last
        names = {t.native_id: _group(t.name) for t in threading.enumerate() if t.native_id is not None}
        used: dict[str, float] = {}
        for tid, seconds in cpu.items():
            group = names.get(tid, "native")
            used[group] = used.get(group, 0.0) + (seconds - cpu_then.get(tid, 0.0)) / (now - then)
        self.rows.append((now - self._t0, used, (dirtied - dirtied_then) / (now - then), (device - device_then) / (now - then)))
        self._last = (now, cpu, dirtied, device)

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            self._sample()

    def stop(self) -> None:
        self._stop_event.set()
        self.join()
        self._sample()

    def table(self) -> str:
        totals: dict[str, float] = {}
        for _, used, _, _ in self.rows:
            for group, cores in used.items():
                totals[group] = totals.get(group, 0.0) + cores
        groups = [g for g, total in sorted(totals.items(), key=lambda kv: -kv[1]) if total * self.interval >= 0.02 and g != "timeline"]
        lines = ["    t  " + " ".join(f"{g[:12]:>12s}" for g in groups) + "   all CPU  dirtied MiB/s  disk MiB/s"]
        marks = list(self.marks)
        for at, used, dirtied, device in self.rows:
            while marks and marks[0][0] <= at:
                lines.append(f"  -- {marks.pop(0)[1]}")
            lines.append(f"{at:5.1f}  " + " ".join(f"{used.get(g, 0.0):12.2f}" for g in groups)
                         + f"  {sum(v for k, v in used.items() if k != 'timeline'):8.2f}  {dirtied / MiB:13.0f}  {device / MiB:10.0f}")
        seconds = {g: totals[g] * self.interval for g in groups}
        lines.append("  CPU seconds: " + ", ".join(f"{g} {s:.2f}" for g, s in seconds.items()))
        return "\n".join(lines)


# --- a benchmark's lifecycle ------------------------------------------------------------------


class _Stoppable(Protocol):
    name: str

    def stop(self) -> None: ...


class _Bench(Protocol):
    def run(self) -> bool: ...

    def cleanup(self) -> None: ...


def stop_servers(servers: Iterable[_Stoppable]) -> None:
    for server in servers:
        try:
            server.stop()
        except Exception as exc:  # keep cleaning up
            log(f"warning: stopping {server.name}: {exc}")


def remove_temp_dir(root: Path, keep: bool) -> None:
    if keep:
        log(f"kept {root}")
    else:
        shutil.rmtree(root, ignore_errors=True)


def interrupt_on_sigterm() -> None:
    """SIGTERM raises KeyboardInterrupt, so it ends a run like Ctrl-C (and `run_bench` cleans up)."""

    def on_signal(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)


def run_bench(bench: _Bench) -> int:
    """Run a benchmark and always clean up: exit status 0 when its targets are met, 1 when not,
    130 when interrupted. The machine's load is watched from here on (`check_load`)."""
    watch_load()
    try:
        ok = bench.run()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        bench.cleanup()
    return 0 if ok else 1
