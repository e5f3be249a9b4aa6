"""versionstore extension endpoints for backup targets and jobs (Admin auth; docs/api.md).

    GET            /v1_1/<cloud>/versionstore/backup       target, health, pending queue, migration
    PUT|POST       /v1_1/<cloud>/versionstore/backup       bucket=s3://...|gs://...|default
    DELETE         /v1_1/<cloud>/versionstore/backup       back to the default store
    GET            /v1_1/<cloud>/versionstore/jobs/<id>    one job
"""

from typing import Any

from aiohttp import web

from versionstore import migration, verify
from versionstore.disk_space import space_report
from versionstore.errors import BadRequest, NotFound
from versionstore.http import render
from versionstore.http.audit_views import record_api
from versionstore.http.auth import check_basic
from versionstore.http.inputs import admin_params
from versionstore.http.keys import CONFIG, JOBS, META
from versionstore.models import Cloud
from versionstore.repository import MetadataRepository


async def backup_status(
    meta: MetadataRepository, cloud: Cloud, space: dict[str, Any], stores: tuple[str | None, str | None] = (None, None)
) -> dict[str, Any]:
    """`space` is disk_space.space_report() of the data dir (free bytes, `low_space`); `stores`:
    the primary and default backup store URLs, to tell whether they share storage."""
    health = await meta.get_health(cloud.name)
    count, size, oldest = await meta.pending_summary(cloud.name)
    jobs = await meta.open_jobs(cloud.name, migration.KIND)
    return {
        "cloud_name": cloud.name,
        "target": migration.target_name(cloud.backup_target),
        "state": health.state if health else "healthy",
        "last_error": health.last_error if health else None,
        "last_error_at": render.iso(health.last_error_at) if health and health.last_error_at else None,
        "pending": {"count": count, "bytes": size, "oldest_queued_at": render.iso(oldest) if oldest else None},
        "migration": render.job(jobs[0]) if jobs else None,
        "data_dir": space,
        **await verify.status_fields(meta, cloud, *stores),
    }


async def backup(request: web.Request, cloud: Cloud, match: dict[str, str]) -> web.Response:
    check_basic(request, cloud)
    meta = request.app[META]
    if request.method != "GET":
        params = await admin_params(request)
        if request.method == "DELETE":
            bucket: str | None = None
        elif "bucket" in params:
            bucket = str(params["bucket"] or "") or None
        else:
            raise BadRequest("Missing required parameter - bucket (s3://..., gs://... or default)")
        job = await migration.change_target(meta, cloud, bucket)
        where = bucket.split("?", 1)[0] if bucket else None  # without store options
        await record_api(request, cloud, "backup_target", cloud.name, detail={"bucket": where, "job_id": job.id if job else None})
        if job is not None:
            request.app[JOBS].wake.set()
        cloud = await meta.get_cloud(cloud.name) or cloud
    config = request.app[CONFIG]
    space = space_report(config.data_dir, config.min_free_bytes)
    return web.json_response(await backup_status(meta, cloud, space, (config.primary_url, config.backup_url)))


async def job(request: web.Request, cloud: Cloud, match: dict[str, str]) -> web.Response:
    check_basic(request, cloud)
    found = await request.app[META].get_job(cloud.name, match["job_id"])
    if found is None:
        raise NotFound(f"Job not found - {match['job_id']}")
    return web.json_response(render.job(found))
