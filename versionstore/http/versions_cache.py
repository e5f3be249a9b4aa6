"""Rendered `versions` arrays, reused while an asset's set of versions is unchanged.

Versions are immutable rows, so the JSON of an asset's history only changes when a version
is added or deleted, when a pending revision reaches its target (`restorable` flips), or when
verify finds a revision missing or corrupt (or repaired). The caller reads the asset's
`VersionsKey` in the statement that reads the asset (`MetadataRepository.get_asset_keyed`):
the versions' count and highest row id, and two counters kept in the database and bumped in
the transactions that change those flags. Any change, made by any process or the CLI, moves
the key, so an entry is never served stale and the hit costs no statement of its own (on
PostgreSQL every statement is a round trip). A 1,000-version history then costs a string copy
instead of 1,000 row conversions. The cache is bounded by the total size of what it holds.
"""

from collections import OrderedDict

from versionstore.http import render
from versionstore.models import VersionsKey
from versionstore.repository import MetadataRepository

#: (the key the JSON was rendered at, JSON bytes, backup_bytes)
_Entry = tuple[VersionsKey, bytes, int]


class VersionsJsonCache:
    def __init__(self, max_bytes: int = 32 << 20) -> None:
        self.max_bytes = max_bytes
        self._size = 0
        self._entries: OrderedDict[int, _Entry] = OrderedDict()

    async def get(self, meta: MetadataRepository, cloud: str, asset_pk: int, key: VersionsKey) -> tuple[bytes, int]:
        """(JSON array of the asset's versions, backup_bytes), as of `key`."""
        hit = self._entries.get(asset_pk)
        if hit is not None and hit[0] == key:
            self._entries.move_to_end(asset_pk)
            return hit[1], hit[2]
        versions = await meta.versions(asset_pk)
        revisions = [v.digest for v in versions if v.backed_up]
        pending = await meta.pending_digests(cloud, revisions)
        bad = await meta.bad_revisions(cloud, revisions)
        text = render.dumps([render.version(v, v.digest in pending, bad.get(v.digest)) for v in versions])
        backup_bytes = await meta.backup_bytes(asset_pk)  # only on a miss: one definition of the sum
        self._store(asset_pk, (key, text, backup_bytes))
        return text, backup_bytes

    def _store(self, asset_pk: int, entry: _Entry) -> None:
        old = self._entries.pop(asset_pk, None)
        if old is not None:
            self._size -= len(old[1])
        if len(entry[1]) > self.max_bytes // 4:
            return  # one huge history must not evict everything else
        self._entries[asset_pk] = entry
        self._size += len(entry[1])
        while self._size > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self._size -= len(evicted[1])
