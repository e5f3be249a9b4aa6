"""Phase timings of one archive import (`bench_snapshots.py --archive-tail`): what runs after
the last member was read, the import's tail, which overlaps nothing.

Wraps, for the length of a `Phases` block, the steps an import waits for: each staged file's
end (`staging._File._end`: its last writes, truncation and fsync), each link into a local
store (`LocalBlobStore._link`; `_put_file` in code before it) and each directory fsync, each metadata write
transaction (BEGIN to COMMIT, its wait for the writer lock included) and point read. Each is
recorded as a span (start, end, seconds since the block began); the progress callback marks
the reading. `tail()` says, for the stretch from the last read to the end, how long each kind
of step covered it (spans of one kind overlap: their union) and how many ran in it.
Measurement only: nothing here changes what the import does.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

KINDS = ("member fsync", "link", "dir fsync", "sql transaction", "sql read", "md5 done")


class Phases:
    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.spans: list[tuple[str, float, float]] = []
        self.last_read = 0.0
        self.end = 0.0
        self._lock = threading.Lock()

    def now(self) -> float:
        return time.perf_counter() - self.t0

    def record(self, kind: str, start: float, end: float) -> None:
        with self._lock:
            self.spans.append((kind, start, end))

    def progress(self, _size: int) -> None:
        self.last_read = self.now()

    def last(self, kind: str) -> float:
        """When the last span of `kind` ended."""
        return max((e for k, _, e in self.spans if k == kind), default=0.0)

    def tail(self) -> dict[str, tuple[float, int]]:
        """kind -> (seconds of the tail it covered, spans in the tail)."""
        out: dict[str, tuple[float, int]] = {}
        for kind in KINDS:
            inside = sorted((max(s, self.last_read), min(e, self.end)) for k, s, e in self.spans if k == kind and e > self.last_read)
            covered, reach = 0.0, self.last_read
            for start, end in inside:
                if end > reach:
                    covered += end - max(start, reach)
                    reach = end
            out[kind] = (covered, len(inside))
        return out


@contextlib.contextmanager
def watching(phases: Phases, meta: Any) -> Iterator[None]:
    """The wrappers above in place for the block (the SQL ones on the metadata store `meta`,
    which binds its gateway's methods once), the originals back afterwards."""
    from versionstore import staging
    from versionstore.blobstore import local

    def timed(kind: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = phases.now()
            try:
                return function(*args, **kwargs)
            finally:
                phases.record(kind, start, phases.now())
        return wrapper

    def timed_async(kind: str, function: Callable[..., Any]) -> Callable[..., Any]:
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = phases.now()
            try:
                return await function(*args, **kwargs)
            finally:
                phases.record(kind, start, phases.now())
        return wrapper

    transaction = meta.transaction

    @contextlib.asynccontextmanager
    async def timed_transaction() -> AsyncIterator[Any]:
        start = phases.now()
        try:
            async with transaction() as db:
                yield db
        finally:
            phases.record("sql transaction", start, phases.now())

    stage = staging.Stager.stage

    def staged(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = stage(self, *args, **kwargs)
        if result.md5 is not None:
            result.md5.add_done_callback(lambda _: phases.record("md5 done", phases.now(), phases.now()))
        return result

    saved: list[tuple[Any, str, Any]] = [
        (staging._File, "_end", staging._File._end),
        (local.LocalBlobStore, "_put_file", local.LocalBlobStore._put_file),
        (local.LocalBlobStore, "_link", getattr(local.LocalBlobStore, "_link", None)),
        (local, "fsync_path", local.fsync_path),
        (meta, "transaction", meta.transaction),
        (meta, "_one", meta._one),
        (meta, "_all", meta._all),
        (staging.Stager, "stage", staging.Stager.stage),
    ]
    staging._File._end = timed("member fsync", staging._File._end)
    if hasattr(local.LocalBlobStore, "_link"):  # put_files: links first, then each directory's fsync
        local.LocalBlobStore._link = timed("link", local.LocalBlobStore._link)
    else:
        local.LocalBlobStore._put_file = timed("link", local.LocalBlobStore._put_file)
    local.fsync_path = timed("dir fsync", local.fsync_path)
    meta.transaction = timed_transaction
    meta._one = timed_async("sql read", meta._one)
    meta._all = timed_async("sql read", meta._all)
    staging.Stager.stage = staged
    try:
        yield
    finally:
        phases.end = phases.now()
        for owner, name, original in saved:
            if original is not None:
                setattr(owner, name, original)


async def timed_import(service: Any, target: Any, path: Path) -> Phases:
    """One `archives.import_file` (what `versionstore archive import` runs), with its phases."""
    from versionstore import archives

    phases = Phases()
    with watching(phases, service.meta):
        await archives.import_file(service, target, path, phases.progress)
    return phases


def print_phases(runs: list[Phases]) -> None:
    """Per run and as medians: the import, its read, its tail and what the tail held."""
    import statistics

    print("archive import phases (s; tail = after the last member was read; kind: time covered / count):")
    for number, phases in enumerate(runs, start=1):
        tail = phases.tail()
        parts = ", ".join(f"{kind} {seconds:.3f}/{count}" for kind, (seconds, count) in tail.items())
        ends = ", ".join(f"last {kind} {phases.last(kind) - phases.last_read:+.3f}" for kind in ("md5 done", "member fsync"))
        print(f"  run {number}: total {phases.end:.3f}, read {phases.last_read:.3f}, tail {phases.end - phases.last_read:.3f}: "
              f"{parts}; {ends}")
    median = statistics.median
    print(f"  median: total {median(p.end for p in runs):.3f}, tail {median(p.end - p.last_read for p in runs):.3f}; "
          + ", ".join(f"{kind} {median(p.tail()[kind][0] for p in runs):.3f}" for kind in KINDS))
