"""The domain: uploads become versions, versions become revisions, and nothing is lost.

Write order (docs/design.md): bytes are spooled and hashed, the write is journaled
(`Claims.writing`), put create-only into the stores, and only then is the metadata committed
in one transaction that also removes the journal rows. Blob deletions happen after the
metadata no longer references the digest, under a deletion claim in the database that every
writer of the digest, in any process, waits for (`Claims.deleting`), so an upload can never
commit a version whose blob a concurrent deletion is removing.
This module does not know about HTTP.
"""

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from versionstore import layout, media, verify
from versionstore.blobstore import BlobNotFound, BlobStore, BlobStoreError
from versionstore.blobstore.resilient import local_of, publish_locally
from versionstore.claims import ORIGINAL, PENDING, REVISION, Claims, WriteTicket
from versionstore.epoch_cache import EpochCache
from versionstore.errors import AppendOnlyRefused, BadRequest, Conflict, NotFound, Unavailable
from versionstore.ids import new_hex_id, new_public_id
from versionstore.locks import KeyedLocks
from versionstore.metadata import AssetChanged, WriteExpired
from versionstore.models import Asset, Cloud, Downloadable, RestoreFailure, ScheduledPurge, Version
from versionstore.repository import MetadataRepository
from versionstore.spool import Spooled, SpoolFile, hash_file, make_durable, spool_bytes
from versionstore.targets import FAILING, BackupTargets, TargetUnavailable

log = logging.getLogger(__name__)

#: How often a write whose asset row changed under it re-reads and tries again. Within one
#: process name locks make this rare (a tags update meeting an upload); it is what keeps
#: several processes on one database correct.
WRITE_ATTEMPTS = 10
DAY = 86400.0


class RevisionCorrupt(Exception):
    """The bytes read back from backup storage do not hash to their name."""


class _Superseded(Exception):
    """An `overwrite=false` upload found its name taken by the time it came to commit."""

    def __init__(self, asset: Asset) -> None:
        super().__init__(asset.asset_id)
        self.asset = asset


@dataclass
class UploadRequest:
    cloud: Cloud
    resource_type: str  # image | video | raw | auto
    type: str = "upload"
    public_id: str | None = None
    overwrite: bool = True
    backup: bool | None = None  # per-upload override of the environment's auto backup
    filename: str | None = None
    tags: list[str] | None = None
    context: dict[str, str] | None = None
    metadata: dict[str, str] | None = None
    #: A point-in-time restore into another environment: where the bytes came from.
    restored_from: str | None = None
    #: Made with an append-only key: refuse to replace a current version nobody backed up.
    keep_history: bool = False


@dataclass
class UploadResult:
    asset: Asset
    version: Version
    existing: bool = False
    overwritten: bool = False


@dataclass
class RestoreOutcome:
    asset: Asset | None = None
    error: RestoreFailure | None = None


@dataclass
class DeleteVersionsOutcome:
    deleted: list[str] = field(default_factory=list)
    failures: list[dict[str, str]] = field(default_factory=list)
    #: Set when the environment's purge delay held the deletion back (protection.py).
    scheduled_purge: ScheduledPurge | None = None


@dataclass
class BlobWrite:
    """A blob written into the stores ahead of the commit that will name it (an archive import
    links each member once it is durable): its journal rows, and whether its revision waits in
    the primary store for the backup target (`pending`)."""

    ticket: WriteTicket
    pending: bool = False


class VersionService:
    def __init__(
        self, meta: MetadataRepository, primary: BlobStore, targets: BackupTargets, spool_dir: Path, max_bytes: int,
        claims: Claims | None = None,
    ) -> None:
        self.meta = meta
        self.primary = primary
        self.targets = targets
        self.spool_dir = spool_dir
        self.max_bytes = max_bytes
        #: Digest safety and target switches across processes (database claims and leases).
        self.claims = claims or Claims(meta)
        #: (cloud, name): an in-process optimisation only, so uploads to one name queue here
        #: instead of failing each other's compare-and-set; correctness is the database's.
        self._names = KeyedLocks()
        #: (cloud, asset_id): held from reading an asset row to writing it, by every writer
        #: of that row in this process, so they queue instead of failing each other's
        #: compare-and-set. Held briefly: an upload takes it only to commit, not for its bytes.
        self._field_updates = KeyedLocks()
        #: Set when a revision is queued as pending, so the drainer need not wait for its tick.
        self.pending_added = asyncio.Event()
        #: (cloud, asset_id, version_id): what `download_backup` read, until anything commits.
        self._downloadables: EpochCache[tuple[str, str, str], Downloadable] = EpochCache(4096)

    def new_spool(self, *, md5: bool = True) -> SpoolFile:
        """A spool file for an upload; `md5=False` for bytes whose MD5 nobody reads."""
        return SpoolFile(self.spool_dir, self.max_bytes, md5=md5)

    async def spool_bytes(self, data: bytes, sync: bool = True) -> Spooled:
        """A small body already in memory, spooled in one worker-thread call (spool.spool_bytes)."""
        return await spool_bytes(self.spool_dir, self.max_bytes, data, sync)

    # --- uploads ---------------------------------------------------------------------------

    async def upload(self, request: UploadRequest, spooled: Spooled) -> UploadResult:
        """Turn spooled bytes into the asset's newest version. The spool file is consumed."""
        try:
            fmt, sniffed_type = media.sniff(spooled.head, request.filename)
            resource_type = sniffed_type if request.resource_type == "auto" else request.resource_type
            public_id = request.public_id or self._generated_public_id(resource_type, fmt)
            key = (request.cloud.name, resource_type, request.type, public_id)
            async with self._names.hold(key):
                return await self._upload_locked(request, spooled, resource_type, public_id, fmt)
        finally:
            spooled.path.unlink(missing_ok=True)

    @staticmethod
    def _generated_public_id(resource_type: str, fmt: str | None) -> str:
        public_id = new_public_id()
        return f"{public_id}.{fmt}" if resource_type == "raw" and fmt else public_id

    async def _upload_locked(
        self, request: UploadRequest, spooled: Spooled, resource_type: str, public_id: str, fmt: str | None
    ) -> UploadResult:
        cloud = request.cloud
        name = (cloud.name, resource_type, request.type, public_id)
        existing = await self.meta.get_asset(*name)
        if existing is not None and existing.live and not request.overwrite:
            return await self._existing(existing)
        await self._check_keeps_history(request, existing)  # early: before any byte is written
        backed_up = cloud.auto_backup if request.backup is None else request.backup

        def new_version(existing: Asset | None) -> tuple[Asset, Version]:
            return _new_rows(request, spooled, existing, resource_type, public_id, fmt, backed_up)

        async def commit(done_writes: list[int], pending: bool = False) -> tuple[Asset, Version, Asset | None, bool]:
            """Build the rows from a fresh read, taken while no tags update of this asset runs
            here, and compare-and-set them; a row another process changed meanwhile is read
            again. The blobs are already written. The commit also claims the replaced original
            for its release (the last value: whether it did)."""
            current = existing
            for _attempt in range(WRITE_ATTEMPTS):
                async with self._field_updates.hold((cloud.name, current.asset_id if current else name)):
                    current = await self.meta.get_asset(*name)
                    if current is not None and current.live and not request.overwrite:
                        raise _Superseded(current)
                    await self._check_keeps_history(request, current)  # again, on the row as it is now
                    asset, version = new_version(current)
                    try:
                        if current is None or current.digest == spooled.digest:
                            saved = await self.meta.save_version(asset, version, pending=pending, done_writes=done_writes)
                            return saved, version, current, False
                        saved, claimed = await self.meta.save_version_claiming(
                            asset, version, pending=pending, done_writes=done_writes, replaced=current.digest,
                            owner=self.claims.owner, lease_until=self.claims.lease_until(),
                        )
                        return saved, version, current, claimed
                    except AssetChanged:
                        continue
            raise Conflict(f"Resource {public_id} kept changing during the upload; retry")

        roles: list[tuple[str, str | None]] = [(ORIGINAL, None)]
        if backed_up:
            roles += [(REVISION, cloud.backup_target), (PENDING, None)]
        # The original this upload replaces is released after the commit: journaled (with the
        # write, in one commit), so a crash in between leaves it to orphan collection.
        replacing = [existing.digest] if existing is not None and existing.live and existing.digest != spooled.digest else []
        return await self._write_and_commit(cloud, spooled, roles, backed_up, public_id, commit, replacing)

    async def _write_and_commit(
        self, cloud: Cloud, spooled: Spooled, roles: list[tuple[str, str | None]], backed_up: bool, public_id: str,
        commit: Callable[..., Awaitable[tuple[Asset, Version, Asset | None, bool]]], replacing: list[str],
    ) -> UploadResult:
        """Blobs first (journaled), then the metadata commit, then the superseded original."""
        # A local primary store: the spool file's fsync and every local link are one worker
        # call after the journal commit (`_publish_locally`). Otherwise the fsync runs beside
        # the journal's commit and while a remote bucket receives the revision; local links
        # wait for it (spool.make_durable).
        local = local_of(self.primary) is not None
        durable = None if local else asyncio.ensure_future(make_durable(spooled))
        try:
            async with self.claims.writing(cloud.name, spooled.digest, roles, releasing=replacing) as ticket:
                # Blobs first, metadata second: a crash in between leaves only a journal row,
                # from which orphan collection finds the blob.
                if durable is None:
                    pending = await self._publish_locally(cloud.name, spooled, backed_up)
                elif backed_up:
                    try:
                        # A task group, not gather: if one write fails the other is cancelled
                        # instead of reading a spool file that is about to be removed.
                        async with asyncio.TaskGroup() as group:
                            group.create_task(self._put_original(cloud.name, spooled, durable))
                            revision = group.create_task(self._put_revision(cloud.name, spooled.digest, spooled.path, durable))
                    except ExceptionGroup as failed:
                        raise failed.exceptions[0] from None
                    pending = not revision.result()
                    if pending:
                        # Nothing is dropped: the bytes wait in the primary store until the
                        # drainer writes them to the target (docs/buckets.md).
                        await self.primary.put_file(layout.pending_key(cloud.name, spooled.digest), spooled.path)
                    await durable
                else:
                    await self._put_original(cloud.name, spooled, durable)
                    pending = False
                asset, version, replaced, claimed = await commit(ticket.commit_ids(), pending)
                if pending:
                    self.pending_added.set()
                ticket.committed = True
        except _Superseded as superseded:
            # Another process created the asset while these bytes were written, and this upload
            # must not overwrite it: its journal rows expired, orphan collection takes its blobs.
            return await self._existing(superseded.asset)
        except WriteExpired:
            raise Conflict(f"The upload of {public_id} stalled past its lease; retry") from None
        finally:
            if durable is not None and not durable.done():
                durable.cancel()
        if claimed:
            assert replaced is not None
            # The version commit took the deletion claim: one more commit ends it and the release rows.
            async with self.claims.deleting_claimed(cloud.name, replaced.digest, ORIGINAL, ticket.release_ids) as free:
                if free:
                    await self.primary.delete(layout.original_key(cloud.name, replaced.digest))
        else:
            async with self.claims.released(ticket.release_ids):
                if replaced is not None and replaced.digest != spooled.digest:
                    await self._release_primary(cloud.name, replaced.digest)
        return UploadResult(asset, version, overwritten=replaced is not None and replaced.live)

    async def _check_keeps_history(self, request: UploadRequest, current: Asset | None) -> None:
        """An append-only key may overwrite a live asset only when its current version is a
        revision (restorable after the overwrite); else the overwrite would lose it."""
        if not request.keep_history or current is None or not current.live:
            return
        found = await self.meta.version_of(current.cloud, current.asset_id, current.version_id)
        if found is None or not found[1].backed_up:
            raise AppendOnlyRefused(
                f"This API key is append-only: it cannot overwrite {current.public_id}, whose current version is not "
                "backed up (use the environment's main key, or upload under another public_id)"
            )

    async def _existing(self, asset: Asset) -> UploadResult:
        """`overwrite=false` onto a live asset: its current version, unchanged."""
        found = await self.meta.version_of(asset.cloud, asset.asset_id, asset.version_id)
        assert found is not None  # the current version of a live asset is never deleted
        return UploadResult(asset, found[1], existing=True)

    async def _put_original(self, cloud_name: str, spooled: Spooled, durable: Awaitable[None]) -> None:
        await durable
        await self.primary.put_file(layout.original_key(cloud_name, spooled.digest), spooled.path)

    async def _publish_locally(self, cloud_name: str, spooled: Spooled, backed_up: bool) -> bool:
        """The original and, `backed_up`, the revision into a local primary store: the spool
        file's fsync and the links into every local store in one worker call (blobstore/local.py's
        `publish`); a remote target receives the revision beside it. True when the revision
        must wait as pending (its copy is then linked into `pending/`)."""
        primary = local_of(self.primary)
        assert primary is not None
        store = await self._revision_store(cloud_name) if backed_up else None
        target = local_of(store) if store is not None else None
        revision_key = layout.revision_key(cloud_name, spooled.digest)
        puts = [(primary, layout.original_key(cloud_name, spooled.digest))]
        if target is not None:
            puts.append((target, revision_key))
        linking = publish_locally(spooled.path, not spooled.synced, puts)
        if store is None or target is not None:
            await linking
            if target is not None:
                await self._revision_written(cloud_name)
            written = target is not None
        elif store.local_path(revision_key) is not None:
            await linking  # a local store of another kind: it links the file, so after the fsync
            written = await self._put_revision_in(store, cloud_name, spooled.digest, spooled.path)
        else:
            try:
                async with asyncio.TaskGroup() as group:  # a bucket only reads the file: no need to wait for its fsync
                    group.create_task(linking)
                    revision = group.create_task(self._put_revision_in(store, cloud_name, spooled.digest, spooled.path))
            except ExceptionGroup as failed:
                raise failed.exceptions[0] from None
            written = revision.result()
        if backed_up and not written:
            await self.primary.put_file(layout.pending_key(cloud_name, spooled.digest), spooled.path)
        return backed_up and not written

    async def _put_revision(self, cloud_name: str, digest: str, path: Path, durable: Awaitable[None] | None = None) -> bool:
        """Write a revision to the environment's current target; False when it must wait."""
        store = await self._revision_store(cloud_name)
        return store is not None and await self._put_revision_in(store, cloud_name, digest, path, durable)

    async def _revision_store(self, cloud_name: str) -> BlobStore | None:
        """The environment's current target store, or None when a revision must wait."""
        cloud = await self.meta.get_cloud(cloud_name)  # fresh: a migration may have switched it
        if cloud is None:
            return None
        return await self.targets.for_upload(cloud)

    async def _put_revision_in(
        self, store: BlobStore, cloud_name: str, digest: str, path: Path, durable: Awaitable[None] | None = None
    ) -> bool:
        """A revision into `store`; False when it must wait. A local target links the file, so
        it waits for `durable` first; a bucket need not."""
        key = layout.revision_key(cloud_name, digest)
        if durable is not None and store.local_path(key) is not None:
            await durable
        try:
            await store.put_file(key, path)
        except BlobStoreError as exc:
            await self.targets.record_failure(cloud_name, FAILING, f"{type(exc).__name__}: {exc}")
            return False
        await self._revision_written(cloud_name)
        return True

    async def _revision_written(self, cloud_name: str) -> None:
        """A revision reached its target: a target that was failing is back, so its pending queue is retried now."""
        if await self.targets.record_success(cloud_name):
            await self.meta.retry_pending_now(cloud_name)
            self.pending_added.set()

    @staticmethod
    def _next_version_number(existing: Asset | None, now: float) -> int:
        """Unix seconds, strictly increasing per asset even for several uploads a second."""
        return max(int(now), existing.version + 1) if existing else int(now)

    async def back_up_current_version(self, asset: Asset, version_pk: int, job_id: str) -> str:
        """Make a live asset's current version a revision after the fact (initial backup).

        Returns "backed_up", "pending" (queued for its target, like an upload's), "already"
        (someone else did it meanwhile) or "missing" (its original is not in the primary store).
        """
        async with self._names.hold((asset.cloud, asset.resource_type, asset.type, asset.public_id)):
            current = await self.meta.get_asset_by_id(asset.cloud, asset.asset_id)
            if current is None or not current.live or current.version_id != asset.version_id:
                return "already"  # changed meanwhile: a new upload decided its own backup
            found = await self.meta.version_of(asset.cloud, asset.asset_id, asset.version_id)
            if found is None or found[1].backed_up:
                return "already"
            version = found[1]
            key = layout.original_key(asset.cloud, version.digest)
            cloud = await self.meta.get_cloud(asset.cloud)
            roles = [(REVISION, cloud.backup_target if cloud else None), (PENDING, None)]
            async with (
                self.claims.writing(asset.cloud, version.digest, roles) as ticket,
                self.local_copy(self.primary, key, version.digest, verify=False) as source,
            ):
                if source is None:
                    return "missing"
                pending = not await self._put_revision(asset.cloud, version.digest, source)
                if pending:
                    await self.primary.put_file(layout.pending_key(asset.cloud, version.digest), source)
                marked = await self.meta.mark_backed_up(
                    asset.cloud, version_pk, version, pending=pending, job_id=job_id, done_writes=ticket.commit_ids()
                )
                ticket.committed = True
        if pending:
            self.pending_added.set()
        return ("pending" if pending else "backed_up") if marked else "already"

    # --- batched uploads (an archive import) ------------------------------------------------

    async def upload_batch(
        self, items: Sequence[tuple[UploadRequest, Spooled]], written: dict[str, BlobWrite] | None = None
    ) -> list[UploadResult]:
        """Uploads into one environment, each to a distinct, given name (no `auto`), backed up
        and overwriting, written and committed together: every blob first (`write_blobs`:
        journaled in one transaction, made durable, then put into both stores), then one
        metadata transaction naming them all: one commit for the batch, not two per upload.
        `written`: blobs some caller already wrote ahead of this commit (an archive import
        links each member as soon as it is durable); the commit takes the rows of the digests
        it names (they leave `written`), and writes the others first. When the backup target
        cannot take revisions now, each goes through `upload` (which queues it as pending).
        The spool files are consumed."""
        if not items:
            return []
        try:
            cloud = await self.meta.get_cloud(items[0][0].cloud.name)
            if cloud is None or await self.targets.for_upload(cloud) is None:
                return [await self.upload(request, spooled) for request, spooled in items]
            batch = []
            for request, spooled in items:
                assert request.public_id and request.resource_type != "auto" and request.overwrite
                batch.append((request, spooled, media.sniff(spooled.head, request.filename)[0]))
            async with contextlib.AsyncExitStack() as held:
                for name in sorted({(cloud.name, r.resource_type, r.type, r.public_id or "") for r, _, _ in batch}):
                    await held.enter_async_context(self._names.hold(name))
                return await self._write_and_commit_batch(cloud, batch, {} if written is None else written)
        finally:
            for _, spooled in items:
                spooled.path.unlink(missing_ok=True)

    async def write_blobs(self, cloud: Cloud, files: Sequence[Spooled]) -> dict[str, BlobWrite]:
        """The blobs of files a batch will commit, written before it: journaled (one
        transaction), each made durable, then put into the primary store and the backup
        target (or, when the target cannot take it now, the primary's pending copy), several at
        once. Blobs before metadata: a commit naming them takes their rows (`upload_batch`);
        `abandon_blobs` settles writes that will never commit. On a failure the rows expire
        (orphan collection removes what nothing uses) and this raises."""
        by_digest = {spooled.digest: spooled for spooled in files}
        if not by_digest:
            return {}
        tickets = await self.claims.begin_writing(cloud.name, list(by_digest), _batch_roles(cloud))
        written = {ticket.digest: BlobWrite(ticket) for ticket in tickets}
        paths = {digest: spooled.path for digest, spooled in by_digest.items()}
        try:
            await asyncio.gather(*(make_durable(spooled) for spooled in by_digest.values()))
            # Each store's links together: one directory fsync per directory, not one per blob.
            _, pending = await asyncio.gather(
                self.primary.put_files([(layout.original_key(cloud.name, digest), path) for digest, path in paths.items()]),
                self._put_revisions(cloud.name, paths),
            )
            if pending:
                await self.primary.put_files([(layout.pending_key(cloud.name, digest), paths[digest]) for digest in pending])
                for digest in pending:
                    written[digest].pending = True
        except BaseException:
            await asyncio.shield(self.claims.end_writing(tickets, expire=True))
            raise
        return written

    async def _put_revisions(self, cloud_name: str, paths: dict[str, Path]) -> list[str]:
        """`_put_revision` of several files in one `put_files`: the digests that must wait
        (all of them when the target cannot take revisions now or the write failed)."""
        cloud = await self.meta.get_cloud(cloud_name)  # fresh: a migration may have switched it
        store = None if cloud is None else await self.targets.for_upload(cloud)
        if cloud is None or store is None:
            return list(paths)
        try:
            await store.put_files([(layout.revision_key(cloud.name, digest), path) for digest, path in paths.items()])
        except BlobStoreError as exc:
            await self.targets.record_failure(cloud.name, FAILING, f"{type(exc).__name__}: {exc}")
            return list(paths)
        if await self.targets.record_success(cloud.name):
            await self.meta.retry_pending_now(cloud.name)
            self.pending_added.set()
        return []

    async def abandon_blobs(self, cloud: Cloud, written: dict[str, BlobWrite]) -> None:
        """Blobs written ahead of a commit that will not come (a refused archive, or entries a
        commit found unchanged): each removed now unless something else uses it (`Claims.abandon`)."""
        if written:
            tickets = [blob.ticket for blob in written.values()]
            written.clear()
            await self.claims.abandon(cloud.name, tickets, self.remove_unreferenced)

    async def _write_and_commit_batch(
        self, cloud: Cloud, batch: list[tuple[UploadRequest, Spooled, str | None]], written: dict[str, BlobWrite]
    ) -> list[UploadResult]:
        files = {spooled.digest: spooled for _, spooled, _ in batch}
        existing = [await self.meta.get_asset(cloud.name, r.resource_type, r.type, r.public_id or "") for r, _, _ in batch]
        replacing = [e.digest for e, (_, s, _) in zip(existing, batch, strict=True) if e is not None and e.live and e.digest != s.digest]
        async with self.claims.releasing(cloud.name, replacing):
            fresh = await self.write_blobs(cloud, [spooled for digest, spooled in files.items() if digest not in written])
            blobs = {digest: written.get(digest) or fresh[digest] for digest in files}
            try:
                pending = {digest for digest, blob in blobs.items() if blob.pending}
                done_writes = [i for blob in blobs.values() for i in blob.ticket.commit_ids()]
                committed = await self._commit_batch(cloud, batch, pending, done_writes)
            except BaseException as exc:
                await asyncio.shield(self.claims.end_writing([blob.ticket for blob in fresh.values()], expire=True))
                if isinstance(exc, WriteExpired):
                    raise Conflict("A batch of uploads stalled past its lease; retry") from None
                raise
            for digest, blob in blobs.items():
                blob.ticket.committed = True  # its rows went with the commit
                written.pop(digest, None)
            if pending:
                self.pending_added.set()
            for (_, _, replaced), (_, spooled, _) in zip(committed, batch, strict=True):
                if replaced is not None and replaced.live and replaced.digest != spooled.digest:
                    await self._release_primary(cloud.name, replaced.digest)
        return [UploadResult(asset, version, overwritten=replaced is not None and replaced.live) for asset, version, replaced in committed]

    async def _commit_batch(
        self, cloud: Cloud, batch: list[tuple[UploadRequest, Spooled, str | None]], pending: set[str], done_writes: list[int]
    ) -> list[tuple[Asset, Version, Asset | None]]:
        """Every row of the batch from a fresh read, compare-and-set in one transaction (read
        again, all of them, if another process changed one meanwhile). The blobs are written."""
        for _attempt in range(WRITE_ATTEMPTS):
            names = [(cloud.name, r.resource_type, r.type, r.public_id or "") for r, _, _ in batch]
            seen = [await self.meta.get_asset(*name) for name in names]
            keys = sorted({(cloud.name, a.asset_id if a else name) for a, name in zip(seen, names, strict=True)}, key=repr)
            async with contextlib.AsyncExitStack() as held:
                for key in keys:
                    await held.enter_async_context(self._field_updates.hold(key))
                rows = []
                for (request, spooled, fmt), name in zip(batch, names, strict=True):
                    current = await self.meta.get_asset(*name)
                    await self._check_keeps_history(request, current)
                    asset, version = _new_rows(request, spooled, current, request.resource_type, name[3], fmt, True)
                    rows.append((asset, version, current))
                try:
                    await self.meta.save_versions(
                        [(asset, version, version.digest in pending) for asset, version, _ in rows], done_writes=done_writes
                    )
                except AssetChanged:
                    continue
                return rows
        raise Conflict("Resources of a batch kept changing during the upload; retry")

    # --- deletion ---------------------------------------------------------------------------

    async def delete_asset(self, asset: Asset) -> None:
        """Delete a live asset. With backed-up versions it stays as a reservation."""
        async with self._names.hold((asset.cloud, asset.resource_type, asset.type, asset.public_id)):
            await self._delete_asset_locked(asset)

    async def _delete_asset_locked(self, asset: Asset) -> None:
        for _attempt in range(WRITE_ATTEMPTS):
            async with self._field_updates.hold((asset.cloud, asset.asset_id)):
                current = await self.meta.get_asset_by_id(asset.cloud, asset.asset_id)
                if current is None or not current.live:
                    return
                async with self.claims.releasing(current.cloud, [current.digest]):
                    try:
                        await self.meta.delete_asset(current, time.time())
                    except AssetChanged:
                        continue
                    await self._release_primary(current.cloud, current.digest)
            return
        raise Conflict(f"Resource {asset.public_id} kept changing during the deletion; retry")

    async def delete_versions(
        self, cloud: str, asset_id: str, version_ids: Sequence[str], *, actor: str = "api"
    ) -> DeleteVersionsOutcome:
        """Irreversibly delete backed-up versions; bytes go once nothing references them.
        Under a purge delay the versions leave the history at once but their rows and bytes
        wait in a scheduled purge (protection.py) that an admin can undo."""
        asset = await self.meta.get_asset_by_id(cloud, asset_id)
        if asset is None:
            raise NotFound(f"Resource not found - {asset_id}")
        outcome = DeleteVersionsOutcome()
        async with self._names.hold((cloud, asset.resource_type, asset.type, asset.public_id)):
            asset = await self.meta.get_asset_by_id(cloud, asset_id) or asset
            by_id = {v.version_id: v for v in await self.meta.versions(asset.pk or 0)}
            wanted: list[str] = []
            for version_id in dict.fromkeys(version_ids):
                version = by_id.get(version_id)
                if version is None:
                    outcome.failures.append({"version_id": version_id, "error": "Version not found"})
                elif asset.live and version_id == asset.version_id:
                    outcome.failures.append(
                        {"version_id": version_id, "error": "Cannot delete the current version of a live asset"}
                    )
                else:
                    wanted.append(version_id)
            environment = await self.meta.get_cloud(cloud)
            if environment is not None and environment.purge_delay_days > 0 and wanted:
                now = time.time()
                purge = await self.meta.schedule_purge(
                    new_hex_id(), asset, wanted, actor, now, now + environment.purge_delay_days * DAY
                )
                outcome.scheduled_purge = purge
                outcome.deleted = [v["version_id"] for v in purge.versions] if purge else []
                changed = [v for v in wanted if v not in outcome.deleted]
                outcome.failures += [{"version_id": v, "error": "Version changed meanwhile; retry"} for v in changed]
                return outcome
            async with self.claims.releasing(cloud, [by_id[v].digest for v in wanted]):
                # The store refuses the current version of a live asset itself, whatever was read here.
                outcome.deleted = await self.meta.delete_versions(asset.pk or 0, wanted)
                for version_id in wanted:
                    if version_id not in outcome.deleted:
                        outcome.failures.append({"version_id": version_id, "error": "Version changed meanwhile; retry"})
                for digest in {by_id[v].digest for v in outcome.deleted if by_id[v].backed_up}:
                    await self.release_revision(cloud, digest)
        return outcome

    async def release_revision(self, cloud_name: str, digest: str) -> None:
        """Delete a revision nothing references any more: from the pending queue, the target,
        and a migration's destination. A target that cannot be used now keeps an orphan,
        which a full store reconciliation (`versionstore gc --full`) removes later."""
        async with self.claims.deleting(cloud_name, digest, REVISION) as free:
            if not free:
                return
            await self.meta.forget_checks(cloud_name, digest)  # a later upload of these bytes starts unmarked
            if await self.meta.get_pending(cloud_name, digest) is not None:
                await self.meta.clear_pending(cloud_name, digest)
                await self.primary.delete(layout.pending_key(cloud_name, digest))
            await self._delete_revision(cloud_name, digest)

    async def _delete_revision(self, cloud_name: str, digest: str, *extra: str | None) -> None:
        """Inside a deletion claim: remove a revision from every target it may be in."""
        cloud = await self.meta.get_cloud(cloud_name)
        if cloud is None:
            return
        for target in dict.fromkeys([*await self.revision_targets(cloud), *extra]):
            try:
                store = await self.targets.target_store(cloud_name, target)
                await store.delete(layout.revision_key(cloud_name, digest))
            except (TargetUnavailable, BlobStoreError) as exc:
                log.warning("revision %s of %s stays in %s until a full gc: %s", digest, cloud_name, target, exc)

    async def revision_targets(self, cloud: Cloud) -> list[str | None]:
        """Where the environment's revisions may be: its target, and a migration's destination."""
        targets = [cloud.backup_target]
        for job in await self.meta.open_jobs(cloud.name, "backup_migration"):
            if job.params.get("to") not in targets:
                targets.append(job.params.get("to"))
        return targets

    async def _release_primary(self, cloud: str, digest: str) -> None:
        async with self.claims.deleting(cloud, digest, ORIGINAL) as free:
            if free:
                await self.primary.delete(layout.original_key(cloud, digest))

    async def remove_unreferenced(self, cloud: str, digest: str, role: str, target: str | None) -> None:
        """Orphan collection's deletion of one blob (the caller holds the claim and checked)."""
        if role == ORIGINAL:
            await self.primary.delete(layout.original_key(cloud, digest))
        elif role == PENDING:
            await self.primary.delete(layout.pending_key(cloud, digest))
        else:
            await self._delete_revision(cloud, digest, target)

    async def collect_expired_writes(self) -> int:
        """Orphan collection from the write journal: at start and periodically, in every process."""
        return await self.claims.collect_expired(self.remove_unreferenced)

    async def collect_orphans(self, cloud: Cloud, *, rate: float | None = None) -> int:
        """Full store reconciliation: delete blobs that no metadata references (leftovers of a
        crash from before the write journal, or of a store that was unreachable when a blob
        was released). Walks every blob, so it is a paced job (`versionstore gc --full`), never
        a start-up step: at most `rate` blobs a second, yielding to requests. Safe beside live
        traffic and other processes: each deletion holds the digest's deletion claim."""
        removed = seen = 0
        try:
            backup: BlobStore | None = await self.targets.usable(cloud)
        except (TargetUnavailable, BlobStoreError):
            backup = None
        passes: list[tuple[BlobStore | None, str, str]] = [
            (backup, layout.revision_prefix(cloud.name), REVISION),
            (self.primary, layout.original_prefix(cloud.name), ORIGINAL),
            (self.primary, layout.pending_prefix(cloud.name), PENDING),
        ]
        started = time.monotonic()
        for store, prefix, role in passes:
            if store is None:
                continue
            async for key in store.list(prefix):
                seen += 1
                if rate:
                    await asyncio.sleep(max(0.0, started + seen / rate - time.monotonic()))
                elif seen % 256 == 0:
                    await asyncio.sleep(0)  # point reads are synchronous: let requests through
                digest = layout.digest_of(key)
                async with self.claims.deleting(cloud.name, digest, role) as free:
                    if free:
                        await store.delete(key)
                        removed += 1
        return removed

    # --- restore ----------------------------------------------------------------------------

    async def restore(self, asset: Asset, version_id: str | None) -> RestoreOutcome:
        """Append a version that points at a backed-up revision and make it current.

        History stays append-only; the new version records what it was restored from and
        brings back the chosen version's own attributes. A failure says why (RestoreFailure).
        """
        async with self._names.hold((asset.cloud, asset.resource_type, asset.type, asset.public_id)):
            for _attempt in range(WRITE_ATTEMPTS):
                async with self._field_updates.hold((asset.cloud, asset.asset_id)):
                    current = await self.meta.get_asset_by_id(asset.cloud, asset.asset_id)
                    if current is None:
                        return _failure("asset_not_found", f"Resource not found - {asset.public_id}")
                    async with self.claims.releasing(asset.cloud, [current.digest] if current.live else []):
                        try:
                            outcome, previous_digest = await self._restore_locked(current, version_id)
                        except AssetChanged:
                            continue  # another process wrote the row meanwhile: read again, decide again
                        if previous_digest and outcome.asset is not None and previous_digest != outcome.asset.digest:
                            await self._release_primary(asset.cloud, previous_digest)
                return outcome
        return _failure("conflict", f"Resource {asset.public_id} kept changing during the restore; retry")

    async def _restore_locked(self, asset: Asset, version_id: str | None) -> tuple[RestoreOutcome, str | None]:
        """One attempt, on the row as just read: (outcome, the superseded primary digest)."""
        versions = await self.meta.versions(asset.pk or 0)
        backed = [v for v in versions if v.backed_up]
        if version_id:
            chosen = next((v for v in versions if v.version_id == version_id), None)
            if chosen is None:
                return _failure(
                    "version_not_found",
                    f"Version {version_id} not found in the history of {asset.public_id}: "
                    "it never existed there or was deleted",
                ), None
            if not chosen.backed_up:
                return _failure("not_backed_up", f"Version {version_id} of {asset.public_id} was not backed up"), None
        elif backed:
            chosen = backed[-1]
        else:
            return _failure("nothing_backed_up", f"{asset.public_id} has no backed-up version"), None
        if await self.meta.pending_digests(asset.cloud, [chosen.digest]):
            return _failure(
                "backup_pending", f"Version {chosen.version_id} is not restorable yet: its backup is pending"
            ), None
        if asset.live and version_id is None:
            return RestoreOutcome(asset=asset), None  # nothing deleted, nothing named: a no-op
        if asset.detached:
            holder = await self.meta.get_asset(asset.cloud, asset.resource_type, asset.type, asset.public_id)
            if holder is not None:
                return _failure(
                    "public_id_taken",
                    f"{asset.public_id} now belongs to asset {holder.asset_id}; rename or delete it first "
                    "(this history stays reachable by its asset_id)",
                ), None
        now = time.time()
        version = replace(
            chosen, version_id=new_hex_id(), version=self._next_version_number(asset, now), backed_up=True,
            restored_from=chosen.version_id, created_at=now,
        )
        previous_digest = asset.digest if asset.live else None
        cloud = await self.meta.get_cloud(asset.cloud)
        roles = [(ORIGINAL, None), (REVISION, cloud.backup_target if cloud else None)]
        async with self.claims.writing(asset.cloud, chosen.digest, roles) as ticket:
            # Journaled: a concurrent release of this digest's primary copy (another asset
            # deleted) or of its revision must not slip between the copy and the commit.
            try:
                await self._copy_revision_to_primary(asset.cloud, chosen.digest)
            except BlobNotFound as exc:
                log.error("restore of %s from %s failed: %r", asset.asset_id, chosen.version_id, exc)
                return _failure("revision_missing", f"Version {chosen.version_id}'s bytes are missing from backup storage"), None
            except RevisionCorrupt as exc:
                log.error("restore of %s from %s failed: %r", asset.asset_id, chosen.version_id, exc)
                return _failure(
                    "revision_corrupt", f"Version {chosen.version_id}'s bytes in backup storage are corrupt (digest mismatch)"
                ), None
            except (BlobStoreError, TargetUnavailable) as exc:
                log.error("restore of %s from %s failed: %r", asset.asset_id, chosen.version_id, exc)
                return _failure("backup_unavailable", f"Backup storage could not be read: {_reason(exc)}"), None
            if version.width is None and version.height is None:
                # A version recorded before schema migration 4: its dimensions come from its bytes.
                width, height = await self._dimensions(asset.cloud, version)
                version = replace(version, width=width, height=height)
            # Every per-version attribute comes from the chosen version (docs/design.md).
            restored = replace(
                asset, status="live", detached=False, digest=version.digest, format=version.format, bytes=version.bytes,
                width=version.width, height=version.height, original_filename=version.original_filename,
                version=version.version, version_id=version.version_id, uploaded_at=now, deleted_at=None,
                md5=version.md5,
            )
            try:
                restored = await self.meta.save_version(restored, version, done_writes=ticket.commit_ids())
            except WriteExpired:
                return _failure("conflict", f"The restore of {asset.public_id} stalled past its lease; retry"), None
            ticket.committed = True
        return RestoreOutcome(asset=restored), previous_digest

    async def _dimensions(self, cloud_name: str, version: Version) -> tuple[int | None, int | None]:
        """Width and height read from the head of a version's primary copy."""
        head = b""
        async for chunk in self.primary.read(layout.original_key(cloud_name, version.digest), 0, 64):
            head += chunk
        return media.dimensions(head, version.format)

    async def _copy_revision_to_primary(self, cloud_name: str, digest: str) -> None:
        cloud = await self.meta.get_cloud(cloud_name)
        assert cloud is not None
        source = await self.targets.usable(cloud)
        key = layout.revision_key(cloud_name, digest)
        original = layout.original_key(cloud_name, digest)
        if await self.primary.stat(original) is not None:
            await self._verify_revision(cloud_name, source, key, digest)
            # One inode (the embedded default's hard link) was just proven: no second read.
            if verify.same_file(source, key, self.primary, original):
                return
            if (await verify.check_blob(self.primary, original, digest))[0] == verify.OK:
                return
            await self.primary.delete(original)  # a damaged primary copy: replaced from the proven revision below
        try:
            await self.copy_blob(source, key, self.primary, original, digest)
        except (RevisionCorrupt, BlobNotFound) as exc:
            outcome = verify.CORRUPT if isinstance(exc, RevisionCorrupt) else verify.MISSING
            await self.meta.record_checks(cloud_name, digest, {verify.BACKUP: (outcome, str(exc))})
            raise
        await self._record_intact(cloud_name, digest)

    async def _verify_revision(self, cloud_name: str, store: BlobStore, key: str, digest: str) -> None:
        """A restore proves the revision's bytes before it commits, even when a primary copy
        with the same digest exists: the promise is that the backup is intact. A bad revision
        is recorded (restorable: false) and fails the restore."""
        outcome, detail = await verify.check_blob(store, key, digest)
        if outcome == verify.OK:
            await self._record_intact(cloud_name, digest)
            return
        await self.meta.record_checks(cloud_name, digest, {verify.BACKUP: (outcome, detail)})
        raise RevisionCorrupt(detail) if outcome == verify.CORRUPT else BlobNotFound(detail or key)

    async def _record_intact(self, cloud_name: str, digest: str) -> None:
        """A revision recorded as damaged read back intact (put back by hand): clear the mark."""
        if await self.meta.bad_revisions(cloud_name, [digest]):
            await self.meta.record_checks(cloud_name, digest, {verify.BACKUP: (verify.OK, None)})

    async def copy_blob(self, source: BlobStore, source_key: str, target: BlobStore, target_key: str, digest: str) -> bool:
        """Copy a blob between stores, verifying that its bytes still hash to `digest`.
        Returns put_file's answer; raises BlobNotFound when the source has no such blob."""
        async with self.local_copy(source, source_key, digest, verify=True) as path:
            if path is None:
                raise BlobNotFound(f"{source.name}/{source_key}")
            return await target.put_file(target_key, path)

    @asynccontextmanager
    async def local_copy(self, store: BlobStore, key: str, digest: str, *, verify: bool) -> AsyncIterator[Path | None]:
        """A local file with the blob's bytes (None when the blob is missing).

        A local store's file is used in place (hashed first with `verify`); any other store is
        streamed into a spool file, hashed on the way, and the copy removed afterwards.
        """
        local = store.local_path(key)
        if local is not None:
            path = Path(local)
            if not await asyncio.to_thread(path.exists):
                yield None
                return
            if verify and (actual := (await hash_file(path))[0]) != digest:
                raise RevisionCorrupt(f"{store.name}/{key} hashes to {actual}")
            yield path
            return
        spool = self.new_spool(md5=False)  # checked by its BLAKE3; nobody reads its MD5
        try:
            try:
                async for chunk in store.read(key):
                    await spool.write(chunk)
            except BlobNotFound:
                yield None
                return
            spooled = await spool.finish()
            if spooled.digest != digest:
                raise RevisionCorrupt(f"{store.name}/{key} read back as {spooled.digest}")
            yield spooled.path
        finally:
            spool.discard()

    # --- rename and metadata-only changes ---------------------------------------------------

    async def rename(self, asset: Asset, to_type: str, to_public_id: str, overwrite: bool) -> Asset:
        """Give a live asset a new name, keeping its asset_id and history. With `overwrite`,
        an asset holding the name gives it up: forgotten if nothing of it is backed up, else
        detached, its history reachable by asset_id (docs/design.md)."""
        source_key = (asset.cloud, asset.resource_type, asset.type, asset.public_id)
        target_key = (asset.cloud, asset.resource_type, to_type, to_public_id)
        if source_key == target_key:
            return asset
        first, second = sorted([source_key, target_key])
        async with self._names.hold(first), self._names.hold(second):
            for _attempt in range(WRITE_ATTEMPTS):
                async with self._field_updates.hold((asset.cloud, asset.asset_id)):
                    current = await self.meta.get_asset_by_id(asset.cloud, asset.asset_id)
                    if current is None or not current.live or (current.type, current.public_id) != (asset.type, asset.public_id):
                        raise NotFound(f"Resource not found - {asset.public_id}")
                    target = await self.meta.get_asset(*target_key)
                    if target is not None and not overwrite:
                        if target.live:
                            raise BadRequest(f"to_public_id ({to_public_id}) already exists")
                        raise BadRequest(
                            f"to_public_id ({to_public_id}) is reserved by a deleted asset's backup history; "
                            "pass overwrite=true to take it (that history stays reachable by its asset_id)"
                        )
                    async with self.claims.releasing(asset.cloud, [target.digest] if target is not None and target.live else []):
                        try:
                            renamed = await self.meta.rename_asset(current, to_type, to_public_id, replacing=target, now=time.time())
                        except AssetChanged:
                            continue
                        if target is not None and target.live:
                            await self._release_primary(target.cloud, target.digest)
                return renamed
        raise Conflict(f"Resource {asset.public_id} kept changing during the rename; retry")

    async def update_fields(
        self, asset: Asset, tags: list[str] | None = None, context: dict[str, str] | None = None,
        metadata: dict[str, str] | None = None, *, change: Callable[[Asset], dict[str, Any]] | None = None,
    ) -> Asset:
        """Tags, context and metadata: never a new version (spec section 13).

        Only those columns are written, conditional on the row read; `change` computes them
        from the current row (add a tag, merge context), so a concurrent write is re-read, not
        lost. No name lock: a tags update does not wait for an upload's bytes."""
        async with self._field_updates.hold((asset.cloud, asset.asset_id)):
            for _attempt in range(WRITE_ATTEMPTS):
                current = await self.meta.get_asset_by_id(asset.cloud, asset.asset_id)
                if current is None or not current.live:
                    raise NotFound(f"Resource not found - {asset.public_id}")
                updates: dict[str, Any] = {"tags": tags, "context": context, "metadata": metadata}
                if change is not None:
                    updates.update(change(current))
                try:
                    return await self.meta.update_fields(current, **updates)
                except AssetChanged:
                    continue
        raise Conflict(f"Resource {asset.public_id} kept changing; retry")

    # --- reads ------------------------------------------------------------------------------

    async def version_for_download(
        self, cloud: Cloud, asset_id: str, version_id: str, epoch: object | None = None
    ) -> tuple[str, Version, BlobStore, str]:
        """(public_id, version, store, revision key) of a restorable version. `epoch`: the
        metadata's `commit_epoch()` read for this request (what was read under it is reused
        until anything commits, epoch_cache.py); None reads everything afresh."""
        key = (cloud.name, asset_id, version_id)
        found = self._downloadables.get(key, epoch)
        if found is None:
            found = await self.meta.downloadable(cloud.name, asset_id, version_id)  # one statement: the read path's cost
            if found is not None:
                self._downloadables.put(key, epoch, found)
        if found is None or not found.version.backed_up:
            if found is None and await self.meta.get_asset_by_id(cloud.name, asset_id) is None:
                raise NotFound(f"Resource not found - {asset_id}")
            raise NotFound(f"Version not found - {version_id}")
        version = found.version
        if found.pending:
            raise NotFound(f"Version {version_id} is not restorable yet: its backup is pending")
        if found.bad:
            raise NotFound(f"Version {version_id} is not restorable: its backup copy was found {found.bad} (see `versionstore verify`)")
        try:
            store = await self.targets.usable(cloud, inline=True, generation=found.target_generation)
        except TargetUnavailable as exc:
            raise Unavailable(f"Backup target unavailable: {exc.message}") from None
        except BlobStoreError as exc:
            raise Unavailable(f"Backup target unavailable: {exc}") from None
        return found.public_id, version, store, layout.revision_key(cloud.name, version.digest)


def _batch_roles(cloud: Cloud) -> list[tuple[str, str | None]]:
    """Where a batched upload writes each blob: the original, the revision, or its pending copy."""
    return [(ORIGINAL, None), (REVISION, cloud.backup_target), (PENDING, None)]


def _new_rows(
    request: UploadRequest, spooled: Spooled, existing: Asset | None, resource_type: str, public_id: str, fmt: str | None,
    backed_up: bool,
) -> tuple[Asset, Version]:
    """The asset row and version row an upload commits, given the asset's row as read."""
    now = time.time()
    width, height = media.dimensions(spooled.head, fmt)
    filename = _stem(request.filename)
    version = Version(
        version_id=new_hex_id(), version=VersionService._next_version_number(existing, now), digest=spooled.digest,
        bytes=spooled.size, format=fmt, backed_up=backed_up, restored_from=request.restored_from, created_at=now, width=width,
        height=height, original_filename=filename or (existing.original_filename if existing else None),
        md5=spooled.md5,
    )
    if existing is None:
        asset = Asset(
            pk=None, cloud=request.cloud.name, asset_id=new_hex_id(), resource_type=resource_type, type=request.type,
            public_id=public_id, status="live", digest=spooled.digest, format=fmt, bytes=spooled.size,
            width=width, height=height, version=version.version, version_id=version.version_id,
            original_filename=version.original_filename, created_at=now, uploaded_at=now, md5=spooled.md5,
        )
    else:
        asset = replace(
            existing, status="live", digest=spooled.digest, format=fmt, bytes=spooled.size, width=width,
            height=height, version=version.version, version_id=version.version_id,
            original_filename=version.original_filename, uploaded_at=now, deleted_at=None, md5=spooled.md5,
        )
    if request.tags is not None:
        asset.tags = request.tags
    if request.context is not None:
        asset.context = request.context
    if request.metadata is not None:
        asset.metadata = request.metadata
    return asset, version


def _failure(reason: str, message: str) -> RestoreOutcome:
    return RestoreOutcome(error=RestoreFailure(reason, message))


def _reason(exc: Exception) -> str:
    return str(getattr(exc, "message", None) or exc)


def _stem(filename: str | None) -> str | None:
    if not filename:
        return None
    base = filename.replace("\\", "/").rsplit("/", 1)[-1]
    return base.rsplit(".", 1)[0] if "." in base else base
