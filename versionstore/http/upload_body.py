"""Streaming reader for Upload API bodies: fields into params, the file into a spool file.

The file part is never held in memory: it is written block by block while BLAKE3 hashes it.
A `file` field without a filename may be a data URI (decoded as it streams) or an http(s) URL
(fetched later, only after the request is authenticated).

aiohttp's MultipartReader reads the part headers and the small fields. The body of a file part
(the bulk of every upload) is read by `file_part_chunks` straight from the request stream: the
chunks the socket delivered are passed on as they are, and the delimiter is found with one
`bytes.find` per chunk (aiohttp's part reader copies every byte twice into a search window and
was the event loop's largest cost, docs/performance.md). A large body's file part skips even
that: http/body_tap.py receives it into the spool's own blocks (`spool_tapped_part`).
"""

import asyncio
import binascii
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from aiohttp import BodyPartReader, MultipartReader, StreamReader, hdrs, web
from aiohttp.helpers import parse_mimetype

from versionstore import telemetry
from versionstore.errors import BadRequest
from versionstore.http import small_body
from versionstore.http.body_tap import delimiter_prefix, spool_tapped
from versionstore.http.budget import Lease
from versionstore.http.inputs import BodyAllowance, field_text, multipart_reader, next_part, part_names, read_field
from versionstore.http.keys import CONFIG, UNAUTH_BUDGET
from versionstore.params import Params, drop_blank, merge_pairs
from versionstore.spool import Spooled, SpoolFile

READ_SIZE = 256 * 1024
_SNIFF = 8192  # aiohttp asserts read_chunk(size) >= boundary length + 2 on parts without Content-Length
_DATA_URI_MORE = 1024  # read after the first _SNIFF bytes of a data URI: its comma is within both
#: Bytes the request stream may buffer before it stops reading the socket (aiohttp's default,
#: 128 KiB, is less than one socket read and made every read pause and resume the transport).
STREAM_BUFFER = 1 << 20
SOCKET_READ = 1 << 20
_MAX_SIZE = "max_size"  # not part of asyncio's public interface: used only where it exists


@dataclass
class UploadBody:
    params: Params
    spooled: Spooled | None = None
    file_url: str | None = None
    filename: str | None = None
    handled_file: bool = False  # the file part went to an `on_file` hook (chunked uploads)


async def part_chunks(part: BodyPartReader, first: bytes = b"") -> AsyncIterator[bytes]:
    if first:
        yield first
    while data := await part.read_chunk(READ_SIZE):
        yield data


async def file_part_chunks(
    content: StreamReader, reader: MultipartReader, part: BodyPartReader, transport: asyncio.BaseTransport | None = None
) -> AsyncIterator[bytes]:
    """The body of a part of which nothing has been read yet, chunk by chunk, without copies.

    A part with its own Content-Length or Content-Transfer-Encoding (no SDK sends either) goes
    through aiohttp's reader, as would a boundary with a CR in it (HTTP headers cannot carry
    one). Otherwise the body ends at the first CRLF + `--boundary` (RFC 2046), as in aiohttp:
    the rest goes back to the stream and one more `read_chunk` lets aiohttp's reader see its own
    end of part, so the parts after it read as before.
    """
    delimiter = _file_delimiter(reader, part)
    if delimiter is None:
        async for data in part_chunks(part):
            yield data
        return
    content.set_read_chunk_size(STREAM_BUFFER)
    with _larger_socket_reads(transport):
        async for data in _until_delimiter(content, delimiter):
            yield data
    if await part.read_chunk(_SNIFF):  # sees the delimiter at once: the part is at its end
        raise AssertionError("the part reader found data after the delimiter")


def _file_delimiter(reader: MultipartReader, part: BodyPartReader) -> bytes | None:
    """CRLF + `--boundary`, which ends the file part, or None when the part must go through
    aiohttp's reader (a Content-Length or Content-Transfer-Encoding of its own, which no SDK
    sends, or a boundary with a CR in it, which HTTP headers cannot carry)."""
    delimiter = b"\r\n--" + parse_mimetype(reader.headers[hdrs.CONTENT_TYPE]).parameters["boundary"].encode()
    if hdrs.CONTENT_LENGTH in part.headers or hdrs.CONTENT_TRANSFER_ENCODING in part.headers or b"\r" in delimiter[1:]:
        return None
    return delimiter


async def spool_tapped_part(request: web.Request, reader: MultipartReader, part: BodyPartReader, spool: SpoolFile) -> bool:
    """The file part's body into `spool` through http/body_tap.py when the body is large enough;
    False (nothing read) when it is not, or when the part needs aiohttp's reader."""
    delimiter = _file_delimiter(reader, part)
    if delimiter is None or not await spool_tapped(request, delimiter, spool):
        return False
    if await part.read_chunk(_SNIFF):  # sees the delimiter at once: the part is at its end
        raise AssertionError("the part reader found data after the delimiter")
    return True


@contextmanager
def _larger_socket_reads(transport: asyncio.BaseTransport | None) -> Iterator[None]:
    """asyncio's selector transport reads at most `max_size` (256 KiB) per recv(); 1 MiB reads
    cut the event loop's CPU per uploaded GiB by about a tenth. Restored for the connection's
    next request; transports without the attribute (other event loops') are left alone."""
    before = getattr(transport, _MAX_SIZE, None)
    if not isinstance(before, int) or before >= SOCKET_READ:
        yield
        return
    setattr(transport, _MAX_SIZE, SOCKET_READ)
    try:
        yield
    finally:
        setattr(transport, _MAX_SIZE, before)


async def _until_delimiter(content: StreamReader, delimiter: bytes) -> AsyncIterator[bytes]:
    held = b""  # the end of the previous chunk when it may begin a delimiter
    while True:
        chunk, http_chunk_end = await content.readchunk()  # one socket read's bytes, not a join of several
        if not chunk:
            if http_chunk_end:
                continue
            raise BadRequest("Malformed multipart body: the body ended inside the file part")
        if held:
            chunk = held + chunk  # a few bytes, plus one chunk: rare (only when a chunk ends in a prefix of it)
        end = chunk.find(delimiter)
        if end >= 0:
            if end:
                yield chunk[:end]
            with warnings.catch_warnings():  # deprecated, but what aiohttp's own part reader does
                warnings.simplefilter("ignore", DeprecationWarning)
                content.unread_data(chunk[end:])
            return
        keep = delimiter_prefix(chunk, delimiter)
        held = chunk[len(chunk) - keep :] if keep else b""
        if keep < len(chunk):
            yield chunk if not keep else chunk[: len(chunk) - keep]


async def charged(chunks: AsyncIterator[bytes], lease: Lease) -> AsyncIterator[bytes]:
    """A file part sent before the signature: its bytes count against the budget (nothing once
    the lease is settled)."""
    async for data in chunks:
        lease.take(len(data))
        yield data


class _Base64:
    """Base64 arriving in pieces: whitespace dropped, whole quartets decoded (strictly) as they
    complete, the last one padded at the end."""

    def __init__(self) -> None:
        self.pending = b""

    def feed(self, data: bytes) -> bytes:
        self.pending += b"".join(data.split())
        usable = len(self.pending) - len(self.pending) % 4
        decoded, self.pending = self.pending[:usable], self.pending[usable:]
        return _decode(decoded) if decoded else b""

    def end(self) -> bytes:
        return _decode(self.pending + b"=" * (-len(self.pending) % 4)) if self.pending else b""


def _decode(data: bytes) -> bytes:
    try:
        return binascii.a2b_base64(data, strict_mode=True)
    except binascii.Error:
        raise BadRequest("Invalid data URI: bad base64") from None


def _data_uri_payload(head: bytes) -> bytes:
    """What follows the comma of a data URI's first bytes; a 400 unless it is base64."""
    meta, sep, rest = head.partition(b",")
    if not sep or b";base64" not in meta:
        raise BadRequest("Invalid data URI: only base64 data URIs are supported")
    return rest


async def _spool_base64(chunks: AsyncIterator[bytes], spool: SpoolFile) -> None:
    decoder = _Base64()
    async for data in chunks:
        if decoded := decoder.feed(data):
            await spool.write(decoded)
    if decoded := decoder.end():
        await spool.write(decoded)


async def read_multipart(
    request: web.Request,
    new_spool: Callable[[], SpoolFile],
    on_file: Callable[[Params, str | None, AsyncIterator[bytes]], Awaitable[None]] | None = None,
    before_file: Callable[[Params], None] | None = None,
    lease: Lease | None = None,
    spool_bytes: Callable[[bytes, bool], Awaitable[Spooled]] | None = None,
) -> UploadBody:
    """Read every part; `on_file`, when given, consumes the file part's body itself (it gets the
    fields before it, its filename and its chunks).

    `before_file` sees the fields that precede the file part (the SDKs send the file last),
    so a bad signature is refused before a large body is spooled to disk; it settles `lease`
    when it authenticates the request. Until then fields and spooled bytes are charged to it.
    With `spool_bytes` (and no `on_file`) a small body is read whole and split in one pass
    (http/small_body.py), with the same results and errors as the streaming reader.
    """
    own_lease = lease is None
    lease = request.app[UNAUTH_BUDGET].lease() if lease is None else lease
    try:
        if spool_bytes is not None and on_file is None:
            small = await _read_small(request, lease, before_file, spool_bytes)
            if small is not None:
                return small
        telemetry.metrics().upload_bodies.labels("stream").inc()
        return await _read_streaming(request, new_spool, on_file, before_file, lease)
    finally:
        if own_lease:
            lease.settle()


async def _read_small(
    request: web.Request, lease: Lease, before_file: Callable[[Params], None] | None,
    spool_bytes: Callable[[bytes, bool], Awaitable[Spooled]],
) -> UploadBody | None:
    """A small body, read whole (charged whole to `lease` while it is open); None, with nothing
    consumed, when it must stream instead."""
    whole = await small_body.read_whole(request, request.app[CONFIG].small_body_bytes)
    if whole is None:
        return None
    parts = small_body.parts(request, whole)
    if parts is None or not small_body.charge(lease, len(whole)):
        small_body.put_back(request, whole)
        return None
    telemetry.metrics().upload_bodies.labels("small").inc()
    allowance = BodyAllowance(request.app[CONFIG].max_body_bytes, None)  # the lease holds the whole body
    body = UploadBody(params={})
    fields: list[tuple[str, str]] = []  # folded as in `_read_streaming`
    try:
        for part in parts:
            name, data = part.head.name, part.data
            if name != "file":
                allowance.field()
                allowance.charge(len(data))
                fields.append((name or "", field_text(name, data, part.head.charset)))
                continue
            if body.spooled or body.file_url:
                raise BadRequest("More than one file part")
            body.params = drop_blank(merge_pairs(fields))
            if before_file is not None:
                before_file(body.params)
            body.filename = part.head.filename
            if body.filename is None and data[:8].lower().startswith((b"http://", b"https://")):
                allowance.field()
                allowance.charge(max(0, len(data) - _SNIFF))  # the streaming reader charges its first read to the lease
                body.file_url = field_text(name, data, part.head.charset).strip()
                continue
            if body.filename is None and data.startswith(b"data:"):
                data = _data_uri_bytes(data)
            # Not fsynced here: the upload fsyncs it in the worker call that links it (a local
            # primary store), else beside its journal commit (docs/design.md, "Write order").
            body.spooled = await spool_bytes(data, False)
    except BaseException:
        if body.spooled is not None:  # e.g. a second file part: the first one's file goes
            body.spooled.path.unlink(missing_ok=True)
            body.spooled.lock.close()
        raise
    body.params = drop_blank(merge_pairs(fields))
    return body


def _data_uri_bytes(data: bytes) -> bytes:
    """A data URI's bytes, decoded in the pieces the streaming reader sees for a small body."""
    head = _SNIFF + _DATA_URI_MORE
    decoder = _Base64()
    return decoder.feed(_data_uri_payload(data[:head])) + decoder.feed(data[head:]) + decoder.end()


async def _read_streaming(
    request: web.Request,
    new_spool: Callable[[], SpoolFile],
    on_file: Callable[[Params, str | None, AsyncIterator[bytes]], Awaitable[None]] | None,
    before_file: Callable[[Params], None] | None,
    lease: Lease,
) -> UploadBody:
    allowance = BodyAllowance(request.app[CONFIG].max_body_bytes, lease)
    reader = await multipart_reader(request)
    body = UploadBody(params={})
    # Fields are folded into params as a whole (at the file part, and at the end), so indexed
    # keys sent as separate parts (`tags[0]`, `tags[1]`) collect into one list in index order.
    fields: list[tuple[str, str]] = []
    spool: SpoolFile | None = None
    try:
        while (part := await next_part(reader)) is not None:
            name, filename = part_names(part)
            if name != "file":
                fields.append((name or "", await read_field(part, allowance)))
                continue
            if body.spooled or body.file_url or body.handled_file:
                raise BadRequest("More than one file part")
            body.params = drop_blank(merge_pairs(fields))  # the hooks see what the signature covers
            if before_file is not None:
                before_file(body.params)
            if on_file is not None:
                await on_file(body.params, filename, file_part_chunks(request.content, reader, part, request.transport))
                body.handled_file = True
                continue
            body.filename = filename
            first = await part.read_chunk(_SNIFF) if filename is None else b""
            lease.take(len(first))
            if filename is None and first.lower().startswith((b"http://", b"https://")):
                body.file_url = (await read_field(part, allowance, first)).strip()
                continue
            spool = new_spool()
            if filename is None and first.startswith(b"data:"):
                more = await part.read_chunk(_DATA_URI_MORE)
                lease.take(len(more))
                chunks = part_chunks(part, _data_uri_payload(first + more))
                await _spool_base64(charged(chunks, lease) if lease.open else chunks, spool)
            elif filename is not None and not lease.open and await spool_tapped_part(request, reader, part, spool):
                pass  # a large body, received straight into the spool's blocks
            else:
                if filename is None:
                    chunks = part_chunks(part, first)
                else:  # nothing read yet: the fast path
                    chunks = file_part_chunks(request.content, reader, part, request.transport)
                if lease.open:
                    chunks = charged(chunks, lease)
                async for data in chunks:
                    await spool.write(data)
            body.spooled = await spool.finish(sync=False)  # VersionService.upload fsyncs it with its links
    except BaseException:
        if spool is not None:
            spool.discard()
        raise
    body.params = drop_blank(merge_pairs(fields))
    return body
