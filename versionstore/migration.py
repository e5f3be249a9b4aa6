"""Switching an environment's backup target: a durable job that copies the whole history.

Setting a bucket (or removing one, back to the default store) never switches at once: a
`backup_migration` job copies every revision to the new target, verifying each digest on the
way, and only then switches reads and writes in the transaction that completes the job.

- The cursor is the last version row copied. Versions committed during the copy have larger
  row ids, so the loop picks them up; the last pass holds the environment's target switch
  claim in the database (`Claims.switching_target`): no revision write starts meanwhile in
  any process, and those in flight are waited for, so nothing can land in the old target
  after it.
- A revision still pending (its bytes wait in the primary store) is copied from there.
- Deleting a version during the copy deletes it from both targets (VersionService).
- After the switch away from the default store, the environment's copies there are removed
  (phase `cleanup`); a customer bucket switched away from is left as it is: it is theirs.
- Setting the target back to the current one while the copy runs cancels the job.
"""

import asyncio
import logging
import time
from typing import Any

from versionstore import layout
from versionstore.blobstore import BlobNotFound, BlobStore, BlobStoreError
from versionstore.claims import REVISION
from versionstore.errors import BadRequest
from versionstore.ids import new_hex_id
from versionstore.models import Cloud, Job
from versionstore.repository import MetadataRepository
from versionstore.service import RevisionCorrupt, VersionService
from versionstore.targets import TargetUnavailable, customer_bucket, verify_bucket

log = logging.getLogger(__name__)

KIND = "backup_migration"
BATCH = 64  # revisions per saved cursor: progress shows early, a restart redoes little
CONCURRENCY = 4
MAX_FAILED_LISTED = 50


def target_name(target: str | None) -> str:
    return target or "default"


async def change_target(meta: MetadataRepository, cloud: Cloud, url: str | None, *, operator: bool = False) -> Job | None:
    """Verify a new target and queue the migration to it (None: nothing to change).

    `url` None means the default store. Used by the API and, with `operator`, the CLI.
    """
    wanted = None if url in (None, "", "default") else str(customer_bucket(url, operator=operator))
    for job in await meta.open_jobs(cloud.name, KIND):
        if wanted == cloud.backup_target and job.progress.get("phase", "copy") == "copy":
            job.status, job.completed_at = "failed", time.time()
            job.error = f"cancelled: the target was set back to {target_name(wanted)}"
            await meta.save_job(job)
            return job
        raise BadRequest(
            f"A backup migration to {target_name(job.params.get('to'))} is in progress (job {job.id}); wait for it to "
            f"finish, or set the target back to {target_name(cloud.backup_target)} to cancel it"
        )
    if wanted == cloud.backup_target:
        return None
    if wanted is not None:
        await verify_bucket(wanted, cloud.name)
    job = Job(
        id=new_hex_id(), cloud=cloud.name, kind=KIND, status="pending",
        params={"from": cloud.backup_target, "to": wanted}, progress={"phase": "copy"}, created_at=time.time(),
    )
    if await meta.create_job(job) is None:
        raise BadRequest("Another backup migration was queued at the same time; try again")
    return job


class BackupMigration:
    def __init__(self, service: VersionService, *, retry_delay: float = 5.0) -> None:
        self.service = service
        self.meta = service.meta
        self.retry_delay = retry_delay

    async def run(self, job: Job) -> None:
        progress = job.progress
        progress.setdefault("phase", "copy")
        if progress["phase"] == "copy" and not await self._copy_all(job):
            return  # cancelled or failed; the job row says which
        if progress["phase"] == "cleanup":
            await self._cleanup(job)
        job.status, job.completed_at = "completed", time.time()
        await self.meta.save_job(job)

    async def _copy_all(self, job: Job) -> bool:
        cloud = job.cloud
        count, total_bytes = await self.meta.revision_totals(cloud)
        job.progress.update(revisions_total=count, bytes_total=total_bytes)
        while True:
            if await self._cancelled(job):
                return False
            rows = await self.meta.revisions_after(cloud, int(job.cursor.get("after_pk", 0)), BATCH)
            if rows:
                await self._copy_rows(job, rows)
                continue
            async with self.service.claims.switching_target(cloud):
                if await self._cancelled(job):
                    return False
                rows = await self.meta.revisions_after(cloud, int(job.cursor.get("after_pk", 0)), 1 << 30)
                await self._copy_rows(job, rows)
                if job.progress.get("failed"):
                    job.status, job.completed_at = "failed", time.time()
                    job.error = f"{job.progress['failed']} revision(s) could not be copied; the target was not switched"
                    await self.meta.save_job(job)
                    return False
                job.progress["phase"] = "cleanup" if job.params.get("from") is None else "done"
                job.progress["switched_at"] = time.time()
                if not await self.meta.save_job(job, backup_target=(cloud, job.params.get("to"))):
                    return False  # cancelled after the last check: nothing switched
            log.info("environment %s now keeps its backups in %s", cloud, target_name(job.params.get("to")))
            return True

    async def _cancelled(self, job: Job) -> bool:
        current = await self.meta.get_job(job.cloud, job.id)
        return current is None or not current.open

    async def _copy_rows(self, job: Job, rows: list[tuple[int, str, int]]) -> None:
        """Copy a batch (bounded concurrency), retrying transient trouble until it passes."""
        limit = asyncio.Semaphore(CONCURRENCY)
        progress = job.progress

        async def one(digest: str, size: int) -> None:
            async with limit:
                outcome = await self._copy_with_retries(job, digest)
            progress[outcome] = progress.get(outcome, 0) + 1
            progress["revisions_done"] = progress.get("revisions_done", 0) + 1
            progress["bytes_done"] = progress.get("bytes_done", 0) + size

        await asyncio.gather(*(one(digest, size) for _, digest, size in rows))
        progress["revisions_total"] = max(progress.get("revisions_total", 0), progress.get("revisions_done", 0))
        job.cursor = {"after_pk": rows[-1][0]} if rows else job.cursor
        await self.meta.save_job(job)

    async def _copy_with_retries(self, job: Job, digest: str) -> str:
        while True:
            try:
                return await self._copy_one(job, digest)
            except (RevisionCorrupt, MissingSource, BlobNotFound) as exc:
                failed = job.progress.setdefault("failed_digests", [])
                if len(failed) < MAX_FAILED_LISTED:
                    failed.append({"digest": digest, "error": str(exc)})
                return "failed"
            except (TargetUnavailable, BlobStoreError) as exc:
                job.progress["last_error"] = f"{type(exc).__name__}: {exc}"
                job.progress["last_error_at"] = time.time()
                await self.meta.save_job(job)
                log.warning("migration %s of %s: %s; retrying in %.0f s", job.id, job.cloud, exc, self.retry_delay)
                await asyncio.sleep(self.retry_delay)
                if await self._cancelled(job):
                    return "cancelled"

    async def _copy_one(self, job: Job, digest: str) -> str:
        service = self.service
        cloud = await self.meta.get_cloud(job.cloud)
        assert cloud is not None
        if not await self.meta.digest_referenced(job.cloud, digest, backup=True):
            return "skipped"  # deleted meanwhile
        destination = await service.targets.target_store(cloud.name, job.params.get("to"))
        key = layout.revision_key(job.cloud, digest)
        if await destination.stat(key) is not None:
            return "already_present"
        source, source_key = await self._source(cloud, job, digest)
        await service.copy_blob(source, source_key, destination, key, digest)
        # Not journaled (a copy of a referenced revision loses nothing if deleted): a version
        # deleted during the copy had its release remove the destination's copy before this one
        # landed, or is seen here, in any process; then the copy goes, under a deletion claim.
        if not await self.meta.digest_referenced(job.cloud, digest, backup=True):
            async with service.claims.deleting(job.cloud, digest, REVISION) as free:
                if free:
                    await destination.delete(key)
            return "skipped"
        return "copied"

    async def _source(self, cloud: Cloud, job: Job, digest: str) -> tuple[BlobStore, str]:
        if await self.meta.get_pending(cloud.name, digest) is not None:
            return self.service.primary, layout.pending_key(cloud.name, digest)
        source = await self.service.targets.target_store(cloud.name, job.params.get("from"))
        key = layout.revision_key(cloud.name, digest)
        if await source.stat(key) is None:
            raise MissingSource(f"revision {digest} is missing from {target_name(job.params.get('from'))}")
        return source, key

    async def _cleanup(self, job: Job) -> None:
        """Remove the environment's revisions from the default store it moved away from."""
        store = self.service.targets.default
        removed = 0
        async for key in store.list(layout.revision_prefix(job.cloud)):
            await store.delete(key)
            removed += 1
            if removed % 256 == 0:
                job.progress["cleanup_removed"] = removed
                await self.meta.save_job(job)
        job.progress["cleanup_removed"] = removed
        job.progress["phase"] = "done"


class MissingSource(Exception):
    """A revision the metadata lists is not in the old target: reported, never papered over."""


def job_summary(job: Job) -> dict[str, Any]:
    return {"from": target_name(job.params.get("from")), "to": target_name(job.params.get("to")), **job.progress}
