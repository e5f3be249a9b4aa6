"""Event-loop stalls, logged with what the loop was running (`VERSIONSTORE_STALL_LOG_MS`).

While the event loop runs one thing, every request waits: a `/healthz` that answers late with
nothing slow in the access log. asyncio's debug mode names slow callbacks but times every
callback; this costs a timer on the loop and a thread that wakes four times per threshold.
When the loop has not run its timer for longer than the threshold, the thread takes the loop
thread's stack there and then; when the loop runs again it logs how long it was blocked, with
that stack. A stall during which the watcher could not run (some thread held the GIL
throughout, as a garbage collection does: `VERSIONSTORE_GC_LOG_MS`; or no CPU was free) is
logged without one. Off, it costs nothing: no timer, no thread.
"""

import asyncio
import logging
import sys
import threading
import time
import traceback

from versionstore.gclog import milliseconds_from_env

STALL_LOG_VARIABLE = "VERSIONSTORE_STALL_LOG_MS"
#: Frames of the loop thread's stack logged, innermost last.
STACK_LIMIT = 12

log = logging.getLogger("versionstore.stall")


def threshold_from_env() -> float | None:
    """`VERSIONSTORE_STALL_LOG_MS` in milliseconds; None when unset or empty (off). At least
    1: every turn of the loop takes some time, and a lower threshold would log them all."""
    return milliseconds_from_env(STALL_LOG_VARIABLE, minimum=1.0)


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
        self._seen: tuple[float, str] | None = None  # (ms into the stall, the loop thread's stack then)
        self._timer: asyncio.TimerHandle | None = None
        self._stopped = threading.Event()
        self._watcher = threading.Thread(target=self._watch, name="stall-watch", daemon=True)

    def start(self) -> None:
        self._beat = time.monotonic()
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
        self._beat = now
        self._timer = self.loop.call_later(self.interval, self._tick)
        if blocked_ms <= self.threshold_ms:
            return  # a stack taken just as the loop got going again belongs to no stall
        self.stalls += 1
        self.worst_ms = max(self.worst_ms, blocked_ms)
        if seen is None:
            log.warning("stall: the event loop was blocked for %.1f ms (its stack could not be taken: the watcher "
                        "thread did not run during it; a thread held the GIL, as a garbage collection does, "
                        "or the CPUs were busy elsewhere)", blocked_ms)
        else:
            log.warning("stall: the event loop was blocked for %.1f ms; %.0f ms into it, it was running:\n%s",
                        blocked_ms, seen[0], seen[1])

    def _watch(self) -> None:
        while not self._stopped.wait(self.interval):
            late = time.monotonic() - self._beat - self.interval
            if late > self.threshold and self._seen is None:
                frame = sys._current_frames().get(self._loop_thread)
                if frame is not None:
                    stack = "".join(traceback.format_stack(frame, limit=STACK_LIMIT)).rstrip()
                    self._seen = (late * 1000, stack)


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
