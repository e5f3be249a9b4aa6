"""Rendered listing items, reused while the asset's row reads the same.

A listing or search page renders each row it read into a resource's JSON. That JSON is a
function of the row alone (and of the page's rendering options: flat context, `fields`), so
it is kept under the row itself: a later page that reads the same row, from any process's
point of view, gets the same bytes back without decoding or rendering it again, and a row
that changed in any column (a tag, a context entry, a new version, a delete or restore, the
generation every write bumps) is a different key and is rendered afresh. Nothing here
depends on the commit epoch or on time: the page's own statement is what decides, so a
change made by another process shows in the very next page on both backends.

Bounded by the bytes held (rows and their JSON); the least recently used go first. Look-ups
and stores run on the event loop; a long run of misses is rendered in a worker thread.
"""

import asyncio
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence

import orjson

from versionstore.models import AssetRow

#: Misses rendered on the event loop; more are rendered in a worker thread.
RENDER_ON_LOOP = 50
#: What an entry adds beyond twice its JSON (the row's values are about as long as their
#: JSON; the tuple and its objects are the rest). An estimate: summing the row's values cost
#: more than a tenth of a page's rendering.
_ENTRY_OVERHEAD = 1000


def _weight(rendered: bytes) -> int:
    return _ENTRY_OVERHEAD + 2 * len(rendered)


class RenderedRows:
    def __init__(self, max_bytes: int = 32 << 20) -> None:
        self.max_bytes = max_bytes
        self._used = 0
        self._entries: OrderedDict[tuple[Hashable, AssetRow], tuple[bytes, int]] = OrderedDict()

    async def render(
        self, rows: Sequence[AssetRow], options: Hashable, make: Callable[[AssetRow], bytes]
    ) -> list[orjson.Fragment]:
        """Each row's JSON (`make(row)`, rendered with `options`), from what earlier pages
        rendered where the row is unchanged, as fragments to embed in the page's JSON."""
        found: list[bytes | None] = []
        for row in rows:
            hit = self._entries.get((options, row))
            if hit is not None:
                self._entries.move_to_end((options, row))
            found.append(None if hit is None else hit[0])
        missing = [row for row, body in zip(rows, found, strict=True) if body is None]
        if len(missing) > RENDER_ON_LOOP:
            made = await asyncio.to_thread(lambda: [make(row) for row in missing])
        else:
            made = [make(row) for row in missing]
        fresh = iter(made)
        out: list[orjson.Fragment] = []
        for row, body in zip(rows, found, strict=True):
            if body is None:
                body = next(fresh)
                self._store((options, row), body)
            out.append(orjson.Fragment(body))
        return out

    def _store(self, key: tuple[Hashable, AssetRow], body: bytes) -> None:
        weight = _weight(body)
        if weight > self.max_bytes // 4:
            return  # one huge row must not evict everything else
        old = self._entries.pop(key, None)
        if old is not None:
            self._used -= old[1]
        self._entries[key] = (body, weight)
        self._used += weight
        while self._used > self.max_bytes:
            _, (_, evicted) = self._entries.popitem(last=False)
            self._used -= evicted
