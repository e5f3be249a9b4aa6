"""The initial backup: make the current version of every live asset a revision.

For environments that ran with backup off. A durable `initial_backup` job walks the live
assets in row order (its cursor is the last asset row of a finished batch), skips what is
already a revision and remote (`type=fetch` and friends) assets, and backs up the rest with
bounded concurrency so live uploads stay responsive. A revision whose target cannot take it
now is queued as pending, as an upload's would be.

Counts are exact across restarts: the backed-up count and bytes are read from the versions
the job marked (`versions.backup_job`), and a batch interrupted by a crash is re-examined,
finding its done assets already backed up (they are not counted twice).
"""

import asyncio
import logging
import time
from datetime import UTC, datetime
from typing import Any

from versionstore.errors import BadRequest
from versionstore.ids import new_hex_id
from versionstore.models import Asset, Cloud, Job
from versionstore.repository import MetadataRepository
from versionstore.service import VersionService

log = logging.getLogger(__name__)

KIND = "initial_backup"
BATCH = 200
#: Remote assets: their bytes live elsewhere, so there is no original to back up.
REMOTE_TYPES = frozenset({"fetch", "facebook", "twitter", "twitter_name", "gravatar", "youtube", "hulu", "vimeo", "animoto",
                          "worldstarhiphop", "dailymotion", "list", "multi", "text", "sprite"})
MAX_FAILURES_LISTED = 100
BACKUP_OFF = "Backup for new uploads isn't enabled. Turn it on before starting an initial backup of existing assets."


class AlreadyRunning(Exception):
    def __init__(self, job_id: str) -> None:
        super().__init__(f"An initial backup is already in progress ({job_id})")
        self.job_id = job_id


async def start(meta: MetadataRepository, cloud: Cloud, notification_url: str | None) -> Job:
    """Queue an initial backup; one at a time per environment."""
    if not cloud.auto_backup:
        raise BadRequest(BACKUP_OFF)
    job = Job(
        id=new_hex_id(), cloud=cloud.name, kind=KIND, status="pending", notification_url=notification_url, created_at=time.time(),
    )
    if await meta.create_job(job) is None:
        running = await meta.open_jobs(cloud.name, KIND)
        raise AlreadyRunning(running[0].id if running else "unknown")
    return job


class InitialBackup:
    def __init__(self, service: VersionService, *, concurrency: int = 4) -> None:
        self.service = service
        self.meta = service.meta
        self.concurrency = concurrency

    async def run(self, job: Job) -> None:
        progress = job.progress
        if "total_assets" not in progress:
            progress["total_assets"], progress["total_bytes"] = await self.meta.unbacked_totals(job.cloud)
            await self.meta.save_job(job)
        limit = asyncio.Semaphore(self.concurrency)
        while rows := await self.meta.live_assets_after(job.cloud, int(job.cursor.get("after_pk", 0)), BATCH):

            async def one(asset: Asset, version_pk: int, backed_up: bool, by_job: str | None) -> None:
                async with limit:
                    await self._one(job, asset, version_pk, backed_up, by_job)

            await asyncio.gather(*(one(*row) for row in rows))
            job.cursor = {"after_pk": rows[-1][0].pk}
            await self.meta.save_job(job)
        failed = progress.get("failed", 0)
        job.status = "failed" if failed else "completed"
        job.error = f"{failed} asset(s) could not be backed up" if failed else None
        job.completed_at = time.time()
        await self.meta.save_job(job)

    async def _one(self, job: Job, asset: Asset, version_pk: int, backed_up: bool, by_job: str | None) -> None:
        progress = job.progress
        if by_job == job.id:
            return  # done before a restart, counted from the versions table
        if asset.type in REMOTE_TYPES:
            outcome = "skipped"
        elif backed_up:
            outcome = "already_backed_up"
        else:
            try:
                outcome = await self.service.back_up_current_version(asset, version_pk, job.id)
            except Exception as exc:  # one asset's trouble must not stop the library's backup
                log.warning("initial backup %s: %s failed: %r", job.id, asset.public_id, exc)
                outcome, reason = "failed", f"{type(exc).__name__}: {exc}"
            else:
                reason = "the original is missing from the primary store"
            outcome = {"already": "already_backed_up", "missing": "failed"}.get(outcome, outcome)
            if outcome == "failed":
                failures = progress.setdefault("failures", [])
                if len(failures) < MAX_FAILURES_LISTED:
                    failures.append({"public_id": asset.public_id, "asset_id": asset.asset_id, "reason": reason})
        if outcome in ("skipped", "already_backed_up", "failed", "pending"):
            progress[outcome] = progress.get(outcome, 0) + 1


async def describe(meta: MetadataRepository, job: Job) -> dict[str, Any]:
    """The job as `GET operations/initial_backup/<id>` shows it (Cloudinary's names first)."""
    backed_up, size = await meta.job_backups(job.id)
    progress = job.progress
    body: dict[str, Any] = {
        "id": job.id,
        "status": job.status,
        "start_time": _iso(job.started_at),
        "completion_time": _iso(job.completed_at),
        "processed_assets_count": backed_up,
        "bytes": size,
        "total_assets": progress.get("total_assets"),
        "total_bytes": progress.get("total_bytes"),
        "failed_assets_count": progress.get("failed", 0),
        "skipped_assets_count": progress.get("skipped", 0),
        "already_backed_up_count": progress.get("already_backed_up", 0),
        "pending_count": progress.get("pending", 0),
        "failures": progress.get("failures", []),
    }
    if job.error:
        body["reason"] = job.error
    return body


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
