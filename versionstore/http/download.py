"""Serving a revision's bytes: Range support on every backend, and every full read verified.

A revision is named by the BLAKE3 of its bytes, so a download proves them on the way out:
- Small local blobs (the common case for images) are read in the event-loop thread (a read of
  a few hundred KiB from the page cache takes microseconds, while aiohttp's FileResponse
  queues each open/stat on a small thread pool, which under 64 concurrent downloads dominated
  the tail latency) and hashed before anything is sent; ranges of them are cut from the
  verified whole.
- Larger local blobs are hashed in a worker thread (mmap, all cores), then sent with sendfile
  (FileResponse). A published blob is never opened for writing, so the bytes sent are the
  bytes hashed.
- Other stores stream through the hash with the last chunk held back: on a mismatch the
  connection is closed before it, and the client sees a truncated transfer, never a clean 200.
In each case a mismatch or a missing blob is reported through `report` (the revision is then
marked and answers `restorable: false`). Range requests of large blobs are not hashed (a part
cannot be checked against the whole's digest): they rely on the last recorded check, and a
revision recorded missing or corrupt is refused before this module is reached.
"""

import asyncio
import os
from collections.abc import Awaitable, Callable

import blake3
from aiohttp import web

from versionstore.blobstore import BlobNotFound, BlobStore
from versionstore.errors import ApiError, NotFound
from versionstore.verify import CORRUPT, INLINE_HASH, MISSING

SMALL_BLOB = 256 * 1024

#: Called with ("missing" | "corrupt", detail) when the served bytes are not the revision's.
Report = Callable[[str, str], Awaitable[None]]


class CorruptBlob(ApiError):
    """The stored bytes no longer hash to the revision's name: nothing wrong is sent."""

    status = 500


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


async def _missing(report: Report, detail: str) -> NotFound:
    await report(MISSING, detail)
    return NotFound("Backup bytes not found: the revision is missing from backup storage")


async def _corrupt(report: Report, detail: str) -> CorruptBlob:
    await report(CORRUPT, detail)
    return CorruptBlob("Backup bytes failed verification: the revision is corrupt in backup storage")


async def blob_response(
    request: web.Request, store: BlobStore, key: str, size: int, digest: str, headers: dict[str, str], report: Report
) -> web.StreamResponse:
    span = byte_range(request, size)
    if span is None:
        return _unsatisfiable(size)
    start, stop, partial = span
    path = store.local_path(key)
    if path is not None and size > SMALL_BLOB:
        if not partial:
            actual = await asyncio.to_thread(_file_digest, path)
            if actual is None:
                raise await _missing(report, f"{path} is missing")
            if actual != digest:
                raise await _corrupt(report, f"{path} hashes to {actual}")
        elif not await asyncio.to_thread(os.path.exists, path):
            raise await _missing(report, f"{path} is missing")
        return web.FileResponse(path, headers=headers)
    headers = {**headers, "Accept-Ranges": "bytes"}
    if partial:
        headers["Content-Range"] = f"bytes {start}-{stop - 1}/{size}"
    status = 206 if partial else 200
    if path is not None:
        try:
            with open(path, "rb") as handle:
                whole = handle.read(size + 1)
        except FileNotFoundError:
            raise await _missing(report, f"{path} is missing") from None
        if (actual := blake3.blake3(whole).hexdigest()) != digest:
            raise await _corrupt(report, f"{path} hashes to {actual}")
        return web.Response(body=whole[start:stop], status=status, headers=headers)
    return await _streamed(request, store, key, (start, stop, partial), digest, status, headers, report)


def _file_digest(path: str) -> str | None:
    try:
        hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
        hasher.update_mmap(path)
    except FileNotFoundError:
        return None
    return str(hasher.hexdigest())


async def _streamed(
    request: web.Request, store: BlobStore, key: str, span: tuple[int, int, bool], digest: str, status: int,
    headers: dict[str, str], report: Report,
) -> web.StreamResponse:
    """A remote blob: the first chunk is fetched before the headers (so a missing blob is a
    JSON 404), a full read is hashed on the way and its last chunk sent only once it matches."""
    start, stop, partial = span
    chunks = store.read(key, start, stop)
    try:
        first = await anext(chunks, None)
    except BlobNotFound:
        raise await _missing(report, f"{store.name}/{key} is missing") from None
    response = web.StreamResponse(status=status, headers=headers)
    response.content_length = stop - start
    await response.prepare(request)
    if partial:
        if first is not None:
            await response.write(first)
        async for data in chunks:
            await response.write(data)
        await response.write_eof()
        return response
    hasher = blake3.blake3()
    held = first
    async for data in chunks:
        if held is not None:
            await _hash(hasher, held)
            await response.write(held)
        held = data
    if held is not None:
        await _hash(hasher, held)
    if (actual := hasher.hexdigest()) != digest:
        await report(CORRUPT, f"{store.name}/{key} read back as {actual}")
        _abort(request)  # the last bytes are never sent: the client sees a truncated body
        return response
    if held is not None:
        await response.write(held)
    await response.write_eof()
    return response


async def _hash(hasher: "blake3.blake3", data: bytes) -> None:
    if len(data) >= INLINE_HASH:
        await asyncio.to_thread(hasher.update, data)
    else:
        hasher.update(data)


def _abort(request: web.Request) -> None:
    if request.protocol is not None:
        request.protocol.force_close()
    if request.transport is not None:
        request.transport.close()
