"""Rendered `versions` arrays, reused while an asset's set of versions is unchanged.

Versions are immutable rows, so the JSON of an asset's history only changes when a version
is added or deleted, which `MetadataRepository.versions_signature` detects with one indexed count,
or when a pending revision reaches its target (`restorable` flips), which bumps
`MetadataRepository.revisions_generation` (a counter in the database, bumped in the same
transaction, so a change made by any process counts), or when verify finds a revision missing or corrupt (or
repaired), which moves `MetadataRepository.verify_generation` (kept in the database, so a change
made by `versionstore verify` in another process counts too).
A 1,000-version history then costs one query and a string copy instead of 1,000 row
conversions. While nothing at all was committed since an entry was checked
(`MetadataRepository.data_version` unchanged, which covers commits by other processes too), the
entry is served without even those queries. The cache is bounded by the total size of what
it holds.
"""

from collections import OrderedDict

from versionstore.http import render
from versionstore.repository import MetadataRepository

#: (versions_signature + generations, JSON bytes, backup_bytes, data_version when last checked)
_Entry = tuple[tuple[int, int, int, int], bytes, int, object]


class VersionsJsonCache:
    def __init__(self, max_bytes: int = 32 << 20) -> None:
        self.max_bytes = max_bytes
        self._size = 0
        self._entries: OrderedDict[int, _Entry] = OrderedDict()

    async def get(self, meta: MetadataRepository, cloud: str, asset_pk: int) -> tuple[bytes, int]:
        """(JSON array of the asset's versions, backup_bytes)."""
        checked = meta.data_version()
        hit = self._entries.get(asset_pk)
        if hit is not None and hit[3] == checked:
            self._entries.move_to_end(asset_pk)
            return hit[1], hit[2]
        signature = (*await meta.versions_signature(asset_pk), await meta.revisions_generation(), await meta.verify_generation())
        if hit is not None and hit[0] == signature:
            self._entries[asset_pk] = (*hit[:3], checked)
            self._entries.move_to_end(asset_pk)
            return hit[1], hit[2]
        versions = await meta.versions(asset_pk)
        revisions = [v.digest for v in versions if v.backed_up]
        pending = await meta.pending_digests(cloud, revisions)
        bad = await meta.bad_revisions(cloud, revisions)
        text = render.dumps([render.version(v, v.digest in pending, bad.get(v.digest)) for v in versions])
        backup_bytes = await meta.backup_bytes(asset_pk)  # only on a miss: one definition of the sum
        self._store(asset_pk, (signature, text, backup_bytes, checked))
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
