"""The audit log over the Admin API (our extension) and the helper the API handlers call to
record what an API key did (the actor is `api_key:<key>`)."""

from typing import Any

from aiohttp import web

from versionstore.console.audit import AuditLog, as_json
from versionstore.http import append_only
from versionstore.http.auth import check_basic
from versionstore.http.inputs import query_params
from versionstore.http.keys import META
from versionstore.models import Cloud
from versionstore.params import as_int

_FILTERS = ("actor", "action", "outcome")


async def record_api(
    request: web.Request, cloud: Cloud, action: str, target: str | None, *, outcome: str = "ok", detail: dict[str, Any] | None = None,
    key: str | None = None,
) -> None:
    """`key`: the API key that made the request when it was not the main one (append-only)."""
    who = key or (cloud.append_key if append_only.used(request) else None) or cloud.api_key
    await AuditLog(request.app[META]).record(
        f"api_key:{who}", action, cloud=cloud.name, target=target, outcome=outcome, address=request.remote,
        detail={"via": "api", **(detail or {})},
    )


async def audit(request: web.Request, cloud: Cloud, match: dict[str, str]) -> web.Response:
    """GET: this environment's records, newest first; `next_cursor` is the seq to continue below."""
    check_basic(request, cloud)
    params = query_params(request)
    limit = as_int(params.get("max_results"), "max_results", 100, 1, 500)
    before = as_int(params.get("next_cursor"), "next_cursor", 1 << 62, 1, 1 << 62)
    filters = {"cloud": cloud.name, **{k: str(params[k]) for k in _FILTERS if params.get(k)}}
    records = await request.app[META].audit_records(0, limit, before_seq=before, filters=filters)
    body: dict[str, Any] = {"records": [as_json(r) for r in records]}
    if len(records) == limit:
        body["next_cursor"] = records[-1].seq
    return web.json_response(body)
