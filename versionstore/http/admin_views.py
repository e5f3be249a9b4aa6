"""Admin API handlers (Basic auth) and the signed `download_backup`. Thin by design."""

import time
from functools import partial
from typing import Any
from urllib.parse import quote

from aiohttp import web

from versionstore import ids, metadata_fields, queries, verify
from versionstore.errors import BadRequest, NotFound
from versionstore.http import render
from versionstore.http.app import META, SERVICE, VERSIONS_CACHE
from versionstore.http.auth import check_basic, check_signed
from versionstore.http.download import blob_response
from versionstore.http.inputs import admin_params, query_params
from versionstore.media import content_type
from versionstore.models import Asset, Cloud, RestoreFailure
from versionstore.params import Params, as_bool, as_bounded_list, as_int, field_updates

MAX_IDS = 100  # per request, for restore, delete and by-id listings
MAX_VERSION_IDS = 1000  # per delete_backed_up_assets call (one asset's versions)


async def _params(request: web.Request, cloud: Cloud) -> Params:
    check_basic(request, cloud)
    return await admin_params(request)


def _ids(params: Params, field: str, missing: str, limit: int = MAX_IDS) -> list[str]:
    """A required id list (public_ids, asset_ids) of at most `limit` entries."""
    values = as_bounded_list(params.get(field), field, limit)
    if not values:
        raise BadRequest(missing)
    return values


async def ping(request: web.Request, cloud: Cloud, match: dict[str, str]) -> web.Response:
    check_basic(request, cloud)
    return web.json_response({"status": "ok"})


# --- single resources ----------------------------------------------------------------------


async def _render_resource(request: web.Request, asset: Asset, params: Params) -> web.Response:
    meta = request.app[META]
    if not as_bool(params.get("versions"), False):
        return web.json_response(render.resource(asset, await meta.backup_bytes(asset.pk or 0)))
    versions_json, backup_bytes = await request.app[VERSIONS_CACHE].get(meta, asset.cloud, asset.pk or 0)
    head = render.dumps(render.resource(asset, backup_bytes))
    return web.Response(body=b"".join((head[:-1], b',"versions":', versions_json, b"}")), content_type="application/json",
                        charset="utf-8")


async def resource(request: web.Request, cloud: Cloud, match: dict[str, str]) -> web.Response:
    params = await _params(request, cloud)
    asset = await request.app[META].get_asset(cloud.name, match["rt"], match["type"], match["public_id"])
    if asset is None:
        raise NotFound(f"Resource not found - {match['public_id']}")
    return await _render_resource(request, asset, params)


async def resource_by_asset_id(request: web.Request, cloud: Cloud, match: dict[str, str]) -> web.Response:
    params = await _params(request, cloud)
    asset = await request.app[META].get_asset_by_id(cloud.name, match["asset_id"])
    if asset is None:
        raise NotFound(f"Resource not found - {match['asset_id']}")
    return await _render_resource(request, asset, params)


async def update(request: web.Request, cloud: Cloud, match: dict[str, str]) -> web.Response:
    """`api.update`: tags/context/metadata only; never a new version."""
    params = await _params(request, cloud)
    asset = await request.app[META].get_asset(cloud.name, match["rt"], match["type"], match["public_id"])
    if asset is None or not asset.live:
        raise NotFound(f"Resource not found - {match['public_id']}")
    updates = field_updates(params)
    if "metadata" in updates:
        updates["metadata"] = await metadata_fields.checked(request.app[META], cloud.name, updates["metadata"])
    updated = await request.app[SERVICE].update_fields(asset, **updates)
    return web.json_response(render.resource(updated))


# --- listings and search -------------------------------------------------------------------


def _page(
    assets: list[Asset], limit: int, offset: int, fields: frozenset[str] | None = None, *, flat_context: bool = False
) -> dict[str, Any]:
    rendered = [render.select(render.resource(a, flat_context=flat_context), fields) for a in assets[:limit]]
    body: dict[str, Any] = {"resources": rendered}
    if len(assets) > limit:
        body["next_cursor"] = queries.encode_cursor(offset + limit)
    return body


async def listing(
    request: web.Request, cloud: Cloud, params: Params, clauses: list[str], args: list[Any], *, by_public_id: bool = False
) -> web.Response:
    """One page of live assets matching `clauses`, in Cloudinary's listing order (newest first,
    or by public_id with a prefix), with `fields` and `direction`. Shared by every listing."""
    limit = as_int(params.get("max_results"), "max_results", 10, 1, 500)
    offset = queries.decode_cursor(params.get("next_cursor"))
    order = queries.listing_order(params.get("direction"), by_public_id=by_public_id)
    fields = render.parse_fields(params.get("fields"))
    where = " AND ".join(["status = 'live'", *clauses])
    assets = await request.app[META].find_assets(cloud.name, where, args, order, limit + 1, offset)
    return web.json_response(_page(assets, limit, offset, fields))


async def list_resources(request: web.Request, cloud: Cloud, match: dict[str, str]) -> web.Response:
    """Live assets only: the SDK documents that listings never return deleted ones."""
    params = await _params(request, cloud)
    clauses = ["resource_type = ?"]
    args: list[Any] = [match["rt"]]
    if "type" in match:
        clauses.append("type = ?")
        args.append(match["type"])
    public_ids = as_bounded_list(params.get("public_ids"), "public_ids", MAX_IDS)
    if public_ids:
        clauses.append(f"public_id IN ({', '.join('?' * len(public_ids))})")
        args.extend(public_ids)
    prefix = params.get("prefix")
    if prefix:
        clauses.append("substr(public_id, 1, ?) = ?")
        args.extend([len(str(prefix)), str(prefix)])
    return await listing(request, cloud, params, clauses, args, by_public_id=bool(prefix))


async def resources_by_asset_ids(request: web.Request, cloud: Cloud, match: dict[str, str]) -> web.Response:
    params = await _params(request, cloud)
    asset_ids = _ids(params, "asset_ids", "Missing required parameter - asset_ids")
    assets = await request.app[META].find_assets(
        cloud.name, f"status = 'live' AND asset_id IN ({', '.join('?' * len(asset_ids))})", asset_ids, "pk", MAX_IDS
    )
    return web.json_response({"resources": [render.resource(a) for a in assets]})


async def search(request: web.Request, cloud: Cloud, match: dict[str, str]) -> web.Response:
    started = time.monotonic()
    params = await _params(request, cloud)
    queries.check_search_options(params)
    query = queries.search_query(str(params.get("expression") or ""), params.get("sort_by"))
    limit = as_int(params.get("max_results"), "max_results", 50, 1, 500)
    offset = queries.decode_cursor(params.get("next_cursor"))
    fields = render.parse_fields(params.get("fields"))
    meta = request.app[META]
    assets = await meta.find_assets(cloud.name, query.where, query.args, query.order, limit + 1, offset)
    body = _page(assets, limit, offset, fields, flat_context=True)  # Search API: context is flat
    body["total_count"] = await meta.count_assets(cloud.name, query.where, query.args)
    body["time"] = int((time.monotonic() - started) * 1000)
    return web.json_response(body)


# --- deletion ------------------------------------------------------------------------------


async def _delete_many(request: web.Request, assets: dict[str, Asset | None]) -> web.Response:
    deleted: dict[str, str] = {}
    for key, asset in assets.items():
        if asset is None or not asset.live:
            deleted[key] = "not_found"
            continue
        await request.app[SERVICE].delete_asset(asset)
        deleted[key] = "deleted"
    counts = {k: {"original": int(v == "deleted"), "derived": 0} for k, v in deleted.items()}
    return web.json_response({"deleted": deleted, "deleted_counts": counts, "partial": False})


async def delete_resources(request: web.Request, cloud: Cloud, match: dict[str, str]) -> web.Response:
    params = await _params(request, cloud)
    public_ids = _ids(params, "public_ids", "Missing required parameter - public_ids (prefix and all deletes are not supported)")
    meta = request.app[META]
    assets = {pid: await meta.get_asset(cloud.name, match["rt"], match["type"], pid) for pid in public_ids}
    return await _delete_many(request, assets)


async def delete_resources_by_asset_ids(request: web.Request, cloud: Cloud, match: dict[str, str]) -> web.Response:
    params = await _params(request, cloud)
    asset_ids = _ids(params, "asset_ids", "asset_ids parameter is required")
    meta = request.app[META]
    assets = {aid: await meta.get_asset_by_id(cloud.name, aid) if ids.is_hex_id(aid) else None for aid in asset_ids}
    return await _delete_many(request, assets)


async def delete_backed_up_versions(request: web.Request, cloud: Cloud, match: dict[str, str]) -> web.Response:
    """Irreversible. Partial failures are reported in a 200 body (Node rejects 207)."""
    params = await _params(request, cloud)
    version_ids = _ids(params, "version_ids", "Missing required parameter - version_ids", MAX_VERSION_IDS)
    outcome = await request.app[SERVICE].delete_versions(cloud.name, match["asset_id"], version_ids)
    body: dict[str, Any] = {"asset_id": match["asset_id"], "deleted_version_ids": outcome.deleted}
    if outcome.failures:
        body["failures"] = outcome.failures
    return web.json_response(body)


# --- restore -------------------------------------------------------------------------------


def _restore_pairs(params: Params, id_field: str) -> list[tuple[str, str | None]]:
    wanted = _ids(params, id_field, f"{id_field} parameter is required")
    versions: list[str | None] = list(as_bounded_list(params.get("versions"), "versions", MAX_IDS))
    if versions and len(versions) != len(wanted):
        raise BadRequest("versions count must match ids count")
    return list(zip(wanted, versions or [None] * len(wanted), strict=True))


async def _restore_many(request: web.Request, found: list[tuple[str, Asset | None, str | None]]) -> web.Response:
    body: dict[str, Any] = {}
    for key, asset, version_id in found:
        if asset is None:
            body[key] = render.restore_failure(RestoreFailure("asset_not_found", f"Resource not found - {key}"))
            continue
        outcome = await request.app[SERVICE].restore(asset, version_id)
        if outcome.asset is not None:
            body[key] = render.restored(outcome.asset)
        elif outcome.error is not None:
            body[key] = render.restore_failure(outcome.error)
    return web.json_response(body)


async def restore(request: web.Request, cloud: Cloud, match: dict[str, str]) -> web.Response:
    params = await _params(request, cloud)
    meta = request.app[META]
    found = [
        (pid, await meta.get_asset(cloud.name, match["rt"], match["type"], pid), vid)
        for pid, vid in _restore_pairs(params, "public_ids")
    ]
    return await _restore_many(request, found)


async def restore_by_asset_ids(request: web.Request, cloud: Cloud, match: dict[str, str]) -> web.Response:
    params = await _params(request, cloud)
    meta = request.app[META]
    found = []
    for aid, vid in _restore_pairs(params, "asset_ids"):
        found.append((aid, await meta.get_asset_by_id(cloud.name, aid) if ids.is_hex_id(aid) else None, vid))
    return await _restore_many(request, found)


# --- signed download -----------------------------------------------------------------------


async def download_backup(request: web.Request, cloud: Cloud, match: dict[str, str]) -> web.StreamResponse:
    """Signed query (valid for one hour); streams the revision with Range support."""
    params = query_params(request)
    for required in ("asset_id", "version_id"):
        if not params.get(required):
            raise BadRequest(f"Missing required parameter - {required}")
    check_signed(params, cloud, purpose="download_backup")  # the same check as every signed endpoint
    asset_id, version_id = str(params["asset_id"]), str(params["version_id"])
    if not (ids.is_hex_id(asset_id) and ids.is_hex_id(version_id)):
        raise BadRequest("Illegal id")
    service = request.app[SERVICE]
    public_id, version, store, key = await service.version_for_download(cloud, asset_id, version_id)
    name = public_id.rsplit("/", 1)[-1]
    if version.format and not name.endswith(f".{version.format}"):
        name = f"{name}.{version.format}"
    headers = {
        "Content-Type": content_type(version.format),
        "Content-Disposition": f"attachment; filename=\"{_ascii(name)}\"; filename*=UTF-8''{quote(name)}",
        "Cache-Control": "private, max-age=3600",
        "ETag": f'"{version.digest[:32]}"',
    }
    report = partial(verify.record_read_failure, request.app[META], cloud.name, version.digest)
    return await blob_response(request, store, key, version.bytes, version.digest, headers, report)


def _ascii(name: str) -> str:
    return "".join(ch if 32 <= ord(ch) < 127 and ch not in '"\\' else "_" for ch in name)


# --- versionstore extension: environment settings -------------------------------------------


async def settings(request: web.Request, cloud: Cloud, match: dict[str, str]) -> web.Response:
    """GET reads, PUT/POST changes `auto_backup` (docs/api.md)."""
    params = await _params(request, cloud)
    meta = request.app[META]
    if request.method != "GET" and "auto_backup" in params:
        await meta.set_auto_backup(cloud.name, bool(as_bool(params["auto_backup"])))
        cloud = await meta.get_cloud(cloud.name) or cloud
    return web.json_response({"cloud_name": cloud.name, "auto_backup": cloud.auto_backup})
