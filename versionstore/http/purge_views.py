"""Scheduled purges over our extension (docs/api.md): deletions the environment's purge delay
holds back, listed for an admin. Undoing one is the console's or the operator's CLI's job."""

from aiohttp import web

from versionstore import protection
from versionstore.errors import BadRequest
from versionstore.http.auth import check_basic
from versionstore.http.inputs import query_params
from versionstore.http.keys import META
from versionstore.models import Cloud
from versionstore.params import as_int

STATES = ("scheduled", "undone", "purged")


async def purges(request: web.Request, cloud: Cloud, match: dict[str, str]) -> web.Response:
    """GET: this environment's purges, newest first (`state` filters; default scheduled)."""
    check_basic(request, cloud)
    params = query_params(request)
    state = str(params.get("state") or "scheduled")
    if state not in (*STATES, "all"):
        raise BadRequest(f"state must be one of {', '.join(STATES)} or all")
    limit = as_int(params.get("max_results"), "max_results", 100, 1, 500)
    found = await request.app[META].list_purges(cloud.name, None if state == "all" else state, limit)
    return web.json_response({
        "purge_delay_days": cloud.purge_delay_days,
        "purges": [protection.as_json(p) for p in found],
    })
