"""Slow garbage collections, logged when an operator asks (`VERSIONSTORE_GC_LOG_MS`).

A collection holds the GIL for as long as it runs, in whichever thread allocated: every
request waits for it. The event loop's stalls during a long listing walk were full
collections (docs/performance.md); this makes them visible in the service's own log instead
of a probe put on PYTHONPATH. Off, it costs nothing: no callback is installed.
"""

import gc
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from versionstore.config import ConfigError

GC_LOG_VARIABLE = "VERSIONSTORE_GC_LOG_MS"

log = logging.getLogger("versionstore.gc")


@dataclass
class SlowCollections:
    """A `gc.callbacks` entry: times each collection and reports those over `threshold_ms`
    with the generation, the duration, what it freed and how many tracked objects are in the
    generation the survivors went to (for a full collection: about what it visited).

    The report is handed to `defer` (the event loop's call_soon_threadsafe): a callback runs
    in the middle of whatever allocation started the collection, where walking the heap
    (gc.get_objects) can meet a tuple still being built and break it."""

    threshold_ms: float
    defer: Callable[[Callable[[], None]], object]
    worst_ms: dict[int, float] = field(default_factory=dict)  # per generation, reported or not
    slow: int = 0
    _started: float = 0.0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        took = (time.perf_counter() - self._started) * 1000
        generation = int(info["generation"])
        if took > self.worst_ms.get(generation, 0.0):
            self.worst_ms[generation] = took
        if took >= self.threshold_ms:
            self.slow += 1
            self.defer(partial(_report, generation, took, int(info["collected"]), int(info["uncollectable"])))


def _report(generation: int, took: float, collected: int, uncollectable: int) -> None:
    into = min(generation + 1, 2)
    log.warning("gc: generation %d collection took %.1f ms; collected %d, uncollectable %d; "
                "%d tracked objects now in generation %d", generation, took, collected, uncollectable,
                len(gc.get_objects(into)), into)


def threshold_from_env() -> float | None:
    """`VERSIONSTORE_GC_LOG_MS` in milliseconds; None when unset or empty (off)."""
    return milliseconds_from_env(GC_LOG_VARIABLE)


def milliseconds_from_env(variable: str, minimum: float = 0.0) -> float | None:
    """A probe's threshold from the environment, in milliseconds; None when unset or empty."""
    value = os.environ.get(variable, "").strip()
    if not value:
        return None
    try:
        threshold = float(value)
    except ValueError:
        threshold = math.nan
    if not math.isfinite(threshold):
        raise ConfigError(f"{variable}={value!r} is not a number of milliseconds")
    if threshold < minimum:
        raise ConfigError(f"{variable}={value!r} must be at least {minimum:g}" if minimum else f"{variable}={value!r} must not be negative")
    return threshold


def install(threshold_ms: float | None, defer: Callable[[Callable[[], None]], object]) -> SlowCollections | None:
    """Start logging collections slower than `threshold_ms` (None: do nothing); `defer`
    runs each report soon, outside the collection (loop.call_soon_threadsafe)."""
    if threshold_ms is None:
        return None
    probe = SlowCollections(threshold_ms, defer)
    gc.callbacks.append(probe)
    log.info("gc: logging collections over %g ms (%s)", threshold_ms, GC_LOG_VARIABLE)
    return probe


def uninstall(probe: SlowCollections | None) -> None:
    """Stop logging, with a last line: the worst collection of each generation seen."""
    if probe is None:
        return
    gc.callbacks.remove(probe)
    worst = ", ".join(f"generation {g} {ms:.1f} ms" for g, ms in sorted(probe.worst_ms.items()))
    log.warning("gc: %d collection(s) over %g ms; worst: %s", probe.slow, probe.threshold_ms, worst or "none")
