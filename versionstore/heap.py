"""The serving process's heap, settled once it has started (docs/performance.md).

A property of the process, not of an app: `versionstore serve` settles after its app has
started and unsettles when it stops. A process that makes many apps (the tests make one per
test) does not settle at all: the full collection before the freeze cost it 0.1-0.5 s per app.
"""

import gc

#: Allocations (minus frees) of container objects between two young-generation collections;
#: CPython's default is 700, which a few requests reach (docs/performance.md). Not more: a
#: young collection walks every object made since the last one that is still alive (the
#: listing cache's new entries, untracked only then), 38-46 ms at 50,000 during a listing walk.
GC_GEN0_THRESHOLD = 10_000
_DEFAULT_GEN0 = gc.get_threshold()[0]


def settle() -> None:
    """After start-up: move everything allocated so far (modules, the SDKs, caches) out of the
    collector's sight (`gc.freeze`), and collect the young generation less often. Full
    collections then scan only what requests allocate, not the whole heap: they were the
    read path's p99 outliers. Forked workers also keep the frozen pages shared."""
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GC_GEN0_THRESHOLD, gen1, gen2)


def unsettle() -> None:
    """Give the collector its view back (the process may go on, e.g. `serve` called in-process)."""
    gc.unfreeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(_DEFAULT_GEN0, gen1, gen2)
