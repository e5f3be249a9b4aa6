"""Restore drills, their schedule, and where failure alerts go (docs/snapshots.md).

    GET|POST        /v1_1/<cloud>/versionstore/drills              list (newest first) | start one (a job)
    GET             /v1_1/<cloud>/versionstore/drills/<id>         one drill and its report
    GET|PUT|DELETE  /v1_1/<cloud>/versionstore/drill_schedule      the environment's drill schedule
    GET|PUT|DELETE  /v1_1/<cloud>/versionstore/alerts              alert notification_url and each operation's state
"""

import time
from typing import Any

from aiohttp import web

from versionstore import drills
from versionstore.errors import BadRequest, Conflict, NotFound
from versionstore.http import render
from versionstore.http.audit_views import record_api
from versionstore.http.auth import check_basic
from versionstore.http.inputs import admin_params
from versionstore.http.keys import JOBS, META
from versionstore.models import Cloud, Job
from versionstore.params import as_int


def drill_body(job: Job) -> dict[str, Any]:
    body = drills.describe(job)
    for name in ("created_at", "started_at", "completed_at"):
        body[name] = render.iso(body[name]) if body[name] else None
    return body


def _url(value: object) -> str | None:
    url = str(value or "") or None
    if url is not None and not url.startswith(("http://", "https://")):
        raise BadRequest("notification_url must be an http(s) URL")
    return url


async def drill_list(request: web.Request, cloud: Cloud, match: dict[str, str]) -> web.Response:
    check_basic(request, cloud)
    params = await admin_params(request)
    meta = request.app[META]
    if request.method == "POST":
        sample = drills.parse_sample(params)
        snapshot_id = str(params.get("snapshot_id") or "") or None
        if snapshot_id is None:
            await drills.latest_snapshot(meta, cloud.name)  # 404 now rather than a failed drill later
        job_params = drills.job_params(sample, snapshot_id=snapshot_id, created_by="api")
        job = await drills.start(meta, cloud.name, job_params, _url(params.get("notification_url")))
        if job is None:
            raise Conflict("A drill of this environment is already running")
        request.app[JOBS].wake.set()
        await record_api(request, cloud, "drill_start", job.id, detail={"snapshot_id": snapshot_id, "sample": sample})
        return web.json_response(drill_body(job))
    limit = as_int(params.get("max_results"), "max_results", 50, 1, 500)
    offset = as_int(params.get("next_cursor"), "next_cursor", 0, 0, 2**31)
    found = await meta.list_jobs(cloud.name, drills.KIND, limit + 1, offset)
    body: dict[str, Any] = {"drills": [drill_body(job) for job in found[:limit]]}
    if len(found) > limit:
        body["next_cursor"] = str(offset + limit)
    return web.json_response(body)


async def drill(request: web.Request, cloud: Cloud, match: dict[str, str]) -> web.Response:
    check_basic(request, cloud)
    job = await request.app[META].get_job(cloud.name, match["drill_id"])
    if job is None or job.kind != drills.KIND:
        raise NotFound(f"Drill not found - {match['drill_id']}")
    return web.json_response(drill_body(job))


async def schedule(request: web.Request, cloud: Cloud, match: dict[str, str]) -> web.Response:
    check_basic(request, cloud)
    meta = request.app[META]
    if request.method == "DELETE":
        await meta.delete_drill_schedule(cloud.name)
        await record_api(request, cloud, "drill_schedule_delete", cloud.name)
    elif request.method in ("PUT", "POST"):
        given = dict(await admin_params(request))
        await drills.set_schedule(meta, cloud.name, given, time.time())
        await record_api(request, cloud, "drill_schedule_set", cloud.name, detail={"schedule": given})
    row = await meta.get_drill_schedule(cloud.name)
    if row is None:
        return web.json_response({"schedule": None, "sample": None, "next_run_at": None, "last_run_at": None})
    return web.json_response({
        "schedule": row.schedule, "sample": row.sample, "created_by": drills.schedule_label(row.schedule),
        "next_run_at": render.iso(row.next_run_at), "last_run_at": render.iso(row.last_run_at) if row.last_run_at else None,
    })


async def alerts(request: web.Request, cloud: Cloud, match: dict[str, str]) -> web.Response:
    check_basic(request, cloud)
    meta = request.app[META]
    if request.method == "DELETE":
        await meta.set_alert_url(cloud.name, None)
        await record_api(request, cloud, "alert_url_delete", cloud.name)
    elif request.method in ("PUT", "POST"):
        params = await admin_params(request)
        if not params.get("notification_url"):
            raise BadRequest("Missing required parameter - notification_url (DELETE stops the alerts)")
        url = _url(params["notification_url"])
        await meta.set_alert_url(cloud.name, url)
        await record_api(request, cloud, "alert_url_set", cloud.name, detail={"notification_url": url})
    states = [
        {"operation": s.operation, "failing": s.failing, "failures": s.failures, "last_error": s.last_error,
         "last_failure_at": render.iso(s.last_failure_at) if s.last_failure_at else None,
         "last_success_at": render.iso(s.last_success_at) if s.last_success_at else None}
        for s in await meta.alert_states(cloud.name)
    ]
    return web.json_response({"notification_url": await meta.get_alert_url(cloud.name), "operations": states})


ROUTES = [
    ("GET|POST", r"versionstore/drills", drill_list),
    ("GET", r"versionstore/drills/(?P<drill_id>[0-9a-f]{32})", drill),
    ("GET|PUT|POST|DELETE", r"versionstore/drill_schedule", schedule),
    ("GET|PUT|POST|DELETE", r"versionstore/alerts", alerts),
]
