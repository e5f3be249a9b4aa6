"""Admin API handlers (Basic auth) and the signed `download_backup`. Thin by design."""

import time
from collections.abc import Awaitable, Callable, Sequence
from functools import lru_cache, partial
from typing import Any
from urllib.parse import quote

from aiohttp import web
from multidict import CIMultiDict

from versionstore import archive_removal, ids, metadata_fields, protection, queries, verify
from versionstore.console.audit import AuditLog
from versionstore.errors import BadRequest, Forbidden, NotFound
from versionstore.http import render
from versionstore.http.audit_views import record_api
from versionstore.http.auth import check_basic
from versionstore.http.download import blob_response
from versionstore.http.inputs import admin_params
from versionstore.http.keys import CONFIG, EPOCH, META, RENDERED_ROWS, RESOURCE_BODIES, SERVICE, VERSIONS_CACHE
from versionstore.http.signed_queries import signed_query
from versionstore.media import content_type
from versionstore.models import Asset, AssetRow, Cloud, RestoreFailure, VersionsKey
from versionstore.params import Params, as_bool, as_bounded_list, as_int, field_updates

#: A resource's one header, made once (copied by web.Response): cheaper than content_type/charset.
_JSON = CIMultiDict({"Content-Type": "application/json; charset=utf-8"})
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


async def _resource(
    request: web.Request, key: tuple[object, ...], name: str, read: Callable[[], Awaitable[tuple[Asset, VersionsKey] | Asset | None]]
) -> web.Response:
    """One resource's JSON, `read` and rendered once and then reused until anything commits
    (versionstore/epoch_cache.py): a hit costs no statement and no rendering."""
    bodies, epoch = request.app[RESOURCE_BODIES], request[EPOCH]
    body = bodies.get(key, epoch)
    if body is None:
        body = await _render_resource(request, await read(), name)
        bodies.put(key, epoch, body)
    return web.Response(body=body, headers=_JSON)


async def _render_resource(request: web.Request, found: tuple[Asset, VersionsKey] | Asset | None, name: str) -> bytes:
    """One resource; with its versions when `found` carries their key (get_asset_keyed: the
    asset and the key in one statement, then the versions JSON from the cache)."""
    if found is None:
        raise NotFound(f"Resource not found - {name}")
    meta = request.app[META]
    if isinstance(found, Asset):
        return render.dumps(render.resource(found, await meta.backup_bytes(found.pk or 0)))
    asset, key = found
    versions_json, backup_bytes = await request.app[VERSIONS_CACHE].get(meta, asset.cloud, asset.pk or 0, key)
    head = render.dumps(render.resource(asset, backup_bytes))
    return b"".join((head[:-1], b',"versions":', versions_json, b"}"))


async def resource(request: web.Request, cloud: Cloud, match: dict[str, str]) -> web.Response:
    params = await _params(request, cloud)
    meta, name = request.app[META], (cloud.name, match["rt"], match["type"], match["public_id"])
    if as_bool(params.get("versions"), False):
        return await _resource(request, ("versions", *name), match["public_id"], partial(meta.get_asset_keyed, *name))
    return await _resource(request, ("asset", *name), match["public_id"], partial(meta.get_asset, *name))


async def resource_by_asset_id(request: web.Request, cloud: Cloud, match: dict[str, str]) -> web.Response:
    params = await _params(request, cloud)
    meta, asset_id = request.app[META], match["asset_id"]
    if as_bool(params.get("versions"), False):
        return await _resource(request, ("versions_of", cloud.name, asset_id), asset_id,
                               partial(meta.get_asset_by_id_keyed, cloud.name, asset_id))
    return await _resource(request, ("asset_of", cloud.name, asset_id), asset_id, partial(meta.get_asset_by_id, cloud.name, asset_id))


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


async def page(
    request: web.Request, cloud: Cloud, params: Params, query: queries.AssetQuery, *, flat_context: bool = False
) -> dict[str, Any]:
    """One page of `query` from the position in `next_cursor`, with `fields`; `next_cursor`
    (the last row's sort keys) when more may follow. Each row's item is reused from earlier
    pages while the row reads the same (versionstore/http/resource_rows.py); the caller
    encodes the page in one render.dumps."""
    query = query.page(query.limit, queries.decode_keyset(query, params.get("next_cursor")))
    meta = request.app[META]
    found = await meta.find_asset_rows(cloud.name, query.page(query.limit + 1, query.after))
    fields = render.parse_fields(params.get("fields"))
    shown = found[: query.limit]

    def rendered(rows: Sequence[AssetRow]) -> list[bytes]:
        return render.encode_items([render.select(render.resource_of_row(row, flat_context), fields) for row in rows])

    options = (flat_context, *sorted(fields or ()))  # strings only: the cache's keys stay untracked by gc
    items = await request.app[RENDERED_ROWS].render(shown, options, rendered)
    body: dict[str, Any] = {"resources": render.json_array(items)}
    if len(found) > query.limit:
        body["next_cursor"] = queries.encode_keyset(query, queries.sort_values(query, meta.asset_of_row(shown[-1])))
    return body


async def listing(
    request: web.Request, cloud: Cloud, params: Params, resource_type: str, type_: str | None = None,
    extra: list[queries.Filter] | None = None, *, by_public_id: bool = False,
) -> web.Response:
    """One page of live assets of a resource type (and type) matching `extra`, in Cloudinary's
    listing order (newest first, or by public_id with a prefix), with `fields` and `direction`.
    Shared by every listing."""
    limit = as_int(params.get("max_results"), "max_results", 10, 1, 500)
    query = queries.listing_query(resource_type, type_, extra or [], params.get("direction"), limit, by_public_id=by_public_id)
    return web.Response(body=render.dumps(await page(request, cloud, params, query)), headers=_JSON)


async def list_resources(request: web.Request, cloud: Cloud, match: dict[str, str]) -> web.Response:
    """Live assets only: the SDK documents that listings never return deleted ones."""
    params = await _params(request, cloud)
    extra: list[queries.Filter] = []
    public_ids = as_bounded_list(params.get("public_ids"), "public_ids", MAX_IDS)
    if public_ids:
        extra.append(queries.Filter("public_id", "in", tuple(public_ids)))
    prefix = params.get("prefix")
    if prefix:
        extra.append(queries.Filter("public_id", "prefix", str(prefix)))
    return await listing(request, cloud, params, match["rt"], match.get("type"), extra, by_public_id=bool(prefix))


async def resources_by_asset_ids(request: web.Request, cloud: Cloud, match: dict[str, str]) -> web.Response:
    params = await _params(request, cloud)
    asset_ids = _ids(params, "asset_ids", "Missing required parameter - asset_ids")
    assets = await request.app[META].find_assets(cloud.name, queries.by_asset_ids(asset_ids))
    return web.json_response({"resources": [render.resource(a) for a in assets]})


async def search(request: web.Request, cloud: Cloud, match: dict[str, str]) -> web.Response:
    """`total_count` is exact up to queries.COUNT_CEILING matches, then that ceiling with
    `total_count_exact: false` (docs/api.md): a search never counts the whole library."""
    started = time.monotonic()
    params = await _params(request, cloud)
    queries.check_search_options(params)
    limit = as_int(params.get("max_results"), "max_results", 50, 1, 500)
    query = queries.search_query(str(params.get("expression") or ""), params.get("sort_by"), limit)
    body = await page(request, cloud, params, query, flat_context=True)  # Search API: context is flat
    counted = await request.app[META].count_assets(cloud.name, query, queries.COUNT_CEILING + 1)
    body["total_count"] = min(counted, queries.COUNT_CEILING)
    body["total_count_exact"] = counted <= queries.COUNT_CEILING
    body["time"] = int((time.monotonic() - started) * 1000)
    return web.Response(body=render.dumps(body), headers=_JSON)


# --- deletion ------------------------------------------------------------------------------


async def _delete_many(request: web.Request, cloud: Cloud, assets: dict[str, Asset | None]) -> web.Response:
    deleted: dict[str, str] = {}
    for key, asset in assets.items():
        if asset is None or not asset.live:
            deleted[key] = "not_found"
            continue
        await request.app[SERVICE].delete_asset(asset)
        await record_api(request, cloud, "delete", f"{asset.asset_id} {asset.public_id}")
        deleted[key] = "deleted"
    counts = {k: {"original": int(v == "deleted"), "derived": 0} for k, v in deleted.items()}
    return web.json_response({"deleted": deleted, "deleted_counts": counts, "partial": False})


async def delete_resources(request: web.Request, cloud: Cloud, match: dict[str, str]) -> web.Response:
    params = await _params(request, cloud)
    public_ids = _ids(params, "public_ids", "Missing required parameter - public_ids (prefix and all deletes are not supported)")
    meta = request.app[META]
    assets = {pid: await meta.get_asset(cloud.name, match["rt"], match["type"], pid) for pid in public_ids}
    return await _delete_many(request, cloud, assets)


async def delete_resources_by_asset_ids(request: web.Request, cloud: Cloud, match: dict[str, str]) -> web.Response:
    params = await _params(request, cloud)
    asset_ids = _ids(params, "asset_ids", "asset_ids parameter is required")
    meta = request.app[META]
    assets = {aid: await meta.get_asset_by_id(cloud.name, aid) if ids.is_hex_id(aid) else None for aid in asset_ids}
    return await _delete_many(request, cloud, assets)


async def delete_backed_up_versions(request: web.Request, cloud: Cloud, match: dict[str, str]) -> web.Response:
    """Irreversible. Partial failures are reported in a 200 body (Node rejects 207)."""
    params = await _params(request, cloud)
    version_ids = _ids(params, "version_ids", "Missing required parameter - version_ids", MAX_VERSION_IDS)
    actor = f"api_key:{cloud.api_key}"
    outcome = await request.app[SERVICE].delete_versions(cloud.name, match["asset_id"], version_ids, actor=actor)
    await record_api(
        request, cloud, "delete_version", match["asset_id"], outcome="ok" if outcome.deleted else "failed",
        detail={"deleted": outcome.deleted, "failures": outcome.failures},
    )
    await protection.record_scheduled(AuditLog(request.app[META]), actor, outcome.scheduled_purge, request.remote, "api")
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


async def _restore_many(request: web.Request, cloud: Cloud, found: list[tuple[str, Asset | None, str | None]]) -> web.Response:
    body: dict[str, Any] = {}
    for key, asset, version_id in found:
        if asset is None:
            body[key] = render.restore_failure(RestoreFailure("asset_not_found", f"Resource not found - {key}"))
            continue
        outcome = await request.app[SERVICE].restore(asset, version_id)
        await record_api(
            request, cloud, "restore", f"{asset.asset_id} {asset.public_id}", outcome="ok" if outcome.asset else "failed",
            detail={"version_id": version_id, **({"error": outcome.error.message} if outcome.error else {})},
        )
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
    return await _restore_many(request, cloud, found)


async def restore_by_asset_ids(request: web.Request, cloud: Cloud, match: dict[str, str]) -> web.Response:
    params = await _params(request, cloud)
    meta = request.app[META]
    found = []
    for aid, vid in _restore_pairs(params, "asset_ids"):
        found.append((aid, await meta.get_asset_by_id(cloud.name, aid) if ids.is_hex_id(aid) else None, vid))
    return await _restore_many(request, cloud, found)


# --- signed download -----------------------------------------------------------------------


async def download_backup(request: web.Request, cloud: Cloud, match: dict[str, str]) -> web.StreamResponse:
    """Signed query (valid for one hour); streams the revision with Range support."""
    # check_signed, the same check as every signed endpoint; once per query string and key pair
    params = signed_query(request, cloud, purpose="download_backup", required=("asset_id", "version_id"))
    asset_id, version_id = str(params["asset_id"]), str(params["version_id"])
    if not (ids.is_hex_id(asset_id) and ids.is_hex_id(version_id)):
        raise BadRequest("Illegal id")
    service = request.app[SERVICE]
    public_id, version, store, key = await service.version_for_download(cloud, asset_id, version_id, request[EPOCH])
    name = public_id.rsplit("/", 1)[-1]
    if version.format and not name.endswith(f".{version.format}"):
        name = f"{name}.{version.format}"
    headers = {
        "Content-Type": content_type(version.format),
        "Content-Disposition": _disposition(name),
        "Cache-Control": "private, max-age=3600",
        "ETag": f'"{version.digest[:32]}"',
    }
    report = partial(verify.record_read_failure, request.app[META], cloud.name, version.digest)
    return await blob_response(request, store, key, version.bytes, version.digest, headers, report)


@lru_cache(maxsize=4096)
def _disposition(name: str) -> str:
    """The attachment header of a file name (the same few names are downloaded again and again)."""
    return f"attachment; filename=\"{_ascii(name)}\"; filename*=UTF-8''{quote(name)}"


def _ascii(name: str) -> str:
    return "".join(ch if 32 <= ord(ch) < 127 and ch not in '"\\' else "_" for ch in name)


# --- versionstore extension: environment settings -------------------------------------------


async def settings(request: web.Request, cloud: Cloud, match: dict[str, str]) -> web.Response:
    """GET reads, PUT/POST changes `auto_backup` and `archive_keep_days` (docs/api.md).
    Deletion protection is shown but only the operator's CLI changes it: a leaked key must not
    be able to switch it off."""
    params = await _params(request, cloud)
    meta = request.app[META]
    writing = request.method != "GET"
    if writing and {"purge_delay_days", "append_only_key"} & set(params):
        raise Forbidden("Deletion protection is changed by the operator only: versionstore cloud set NAME --purge-delay-days N")
    days = archive_removal.default_keep_days_value(params.get("archive_keep_days")) if writing else None  # before any change
    if writing and "auto_backup" in params:
        await meta.set_auto_backup(cloud.name, bool(as_bool(params["auto_backup"])))
        await record_api(request, cloud, "settings", cloud.name, detail={"auto_backup": bool(as_bool(params["auto_backup"]))})
        cloud = await meta.get_cloud(cloud.name) or cloud
    if writing and "archive_keep_days" in params:
        await meta.set_archive_keep_days(cloud.name, days)
        await record_api(request, cloud, "settings", cloud.name, detail={"archive_keep_days": days})
    archive = await archive_removal.settings(meta, cloud.name, request.app[CONFIG].archive_keep_days)
    return web.json_response(
        {"cloud_name": cloud.name, "auto_backup": cloud.auto_backup, **await protection.status(meta, cloud), **archive}
    )
