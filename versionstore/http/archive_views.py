"""Archives: export a snapshot or a point in time as a tar, import one (docs/snapshots.md).

    POST /v1_1/<cloud>/versionstore/archives            snapshot_id | at (+ prefix), notification_url -> export job
    POST /v1_1/<cloud>/versionstore/archives/import     the tar as the body -> 400 when it does not verify, else an import job
    GET  /v1_1/<cloud>/versionstore/archives/<id>       the job, with a signed one-hour download_url once exported
    DELETE /v1_1/<cloud>/versionstore/archives/<id>     remove the archive's file now (refused with the append-only key)
    GET  /v1_1/<cloud>/download_archive                 signed (archive_id, timestamp): the tar, with Range
"""

import contextlib
import logging
import time
from typing import Any

from aiohttp import web

from versionstore import archive_compose, archive_removal, archives, layout, pitr
from versionstore.archive_format import ArchiveInvalid
from versionstore.archive_records import IMPORT_FILE, ArchiveFile
from versionstore.blobstore import BlobStoreError
from versionstore.errors import BadRequest, Conflict, NotFound
from versionstore.http import render
from versionstore.http.audit_views import record_api
from versionstore.http.auth import check_basic, check_signed
from versionstore.http.download import abort, blob_response, byte_range
from versionstore.http.inputs import admin_params, query_params
from versionstore.http.keys import CONFIG, JOBS, META, SERVICE
from versionstore.ids import is_hex_id, new_hex_id
from versionstore.models import Cloud, Job

log = logging.getLogger(__name__)

ARCHIVE = r"(?P<archive_id>[0-9a-f]{32})"


async def _body(request: web.Request, job: Job, cloud: Cloud) -> dict[str, Any]:
    body = {**render.job(job), **await archives.described(request.app[META], job, cloud, time.time())}
    if "download_url" in body:
        body["download_url"] = str(request.url.origin()) + body["download_url"]
    return body


async def export(request: web.Request, cloud: Cloud, match: dict[str, str]) -> web.Response:
    check_basic(request, cloud)
    params = await admin_params(request)
    selection = pitr.Selection(
        cloud.name, str(params.get("prefix") or ""), pitr.parse_time(params.get("at")), str(params.get("snapshot_id") or "") or None
    )
    await pitr.check_selection(request.app[META], selection)
    notification_url = str(params.get("notification_url") or "") or None
    if notification_url and not notification_url.startswith(("http://", "https://")):
        raise BadRequest("notification_url must be an http(s) URL")
    default = await archive_removal.default_keep_days(request.app[META], cloud.name, request.app[CONFIG].archive_keep_days)
    keep = archive_removal.keep_days(params.get("keep_days"), default)
    job_params = {**archives.selection_params(selection), "keep_days": keep}
    job = await archives.start(request.app[SERVICE], cloud.name, archives.EXPORT, job_params, notification_url)
    if job is None:
        raise Conflict("An archive export of this environment is already running")
    await record_api(request, cloud, "archive_export_start", job.id, detail=job_params)
    request.app[JOBS].wake.set()
    return web.json_response(await _body(request, job, cloud))


async def import_(request: web.Request, cloud: Cloud, match: dict[str, str]) -> web.Response:
    """The body is spooled to disk (bounded memory, at most the upload limit), verified whole
    (a tampered, truncated or padded archive is a 400 and nothing is kept), then stored and
    applied by a job."""
    check_basic(request, cloud)
    service = request.app[SERVICE]
    notification_url = request.query.get("notification_url") or None
    if notification_url and not notification_url.startswith(("http://", "https://")):
        raise BadRequest("notification_url must be an http(s) URL")
    if await request.app[META].open_jobs(cloud.name, archives.IMPORT):
        raise Conflict("An archive import into this environment is already running")
    spooled = await archives.spool_upload(service, request.content.iter_chunked(1 << 20), service.max_bytes)
    try:
        try:
            manifest = await archives.verify_file(spooled.path)
        except ArchiveInvalid as exc:
            await record_api(request, cloud, "archive_import_start", None, outcome="refused", detail={"error": str(exc)})
            raise BadRequest(f"Archive refused: {exc}") from None
        job_id = new_hex_id()
        key = layout.archive_upload_key(cloud.name, job_id)
        # The row before the file; the file goes once the job has ended (archive_removal.remove_due).
        await service.meta.register_archive_file(ArchiveFile(job_id, cloud.name, IMPORT_FILE, key, time.time(), None))
        await service.targets.store(None).put_file(key, spooled.path)
    finally:
        spooled.path.unlink(missing_ok=True)
        with contextlib.suppress(Exception):
            spooled.lock.close()
    params = {"digest": spooled.digest, "size": spooled.size, "count": len(manifest.entries),
              "source_cloud": manifest.header.get("cloud")}
    job = await archives.start(service, cloud.name, archives.IMPORT, params, notification_url, job_id)
    if job is None:
        await archive_removal.remove_file(service, ArchiveFile(job_id, cloud.name, IMPORT_FILE, key, time.time(), None), time.time())
        raise Conflict("An archive import into this environment is already running")
    await record_api(request, cloud, "archive_import_start", job.id, detail=params)
    request.app[JOBS].wake.set()
    return web.json_response(await _body(request, job, cloud))


async def one(request: web.Request, cloud: Cloud, match: dict[str, str]) -> web.Response:
    check_basic(request, cloud)
    job = await request.app[META].get_job(cloud.name, match["archive_id"])
    if job is None or job.kind not in archives.KINDS:
        raise NotFound(f"Archive not found - {match['archive_id']}")
    return web.json_response(await _body(request, job, cloud))


async def remove(request: web.Request, cloud: Cloud, match: dict[str, str]) -> web.Response:
    """Remove an archive's file now (an export's published tar, an ended import's uploaded
    one); the job's record stays, with `removed_at`. Refused while the job runs."""
    check_basic(request, cloud)
    service = request.app[SERVICE]
    job = await service.meta.get_job(cloud.name, match["archive_id"])
    if job is None or job.kind not in archives.KINDS:
        raise NotFound(f"Archive not found - {match['archive_id']}")
    if job.open:
        raise Conflict(f"Archive {job.id} is {job.status}: wait for its job to end")
    found = await service.meta.get_archive_file(cloud.name, job.id)
    record = archive_removal.file_of(job, found)
    if found is None and record is not None:
        await service.meta.register_archive_file(record)  # an export from before archive files were recorded
    if record is not None and record.removed_at is None and await archive_removal.remove_file(service, record, time.time()):
        await record_api(request, cloud, "archive_remove", job.id, detail={"kind": record.kind, "key": record.key})
    return web.json_response(await _body(request, job, cloud))


async def download(request: web.Request, cloud: Cloud, match: dict[str, str]) -> web.StreamResponse:
    """Signed query (valid for one hour); the archive with Range, composed from its revisions
    (archive_compose.py): each member read whole proven by its BLAKE3, a full read by the
    archive's (the job's `digest`), a failure cutting the transfer before the last bytes."""
    params = query_params(request)
    if not params.get("archive_id"):
        raise BadRequest("Missing required parameter - archive_id")
    check_signed(params, cloud, purpose="download_archive")
    archive_id = str(params["archive_id"])
    if not is_hex_id(archive_id):
        raise BadRequest("Illegal id")
    service = request.app[SERVICE]
    job, store, key = await archives.published(service, cloud.name, archive_id)

    async def report(outcome: str, detail: str) -> None:
        log.error("archive %s of %s is %s: %s", archive_id, cloud.name, outcome, detail)

    headers = {
        "Content-Type": "application/x-tar",
        "Content-Disposition": f'attachment; filename="{cloud.name}-{archive_id}.tar"',
        "Cache-Control": "private, max-age=3600",
        "ETag": f'"{str(job.progress["digest"])[:32]}"',
    }
    size, digest = int(job.progress["size"]), str(job.progress["digest"])
    if "layout" not in job.progress:  # an export from before archives were composed: its tar
        return await blob_response(request, store, key, size, digest, headers, report)
    span = byte_range(request, size)
    if span is None:
        return web.Response(status=416, headers={"Content-Range": f"bytes */{size}"})
    start, stop, partial = span
    revisions = await archives.revision_store(service, cloud)
    async with archives.opened_layout(service, job, store, key) as described:
        chunks = archive_compose.compose(
            described, revisions, cloud.name, start, stop, digest, archives.kept_check(service, cloud.name, archive_id)
        )
        headers = {**headers, "Accept-Ranges": "bytes"}
        if partial:
            headers["Content-Range"] = f"bytes {start}-{stop - 1}/{size}"
        response = web.StreamResponse(status=206 if partial else 200, headers=headers)
        response.content_length = stop - start
        await response.prepare(request)
        try:
            async for chunk in chunks:
                await response.write(chunk)
        except (ArchiveInvalid, NotFound, BlobStoreError) as exc:  # a member damaged or gone, the archive withdrawn
            await report("cut", str(exc))
            abort(request)  # the client sees a truncated transfer, never wrong bytes
            return response
        await response.write_eof()
    return response


ROUTES = [
    ("GET", r"download_archive", download),
    ("POST", r"versionstore/archives/import", import_),
    ("POST", r"versionstore/archives", export),
    ("GET", rf"versionstore/archives/{ARCHIVE}", one),
    ("DELETE", rf"versionstore/archives/{ARCHIVE}", remove),
]
