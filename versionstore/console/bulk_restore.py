"""Bulk restore: a durable job that restores a selection of assets (their newest backed-up
version) one after another, with progress, resumed from its cursor after a restart, each
restore audited under the staff member who started it."""

import time

from versionstore.console.actions import require
from versionstore.console.audit import AuditLog
from versionstore.console.records import StaffMember
from versionstore.errors import BadRequest, Conflict
from versionstore.ids import is_hex_id, new_hex_id
from versionstore.models import Job
from versionstore.repository import MetadataRepository
from versionstore.service import VersionService

KIND = "bulk_restore"
MAX_ASSETS = 500
MAX_FAILURES_LISTED = 100


async def start(meta: MetadataRepository, member: StaffMember, cloud: str, asset_ids: list[str], address: str | None) -> Job:
    require(member, cloud, "restorer")
    wanted = list(dict.fromkeys(a for a in asset_ids if is_hex_id(a)))
    if not wanted:
        raise BadRequest("Select at least one asset to restore")
    if len(wanted) > MAX_ASSETS:
        raise BadRequest(f"At most {MAX_ASSETS} assets per bulk restore")
    job = Job(
        id=new_hex_id(), cloud=cloud, kind=KIND, status="pending", created_at=time.time(),
        params={"asset_ids": wanted, "actor": f"staff:{member.email}", "address": address},
        progress={"total": len(wanted), "restored": 0, "failed": 0, "failures": []},
    )
    if await meta.create_job(job) is None:
        raise Conflict("A bulk restore is already running in this environment; wait for it to finish")
    await AuditLog(meta).record(f"staff:{member.email}", "job_start", cloud=cloud, target=job.id, address=address,
                                detail={"kind": KIND, "assets": len(wanted)})
    return job


class BulkRestore:
    def __init__(self, service: VersionService) -> None:
        self.service = service
        self.meta = service.meta
        self.audit = AuditLog(service.meta)

    async def run(self, job: Job) -> None:
        asset_ids: list[str] = job.params["asset_ids"]
        progress = job.progress
        for index in range(int(job.cursor.get("index", 0)), len(asset_ids)):
            asset = await self.meta.get_asset_by_id(job.cloud, asset_ids[index])
            if asset is None:
                error: str | None = "asset not found"
            else:
                outcome = await self.service.restore(asset, None)
                error = outcome.error.message if outcome.error else None
            await self.audit.record(
                job.params["actor"], "restore", cloud=job.cloud, target=f"{asset_ids[index]} {asset.public_id if asset else ''}".strip(),
                address=job.params.get("address"), outcome="failed" if error else "ok", detail={"via": "bulk_restore", "job_id": job.id,
                                                                                                **({"error": error} if error else {})},
            )
            if error:
                progress["failed"] += 1
                if len(progress["failures"]) < MAX_FAILURES_LISTED:
                    progress["failures"].append({"asset_id": asset_ids[index], "error": error})
            else:
                progress["restored"] += 1
            job.cursor = {"index": index + 1}
            if not await self.meta.save_job(job):
                return  # cancelled meanwhile
        job.status = "failed" if progress["failed"] else "completed"
        job.error = f"{progress['failed']} asset(s) could not be restored" if progress["failed"] else None
        job.completed_at = time.time()
        await self.meta.save_job(job)
