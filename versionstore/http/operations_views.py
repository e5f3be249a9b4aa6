"""Cloudinary's initial-backup operations (Admin auth; spec section 14, docs/api.md).

    POST  /v1_1/<cloud>/operations/initial_backup        start one (optional notification_url)
    GET   /v1_1/<cloud>/operations/initial_backup        list, newest first (max_results, next_cursor)
    GET   /v1_1/<cloud>/operations/initial_backup/<id>   one, with its counts
"""

from aiohttp import web

from versionstore import initial_backup, queries
from versionstore.errors import BadRequest, Conflict, NotFound
from versionstore.http import render
from versionstore.http.audit_views import record_api
from versionstore.http.auth import check_basic
from versionstore.http.inputs import admin_params
from versionstore.http.keys import JOBS, META
from versionstore.models import Cloud
from versionstore.params import as_int


async def initial_backups(request: web.Request, cloud: Cloud, match: dict[str, str]) -> web.Response:
    """POST starts one, GET lists them."""
    check_basic(request, cloud)
    params = await admin_params(request)
    meta = request.app[META]
    if request.method == "GET":
        limit = as_int(params.get("max_results"), "max_results", 50, 1, 500)
        offset = queries.decode_cursor(params.get("next_cursor"))
        jobs = await meta.list_jobs(cloud.name, initial_backup.KIND, limit + 1, offset)
        body: dict[str, object] = {
            "initial_backups": [{"id": j.id, "status": j.status, "created_at": render.iso(j.created_at)} for j in jobs[:limit]]
        }
        if len(jobs) > limit:
            body["next_cursor"] = queries.encode_cursor(offset + limit)
        return web.json_response(body)
    notification_url = str(params.get("notification_url") or "") or None
    if notification_url and not notification_url.startswith(("http://", "https://")):
        raise BadRequest("notification_url must be an http(s) URL")
    try:
        job = await initial_backup.start(meta, cloud, notification_url)
    except initial_backup.AlreadyRunning as exc:
        raise Conflict(str(exc)) from None
    request.app[JOBS].wake.set()
    await record_api(request, cloud, "job_start", job.id, detail={"kind": initial_backup.KIND})
    return web.json_response({"ok": True, "id": job.id})


async def one(request: web.Request, cloud: Cloud, match: dict[str, str]) -> web.Response:
    check_basic(request, cloud)
    meta = request.app[META]
    job = await meta.get_job(cloud.name, match["job_id"])
    if job is None or job.kind != initial_backup.KIND:
        raise NotFound("Operation does not exist")
    return web.json_response(await initial_backup.describe(meta, job))
