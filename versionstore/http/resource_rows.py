"""Rendered listing items, reused while the asset's row reads the same.

A listing or search page renders each row it read into a resource's JSON. That JSON is a
function of the row alone (and of the page's rendering options: flat context, `fields`), so
it is kept with the row it came from: a later page that reads an equal row, from any
process's point of view, gets the same bytes back without decoding or rendering it again,
and a row that changed in any column (a tag, a context entry, a new version, a delete or
restore, the generation every write bumps) does not equal the one kept and is rendered afresh. Nothing here
depends on the commit epoch or on time: the page's own statement is what decides, so a
change made by another process shows in the very next page on both backends.

Bounded by the bytes held (rows and their JSON); the least recently used go first. Look-ups
and stores run on the event loop; a long run of misses is rendered in a worker thread.

What is kept is invisible to the garbage collector: an entry is a tuple of the row (a tuple of
strings and numbers), the item's encoded JSON (bytes) and an int, which CPython stops tracking
at the first collection that sees it. Kept as dicts (and their tag lists), 20,000 entries were
~65,000 tracked objects that every full collection walked, holding the GIL for 100-200 ms in
the middle of a listing walk (docs/performance.md, "GC").
"""

import asyncio
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence

from versionstore.models import AssetRow

#: Misses rendered on the event loop; more are rendered in a worker thread.
RENDER_ON_LOOP = 50


def text_weight(row: AssetRow) -> int:
    """Bytes an entry holds, estimated from its row's text (the item mostly holds the row's
    own string objects): any row's; the app passes render.row_weight, cheaper on asset rows."""
    return 1500 + 3 * sum([len(value) for value in row if type(value) is str])


class RenderedRows:
    """Kept per rendering options, by the row's first column (an asset row's pk); an entry
    holds the whole row it was rendered from and counts only while the page's row equals it.
    Keyed by the whole row, a miss hashed every value of it twice (look-up, store): on a
    page of 500 rows not seen before that bookkeeping cost as much as a third of rendering.

    `options` should be a tuple of strings, numbers and None (then the keys are untracked too).
    Items are kept as each item's JSON bytes; `make` renders the misses of a page together
    (render.encode_items: one orjson call for all of them, then split)."""

    def __init__(self, max_bytes: int = 32 << 20, weigh: Callable[[AssetRow], int] = text_weight) -> None:
        self.max_bytes = max_bytes
        self._weigh = weigh
        self._used = 0
        self._entries: OrderedDict[tuple[Hashable, Hashable], tuple[AssetRow, bytes, int]] = OrderedDict()

    async def render(
        self, rows: Sequence[AssetRow], options: Hashable, make: Callable[[Sequence[AssetRow]], list[bytes]]
    ) -> list[bytes]:
        """Each row's item as JSON (`make(rows)` renders a list of rows with `options`), from
        what earlier pages rendered where the row is unchanged."""
        entries = self._entries
        found: list[bytes | None] = []
        missing: list[AssetRow] = []
        for row in rows:
            key = (options, row[0])
            hit = entries.get(key)
            if hit is not None and hit[0] == row:
                entries.move_to_end(key)
                found.append(hit[1])
            else:
                found.append(None)
                missing.append(row)
        if len(missing) > RENDER_ON_LOOP:
            made = await asyncio.to_thread(make, missing)
        else:
            made = make(missing) if missing else []
        for row, item in zip(missing, made, strict=True):
            self._store((options, row[0]), row, item)
        fresh = iter(made)
        return [next(fresh) if item is None else item for item in found]

    def _store(self, key: tuple[Hashable, Hashable], row: AssetRow, item: bytes) -> None:
        weight = self._weigh(row)
        if weight > self.max_bytes // 4:
            return  # one huge row must not evict everything else
        old = self._entries.pop(key, None)
        if old is not None:
            self._used -= old[2]
        self._entries[key] = (row, item, weight)
        self._used += weight
        while self._used > self.max_bytes:
            _, (_, _, evicted) = self._entries.popitem(last=False)
            self._used -= evicted
