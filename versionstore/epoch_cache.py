"""Values read from the metadata store, reused until anything commits.

On SQLite `MetadataRepository.commit_epoch()` (`PRAGMA data_version`) moves whenever any
connection of any process (our writer, another `serve` worker, the CLI) commits, so a value
read while it showed E is current for as long as it still shows E: no TTL, no lag, and a hit
costs that one pragma instead of the statement, the row's decoding and the rendering. On
PostgreSQL (versionstore/pg_commits.py) every write transaction notifies at its COMMIT and each
process listens: the epoch moves at this process's commits at once, at another's as its
notification is delivered, on reconnecting, and at least every second (pg.CACHE_SECONDS: a
lost notification lags no longer); while no connection listens `commit_epoch()` is None and
nothing is cached here. One epoch covers every entry, so the
first read under a new epoch drops them all: a server that takes writes all the time (or on
PostgreSQL, any server once a second) simply misses.

Use: read the epoch, then `get`; on a miss read (and derive) the value and `put` it under the
epoch read *before* reading it. A value read across a commit is then stored under the older
epoch and never served, since every later read of the epoch shows the newer one.
"""

from collections.abc import Callable
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class EpochCache(Generic[K, V]):
    """At most `budget` units of values (`weigh`: a value's units; one per entry by default),
    the oldest entries dropped first."""

    def __init__(self, budget: int, weigh: Callable[[V], int] = lambda _value: 1) -> None:
        self.budget = budget
        self._weigh = weigh
        self._epoch: object = None
        self._entries: dict[K, tuple[V, int]] = {}
        self._used = 0

    def get(self, key: K, epoch: object | None) -> V | None:
        if epoch is None:
            return None
        if epoch != self._epoch:
            self._entries.clear()
            self._used = 0
            self._epoch = epoch
            return None
        hit = self._entries.get(key)
        return None if hit is None else hit[0]

    def put(self, key: K, epoch: object | None, value: V) -> None:
        """Keep `value`, read after the epoch showed `epoch` (a value read under an epoch that
        has moved on since is dropped)."""
        if epoch is None or epoch != self._epoch:
            return
        weight = self._weigh(value)
        if weight > self.budget // 4:
            return  # one huge value must not evict everything else
        old = self._entries.pop(key, None)
        if old is not None:
            self._used -= old[1]
        self._entries[key] = (value, weight)
        self._used += weight
        while self._used > self.budget:
            oldest = next(iter(self._entries))
            self._used -= self._entries.pop(oldest)[1]
