"""Event-loop stalls, logged with what the loop was running (`VERSIONSTORE_STALL_LOG_MS`).

While the event loop runs one thing, every request waits: a `/healthz` that answers late with
nothing slow in the access log. asyncio's debug mode names slow callbacks but times every
callback; this costs a timer on the loop and a thread that wakes four times per threshold.
When the loop has not run its timer for longer than the threshold, the thread takes the loop
thread's stack there and then; when the loop runs again it logs how long it was blocked, with
that stack. A stall during which the watcher could not run (some thread held the GIL
throughout, as a garbage collection does: `VERSIONSTORE_GC_LOG_MS`; or no CPU was free) is
logged without one. Every line also says where the CPU went meanwhile (each Python thread's
CPU time, this process's, and how busy the machine's CPUs were), which tells the two apart: a
worker thread with CPU time near the stall's length held the GIL; a process that used little
while the machine was busy was not scheduled. Off, it costs nothing: no timer, no thread.
"""

import asyncio
import logging
import sys
import threading
import time
from dataclasses import dataclass
from types import FrameType

from versionstore.gclog import milliseconds_from_env

STALL_LOG_VARIABLE = "VERSIONSTORE_STALL_LOG_MS"
#: Frames of the loop thread's stack logged, innermost last.
STACK_LIMIT = 12
#: Threads named in a stall's CPU line, the busiest first.
BUSIEST_THREADS = 3

log = logging.getLogger("versionstore.stall")


def threshold_from_env() -> float | None:
    """`VERSIONSTORE_STALL_LOG_MS` in milliseconds; None when unset or empty (off). At least
    1: every turn of the loop takes some time, and a lower threshold would log them all."""
    return milliseconds_from_env(STALL_LOG_VARIABLE, minimum=1.0)


@dataclass(frozen=True)
class CpuTimes:
    """CPU seconds used so far: per Python thread (ident: (name, seconds)) and by the whole
    process (native threads too)."""

    threads: dict[int, tuple[str, float]]
    process: float

    @classmethod
    def now(cls) -> "CpuTimes":
        """A system call per thread, none of which lets the GIL go: cheap enough to take on
        every turn of the stall timer."""
        threads = {}
        for thread in threading.enumerate():
            if thread.ident is None:
                continue
            try:
                threads[thread.ident] = (thread.name, time.clock_gettime(time.pthread_getcpuclockid(thread.ident)))
            except (OSError, AttributeError):  # exited meanwhile, or a platform without thread clocks
                continue
        return cls(threads, time.process_time())

    def since(self, before: "CpuTimes", loop_thread: int, machine: "MachineSpan | None") -> str:
        """What each thread and the process used between `before` and this, and the machine over `machine`."""
        used = []
        for ident, (name, seconds) in self.threads.items():
            earlier = before.threads.get(ident)
            spent = seconds - (earlier[1] if earlier is not None else 0.0)
            if spent < 0:  # a new thread under an ended one's ident: all its time is since
                spent = seconds
            used.append((spent, "event loop" if ident == loop_thread else name))
        used.sort(reverse=True)
        process = self.process - before.process
        # Native threads (BLAKE3's, say) and threads that ended meanwhile have no clock here.
        rest = process - sum(spent for spent, _ in used)
        named = [f"{name} {spent * 1000:.0f}" for spent, name in used[:BUSIEST_THREADS] if spent >= 0.0005]
        named += [f"other threads {rest * 1000:.0f}"] if rest >= 0.0005 else []
        text = f"CPU meanwhile: this process {process * 1000:.0f} ms"
        text += f" ({', '.join(named)} ms)" if named else ""
        if machine is not None:
            text += f"; the machine's CPUs {machine.busy:.0%} busy over {machine.seconds * 1000:.0f} ms"
        return text


@dataclass(frozen=True)
class MachineSpan:
    busy: float  # share of all CPUs' time
    seconds: float


def _machine_cpu() -> tuple[float, float] | None:
    """(busy, total) ticks of all CPUs from /proc/stat's first line; None where there is none."""
    try:
        with open("/proc/stat", "rb") as stat:
            fields = [int(x) for x in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = sum(fields[3:5])  # idle and iowait: time no process used the CPU
    return float(sum(fields[:8]) - idle), float(sum(fields[:8]))


class StallWatch:
    """Made and started on the loop's thread; `stop()` there too."""

    def __init__(self, loop: asyncio.AbstractEventLoop, threshold_ms: float) -> None:
        self.loop = loop
        self.threshold_ms = threshold_ms
        self.threshold = threshold_ms / 1000
        self.interval = max(self.threshold / 4, 0.001)
        self.stalls = 0
        self.worst_ms = 0.0
        self._loop_thread = threading.get_ident()
        self._beat = time.monotonic()
        self._cpu: CpuTimes | None = None  # at the last beat
        # (monotonic, /proc/stat's busy and total ticks): the watcher's newest reading (a file
        # read lets the GIL go, which the loop should not do on every turn of its timer), and
        # the one that was newest at the last beat, from before any stall that follows it.
        self._machine: tuple[float, tuple[float, float] | None] | None = None
        self._machine_at_beat: tuple[float, tuple[float, float] | None] | None = None
        self._seen: tuple[float, str] | None = None  # (ms into the stall, the loop thread's stack then)
        self._timer: asyncio.TimerHandle | None = None
        self._stopped = threading.Event()
        self._watcher = threading.Thread(target=self._watch, name="stall-watch", daemon=True)

    def start(self) -> None:
        machine = _machine_cpu()  # the watcher's readings follow; this one covers a stall before its first
        self._beat = time.monotonic()
        self._machine = self._machine_at_beat = (self._beat, machine)
        self._cpu = CpuTimes.now()
        self._timer = self.loop.call_later(self.interval, self._tick)
        self._watcher.start()
        log.info("stall: logging event-loop stalls over %g ms (%s)", self.threshold_ms, STALL_LOG_VARIABLE)

    def stop(self) -> None:
        """Stop watching, with a last line: how many stalls and the worst."""
        self._stopped.set()
        if self._timer is not None:
            self._timer.cancel()
        self._watcher.join(timeout=1.0)
        log.warning("stall: %d event-loop stall(s) over %g ms; worst %.1f ms", self.stalls, self.threshold_ms, self.worst_ms)

    def _tick(self) -> None:
        now = time.monotonic()
        blocked_ms = (now - self._beat - self.interval) * 1000  # how late this timer ran
        seen, self._seen = self._seen, None
        cpu, before, machine_before = CpuTimes.now(), self._cpu, self._machine_at_beat
        self._beat, self._cpu, self._machine_at_beat = now, cpu, self._machine
        self._timer = self.loop.call_later(self.interval, self._tick)
        if blocked_ms <= self.threshold_ms:
            return  # a stack taken just as the loop got going again belongs to no stall
        self.stalls += 1
        self.worst_ms = max(self.worst_ms, blocked_ms)
        machine = _machine_since(machine_before, now)
        used = cpu.since(before, self._loop_thread, machine) if before is not None else "CPU meanwhile: unknown"
        if seen is None:
            log.warning("stall: the event loop was blocked for %.1f ms (its stack could not be taken: the watcher "
                        "thread did not run during it; a thread held the GIL, as a garbage collection does, "
                        "or the CPUs were busy elsewhere); %s", blocked_ms, used)
        else:
            log.warning("stall: the event loop was blocked for %.1f ms; %s; %.0f ms into it, it was running:\n%s",
                        blocked_ms, used, seen[0], seen[1])

    def _watch(self) -> None:
        while not self._stopped.wait(self.interval):
            machine = _machine_cpu()  # the file read lets the GIL go: stamp the reading after it
            self._machine = (time.monotonic(), machine)
            late = time.monotonic() - self._beat - self.interval
            if late > self.threshold and self._seen is None:
                frame = sys._current_frames().get(self._loop_thread)
                if frame is not None:
                    self._seen = (late * 1000, _stack_text(frame))


def _stack_text(frame: FrameType) -> str:
    """The innermost STACK_LIMIT frames as traceback's `File ..., line N, in f` lines, innermost
    last, without their source lines: reading those (linecache, cold source files) held the GIL
    for tens of milliseconds in the watcher, which lengthened the very stall it described."""
    frames: list[tuple[str, int, str]] = []
    current: FrameType | None = frame
    while current is not None and len(frames) < STACK_LIMIT:
        frames.append((current.f_code.co_filename, current.f_lineno, current.f_code.co_name))
        current = current.f_back
    return "\n".join(f'  File "{path}", line {line}, in {name}' for path, line, name in reversed(frames))


def _machine_since(reading: tuple[float, tuple[float, float] | None] | None, now: float) -> MachineSpan | None:
    """The machine's busy share from `reading` (taken before the stall) to now."""
    later = _machine_cpu()
    if reading is None or reading[1] is None or later is None or later[1] <= reading[1][1]:
        return None
    taken, (busy, total) = reading[0], reading[1]
    return MachineSpan((later[0] - busy) / (later[1] - total), now - taken)


def install(threshold_ms: float | None, loop: asyncio.AbstractEventLoop) -> StallWatch | None:
    """Start watching `loop` (the running one; None threshold: do nothing)."""
    if threshold_ms is None:
        return None
    watch = StallWatch(loop, threshold_ms)
    watch.start()
    return watch


def uninstall(watch: StallWatch | None) -> None:
    if watch is not None:
        watch.stop()
