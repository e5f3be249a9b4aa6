"""Archive removal (docs/snapshots.md, "Removal"): a prepared archive expires `keep_days` after
it was written, an import's uploaded tar goes once its job has ended, and what a killed export
or CLI import left in the spool goes once its job or process is gone. Every file is recorded
(`archive_files`) before it is stored; removal deletes the file first and then records it with a
compare-and-set, so several processes may run it at once and exactly one audits each removal.
"""

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path

from versionstore import staging, ticks
from versionstore.archive_records import EXPORT, EXPORT_FILE, IMPORT_STAGING, ArchiveFile
from versionstore.console.audit import AuditLog
from versionstore.errors import BadRequest
from versionstore.models import Job
from versionstore.repository import MetadataRepository
from versionstore.service import VersionService

log = logging.getLogger(__name__)

DAY = 86400.0
#: Days a prepared archive stays downloadable unless its export asked otherwise (`keep_days`).
DEFAULT_KEEP_DAYS = 7
MAX_KEEP_DAYS = 3650
#: An import's stored tar whose job never came to exist this long after (a crash between
#: storing it and creating the job) is removed.
ORPHAN_AGE = DAY
REMOVE_BATCH = 100
REMOVAL_INTERVAL = 60.0
REMOVAL_ACTOR = "job:archive_removal"


def keep_days(value: object, default: int, name: str = "keep_days") -> int:
    """The `keep_days` of an export (or the environment's default, `name`): a whole number of
    days from 1 to MAX_KEEP_DAYS; `default` when not given."""
    if value is None or value == "":
        return default
    try:
        days = int(str(value))
    except ValueError:
        days = 0
    if not 1 <= days <= MAX_KEEP_DAYS:
        raise BadRequest(f"{name} must be a whole number of days from 1 to {MAX_KEEP_DAYS}")
    return days


#: What clears an environment's `archive_keep_days` (back to the server's default). Not a blank:
#: a blank parameter is no parameter (as Cloudinary's API treats them).
UNSET = "default"


async def default_keep_days(meta: MetadataRepository, cloud: str, server_default: int) -> int:
    """The `keep_days` of an export that does not give one: the environment's setting, else the
    server's (VERSIONSTORE_ARCHIVE_KEEP_DAYS)."""
    return await meta.get_archive_keep_days(cloud) or server_default


def default_keep_days_value(value: object) -> int | None:
    """An environment's `archive_keep_days` as given to the settings: days, or None (UNSET:
    back to the server's default). BadRequest otherwise."""
    return None if value == UNSET else keep_days(value, 0, "archive_keep_days")


async def settings(meta: MetadataRepository, cloud: str, server_default: int) -> dict[str, int | None]:
    """What the settings extension and `cloud status` show: the environment's own default
    (null: none, the server's applies) and the server's."""
    return {"archive_keep_days": await meta.get_archive_keep_days(cloud), "server_archive_keep_days": server_default}


def file_of(job: Job, record: ArchiveFile | None) -> ArchiveFile | None:
    """The file an ended archive job keeps: its record, or for an export written before
    archive files were recorded, one made from the job (its `key`)."""
    if record is None and job.kind == EXPORT and job.status == "completed":
        return ArchiveFile(job.id, job.cloud, EXPORT_FILE, str(job.progress["key"]), job.completed_at or job.created_at, None)
    return record


async def remove_file(service: VersionService, record: ArchiveFile, now: float) -> bool:
    """Delete an archive's file (a missing one is no error), then record that; True for the one
    caller, in any process, that recorded it (and so audits it). That caller then releases the
    revisions a composed export listed: those nothing else references go (a crash first leaves
    them to `versionstore gc --full`)."""
    await service.targets.store(None).delete(record.key)
    if not await service.meta.mark_archive_removed(record.job_id, now):
        return False
    if record.kind == EXPORT_FILE:
        await release_members(service, record)
    return True


async def release_members(service: VersionService, record: ArchiveFile) -> None:
    """Each revision a removed export listed, checked again under its deletion claim and
    deleted when nothing else references it (`VersionService.release_revision`)."""
    after = ""
    while digests := await service.meta.archive_member_digests(record.job_id, after, REMOVE_BATCH):
        for digest in digests:
            await service.release_revision(record.cloud, digest)
        after = digests[-1]


async def remove_due(service: VersionService, now: float) -> int:
    """Remove every archive file due at `now` (expired exports, tars of ended imports); safe
    in several processes at once. Returns how many this call removed."""
    audit = AuditLog(service.meta)
    removed = 0
    while True:
        due = await service.meta.due_archive_files(now, now - ORPHAN_AGE, REMOVE_BATCH)
        for record in due:
            if await remove_file(service, record, now):
                reason = record.removed_reason or (
                    "expired" if record.expires_at is not None and record.expires_at <= now else "job_ended"
                )
                await audit.record(REMOVAL_ACTOR, "archive_removed", cloud=record.cloud, target=record.job_id,
                                   detail={"kind": record.kind, "key": record.key, "reason": reason})
                removed += 1
        if len(due) < REMOVE_BATCH:
            return removed


async def run_removals(service: VersionService, interval: float = REMOVAL_INTERVAL, clock: Callable[[], float] = time.time) -> None:
    """The server's loop around `remove_due` (at start, then every `interval` seconds: an
    expiry is counted in days); runs until cancelled."""
    await ticks.every(interval, lambda: remove_due(service, clock()), log, "removing archive files")


# --- what a kill leaves in the spool ------------------------------------------------------------


def export_temp(spool_dir: Path, job_id: str) -> Path:
    """Where the export job writes its layout before publishing it (and, beside it, the
    spooled manifest `<temp>.manifest` and member lines `<temp>.members`)."""
    return spool_dir / f"archive-{job_id}.tar.tmp"


async def remove_stale_files(service: VersionService) -> int:
    """Remove what a killed archive job or import left in the spool: an import's staging
    directory whose process is gone (`import_file`), and export temp files (and their spooled
    manifests) whose job is no longer open (it failed or finished elsewhere since). An open
    job's file is left to it: its run, or its rerun after a kill, writes the same name again
    and removes it. Listed before the open jobs are read, so a file of a job that starts
    meanwhile is kept."""
    removed = await asyncio.to_thread(staging.remove_stale, service.spool_dir, IMPORT_STAGING)
    found = await asyncio.to_thread(lambda: list(service.spool_dir.glob("archive-*.tar.tmp*")))
    if not found:
        return removed
    open_ids = {job.id for job in await service.meta.open_jobs(kind=EXPORT)}
    stale = [p for p in found if p.name.removeprefix("archive-").split(".", 1)[0] not in open_ids]
    for path in stale:
        await asyncio.to_thread(path.unlink, missing_ok=True)
    return removed + len(stale)
