"""The spool's worker lanes: each one runs its jobs in order on one worker thread at a time.

A lane is a queue drained by one thread job that keeps taking the next block while there is
one, so a busy lane (MD5, the serial hash, on an upload that outruns it) never goes back to
the event loop between blocks: the loop only queues blocks and collects one completion per
block. Lanes are independent: the MD5 lane never waits for the write lane, only the caller's
memory bound (blocks in flight) holds either back. A failed job fails every later job of its
lane without running it: the bytes must reach each hasher and the file in order.

Lanes run on a pool of their own, not the event loop's default executor: a lane of a long
upload holds its thread for as long as it has blocks, and must not keep the service's other
thread work (database commits, file operations) waiting. A lane also gives its thread up after
`RUN` blocks in a row (it queues itself again behind the other lanes waiting), so many
concurrent uploads share the pool instead of the first ones holding it.

`Timeline` records when each lane was busy and when the event loop waited for a lane, behind
the `VERSIONSTORE_SPOOL_TIMELINE` environment variable (a file that gets one JSON line per
spool file): `scripts/bench_core.py --timeline` reads it to show where an upload idles.
"""

import asyncio
import collections
import contextlib
import json
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

#: A file to append one JSON line per spool file to: the lanes' busy intervals and the loop's waits.
TIMELINE_ENV = "VERSIONSTORE_SPOOL_TIMELINE"
#: Equal slices of a spool file's life the timeline gives each lane's busy share for.
SLICES = 10
#: Blocks a lane runs in a row before it gives its thread up to the other lanes waiting.
RUN = 16
#: Threads of all lanes together: two lanes per upload, so 16 uploads run at full pace at once.
_THREADS = ThreadPoolExecutor(max_workers=32, thread_name_prefix="spool-lane")

Chunks = list[bytes | memoryview]
Job = tuple[Callable[[Chunks], None], Chunks, asyncio.Future[None]]


class Timeline:
    """Busy intervals per lane and the event loop's waits of one spool file (monotonic seconds)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.started = time.monotonic()
        self.intervals: dict[str, list[tuple[float, float]]] = collections.defaultdict(list)
        self.cpu: dict[str, float] = collections.defaultdict(float)  # the lanes' thread CPU seconds

    @staticmethod
    def from_env() -> "Timeline | None":
        path = os.environ.get(TIMELINE_ENV)
        return Timeline(path) if path else None

    def record(self, lane: str, start: float, end: float, cpu: float = 0.0) -> None:
        self.intervals[lane].append((start, end))  # each lane appends from one thread at a time
        self.cpu[lane] += cpu

    def summary(self, size: int, finished: float) -> dict[str, Any]:
        """Per lane (and the loop's waits): jobs, busy and CPU seconds, the busy share of the
        spool's life, of the span from its first to its last job, and of each tenth of the life."""
        life = max(finished - self.started, 1e-9)
        lanes: dict[str, Any] = {}
        for lane, spans in self.intervals.items():
            busy = sum(end - start for start, end in spans)
            span = max(spans[-1][1] - spans[0][0], 1e-9) if spans else 1e-9
            lanes[lane] = {"jobs": len(spans), "busy_s": round(busy, 4), "cpu_s": round(self.cpu[lane], 4),
                           "busy_of_life": round(busy / life, 3),
                           "busy_of_span": round(busy / span, 3),
                           "first_s": round(spans[0][0] - self.started, 4) if spans else None,
                           "last_s": round(spans[-1][1] - self.started, 4) if spans else None,
                           "slices": _slices(spans, self.started, life)}
        return {"bytes": size, "life_s": round(life, 4), "lanes": lanes}

    def write(self, size: int) -> None:
        line = json.dumps(self.summary(size, time.monotonic()))
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(line + "\n")


def _slices(spans: list[tuple[float, float]], started: float, life: float, count: int = SLICES) -> list[float]:
    """The busy share of each of `count` equal slices of the spool's life: where a lane idles."""
    width = life / count
    busy = [0.0] * count
    for start, end in spans:
        start, end = start - started, end - started
        for index in range(max(0, int(start / width)), min(count, int(end / width) + 1)):
            low, high = index * width, (index + 1) * width
            busy[index] += max(0.0, min(end, high) - max(start, low))
    return [round(share / width, 2) for share in busy]


class Lane:
    """Jobs run one after the other, in the order submitted, on one worker thread at a time."""

    def __init__(self, name: str, timeline: Timeline | None) -> None:
        self.name = name
        self._timeline = timeline
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop of the first submit
        self._jobs: collections.deque[Job] = collections.deque()
        self._lock = threading.Lock()
        self._running = False
        self._failure: BaseException | None = None

    def submit(self, work: Callable[[Chunks], None], chunks: Chunks) -> asyncio.Future[None]:
        """`work(chunks)` after every job submitted before; done (or failed) when it has run."""
        loop = self._loop = self._loop or asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        with self._lock:
            self._jobs.append((work, chunks, future))
            start, self._running = not self._running, True
        if start:  # no thread drains the lane: start one (it stops when the lane is empty)
            _THREADS.submit(self._drain, loop)
        return future

    def _drain(self, loop: asyncio.AbstractEventLoop) -> None:
        for _ in range(RUN):
            with self._lock:
                if not self._jobs:
                    self._running = False
                    return
                work, chunks, future = self._jobs.popleft()
            if self._failure is None:
                started, cpu = time.monotonic(), time.thread_time()
                try:
                    work(chunks)
                except BaseException as error:  # handed to the loop, which raises it
                    self._failure = error
                if self._timeline is not None:
                    self._timeline.record(self.name, started, time.monotonic(), time.thread_time() - cpu)
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits for this job any more
                loop.call_soon_threadsafe(_settle, future, self._failure)
        _THREADS.submit(self._drain, loop)  # RUN blocks done: behind the other lanes waiting for a thread


def _settle(future: asyncio.Future[None], failure: BaseException | None) -> None:
    if future.done():
        return
    if failure is None:
        future.set_result(None)
    else:
        future.set_exception(failure)
        future.exception()  # retrieved: a failure nobody awaits any more (a discard) is not logged
