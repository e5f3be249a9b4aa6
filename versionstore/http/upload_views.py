"""Upload API handlers: thin: read params, authenticate, call the domain, render."""

import binascii
import secrets
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import blake3
from aiohttp import web

from versionstore import ids, metadata_fields
from versionstore.chunks import parse_content_range
from versionstore.errors import BadRequest, NotFound
from versionstore.http import append_only, render
from versionstore.http.audit_views import record_api
from versionstore.http.auth import check_signed, check_upload_auth, pre_auth_lease
from versionstore.http.budget import Lease
from versionstore.http.fetch import fetch_to_spool
from versionstore.http.inputs import admin_params, media_type
from versionstore.http.keys import CHUNKS, CONFIG, EGRESS, FETCHER, META, SERVICE
from versionstore.http.upload_body import UploadBody, charged, read_multipart
from versionstore.media import extension
from versionstore.models import Asset, Cloud
from versionstore.params import MAX_TAGS, Params, as_bool, as_bounded_list, field_updates, parse_pipe_map
from versionstore.service import UploadRequest, UploadResult
from versionstore.spool import Spooled


async def upload(request: web.Request, cloud: Cloud, match: dict[str, str]) -> web.Response:
    service = request.app[SERVICE]
    upload_id = request.headers.get("X-Unique-Upload-Id")
    content_range = request.headers.get("Content-Range")
    if upload_id and content_range:
        return await _upload_chunk(request, cloud, match["rt"], upload_id, content_range)
    lease = pre_auth_lease(request, cloud)
    try:
        if media_type(request) == "multipart/form-data":
            body = await read_multipart(
                request, service.new_spool, before_file=_early_auth(cloud, lease), lease=lease, spool_bytes=service.spool_bytes
            )
        else:
            body = UploadBody(params=await admin_params(request, lease))
    finally:
        lease.settle()
    try:
        check_upload_auth(request, body.params, cloud)
        spooled = await _file_bytes(request, body)
        return await _finish_upload(request, cloud, match["rt"], body, spooled)
    finally:
        if body.spooled is not None:  # not handed to the service
            body.spooled.path.unlink(missing_ok=True)


def _early_auth(cloud: Cloud, lease: Lease) -> Callable[[Params], None]:
    """Authenticate at the file part when the credentials came first (they do from the SDKs);
    from then on the file streams without being charged to the unauthenticated budget."""

    def check(params: Params) -> None:
        if lease.open and "signature" in params:
            check_signed(params, cloud, purpose="upload")
            lease.settle()

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
        body.spooled = await service.spool_bytes(data)  # too large: refused before anything is written
    else:
        config = request.app[CONFIG]
        fetcher, egress = request.app[FETCHER], request.app[EGRESS]
        body.spooled = await fetch_to_spool(fetcher, file_value, service.new_spool(), config.fetch_timeout, egress)
        body.filename = body.filename or file_value.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]
    return body.spooled


async def _upload_chunk(request: web.Request, cloud: Cloud, rt: str, upload_id: str, content_range: str) -> web.Response:
    """One `upload_large` chunk; the one that completes the upload publishes it like a normal one.

    The chunk's bytes go to a private file first; only once the whole body is read and every
    field (wherever it sat, before or after the file part) is authenticated does the chunk
    join its session."""
    chunks = request.app[CHUNKS]
    chunk = parse_content_range(content_range)
    chunks.check(upload_id, chunk)
    if media_type(request) != "multipart/form-data":
        raise BadRequest("Chunked uploads must be multipart/form-data")
    received: list[Path] = []
    filenames: list[str | None] = []

    lease = pre_auth_lease(request, cloud)

    async def on_file(params: Params, filename: str | None, body: AsyncIterator[bytes]) -> None:
        filenames.append(filename)
        received.append(await chunks.receive(chunk, charged(body, lease)))

    try:
        try:
            new_spool = request.app[SERVICE].new_spool
            body = await read_multipart(request, new_spool, on_file, before_file=_early_auth(cloud, lease), lease=lease)
        finally:
            lease.settle()
        if not received:
            raise BadRequest("Missing required parameter - file")
        check_upload_auth(request, body.params, cloud)
        filename = _filename(body.params, filenames[0])
        candidate, named = _chunk_public_ids(body.params, filename, cloud.name, upload_id, rt)
        # Every parameter is checked at every chunk, so a bad one never joins the session.
        upload_request = await _upload_request(request, cloud, rt, body.params, candidate, filename)
        progress = await chunks.commit(cloud.name, upload_id, rt, chunk, received[0], candidate, named)
    finally:
        for path in received:
            path.unlink(missing_ok=True)  # refused, or already published under its part name
    public_id = progress.session.public_id
    if progress.token is None:
        return web.json_response({"done": False, "bytes": progress.received, "public_id": public_id, "resource_type": rt, "kind": "upload"})
    async with chunks.claimed(progress):
        spooled = await chunks.assemble(progress)
        result = await request.app[SERVICE].upload(replace(upload_request, public_id=public_id), spooled)
    await chunks.finish(progress)
    return _upload_response(cloud, result)


def _filename(params: Params, filename: str | None) -> str | None:
    """`filename_override` names the original (and, with use_filename, the public id)."""
    override = params.get("filename_override")
    return str(override) if override else filename


def _chunk_public_ids(params: Params, filename: str | None, cloud: str, upload_id: str, rt: str) -> tuple[str, tuple[str, ...]]:
    """(the public_id this chunk gives a new upload, the ids it names explicitly). Python sends
    back the id the first chunk answered together with `folder` again, so both the value sent
    and the folder-prefixed one name the upload's id."""
    generated = {**params, "public_id": _chunked_public_id(cloud, upload_id, rt, filename)}
    candidate = _public_id(params, filename) or _public_id(generated, None)
    assert candidate is not None  # the generated stem is never empty
    explicit = str(params.get("public_id") or "")
    return candidate, (explicit, candidate) if explicit else ()


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


async def _upload_request(
    request: web.Request, cloud: Cloud, rt: str, params: Params, public_id: str | None, filename: str | None
) -> UploadRequest:
    return UploadRequest(
        cloud=cloud,
        resource_type=rt,
        type=ids.check_delivery_type(str(params.get("type") or "upload")),
        public_id=public_id,
        overwrite=bool(as_bool(params.get("overwrite"), True)),
        backup=as_bool(params.get("backup")),
        keep_history=append_only.used(request),
        filename=filename,
        tags=as_bounded_list(params["tags"], "tags", MAX_TAGS) if "tags" in params else None,
        context=parse_pipe_map(params["context"]) if "context" in params else None,
        metadata=await _metadata(request, cloud, params),
    )


async def _finish_upload(request: web.Request, cloud: Cloud, rt: str, body: UploadBody, spooled: Spooled) -> web.Response:
    filename = _filename(body.params, body.filename)
    upload_request = await _upload_request(request, cloud, rt, body.params, _public_id(body.params, filename), filename)
    body.spooled = None  # the service consumes the spool file: it removes it whatever happens (one unlink, not two)
    return _upload_response(cloud, await request.app[SERVICE].upload(upload_request, spooled))


def _upload_response(cloud: Cloud, result: UploadResult) -> web.Response:
    return web.json_response(
        render.upload_result(cloud, result.asset, result.version, existing=result.existing, overwritten=result.overwritten)
    )


async def _metadata(request: web.Request, cloud: Cloud, params: Params) -> dict[str, str] | None:
    """An upload's `metadata`, checked against the environment's field definitions."""
    if "metadata" not in params:
        return None
    return await metadata_fields.checked(request.app[META], cloud.name, parse_pipe_map(params["metadata"]))


async def _signed_params(request: web.Request, cloud: Cloud, purpose: str, optional_skip: bool = False) -> Params:
    lease = pre_auth_lease(request, cloud)
    try:
        params = await admin_params(request, lease)
    finally:
        lease.settle()
    check_upload_auth(request, params, cloud, purpose=purpose, optional_skip=optional_skip)
    return params


async def _live_asset(request: web.Request, cloud: Cloud, rt: str, type_: str, public_id: str) -> Asset | None:
    asset = await request.app[META].get_asset(cloud.name, rt, type_, public_id)
    return asset if asset is not None and asset.live else None


async def destroy(request: web.Request, cloud: Cloud, match: dict[str, str]) -> web.Response:
    params = await _signed_params(request, cloud, "destroy")
    public_id = ids.check_public_id(str(params.get("public_id") or ""))
    asset = await _live_asset(request, cloud, match["rt"], str(params.get("type") or "upload"), public_id)
    if asset is None:
        return web.json_response({"result": "not found"})
    await request.app[SERVICE].delete_asset(asset)
    await record_api(request, cloud, "delete", f"{asset.asset_id} {asset.public_id}", detail={"endpoint": "destroy"})
    return web.json_response({"result": "ok"})


async def rename(request: web.Request, cloud: Cloud, match: dict[str, str]) -> web.Response:
    params = await _signed_params(request, cloud, "rename")
    from_id = ids.check_public_id(str(params.get("from_public_id") or ""), "from_public_id")
    to_id = ids.check_public_id(str(params.get("to_public_id") or ""), "to_public_id")
    type_ = str(params.get("type") or "upload")
    to_type = ids.check_delivery_type(str(params.get("to_type") or type_))
    overwrite = bool(as_bool(params.get("overwrite"), False))
    append_only.check(request, overwrite, "rename with overwrite (it takes the name from another asset)")
    asset = await _live_asset(request, cloud, match["rt"], type_, from_id)
    if asset is None:
        raise NotFound(f"Resource not found - {from_id}")
    renamed = await request.app[SERVICE].rename(asset, to_type, to_id, overwrite)
    return web.json_response(render.resource(renamed))


async def explicit(request: web.Request, cloud: Cloud, match: dict[str, str]) -> web.Response:
    """Only tags, context and metadata are applied: explicit never creates a revision."""
    params = await _signed_params(request, cloud, "explicit")
    public_id = ids.check_public_id(str(params.get("public_id") or ""))
    asset = await _live_asset(request, cloud, match["rt"], str(params.get("type") or "upload"), public_id)
    if asset is None:
        raise NotFound(f"Resource not found - {public_id}")
    updates = field_updates(params)
    if "metadata" in updates:
        updates["metadata"] = await metadata_fields.checked(request.app[META], cloud.name, updates["metadata"])
    updated = await request.app[SERVICE].update_fields(asset, **updates)
    return web.json_response(render.resource(updated))


#: Most public_ids per tags/context/metadata call (Cloudinary documents up to 1000 there).
MAX_BULK_IDS = 1000


def _bulk_ids(params: Params) -> list[str]:
    """The `public_ids` of a tags/context/metadata call: present and bounded (checked before
    anything that costs more)."""
    public_ids = as_bounded_list(params.get("public_ids"), "public_ids", MAX_BULK_IDS)
    if not public_ids:
        raise BadRequest("Missing required parameter - public_ids")
    return public_ids


async def _bulk_update(request: web.Request, cloud: Cloud, rt: str, params: Params, change: Any) -> web.Response:
    public_ids = _bulk_ids(params)
    type_ = str(params.get("type") or "upload")
    done = []
    for public_id in public_ids:
        asset = await _live_asset(request, cloud, rt, type_, public_id)
        if asset is not None:
            await request.app[SERVICE].update_fields(asset, change=change)  # from the row as it is then
            done.append(public_id)
    return web.json_response({"public_ids": done})


async def tags(request: web.Request, cloud: Cloud, match: dict[str, str]) -> web.Response:
    params = await _signed_params(request, cloud, "tags", optional_skip=True)
    command = str(params.get("command") or "add")
    new = as_bounded_list(params.get("tag"), "tag", MAX_TAGS)

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
    params = await _signed_params(request, cloud, "context", optional_skip=True)
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
    params = await _signed_params(request, cloud, "metadata", optional_skip=True)
    _bulk_ids(params)
    new = await metadata_fields.checked(request.app[META], cloud.name, parse_pipe_map(params.get("metadata"))) or {}
    return await _bulk_update(request, cloud, match["rt"], params, lambda asset: {"metadata": {**asset.metadata, **new}})
