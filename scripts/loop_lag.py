#!/usr/bin/env python3
"""Run a Python module (e.g. `versionstore serve`) with an event-loop lag probe in every loop it makes.

    python scripts/loop_lag.py OUT.jsonl versionstore serve --data-dir ... --port ...

Each event loop the module creates (one per `serve` worker too) gets two probes:
- a timer due every millisecond: how late it runs is how long the loop was busy elsewhere
  (one pass over the ready callbacks, i.e. a batch of requests, or one long callback);
- every callback timed (asyncio's `Handle._run`): the ones over `SLOW_MS` are counted by what
  they ran (the task's name and coroutine), which names any periodic duty (a ticker, a sweep,
  a log flush) that holds the loop.
On SIGUSR1 a process appends one JSON line to OUT with what it saw since the last signal (and
starts afresh): `scripts/bench_core.py --loop-lag` signals before and after each wrk run. The
probes cost the loop a few percent (a timer a millisecond, two clock reads a callback): they
are for finding pauses, not for measuring throughput.
"""

from __future__ import annotations

import asyncio
import asyncio.events
import contextlib
import json
import os
import runpy
import signal
import sys
import time
from typing import Any

SLOW_MS = 1.0
TICK = 0.001
_GAPS_MS = (1, 2, 5, 10, 20, 50, 100)


class Probe:
    def __init__(self, out: str) -> None:
        self.out = out
        self.reset()

    def reset(self) -> None:
        self.started = time.monotonic()
        self.ticks = 0
        self.late_max = 0.0
        self.late_over = dict.fromkeys(_GAPS_MS, 0)
        self.late_sum = 0.0
        self.slow: dict[str, list[float]] = {}  # what -> [count, total ms, max ms]

    def tick(self, loop: asyncio.AbstractEventLoop, due: float) -> None:
        now = loop.time()
        late = (now - due) * 1000
        self.ticks += 1
        self.late_sum += late
        self.late_max = max(self.late_max, late)
        for limit in _GAPS_MS:
            if late > limit:
                self.late_over[limit] += 1
        loop.call_at(now + TICK, self.tick, loop, now + TICK)

    def callback(self, handle: asyncio.Handle, ms: float) -> None:
        what = _describe(handle)
        entry = self.slow.setdefault(what, [0, 0.0, 0.0])
        entry[0] += 1
        entry[1] += ms
        entry[2] = max(entry[2], ms)

    def dump(self) -> None:
        record: dict[str, Any] = {
            "pid": os.getpid(), "seconds": time.monotonic() - self.started, "ticks": self.ticks,
            "late_max_ms": round(self.late_max, 3), "late_mean_ms": round(self.late_sum / max(self.ticks, 1), 3),
            "late_over_ms": {str(k): v for k, v in self.late_over.items()},
            "slow_callbacks": {what: {"count": c, "total_ms": round(t, 2), "max_ms": round(m, 2)}
                               for what, (c, t, m) in sorted(self.slow.items(), key=lambda kv: -kv[1][1])[:20]},
        }
        with open(self.out, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        self.reset()


def _describe(handle: asyncio.Handle) -> str:
    callback = getattr(handle, "_callback", None)
    owner = getattr(callback, "__self__", None)
    if isinstance(owner, asyncio.Task):
        coro = owner.get_coro()
        return f"task {owner.get_name()!r} {getattr(coro, '__qualname__', type(coro).__name__)}"
    return getattr(callback, "__qualname__", repr(callback))


_PROBE: Probe | None = None


def _install(out: str) -> None:
    global _PROBE
    _PROBE = Probe(out)
    run = asyncio.events.Handle._run

    def timed(self: asyncio.Handle) -> None:
        started = time.perf_counter()
        run(self)
        ms = (time.perf_counter() - started) * 1000
        if ms > SLOW_MS and _PROBE is not None:
            _PROBE.callback(self, ms)

    asyncio.events.Handle._run = timed  # type: ignore[method-assign]

    base = asyncio.get_event_loop_policy()

    class Policy(type(base)):  # type: ignore[misc]
        def new_event_loop(self) -> asyncio.AbstractEventLoop:
            loop = super().new_event_loop()
            assert _PROBE is not None
            _PROBE.reset()  # a forked worker starts its own count
            loop.call_soon(_PROBE.tick, loop, loop.time())

            def on_signal(*_: object) -> None:
                with contextlib.suppress(RuntimeError):  # that loop has ended (e.g. the parent's migration loop)
                    loop.call_soon_threadsafe(probe.dump)

            probe = _PROBE
            signal.signal(signal.SIGUSR1, on_signal)
            return loop

    asyncio.set_event_loop_policy(Policy())


def main() -> None:
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    out, module, rest = sys.argv[1], sys.argv[2], sys.argv[3:]
    _install(out)
    sys.argv = [module, *rest]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
