"""Slow garbage collections, logged when an operator asks (`VERSIONSTORE_GC_LOG_MS`).

A collection holds the GIL for as long as it runs, in whichever thread allocated: every
request waits for it. The event loop's stalls during a long listing walk were full
collections (docs/performance.md); this makes them visible in the service's own log instead
of a probe put on PYTHONPATH. Off, it costs nothing: no callback is installed.
"""

import gc
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

from versionstore.config import ConfigError

GC_LOG_VARIABLE = "VERSIONSTORE_GC_LOG_MS"

log = logging.getLogger("versionstore.gc")


@dataclass
class SlowCollections:
    """A `gc.callbacks` entry: times each collection and logs those over `threshold_ms` with
    the generation, the duration, what it freed and how many tracked objects survive in the
    generation it moved them to (for a full collection, visited = survivors + collected)."""

    threshold_ms: float
    worst_ms: dict[int, float] = field(default_factory=dict)  # per generation, logged or not
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
        if took < self.threshold_ms:
            return
        self.slow += 1
        into = min(generation + 1, 2)
        log.warning("gc: generation %d collection took %.1f ms; collected %d, uncollectable %d; "
                    "%d tracked objects now in generation %d", generation, took, info["collected"],
                    info["uncollectable"], len(gc.get_objects(into)), into)


def threshold_from_env() -> float | None:
    """`VERSIONSTORE_GC_LOG_MS` in milliseconds; None when unset or empty (off)."""
    value = os.environ.get(GC_LOG_VARIABLE, "").strip()
    if not value:
        return None
    try:
        threshold = float(value)
    except ValueError:
        raise ConfigError(f"{GC_LOG_VARIABLE}={value!r} is not a number of milliseconds") from None
    if threshold < 0:
        raise ConfigError(f"{GC_LOG_VARIABLE}={value!r} must not be negative")
    return threshold


def install(threshold_ms: float | None) -> SlowCollections | None:
    """Start logging collections slower than `threshold_ms` (None: do nothing)."""
    if threshold_ms is None:
        return None
    probe = SlowCollections(threshold_ms)
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
