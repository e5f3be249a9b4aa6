"""Upload API handlers: thin: read params, authenticate, call the domain, render."""

import binascii
import secrets
from collections.abc import Callable
from typing import Any

import blake3
from aiohttp import BodyPartReader, web

from versionstore import ids, metadata_fields
from versionstore.chunks import parse_content_range
from versionstore.errors import BadRequest, NotFound
from versionstore.http import render
from versionstore.http.app import CHUNKS, CONFIG, FETCHER, META, SERVICE
from versionstore.http.auth import basic_credentials, check_upload_auth
from versionstore.http.fetch import fetch_to_spool
from versionstore.http.inputs import admin_params
from versionstore.http.upload_body import UploadBody, part_chunks, read_multipart
from versionstore.media import extension
from versionstore.models import Asset, Cloud
from versionstore.params import Params, as_bool, as_list, field_updates, parse_pipe_map
from versionstore.service import UploadRequest
from versionstore.spool import Spooled


async def upload(request: web.Request, cloud: Cloud, match: dict[str, str]) -> web.Response:
    service = request.app[SERVICE]
    upload_id = request.headers.get("X-Unique-Upload-Id")
    content_range = request.headers.get("Content-Range")
    if upload_id and content_range:
        return await _upload_chunk(request, cloud, match["rt"], upload_id, content_range)
    if request.content_type == "multipart/form-data":
        body = await read_multipart(request, service.new_spool, before_file=_early_auth(request, cloud))
    else:
        body = UploadBody(params=await admin_params(request))
    try:
        check_upload_auth(request, body.params, cloud)
        spooled = await _file_bytes(request, body)
        return await _finish_upload(request, cloud, match["rt"], body.params, spooled, body.filename)
    finally:
        if body.spooled is not None:
            body.spooled.path.unlink(missing_ok=True)


def _early_auth(request: web.Request, cloud: Cloud) -> Callable[[Params], None]:
    """Authenticate at the file part when the credentials came first (they do from the SDKs)."""

    def check(params: Params) -> None:
        if "signature" in params or basic_credentials(request) is not None:
            check_upload_auth(request, params, cloud)

    return check


async def _file_bytes(request: web.Request, body: UploadBody) -> Spooled:
    if body.spooled is not None:
        return body.spooled
    service = request.app[SERVICE]
    file_value = body.file_url or body.params.pop("file", None)
    if not file_value or not isinstance(file_value, str):
        raise BadRequest("Missing required parameter - file")
    if file_value.startswith("data:"):
        meta, sep, payload = file_value.partition(",")
        if not sep or ";base64" not in meta:
            raise BadRequest("Invalid data URI: only base64 data URIs are supported")
        try:
            data = binascii.a2b_base64(payload)
        except (binascii.Error, ValueError):
            raise BadRequest("Invalid data URI: bad base64") from None
        spool = service.new_spool()
        try:
            await spool.write(data)
            body.spooled = await spool.finish()
        except BaseException:
            spool.discard()  # e.g. too large: leave nothing in spool/
            raise
    else:
        config = request.app[CONFIG]
        body.spooled = await fetch_to_spool(request.app[FETCHER], file_value, service.new_spool(), config.fetch_timeout)
        body.filename = body.filename or file_value.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]
    return body.spooled


async def _upload_chunk(request: web.Request, cloud: Cloud, rt: str, upload_id: str, content_range: str) -> web.Response:
    """One `upload_large` chunk; the last one completes the upload like a normal one."""
    chunk = parse_content_range(content_range)
    state: dict[str, Any] = {}

    async def on_file(params: Params, part: BodyPartReader) -> None:
        check_upload_auth(request, params, cloud)  # before a byte touches the shared file
        _public_id(params, part.filename)  # a hostile id is refused at the first chunk, not the last
        state["filename"] = part.filename
        state["result"] = await request.app[CHUNKS].write(cloud.name, upload_id, chunk, part_chunks(part))

    if request.content_type != "multipart/form-data":
        raise BadRequest("Chunked uploads must be multipart/form-data")
    body = await read_multipart(request, request.app[SERVICE].new_spool, on_file)
    if "result" not in state:
        raise BadRequest("Missing required parameter - file")
    spooled, received = state["result"]
    if not body.params.get("public_id"):
        body.params["public_id"] = _chunked_public_id(cloud.name, upload_id, rt, state["filename"])
    if spooled is None:
        return web.json_response(
            {"done": False, "bytes": received, "public_id": body.params["public_id"], "resource_type": rt, "kind": "upload"}
        )
    try:
        return await _finish_upload(request, cloud, rt, body.params, spooled, state["filename"])
    finally:
        spooled.path.unlink(missing_ok=True)


def _chunked_public_id(cloud: str, upload_id: str, rt: str, filename: str | None) -> str:
    """Stable across the chunks of one upload, so every chunk's response names the same id."""
    stem = blake3.blake3(f"{cloud}/{upload_id}".encode()).hexdigest()[:20]
    ext = extension(filename)
    return f"{stem}.{ext}" if rt == "raw" and ext else stem


def _public_id(params: Params, filename: str | None) -> str | None:
    public_id = params.get("public_id") or None
    if public_id is None and as_bool(params.get("use_filename"), False) and filename:
        stem = filename.replace("\\", "/").rsplit("/", 1)[-1].rsplit(".", 1)[0]
        unique = as_bool(params.get("unique_filename"), True)
        public_id = f"{stem}_{secrets.token_hex(3)}" if unique else stem
    folder = str(params.get("folder") or "").strip("/")
    if public_id and folder:
        public_id = f"{folder}/{public_id}"
    return ids.check_public_id(str(public_id)) if public_id else None


async def _finish_upload(
    request: web.Request, cloud: Cloud, rt: str, params: Params, spooled: Spooled, filename: str | None
) -> web.Response:
    upload_request = UploadRequest(
        cloud=cloud,
        resource_type=rt,
        type=ids.check_delivery_type(str(params.get("type") or "upload")),
        public_id=_public_id(params, filename),
        overwrite=bool(as_bool(params.get("overwrite"), True)),
        backup=as_bool(params.get("backup")),
        filename=filename,
        tags=as_list(params["tags"]) if "tags" in params else None,
        context=parse_pipe_map(params["context"]) if "context" in params else None,
        metadata=await _metadata(request, cloud, params),
    )
    result = await request.app[SERVICE].upload(upload_request, spooled)
    return web.json_response(
        render.upload_result(cloud, result.asset, result.version, existing=result.existing, overwritten=result.overwritten)
    )


async def _metadata(request: web.Request, cloud: Cloud, params: Params) -> dict[str, str] | None:
    """An upload's `metadata`, checked against the environment's field definitions."""
    if "metadata" not in params:
        return None
    return await metadata_fields.checked(request.app[META], cloud.name, parse_pipe_map(params["metadata"]))


async def _signed_params(request: web.Request, cloud: Cloud, optional_skip: bool = False) -> Params:
    params = await admin_params(request)
    check_upload_auth(request, params, cloud, optional_skip=optional_skip)
    return params


async def _live_asset(request: web.Request, cloud: Cloud, rt: str, type_: str, public_id: str) -> Asset | None:
    asset = await request.app[META].get_asset(cloud.name, rt, type_, public_id)
    return asset if asset is not None and asset.live else None


async def destroy(request: web.Request, cloud: Cloud, match: dict[str, str]) -> web.Response:
    params = await _signed_params(request, cloud)
    public_id = ids.check_public_id(str(params.get("public_id") or ""))
    asset = await _live_asset(request, cloud, match["rt"], str(params.get("type") or "upload"), public_id)
    if asset is None:
        return web.json_response({"result": "not found"})
    await request.app[SERVICE].delete_asset(asset)
    return web.json_response({"result": "ok"})


async def rename(request: web.Request, cloud: Cloud, match: dict[str, str]) -> web.Response:
    params = await _signed_params(request, cloud)
    from_id = ids.check_public_id(str(params.get("from_public_id") or ""), "from_public_id")
    to_id = ids.check_public_id(str(params.get("to_public_id") or ""), "to_public_id")
    type_ = str(params.get("type") or "upload")
    to_type = ids.check_delivery_type(str(params.get("to_type") or type_))
    asset = await _live_asset(request, cloud, match["rt"], type_, from_id)
    if asset is None:
        raise NotFound(f"Resource not found - {from_id}")
    renamed = await request.app[SERVICE].rename(asset, to_type, to_id, bool(as_bool(params.get("overwrite"), False)))
    return web.json_response(render.resource(renamed))


async def explicit(request: web.Request, cloud: Cloud, match: dict[str, str]) -> web.Response:
    """Only tags, context and metadata are applied: explicit never creates a revision."""
    params = await _signed_params(request, cloud)
    public_id = ids.check_public_id(str(params.get("public_id") or ""))
    asset = await _live_asset(request, cloud, match["rt"], str(params.get("type") or "upload"), public_id)
    if asset is None:
        raise NotFound(f"Resource not found - {public_id}")
    updates = field_updates(params)
    if "metadata" in updates:
        updates["metadata"] = await metadata_fields.checked(request.app[META], cloud.name, updates["metadata"])
    updated = await request.app[SERVICE].update_fields(asset, **updates)
    return web.json_response(render.resource(updated))


async def _bulk_update(request: web.Request, cloud: Cloud, rt: str, params: Params, change: Any) -> web.Response:
    public_ids = as_list(params.get("public_ids"))
    if not public_ids:
        raise BadRequest("Missing required parameter - public_ids")
    type_ = str(params.get("type") or "upload")
    done = []
    for public_id in public_ids:
        asset = await _live_asset(request, cloud, rt, type_, public_id)
        if asset is not None:
            await request.app[SERVICE].update_fields(asset, **change(asset))
            done.append(public_id)
    return web.json_response({"public_ids": done})


async def tags(request: web.Request, cloud: Cloud, match: dict[str, str]) -> web.Response:
    params = await _signed_params(request, cloud, optional_skip=True)
    command = str(params.get("command") or "add")
    new = as_list(params.get("tag"))

    def change(asset: Asset) -> dict[str, Any]:
        if command == "add":
            return {"tags": list(dict.fromkeys(asset.tags + new))}
        if command == "remove":
            return {"tags": [t for t in asset.tags if t not in new]}
        if command == "replace":
            return {"tags": new}
        if command == "remove_all":
            return {"tags": []}
        raise BadRequest(f"Invalid command - {command}")

    return await _bulk_update(request, cloud, match["rt"], params, change)


async def context(request: web.Request, cloud: Cloud, match: dict[str, str]) -> web.Response:
    params = await _signed_params(request, cloud, optional_skip=True)
    command = str(params.get("command") or "add")
    new = parse_pipe_map(params.get("context"))

    def change(asset: Asset) -> dict[str, Any]:
        if command == "remove_all":
            return {"context": {}}
        if command == "add":
            return {"context": {**asset.context, **new}}
        raise BadRequest(f"Invalid command - {command}")

    return await _bulk_update(request, cloud, match["rt"], params, change)


async def metadata(request: web.Request, cloud: Cloud, match: dict[str, str]) -> web.Response:
    params = await _signed_params(request, cloud, optional_skip=True)
    new = await metadata_fields.checked(request.app[META], cloud.name, parse_pipe_map(params.get("metadata"))) or {}
    return await _bulk_update(request, cloud, match["rt"], params, lambda asset: {"metadata": {**asset.metadata, **new}})
