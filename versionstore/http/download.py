"""Serving a revision's bytes: Range support on every backend.

Small local blobs (the common case for images) are read in the event-loop thread: a read of
a few hundred KiB from the page cache takes microseconds, while aiohttp's FileResponse queues
each open/stat on a small thread pool, which under 64 concurrent downloads dominated the tail
latency (docs/performance.md). Larger local blobs use FileResponse (sendfile); other stores
stream through `BlobStore.read`.
"""

from aiohttp import web

from versionstore.blobstore import BlobStore
from versionstore.errors import NotFound

SMALL_BLOB = 256 * 1024


def byte_range(request: web.Request, size: int) -> tuple[int, int, bool] | None:
    """(start, stop, partial) for the request's Range header; None when unsatisfiable."""
    try:
        rng = request.http_range
    except ValueError:
        return 0, size, False
    if rng.start is None and rng.stop is None:
        return 0, size, False
    start, stop = rng.start, rng.stop
    if start is not None and start < 0:
        start, stop = max(0, size + start), None
    start = start or 0
    stop = size if stop is None else min(stop, size)
    if start >= stop:
        return None
    return start, stop, True


def _unsatisfiable(size: int) -> web.Response:
    return web.Response(status=416, headers={"Content-Range": f"bytes */{size}"})


async def blob_response(
    request: web.Request, store: BlobStore, key: str, size: int, headers: dict[str, str]
) -> web.StreamResponse:
    path = store.local_path(key)
    if path is not None and size > SMALL_BLOB:
        return web.FileResponse(path, headers=headers)
    span = byte_range(request, size)
    if span is None:
        return _unsatisfiable(size)
    start, stop, partial = span
    headers = {**headers, "Accept-Ranges": "bytes"}
    if partial:
        headers["Content-Range"] = f"bytes {start}-{stop - 1}/{size}"
    status = 206 if partial else 200
    if path is not None:
        try:
            with open(path, "rb") as handle:
                handle.seek(start)
                body = handle.read(stop - start)
        except FileNotFoundError:
            raise NotFound("Backup bytes not found") from None
        return web.Response(body=body, status=status, headers=headers)
    response = web.StreamResponse(status=status, headers=headers)
    response.content_length = stop - start
    await response.prepare(request)
    async for data in store.read(key, start, stop):
        await response.write(data)
    await response.write_eof()
    return response
