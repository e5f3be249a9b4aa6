"""Snapshots, their schedule and retention, point-in-time restore (Admin auth; docs/snapshots.md).

    GET|POST        /v1_1/<cloud>/versionstore/snapshots                 list (cursor) | create (note, prefix)
    GET|DELETE      /v1_1/<cloud>/versionstore/snapshots/<id>            one | delete a manual one
    GET             /v1_1/<cloud>/versionstore/snapshots/<id>/items      its (asset, version) list
    POST|DELETE     /v1_1/<cloud>/versionstore/snapshots/<id>/pin        pin | unpin
    GET|PUT|DELETE  /v1_1/<cloud>/versionstore/snapshot_schedule         schedule and retention policy
    GET             /v1_1/<cloud>/versionstore/retention/simulate        what the policy would keep and remove
    POST            /v1_1/<cloud>/versionstore/point_in_time_restore/preview   the dry-run diff
    POST            /v1_1/<cloud>/versionstore/point_in_time_restore     the real run (a job)
"""

import base64
import binascii
import hmac
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from versionstore import pitr, retention
from versionstore.errors import ApiError, BadRequest, Conflict, NotFound, Unauthorized
from versionstore.http import append_only, render
from versionstore.http.audit_views import record_api
from versionstore.http.auth import check_basic
from versionstore.http.inputs import admin_params
from versionstore.http.keys import ALERTS, JOBS, META, SERVICE
from versionstore.models import Cloud
from versionstore.params import Params, as_bool, as_int
from versionstore.snapshot_records import Snapshot
from versionstore.snapshots import Snapshots, item_dict

SNAP = r"(?P<snapshot_id>[0-9a-f]{32})"


def _snapshots(request: web.Request) -> Snapshots:
    return Snapshots(request.app[SERVICE], request.app[ALERTS])


async def _audited(
    request: web.Request, cloud: Cloud, action: str, target: str | None, run: Callable[[], Awaitable[Any]],
    detail: dict[str, Any] | None = None,
) -> Any:
    """Run a changing action and audit it (actor: the API key), refused or failed too."""
    try:
        result = await run()
    except ApiError as exc:
        await record_api(request, cloud, action, target, outcome="failed", detail={**(detail or {}), "error": exc.message})
        raise
    target = target or getattr(result, "id", None)
    await record_api(request, cloud, action, target, outcome="failed" if getattr(result, "status", None) == "failed" else "ok",
                     detail=detail)
    return result


async def _body(snapshots: Snapshots, snapshot: Snapshot, unique_bytes: bool = True) -> dict[str, Any]:
    body = await snapshots.describe(snapshot, unique_bytes=unique_bytes)
    for name in ("created_at", "expires_at", "changed_at"):
        body[name] = render.iso(body[name]) if body[name] is not None else None
    body.pop("cloud")
    return body


def _encode(snapshot: Snapshot) -> str:
    return base64.urlsafe_b64encode(f"{snapshot.created_at!r}:{snapshot.id}".encode()).decode()


def _decode(cursor: object) -> tuple[float, str] | None:
    if cursor is None or cursor == "":
        return None
    try:
        created_at, snapshot_id = base64.urlsafe_b64decode(str(cursor).encode()).decode().split(":", 1)
        return float(created_at), snapshot_id
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise BadRequest(f"Invalid next_cursor - {cursor}") from None


async def snapshots(request: web.Request, cloud: Cloud, match: dict[str, str]) -> web.Response:
    check_basic(request, cloud)
    params = await admin_params(request)
    service = _snapshots(request)
    if request.method == "POST":
        created = await _audited(request, cloud, "snapshot_create", None,
                                 lambda: service.create(cloud.name, note=params.get("note"), prefix=params.get("prefix") or ""))
        return web.json_response(await _body(service, created))
    limit = as_int(params.get("max_results"), "max_results", 50, 1, 500)
    found = await request.app[META].list_snapshots(cloud.name, limit + 1, _decode(params.get("next_cursor")))
    unique = bool(as_bool(params.get("unique_bytes"), False))  # a scan of each snapshot's items
    body: dict[str, Any] = {"snapshots": [await _body(service, s, unique) for s in found[:limit]]}
    if len(found) > limit:
        body["next_cursor"] = _encode(found[limit - 1])
    return web.json_response(body)


async def snapshot(request: web.Request, cloud: Cloud, match: dict[str, str]) -> web.Response:
    check_basic(request, cloud)
    service = _snapshots(request)
    if request.method == "DELETE":
        deleted = await _audited(request, cloud, "snapshot_delete", match["snapshot_id"],
                                 lambda: service.delete(cloud.name, match["snapshot_id"]))
        return web.json_response({"deleted": deleted.id})
    return web.json_response(await _body(service, await service.get(cloud.name, match["snapshot_id"])))


async def items(request: web.Request, cloud: Cloud, match: dict[str, str]) -> web.Response:
    check_basic(request, cloud)
    params = await admin_params(request)
    found = await _snapshots(request).get(cloud.name, match["snapshot_id"])
    limit = as_int(params.get("max_results"), "max_results", 500, 1, 5000)
    after = as_int(params.get("next_cursor"), "next_cursor", 0, 0, 2**62)
    rows = await request.app[META].snapshot_items(found.id, after, limit + 1, covered=as_bool(params.get("covered")))
    body: dict[str, Any] = {"items": [item_dict(r) for r in rows[:limit]]}
    if len(rows) > limit:
        body["next_cursor"] = str(rows[limit - 1].asset_pk)
    return web.json_response(body)


async def pin(request: web.Request, cloud: Cloud, match: dict[str, str]) -> web.Response:
    check_basic(request, cloud)
    service = _snapshots(request)
    action = "snapshot_pin" if request.method == "POST" else "snapshot_unpin"
    pinned = await _audited(request, cloud, action, match["snapshot_id"],
                            lambda: service.pin(cloud.name, match["snapshot_id"], request.method == "POST"))
    return web.json_response(await _body(service, pinned))


def _schedule_body(row: Any) -> dict[str, Any]:
    if row is None:
        return {"schedule": None, "policy": None, "next_run_at": None}
    return {
        "schedule": row.schedule, "policy": row.policy, "created_by": retention.schedule_label(row.schedule),
        "next_run_at": render.iso(row.next_run_at), "last_run_at": render.iso(row.last_run_at) if row.last_run_at else None,
    }


def _policy_params(params: Params) -> dict[str, Any]:
    names = ("preset", "keep_within", *retention._COUNTS)
    return {name: params[name] for name in names if name in params}


async def schedule(request: web.Request, cloud: Cloud, match: dict[str, str]) -> web.Response:
    check_basic(request, cloud)
    meta = request.app[META]
    if request.method == "DELETE":
        await _audited(request, cloud, "schedule_delete", cloud.name, lambda: meta.delete_schedule(cloud.name))
        return web.json_response(_schedule_body(None))
    if request.method in ("PUT", "POST"):
        params = await admin_params(request)
        raw: dict[str, Any] = {name: params[name] for name in ("every", "at", "weekday", "prefix") if name in params}
        policy = _policy_params(params)
        await _audited(request, cloud, "schedule_set", cloud.name,
                       lambda: retention.set_schedule(_snapshots(request), cloud.name, raw, policy, time.time()),
                       detail={"schedule": raw, "policy": policy})
    return web.json_response(_schedule_body(await meta.get_schedule(cloud.name)))


async def simulate(request: web.Request, cloud: Cloud, match: dict[str, str]) -> web.Response:
    """The environment's policy (or one given in the query) at `at` (default: now)."""
    check_basic(request, cloud)
    params = await admin_params(request)
    given = _policy_params(params)
    if given:
        policy = retention.parse_policy(given)
    else:
        row = await request.app[META].get_schedule(cloud.name)
        if row is None:
            raise BadRequest("No retention policy: give one (preset, keep_*) or set the environment's schedule")
        policy = row.policy
    at = pitr.parse_time(params.get("at")) or time.time()
    report = await retention.simulate(_snapshots(request), cloud.name, policy, at)
    for entry in (*report["keep"], *report["remove"]):
        entry["created_at"] = render.iso(entry["created_at"])
    return web.json_response(report)


async def _selection(request: web.Request, cloud: Cloud, params: Params) -> pitr.Selection:
    target = str(params.get("target_cloud") or "") or None
    if target is not None and target != cloud.name:
        other = await request.app[META].get_cloud(target)
        if other is None:
            raise NotFound(f"Target environment not found - {target}")
        # Writing into another environment needs its credentials too.
        key, secret = str(params.get("target_api_key") or ""), str(params.get("target_api_secret") or "")
        if not (hmac.compare_digest(key, other.api_key) and hmac.compare_digest(secret, other.api_secret)):
            raise Unauthorized("target_api_key and target_api_secret must be the target environment's credentials")
    selection = pitr.Selection(
        cloud.name, str(params.get("prefix") or ""), pitr.parse_time(params.get("at")),
        str(params.get("snapshot_id") or "") or None, target,
    )
    return await pitr.check_selection(request.app[META], selection)


async def restore_preview(request: web.Request, cloud: Cloud, match: dict[str, str]) -> web.Response:
    check_basic(request, cloud)
    params = await admin_params(request)
    selection = await _selection(request, cloud, params)
    limit = as_int(params.get("max_results"), "max_results", 1000, 0, 100000)
    return web.json_response(await pitr.dry_run(request.app[META], selection, limit))


async def restore(request: web.Request, cloud: Cloud, match: dict[str, str]) -> web.Response:
    check_basic(request, cloud)
    params = await admin_params(request)
    selection = await _selection(request, cloud, params)
    notification_url = str(params.get("notification_url") or "") or None
    if notification_url and not notification_url.startswith(("http://", "https://")):
        raise BadRequest("notification_url must be an http(s) URL")
    missing, overwrite_unbacked = str(params.get("missing") or "leave"), bool(as_bool(params.get("overwrite_unbacked"), False))
    append_only.check(request, missing == "delete" or overwrite_unbacked, "restore with missing=delete or overwrite_unbacked")
    job_params = pitr.job_params(selection, missing, overwrite_unbacked)
    job = await pitr.start(request.app[META], selection, job_params, notification_url)
    if job is None:
        await record_api(request, cloud, "pitr_start", None, outcome="failed", detail={**job_params, "error": "already running"})
        raise Conflict("A point-in-time restore of this environment is already running")
    await record_api(request, cloud, "pitr_start", job.id, detail=job_params)
    request.app[JOBS].wake.set()
    return web.json_response(render.job(job))


ROUTES = [
    ("GET|POST", r"versionstore/snapshots", snapshots),
    ("GET|DELETE", rf"versionstore/snapshots/{SNAP}", snapshot),
    ("GET", rf"versionstore/snapshots/{SNAP}/items", items),
    ("POST|DELETE", rf"versionstore/snapshots/{SNAP}/pin", pin),
    ("GET|PUT|POST|DELETE", r"versionstore/snapshot_schedule", schedule),
    ("GET", r"versionstore/retention/simulate", simulate),
    ("POST", r"versionstore/point_in_time_restore/preview", restore_preview),
    ("POST", r"versionstore/point_in_time_restore", restore),
]
