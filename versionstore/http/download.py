"""Serving a revision's bytes: Range support on every backend, and every full read verified.

A revision is named by the BLAKE3 of its bytes, so a download proves them on the way out:
- Small local blobs (the common case for images) are read in the event-loop thread (a read of
  a few hundred KiB from the page cache takes microseconds, while aiohttp's FileResponse
  queues each open/stat on a small thread pool, which under 64 concurrent downloads dominated
  the tail latency) and hashed before anything is sent; ranges of them are cut from the
  verified whole. The proven bytes are kept (by path and digest, VERIFIED_BLOBS) until
  anything commits: a repeated download sends the bytes already proven to be the digest's,
  and re-reads the disk after the next commit (a verify that marks the revision is one).
- Larger local blobs are read and hashed in a worker thread one chunk ahead of the socket
  (measured against the former sendfile in docs/performance.md), and other stores stream
  through the hash: in both, the last chunk is held back until every byte is proven, so on a
  mismatch the connection is closed before it and the client sees a truncated transfer, never
  a clean 200. The hash covers exactly the bytes sent.
In each case a mismatch or a missing blob is reported through `report` (the revision is then
marked and answers `restorable: false`). Range requests of large blobs are not hashed (a part
cannot be checked against the whole's digest): they rely on the last recorded check, and a
revision recorded missing or corrupt is refused before this module is reached.
"""

import asyncio
import os
import re
from collections.abc import Awaitable, Callable

import blake3
from aiohttp import web

from versionstore.blobstore import BlobNotFound, BlobStore
from versionstore.errors import ApiError, NotFound
from versionstore.http.keys import EPOCH, VERIFIED_BLOBS
from versionstore.verify import CORRUPT, INLINE_HASH, MISSING

SMALL_BLOB = 256 * 1024
_ZERO_SUFFIX = re.compile(r"bytes=-0+", re.ASCII | re.IGNORECASE)

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
    if _ZERO_SUFFIX.fullmatch(request.headers.get("Range", "").strip()):
        return None  # `bytes=-0`: the last zero bytes (aiohttp reads it as `bytes=0-`, the whole)
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
            return await _local_streamed(request, path, size, digest, headers, report)
        if not await asyncio.to_thread(os.path.exists, path):
            raise await _missing(report, f"{path} is missing")
        return web.FileResponse(path, headers=headers)
    headers = {**headers, "Accept-Ranges": "bytes"}
    if partial:
        headers["Content-Range"] = f"bytes {start}-{stop - 1}/{size}"
    status = 206 if partial else 200
    if path is not None:
        whole = await _proven_small(request, path, size, digest, report)
        return web.Response(body=whole if not partial else whole[start:stop], status=status, headers=headers)
    return await _streamed(request, store, key, (start, stop, partial), digest, status, headers, report)


async def _proven_small(request: web.Request, path: str, size: int, digest: str, report: Report) -> bytes:
    """The whole of a small local blob, proven to hash to `digest`: from VERIFIED_BLOBS while
    nothing has committed since it was proven, else read, hashed and kept there."""
    proven, epoch = request.app[VERIFIED_BLOBS], request.get(EPOCH)
    whole = proven.get((path, digest), epoch)
    if whole is not None:
        return whole
    try:
        whole = _read_small(path, size)
    except FileNotFoundError:
        raise await _missing(report, f"{path} is missing") from None
    if (actual := blake3.blake3(whole).hexdigest()) != digest:
        raise await _corrupt(report, f"{path} hashes to {actual}")
    proven.put((path, digest), epoch, whole)
    return whole


def _read_small(path: str, size: int) -> bytes:
    """The whole of a small blob (one byte more than `size` when it is longer: then it cannot
    hash right), in three system calls where a file object makes seven (fstat, ioctl, lseek
    and a second read to see the end). A read of a regular file returns less than asked only
    at its end, so `size` bytes for `size + 1` asked is the whole file; a shorter one reads on."""
    fd = os.open(path, os.O_RDONLY)
    try:
        data = os.read(fd, size + 1)
        while len(data) < size and (more := os.read(fd, size + 1 - len(data))):
            data += more
        return data
    finally:
        os.close(fd)


READ = 1 << 20


async def _local_streamed(
    request: web.Request, path: str, size: int, digest: str, headers: dict[str, str], report: Report
) -> web.StreamResponse:
    """A large local blob, read and hashed in a worker thread one chunk ahead of the socket;
    the last chunk is sent only once every byte is proven."""
    try:
        handle = await asyncio.to_thread(open, path, "rb")
    except FileNotFoundError:
        raise await _missing(report, f"{path} is missing") from None
    following: asyncio.Future[bytes] | None = None
    try:
        hasher = blake3.blake3()

        def step() -> bytes:
            data = handle.read(READ)
            hasher.update(data)
            return data

        held = await asyncio.to_thread(step)
        response = web.StreamResponse(status=200, headers={**headers, "Accept-Ranges": "bytes"})
        response.content_length = size
        await response.prepare(request)
        sent = 0
        following = asyncio.ensure_future(asyncio.to_thread(step))
        while (ahead := await following) and sent + len(held) + len(ahead) <= size:
            following = asyncio.ensure_future(asyncio.to_thread(step))  # read and hash on while this chunk is sent
            await response.write(held)
            sent, held = sent + len(held), ahead
        if ahead:  # more bytes than the revision has: corrupt (the rest need not be read)
            sent = -1
        actual = hasher.hexdigest()
    finally:
        if following is not None and not following.done():
            await asyncio.wait([following])  # the client went away mid-write: let the read finish before closing
        handle.close()
    if actual != digest or sent + len(held) != size:
        await report(CORRUPT, f"{path} hashes to {actual}" if sent >= 0 else f"{path} is longer than {size} bytes")
        abort(request)
        return response
    await response.write(held)  # the last chunk, only now that every byte is proven
    await response.write_eof()
    return response


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
        abort(request)  # the last bytes are never sent: the client sees a truncated body
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


def abort(request: web.Request) -> None:
    """Close the connection now: the client sees a truncated body, never a clean end."""
    if request.protocol is not None:
        request.protocol.force_close()
    if request.transport is not None:
        request.transport.close()
