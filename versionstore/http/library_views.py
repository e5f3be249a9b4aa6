"""Admin API calls media apps make beside uploads: listing by tag and by context, the tags
list, resource types, usage, config and structured metadata field definitions. Thin: the
listing order and `fields` come from admin_views.listing, field rules from metadata_fields.
Authentication and the rate limit are applied by the dispatcher (routes.py) before these run.
"""

import time
from typing import Any

from aiohttp import web

from versionstore import metadata_fields as fields_domain
from versionstore import queries
from versionstore.errors import BadRequest, NotFound
from versionstore.http.admin_views import listing
from versionstore.http.inputs import admin_params
from versionstore.http.keys import CONFIG, META, RATE_LIMIT
from versionstore.http.render import iso
from versionstore.models import Cloud
from versionstore.params import as_bool, as_int, as_list

RESOURCE_TYPES = ["image", "raw", "video"]


async def resources_by_tag(request: web.Request, cloud: Cloud, match: dict[str, str]) -> web.Response:
    params = await admin_params(request)
    return await listing(request, cloud, params, match["rt"], extra=[queries.Filter("tag", "=", match["tag"])])


async def resources_by_context(request: web.Request, cloud: Cloud, match: dict[str, str]) -> web.Response:
    params = await admin_params(request)
    key = str(params.get("key") or "")
    if not key:
        raise BadRequest("Missing required parameter - key")
    if params.get("value") not in (None, ""):
        wanted = queries.Filter("context", "=", (key, str(params["value"])))
    else:
        wanted = queries.Filter("context", "has", key)
    return await listing(request, cloud, params, match["rt"], extra=[wanted])


async def tags(request: web.Request, cloud: Cloud, match: dict[str, str]) -> web.Response:
    """`GET tags/<rt>`: the distinct tags of live assets, sorted, paged like the listings."""
    params = await admin_params(request)
    limit = as_int(params.get("max_results"), "max_results", 10, 1, 500)
    after = queries.decode_tag_cursor(params.get("next_cursor"))
    prefix = str(params.get("prefix") or "")
    found = await request.app[META].list_tags(cloud.name, match["rt"], prefix, limit + 1, after)
    body: dict[str, Any] = {"tags": found[:limit]}
    if len(found) > limit:
        body["next_cursor"] = queries.encode_tag_cursor(found[limit - 1])
    return web.json_response(body)


async def resource_types(request: web.Request, cloud: Cloud, match: dict[str, str]) -> web.Response:
    return web.json_response({"resource_types": RESOURCE_TYPES})


async def usage(request: web.Request, cloud: Cloud, match: dict[str, str]) -> web.Response:
    """Cloudinary's usage report, from what this service stores. Backup storage counts toward
    `storage.usage` as on Cloudinary; `original_usage` and `backup_usage` (extensions) split it.
    No billing here: no plan limits, transformations or bandwidth are tracked (0)."""
    if match.get("date"):
        raise BadRequest("Usage for a past date is not supported; omit the date")
    resources, original, backup = await request.app[META].usage_totals(cloud.name)
    total = original + backup
    return web.json_response({
        "plan": "versionstore",
        "last_updated": time.strftime("%Y-%m-%d", time.gmtime()),
        "date_requested": iso(time.time()),
        "transformations": {"usage": 0, "credits_usage": 0},
        "objects": {"usage": resources},
        "bandwidth": {"usage": 0, "credits_usage": 0},
        "storage": {"usage": total, "credits_usage": 0, "original_usage": original, "backup_usage": backup},
        "requests": request.app[RATE_LIMIT].used(cloud.name),
        "resources": resources,
        "derived_resources": 0,
        "rate_limit_allowed": request.app[CONFIG].admin_rate_limit or None,
    })


async def config(request: web.Request, cloud: Cloud, match: dict[str, str]) -> web.Response:
    params = await admin_params(request)
    body: dict[str, Any] = {"cloud_name": cloud.name, "created_at": iso(cloud.created_at)}
    if as_bool(params.get("settings"), False):
        body["settings"] = {"folder_mode": "fixed", "auto_backup": cloud.auto_backup}
    return web.json_response(body)


# --- structured metadata field definitions -------------------------------------------------


async def _field(request: web.Request, cloud: Cloud, external_id: str) -> dict[str, Any]:
    found = await request.app[META].metadata_field(cloud.name, external_id)
    if found is None:
        raise NotFound(f"Metadata field {external_id} not found")
    return found


async def metadata_fields(request: web.Request, cloud: Cloud, match: dict[str, str]) -> web.Response:
    """GET lists the environment's definitions; POST creates one (409-free: a taken
    external_id is a 400, as on Cloudinary)."""
    meta = request.app[META]
    if request.method == "GET":
        return web.json_response({"metadata_fields": await meta.metadata_fields(cloud.name)})
    field = fields_domain.new_field(await admin_params(request))
    if not await meta.add_metadata_field(cloud.name, field):
        raise BadRequest(f"External id {field['external_id']} already exists")
    return web.json_response(field)


async def metadata_field(request: web.Request, cloud: Cloud, match: dict[str, str]) -> web.Response:
    meta = request.app[META]
    field = await _field(request, cloud, match["field"])
    if request.method == "GET":
        return web.json_response(field)
    if request.method == "DELETE":
        await meta.delete_metadata_field(cloud.name, match["field"])
        return web.json_response({"message": "ok"})
    updated = fields_domain.updated_field(field, await admin_params(request))
    await meta.replace_metadata_field(cloud.name, updated)
    return web.json_response(updated)


async def datasource(request: web.Request, cloud: Cloud, match: dict[str, str]) -> web.Response:
    """PUT adds or renames entries; DELETE deactivates them (restorable), as on Cloudinary."""
    params = await admin_params(request)
    field = await _field(request, cloud, match["field"])
    if request.method == "PUT":
        updated = fields_domain.update_datasource(field, params.get("values"))
    else:
        updated = fields_domain.set_entries_state(field, as_list(params.get("external_ids")), "inactive")
    await request.app[META].replace_metadata_field(cloud.name, updated)
    return web.json_response(updated["datasource"])


async def datasource_restore(request: web.Request, cloud: Cloud, match: dict[str, str]) -> web.Response:
    params = await admin_params(request)
    field = await _field(request, cloud, match["field"])
    updated = fields_domain.set_entries_state(field, as_list(params.get("external_ids")), "active")
    await request.app[META].replace_metadata_field(cloud.name, updated)
    return web.json_response(updated["datasource"])

