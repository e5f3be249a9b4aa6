"""Archives: a snapshot or a point-in-time selection exported as a tar, and imported back.

Export (the `archive_export` job) copies no bytes: it lists the selection into a spooled
manifest (metadata only) and writes the archive's layout (archive_compose.py: the manifest and
each member's place in the tar), then reads every original once through the environment's
target, checked against its BLAKE3, while hashing the composed tar (its `digest`), records the
archive and the revisions it lists (`register_archive_layout`: held from then on), and stores
the layout with one create-only `put_file` under `<cloud>/archives/<job id>.layout` in the
default backup store (every process can serve it). A download composes the tar from the
revisions. A killed export describes again into a temp file of the same name when its job
resumes: nothing partial is ever published, and a layout a killed run had stored (never
announced) is replaced. The CLI's export composes the same bytes into a file.

Import checks the whole archive first (`archive_format.verify`: manifest, every member's
BLAKE3 and MD5, nothing extra, nothing missing, no truncation), so a tampered archive is
refused before anything is written. Only then does the `archive_import` job apply it, as new
versions recording `restored_from: archive:<cloud>/<asset>/<version>`, in batches: each entry's
bytes staged (`staging.Stager`: hashed with BLAKE3 against the manifest, MD5 only for an
entry without one), then the batch's blobs made durable together and committed in one
transaction (`VersionService.upload_batch`) while the next batch is staged. That pass reads the
stored copy again (proven by its BLAKE3) and resumes from its cursor (moved past committed
batches only) after a kill; an entry whose bytes are already the asset's current ones is
skipped, so a replay adds nothing twice.

A prepared archive is recorded (`archive_files`) before it is stored; archive_removal.py
removes it `keep_days` after it was written (or once an irreversible deletion withdrew it), and an import's uploaded tar once its job has
ended. docs/snapshots.md describes the format.
"""

import asyncio
import contextlib
import functools
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from versionstore import archive_compose as compose
from versionstore import archive_format as fmt
from versionstore import archive_records, layout, pitr, signing, staging
from versionstore.archive_records import EXPORT_FILE, IMPORT_FILE, IMPORT_STAGING, ArchiveFile, MemberGone
from versionstore.archive_removal import DAY, DEFAULT_KEEP_DAYS, export_temp, remove_file
from versionstore.blobstore import BlobStore, BlobStoreError
from versionstore.console.audit import AuditLog
from versionstore.errors import NotFound, Unavailable
from versionstore.ids import new_hex_id
from versionstore.models import Cloud, Job
from versionstore.repository import MetadataRepository
from versionstore.service import BlobWrite, UploadRequest, VersionService
from versionstore.spool import Spooled, hash_file
from versionstore.targets import TargetUnavailable

EXPORT, IMPORT = archive_records.EXPORT, archive_records.IMPORT  # the job kinds (also archive_removal's)
KINDS = (EXPORT, IMPORT)
SAVE_EVERY = 2.0  # seconds between cursor saves while importing

@dataclass(frozen=True)
class Written:
    digest: str
    size: int
    count: int
    bytes: int
    skipped: list[dict[str, Any]]


# --- export ---------------------------------------------------------------------------------------


async def _selected(service: VersionService, selection: pitr.Selection) -> AsyncIterator[dict[str, Any]]:
    """Each asset of the selection as it was: a manifest entry, or one with a `skipped` reason."""
    meta = service.meta
    cloud = await meta.get_cloud(selection.cloud)
    if cloud is None:
        raise NotFound(f"Environment not found - {selection.cloud}")
    after = 0
    while True:
        if selection.snapshot_id is not None:
            rows = await meta.snapshot_selection(selection.cloud, selection.snapshot_id, selection.prefix, after, pitr.PAGE)
        else:
            assert selection.at is not None
            rows = await meta.point_in_time(selection.cloud, selection.prefix, selection.at, after, pitr.PAGE)
        for row in rows:
            if not pitr.existed_at(row, selection):
                continue
            assert row.at_version_id is not None
            named = {"asset_id": row.asset_id, "public_id": row.public_id, "version_id": row.at_version_id}
            if not row.at_backed_up:
                yield {**named, "skipped": "not_backed_up"}
                continue
            try:
                _, version, _, _ = await service.version_for_download(cloud, row.asset_id, row.at_version_id)
            except NotFound as exc:  # pending, damaged or gone: listed as skipped (a target outage fails the job)
                yield {**named, "skipped": exc.message}
                continue
            asset = await meta.get_asset_by_id(selection.cloud, row.asset_id)
            yield {
                **named, "resource_type": row.resource_type, "type": row.type, "format": version.format,
                "path": fmt.member_name(row.resource_type, row.type, row.public_id, version.format),
                "blake3": version.digest, "md5": version.md5, "bytes": version.bytes, "created_at": version.created_at,
                "tags": asset.tags if asset else [], "context": asset.context if asset else {},
                "metadata": asset.metadata if asset else {},
            }
        if len(rows) < pitr.PAGE:
            return
        after = rows[-1].asset_pk


@dataclass(frozen=True)
class Described:
    """A selection's archive described (its layout file written), not yet read."""

    size: int
    count: int
    bytes: int
    skipped: list[dict[str, Any]]


async def describe_archive(service: VersionService, selection: pitr.Selection, out: Path, created_at: float) -> Described:
    """The selection's layout (archive_compose.py) at `out` (overwritten). Metadata only:
    the manifest is spooled to disk, then the layout written from it (bounded memory)."""
    entries_path = out.with_name(out.name + ".manifest")
    paths: set[str] = set()
    skipped: list[dict[str, Any]] = []
    count = total = 0
    try:
        with entries_path.open("wb") as entries:
            async for entry in _selected(service, selection):
                if "skipped" in entry:
                    skipped.append(entry)
                    continue
                while entry["path"] in paths:  # two assets of one name (a deletion and a new upload)
                    entry["path"] += f"~{entry['asset_id']}"
                paths.add(entry["path"])
                await asyncio.to_thread(entries.write, fmt.entry_line(entry))
                count, total = count + 1, total + entry["bytes"]
        header = {
            "format": fmt.FORMAT, "cloud": selection.cloud, "snapshot_id": selection.snapshot_id, "at": selection.at,
            "prefix": selection.prefix, "created_at": created_at, "count": count, "bytes": total,
            "skipped": len(skipped),
        }
        size, _ = await asyncio.to_thread(compose.write_layout, out, header, entries_path)
    finally:
        entries_path.unlink(missing_ok=True)
    return Described(size, count, total, skipped[:100])


async def write_archive(
    service: VersionService, selection: pitr.Selection, out: Path, created_at: float, progress: fmt.Progress | None = None,
    on_total: Callable[[int], None] | None = None,
) -> Written:
    """The selection's archive written whole at `out` (the CLI's export): described, then
    composed into the file (every original checked against its BLAKE3 on the way), made
    durable. The same bytes a download of the same export serves."""
    described_at = out.with_name(out.name + ".layout")
    try:
        described = await describe_archive(service, selection, described_at, created_at)
        if on_total is not None:
            on_total(described.size)  # the progress counts every byte of the tar
        store = await _revisions(service, selection.cloud)
        await asyncio.to_thread(out.unlink, missing_ok=True)
        with described_at.open("rb") as layout_file, out.open("xb", buffering=0) as handle:
            synced = staging.BackgroundSync(handle.fileno())  # flushed as it grows: the last fsync finds little

            def wrote(size: int) -> None:
                synced.wrote(size)
                if progress is not None:
                    progress(size)

            digest = await compose.hashed(compose.Layout(layout_file), store, selection.cloud, handle, wrote)
            await asyncio.to_thread(synced.finish)
    finally:
        described_at.unlink(missing_ok=True)
    return Written(digest, described.size, described.count, described.bytes, described.skipped)


async def _revisions(service: VersionService, cloud_name: str) -> BlobStore:
    """The store the environment's revisions are read from (its backup target)."""
    cloud = await service.meta.get_cloud(cloud_name)
    if cloud is None:
        raise NotFound(f"Environment not found - {cloud_name}")
    return await service.targets.usable(cloud)


async def check_layout(service: VersionService, cloud: str, path: Path, progress: fmt.Progress | None = None) -> str:
    """The export's check pass over a layout file: every original read once and proven, the
    whole tar's BLAKE3 computed; nothing written."""
    store = await _revisions(service, cloud)
    with path.open("rb") as layout_file:
        return await compose.hashed(compose.Layout(layout_file), store, cloud, None, progress)


def layout_members(path: Path) -> Iterator[tuple[str, str]]:
    """(version_id, blake3) of every original a layout file lists (read lazily)."""
    with path.open("rb") as layout_file:
        for entry in compose.entries(layout_file):
            yield entry["version_id"], entry["blake3"]


# --- import ---------------------------------------------------------------------------------------


async def verify_file(path: Path, progress: fmt.Progress | None = None) -> fmt.Manifest:
    """Check a whole archive file; ArchiveInvalid says what is wrong."""

    def run() -> fmt.Manifest:
        with path.open("rb") as handle:
            return fmt.verify(handle, progress)

    return await asyncio.to_thread(run)


async def apply_archive(
    service: VersionService, cloud: Cloud, path: Path, skip: int = 0, progress: fmt.Progress | None = None,
    after_entry: Callable[[int, dict[str, int]], Any] | None = None, verified: fmt.Manifest | None = None,
) -> dict[str, int]:
    """Every entry of a verified archive as the newest version of its public_id in `cloud`,
    from entry `skip` on, in batches (`Batch`). Counts: imported, unchanged (already the
    current bytes). `verified`: the manifest `verify_file` read, which this file must still
    have (else the file was proven by its digest, as the import job's is)."""
    counts = {"imported": 0, "unchanged": 0}
    handle = await asyncio.to_thread(path.open, "rb")
    stager = staging.Stager(service.spool_dir)
    batch = Batch(service, cloud, counts, after_entry)
    try:
        reader = await asyncio.to_thread(lambda: fmt.ArchiveReader(handle, hashed=False))  # the stager hashes what it writes
        if verified is not None and reader.manifest != verified:
            raise fmt.ArchiveInvalid(f"{fmt.MANIFEST} changed since the archive was verified")
        source = reader.manifest.header["cloud"]
        index = 0
        while (member := await asyncio.to_thread(reader.next_member, progress)) is not None:
            index += 1
            if index > skip:
                await batch.add(index, source, member.entry, functools.partial(_staged, stager, member))
        await batch.flush()
        await asyncio.to_thread(reader.close)
    finally:
        await batch.discard()
        await asyncio.to_thread(stager.drain)
        await asyncio.to_thread(handle.close)
    return counts


#: An import's batch: entries whose blobs are written, made durable together and committed in
#: one transaction. Bounded, so the staged bytes stay bounded and a kill loses little work.
BATCH_BYTES = 256 << 20
BATCH_ENTRIES = 256

Stage = Callable[[], Awaitable[staging.Staged]]


class Batch:
    """Entries of an archive staged for one `VersionService.upload_batch`. An entry whose bytes
    are already its asset's current ones is `unchanged` (a replayed stretch adds nothing
    twice); a name seen again commits the batch first (its later version comes later). A full
    batch is committed in the background while the next one is staged (at most two batches
    staged, one committing); commits run one after the other, in order, and the cursor
    (`after_entry`) moves only past committed entries."""

    def __init__(self, service: VersionService, cloud: Cloud, counts: dict[str, int],
                 after_entry: Callable[[int, dict[str, int]], Any] | None, max_bytes: int = BATCH_BYTES,
                 written: dict[str, BlobWrite] | None = None) -> None:
        self.service, self.cloud, self.counts, self.after_entry = service, cloud, counts, after_entry
        self.max_bytes = max_bytes
        #: Blobs written ahead of their commit (`import_file`'s early links); each commit takes its own.
        self.written = written
        self.items: list[tuple[UploadRequest, staging.Staged, str | None]] = []
        self.names: set[tuple[str, str, str]] = set()
        self.size = self.unchanged = self.last = 0
        #: The batch being committed, and the names it writes.
        self._committing: asyncio.Task[None] | None = None
        self._committing_names: set[tuple[str, str, str]] = set()

    async def add(self, index: int, source: str, entry: dict[str, Any], stage: Stage) -> None:
        """Entry `index` of the archive; `stage()` gives its bytes, checked against the manifest
        (not called for an unchanged entry)."""
        name = (entry["resource_type"], entry["type"], entry["public_id"])
        if name in self.names:
            await self.commit()
        if name in self._committing_names:
            await self._wait_committed()  # its current bytes are the ones that batch writes
        self.names.add(name)
        self.last = index
        current = await self.service.meta.get_asset(self.cloud.name, *name)
        if current is not None and current.live and current.digest == entry["blake3"]:
            self.unchanged += 1
        else:
            staged = await stage()
            self.items.append((_request(self.cloud, source, entry), staged, entry["md5"]))
            self.size += staged.size
        if self.size >= self.max_bytes or len(self.items) >= BATCH_ENTRIES:
            await self.commit()

    async def commit(self) -> None:
        """Start committing what is staged (once the batch before it is committed)."""
        await self._wait_committed()
        items, self.items = self.items, []
        unchanged, last, self._committing_names = self.unchanged, self.last, self.names
        self.names, self.size, self.unchanged, self.last = set(), 0, 0, 0
        self._committing = asyncio.ensure_future(self._commit(items, unchanged, last))

    async def flush(self) -> None:
        """Commit what is staged and wait for every commit."""
        await self.commit()
        await self._wait_committed()

    async def _wait_committed(self) -> None:
        if self._committing is not None:
            committing, self._committing = self._committing, None
            await committing
            self._committing_names = set()

    async def _commit(self, items: list[tuple[UploadRequest, staging.Staged, str | None]], unchanged: int, last: int) -> None:
        try:
            await asyncio.gather(*(asyncio.wrap_future(staged.durable) for _, staged, _ in items))
            ready = [(request, staged.spooled(md5)) for request, staged, md5 in items]
            await self.service.upload_batch(ready, self.written)  # consumes the files
        except BaseException:
            await asyncio.to_thread(_discard, items)
            raise
        _release(items)
        self.counts["imported"] += len(items)
        self.counts["unchanged"] += unchanged
        if self.after_entry is not None and last:
            await self.after_entry(last, self.counts)

    async def discard(self) -> None:
        """Remove staged files no commit consumed (a failure, a kill of the job's task). A
        commit in flight is let finish (its batch verified; a failure removes its own files)."""
        if self._committing is not None:
            committing, self._committing = self._committing, None
            with contextlib.suppress(Exception):
                await committing
        items, self.items = self.items, []
        await asyncio.to_thread(_discard, items)


def _discard(items: list[tuple[UploadRequest, staging.Staged, str | None]]) -> None:
    for _, staged, _ in items:
        staged.discard()


def _release(items: list[tuple[UploadRequest, staging.Staged, str | None]]) -> None:
    """Close the staged files' lock handles (their files are consumed or removed)."""
    for _, staged, _ in items:
        if staged.lock is not None:
            staged.lock.close()


async def _staged(stager: staging.Stager, member: fmt.Member) -> staging.Staged:
    """A member's bytes in a new spool file, hashed (BLAKE3) as they are written and compared
    with the manifest before any store or row names them. MD5 only for an entry without one:
    verification proved the manifest's MD5 for the bytes this BLAKE3 names."""
    entry = member.entry
    staged = await asyncio.to_thread(stager.stage, member.readinto, entry["bytes"], md5=entry["md5"] is None)
    try:
        md5: str | None = None
        if staged.md5 is not None:
            md5 = await asyncio.wrap_future(staged.md5)
        member.compare(staged.blake3, md5)
    except fmt.ArchiveInvalid:
        await asyncio.to_thread(staged.discard)
        raise
    return staged


async def import_file(
    service: VersionService, cloud: Cloud, path: Path, progress: fmt.Progress | None = None
) -> tuple[fmt.Manifest, dict[str, int]]:
    """Import an archive file in one read (the CLI's `archive import`): every member verified
    as `verify_file` does (BLAKE3 and MD5, nothing extra or missing) while its bytes are
    staged in a private directory (`staging.Stager`: one read, both hashes and the write on
    their own threads, each file's fsync started once it is written). A member whose BLAKE3
    matched has its blob journaled and linked into the stores as soon as its file is durable,
    while the rest is still read (`_EarlyLinks`): blobs are content-addressed and checked, and
    a blob is not a version. Only once the whole archive verified are the versions committed,
    batch by batch (`Batch`), so the tail after the last read is the last member's links and
    the metadata commits. An archive that does not verify leaves no version, and its blobs are
    removed at once (`VersionService.abandon_blobs`; orphan collection if the process dies).
    Disk: up to the archive's size of staged bytes until committed."""
    directory = await asyncio.to_thread(staging.PrivateDirectory, service.spool_dir, IMPORT_STAGING)
    staged: list[tuple[fmt.Member, staging.Staged]] = []
    links = _EarlyLinks(service, cloud)

    def read_and_stage() -> fmt.Manifest:
        stager = staging.Stager(directory.path, lock=False)
        with path.open("rb") as handle:
            reader = fmt.ArchiveReader(handle, hashed=False)  # the stager hashes what it reads
            try:
                while (member := reader.next_member(progress)) is not None:
                    links.check()
                    file = stager.stage(member.readinto, member.entry["bytes"], md5=True)
                    staged.append((member, file))
                    member.compare(file.blake3, None)  # BLAKE3 at once: a tampered member ends the read
                    links.offer(member.entry, file)
            finally:
                stager.drain()
                reader.close()
        for member, file in staged:  # each MD5 as its lane finishes it, each fsync
            member.compare(file.blake3, file.md5.result() if file.md5 is not None else None)
            file.durable.result()
        return reader.manifest

    try:
        try:
            manifest = await asyncio.to_thread(read_and_stage)
            await links.finish()
        except BaseException as exc:
            failure = await links.stop()
            if isinstance(exc, _LinkFailed) and failure is not None:
                raise failure from None  # why the reading stopped
            raise
        counts = {"imported": 0, "unchanged": 0}
        # Everything is staged already: the batches bound a transaction, not the staged bytes.
        batch = Batch(service, cloud, counts, None, max_bytes=1 << 62, written=links.written)
        source = manifest.header["cloud"]
        try:
            for index, (member, file) in enumerate(staged, start=1):
                await batch.add(index, source, member.entry, functools.partial(_ready, file))
            await batch.flush()
        finally:
            await batch.discard()
        return manifest, counts
    finally:
        try:  # refused, failed, or blobs no commit named (entries found unchanged): settled now
            await service.abandon_blobs(cloud, links.written)
        finally:
            await asyncio.to_thread(directory.remove)


class _LinkFailed(Exception):
    """Writing a staged member's blob failed: the import stops reading (the failure is raised)."""


class _EarlyLinks:
    """The blobs of `import_file`'s verified members, written (journaled, then linked into the
    primary store and the backup target: `VersionService.write_blobs`) as each staged file
    becomes durable, while the reader goes on: whatever arrived meanwhile goes in one journal
    transaction, its links several at once. A member whose bytes are already its asset's
    current ones is left to the commit (which finds it unchanged), a digest seen before is
    written once. `written` holds the writes for the commits to take."""

    def __init__(self, service: VersionService, cloud: Cloud) -> None:
        self.service, self.cloud = service, cloud
        self.written: dict[str, BlobWrite] = {}
        self.failed = threading.Event()
        self._loop = asyncio.get_running_loop()
        self._arrivals: asyncio.Queue[tuple[dict[str, Any], staging.Staged] | None] = asyncio.Queue()
        self._stopping = False
        self._task = asyncio.ensure_future(self._run())

    def offer(self, entry: dict[str, Any], staged: staging.Staged) -> None:
        """A member whose BLAKE3 matched (from the reading thread)."""
        self._loop.call_soon_threadsafe(self._arrivals.put_nowait, (entry, staged))

    def check(self) -> None:
        """From the reading thread: stop reading once writing a blob failed."""
        if self.failed.is_set():
            raise _LinkFailed("writing a member's blob failed")

    async def finish(self) -> None:
        """Wait until every member offered is written; raises the first failure."""
        self._arrivals.put_nowait(None)
        await self._task

    async def stop(self) -> BaseException | None:
        """Write nothing more; wait for the write in flight (its rows are in `written`). Its
        failure, if writing failed."""
        self._stopping = True
        self._arrivals.put_nowait(None)
        try:
            await self._task
        except Exception as exc:
            return exc
        return None

    async def _run(self) -> None:
        try:
            ended = False
            while not ended and (first := await self._arrivals.get()) is not None:
                group = [first]
                while not self._arrivals.empty():
                    arrived = self._arrivals.get_nowait()
                    if arrived is None:
                        ended = True
                        break
                    group.append(arrived)
                await asyncio.gather(*(asyncio.wrap_future(staged.durable) for _, staged in group))
                if not self._stopping:
                    await self._write(group)
        except BaseException:
            self.failed.set()
            raise

    async def _write(self, group: list[tuple[dict[str, Any], staging.Staged]]) -> None:
        files: dict[str, Spooled] = {}
        for entry, staged in group:
            if staged.blake3 in self.written or staged.blake3 in files:
                continue
            current = await self.service.meta.get_asset(self.cloud.name, entry["resource_type"], entry["type"], entry["public_id"])
            if current is not None and current.live and current.digest == staged.blake3:
                continue
            files[staged.blake3] = Spooled(staged.path, staged.size, staged.blake3, staged.head, synced=True)
        self.written.update(await self.service.write_blobs(self.cloud, list(files.values())))


async def _ready(staged: staging.Staged) -> staging.Staged:
    return staged


def _request(cloud: Cloud, source: str, entry: dict[str, Any]) -> UploadRequest:
    return UploadRequest(
        cloud=cloud, resource_type=entry["resource_type"], type=entry["type"], public_id=entry["public_id"], backup=True,
        filename=entry["path"].rsplit("/", 1)[-1], tags=list(entry["tags"]) or None, context=dict(entry["context"]) or None,
        metadata=dict(entry["metadata"]) or None,
        restored_from=f"archive:{source}/{entry['asset_id']}/{entry['version_id']}",
    )


# --- the jobs -------------------------------------------------------------------------------------


def selection_params(selection: pitr.Selection) -> dict[str, Any]:
    return {"snapshot_id": selection.snapshot_id, "at": selection.at, "prefix": selection.prefix}


async def start(service: VersionService, cloud: str, kind: str, params: dict[str, Any], notification_url: str | None,
                job_id: str | None = None) -> Job | None:
    """Queue an export or import; None when the environment already has one of that kind open."""
    job = Job(
        id=job_id or new_hex_id(), cloud=cloud, kind=kind, status="pending", params=params, created_at=time.time(),
        notification_url=notification_url,
    )
    return await service.meta.create_job(job)


async def _audit(service: VersionService, job: Job, action: str, outcome: str, detail: dict[str, Any]) -> None:
    await AuditLog(service.meta).record(f"job:{job.id}", action, cloud=job.cloud, target=job.id, outcome=outcome, detail=detail)


async def _publish(store: BlobStore, key: str, path: Path) -> None:
    """Create-only; a key already there is a killed run's layout, never announced (its job did
    not complete) and maybe not the same (tags or pending backups changed since): replaced."""
    if not await store.put_file(key, path):
        await store.delete(key)
        await store.put_file(key, path)


class ArchiveExport:
    """The `archive_export` job: describe, check, record, publish the layout; a restart
    describes again from the start (nothing partial is published)."""

    def __init__(self, service: VersionService, clock: Callable[[], float] = time.time) -> None:
        self.service = service
        self.clock = clock

    async def run(self, job: Job) -> None:
        params = job.params
        selection = pitr.Selection(job.cloud, params.get("prefix") or "", params.get("at"), params.get("snapshot_id"))
        temp = export_temp(self.service.spool_dir, job.id)  # the same name on a rerun: no leftovers
        key = layout.archive_layout_key(job.cloud, job.id)
        try:
            described = await describe_archive(self.service, selection, temp, job.created_at)
            digest = await check_layout(self.service, job.cloud, temp)
            layout_digest = (await hash_file(temp))[0]
            now = self.clock()
            expires_at = now + int(params.get("keep_days") or DEFAULT_KEEP_DAYS) * DAY
            # The row and the revisions it holds before the layout: a published archive always
            # has its expiry, and its revisions are held (or it was withdrawn) from then on.
            record = ArchiveFile(job.id, job.cloud, EXPORT_FILE, key, now, expires_at)
            await self.service.meta.register_archive_layout(record, layout_members(temp))
            await _publish(self.service.targets.store(None), key, temp)
        except (fmt.ArchiveInvalid, MemberGone) as exc:
            await self._fail(job, str(exc))
            return
        finally:
            temp.unlink(missing_ok=True)
        job.progress = {
            "key": key, "layout": layout_digest, "digest": digest, "size": described.size, "count": described.count,
            "bytes": described.bytes, "skipped": described.skipped,
        }
        job.status, job.completed_at = "completed", time.time()
        if await self.service.meta.save_job(job):
            await _audit(self.service, job, "archive_export_finish", "ok", {"digest": digest, "count": described.count})

    async def _fail(self, job: Job, error: str) -> None:
        job.status, job.error, job.completed_at = "failed", error, time.time()
        if await self.service.meta.save_job(job):
            await _audit(self.service, job, "archive_export_finish", "failed", {"error": error})


class _Stopped(Exception):
    """The job's row is no longer open: stop without touching it."""


class ArchiveImport:
    """The `archive_import` job: apply a stored, already verified archive from its cursor."""

    def __init__(self, service: VersionService) -> None:
        self.service = service

    async def run(self, job: Job) -> None:
        cloud = await self.service.meta.get_cloud(job.cloud)
        assert cloud is not None
        store = self.service.targets.store(None)
        key = layout.archive_upload_key(job.cloud, job.id)
        skip = int(job.cursor.get("applied", 0))
        base = {k: int(job.progress.get(k, 0)) if skip else 0 for k in ("imported", "unchanged")}
        last_save = time.monotonic()

        async def saved(index: int, counts: dict[str, int]) -> None:
            nonlocal last_save
            if time.monotonic() - last_save >= SAVE_EVERY:
                job.cursor = {"applied": index}
                job.progress = {k: base[k] + counts[k] for k in base}
                last_save = time.monotonic()
                if not await self.service.meta.save_job(job):
                    raise _Stopped  # cancelled or finished elsewhere meanwhile

        try:
            async with self.service.local_copy(store, key, job.params["digest"], verify=True) as path:
                if path is None:
                    raise fmt.ArchiveInvalid("the uploaded archive is gone from storage")
                counts = await apply_archive(self.service, cloud, path, skip, after_entry=saved)
        except _Stopped:
            return
        except fmt.ArchiveInvalid as exc:
            job.status, job.error, job.completed_at = "failed", str(exc), time.time()
            if await self.service.meta.save_job(job):
                await _audit(self.service, job, "archive_import_finish", "failed", {"error": str(exc)})
                await self._drop_upload(job, key)
            return
        job.progress = {k: base[k] + counts[k] for k in base}
        job.status, job.completed_at = "completed", time.time()
        if await self.service.meta.save_job(job):
            await _audit(self.service, job, "archive_import_finish", "ok", job.progress)
            await self._drop_upload(job, key)

    async def _drop_upload(self, job: Job, key: str) -> None:
        """The uploaded copy has done its work; if this fails (or a kill comes first), the
        removal loop takes it, its job having ended."""
        with contextlib.suppress(Exception):
            await remove_file(self.service, ArchiveFile(job.id, job.cloud, IMPORT_FILE, key, job.created_at, None), time.time())


async def spool_upload(service: VersionService, chunks: AsyncIterator[bytes], limit: int) -> Spooled:
    """An archive sent for import, on local disk (the caller removes it). No MD5 of the whole
    tar: nothing reads it, and verification hashes each member with MD5, once."""
    spool = service.new_spool(md5=False)
    spool.limit = limit
    try:
        async for block in chunks:
            await spool.write(block)
        spooled = await spool.finish()
    except BaseException:
        spool.discard()
        raise
    return spooled


# --- describing and downloading -------------------------------------------------------------------


def download_query(cloud: Cloud, archive_id: str, now: float) -> dict[str, str]:
    """The signed query of `download_archive` (one hour, like download_backup): its purpose's
    vocabulary is `archive_id` alone, so the link opens nothing else (purposes.py)."""
    params: dict[str, str] = {"archive_id": archive_id, "timestamp": str(int(now))}
    params["signature"] = signing.sign(signing.string_to_sign(params), cloud.api_secret, "sha256")
    params["api_key"] = cloud.api_key
    return params


def describe(job: Job, cloud: Cloud, now: float, record: ArchiveFile | None = None) -> dict[str, Any]:
    """An archive job as the API shows it; a finished export has its `expires_at` and, until
    it is removed (`removed_at`; `removed_reason` when a version it lists was deleted
    irreversibly), its signed `download_url` (a path on this service, valid one hour from `now`)."""
    body: dict[str, Any] = {"archive_id": job.id}
    if job.kind == EXPORT and job.status == "completed":
        body["digest"], body["size"] = job.progress.get("digest"), job.progress.get("size")
        if record is not None and record.expires_at is not None:
            body["expires_at"] = _iso(record.expires_at)
        if record is not None and record.removed:
            body["removed_at"] = _iso(record.removed_at or record.expires_at or now)
            if record.removed_reason is not None:
                body["removed_reason"] = record.removed_reason
        else:
            body["download_url"] = f"/v1_1/{cloud.name}/download_archive?{urlencode(download_query(cloud, job.id, now))}"
    return body


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(int(ts), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")  # as the API's other times


async def described(meta: MetadataRepository, job: Job, cloud: Cloud, now: float) -> dict[str, Any]:
    """`describe` with the archive's file record (expiry, removal) read."""
    return describe(job, cloud, now, await meta.get_archive_file(cloud.name, job.id))


async def published(service: VersionService, cloud: str, archive_id: str) -> tuple[Job, BlobStore, str]:
    """(job, store, key) of a finished export that is still kept; NotFound otherwise. The key
    is its layout (`progress["layout"]` is the layout's BLAKE3), or the tar an export made
    before archives were composed."""
    job = await service.meta.get_job(cloud, archive_id)
    if job is None or job.kind != EXPORT:
        raise NotFound(f"Archive not found - {archive_id}")
    if job.status != "completed":
        raise NotFound(f"Archive {archive_id} is {job.status}, not ready")
    await still_kept(service, cloud, archive_id)
    return job, service.targets.store(None), str(job.progress["key"])


def kept_check(service: VersionService, cloud: str, archive_id: str, every: float = 1.0) -> compose.BeforeMember:
    """`still_kept` before a download's next member, at most every `every` seconds: an
    archive withdrawn meanwhile (a takedown) stops being served within about that time."""
    last = time.monotonic()

    async def check() -> None:
        nonlocal last
        if time.monotonic() - last >= every:
            last = time.monotonic()
            await still_kept(service, cloud, archive_id)

    return check


async def still_kept(service: VersionService, cloud: str, archive_id: str) -> None:
    """NotFound once the archive was removed or withdrawn (a download checks it again as it goes)."""
    record = await service.meta.get_archive_file(cloud, archive_id)
    if record is not None and record.removed:
        raise NotFound(f"Archive {archive_id} was removed")


@contextlib.asynccontextmanager
async def opened_layout(service: VersionService, job: Job, store: BlobStore, key: str) -> AsyncIterator[compose.Layout]:
    """A composed export's layout, read locally and proven by its BLAKE3."""
    async with service.local_copy(store, key, str(job.progress["layout"]), verify=True) as path:
        if path is None:
            raise NotFound(f"Archive {job.id} was removed")
        handle = await asyncio.to_thread(path.open, "rb")
        try:
            yield await asyncio.to_thread(compose.Layout, handle)
        finally:
            handle.close()


async def revision_store(service: VersionService, cloud: Cloud) -> BlobStore:
    """Where a download reads an archive's originals: the environment's target, as
    `download_backup` reads a version (Unavailable when it cannot be used now)."""
    try:
        return await service.targets.usable(cloud, inline=True)
    except TargetUnavailable as exc:
        raise Unavailable(f"Backup target unavailable: {exc.message}") from None
    except BlobStoreError as exc:
        raise Unavailable(f"Backup target unavailable: {exc}") from None
