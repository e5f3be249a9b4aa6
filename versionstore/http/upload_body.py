"""Streaming reader for Upload API bodies: fields into params, the file into a spool file.

The file part is never held in memory: it is written block by block while BLAKE3 hashes it.
A `file` field without a filename may be a data URI (decoded as it streams) or an http(s) URL
(fetched later, only after the request is authenticated).
"""

import binascii
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError

from versionstore.errors import BadRequest
from versionstore.params import Params, merge_pairs
from versionstore.spool import Spooled, SpoolFile

FIELD_LIMIT = 64 * 1024
READ_SIZE = 256 * 1024
_SNIFF = 8192  # aiohttp asserts read_chunk(size) >= boundary length + 2 on parts without Content-Length


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


async def _read_field(part: BodyPartReader) -> str:
    data = bytearray()
    while chunk := await part.read_chunk(8192):
        data += chunk
        if len(data) > FIELD_LIMIT:
            raise BadRequest(f"Field {part.name!r} is larger than {FIELD_LIMIT} bytes")
    return data.decode(part.get_charset(default="utf-8"), errors="strict")


async def _spool_base64(chunks: AsyncIterator[bytes], spool: SpoolFile) -> None:
    pending = b""
    async for data in chunks:
        pending += b"".join(data.split())
        usable = len(pending) - len(pending) % 4
        if usable:
            await spool.write(binascii.a2b_base64(pending[:usable], strict_mode=True))
            pending = pending[usable:]
    if pending:
        await spool.write(binascii.a2b_base64(pending + b"=" * (-len(pending) % 4)))


async def read_multipart(
    request: web.Request,
    new_spool: Callable[[], SpoolFile],
    on_file: Callable[[Params, BodyPartReader], Awaitable[None]] | None = None,
    before_file: Callable[[Params], None] | None = None,
) -> UploadBody:
    """Read every part; `on_file`, when given, consumes the file part itself.

    `before_file` sees the fields that precede the file part (the SDKs send the file last),
    so a bad signature is refused before a large body is spooled to disk.
    """
    try:
        reader = await request.multipart()
    except (ValueError, AssertionError, HttpProcessingError) as exc:
        raise BadRequest(f"Malformed multipart body: {exc}") from None
    body = UploadBody(params={})
    spool: SpoolFile | None = None
    try:
        while True:
            try:
                part = await reader.next()
            except (ValueError, HttpProcessingError) as exc:  # e.g. InvalidHeader in a part
                raise BadRequest(f"Malformed multipart body: {exc}") from None
            if part is None:
                break
            if not isinstance(part, BodyPartReader):
                raise BadRequest("Nested multipart bodies are not supported")
            if part.name != "file":
                merge_pairs([(part.name or "", await _read_field(part))], body.params)
                continue
            if body.spooled or body.file_url or body.handled_file:
                raise BadRequest("More than one file part")
            if before_file is not None:
                before_file(body.params)
            if on_file is not None:
                await on_file(body.params, part)
                body.handled_file = True
                continue
            body.filename = part.filename
            first = await part.read_chunk(_SNIFF) if part.filename is None else b""
            if part.filename is None and first.lower().startswith((b"http://", b"https://")):
                body.file_url = (first.decode() + await _read_field(part)).strip()
                continue
            spool = new_spool()
            if part.filename is None and first.startswith(b"data:"):
                head = first + await part.read_chunk(1024)
                meta, sep, rest = head.partition(b",")
                if not sep or b";base64" not in meta:
                    raise BadRequest("Invalid data URI: only base64 data URIs are supported")
                await _spool_base64(part_chunks(part, rest), spool)
            else:
                async for data in part_chunks(part, first):
                    await spool.write(data)
            body.spooled = await spool.finish(sync=False)  # VersionService.upload overlaps the fsync
    except BaseException:
        if spool is not None:
            spool.discard()
        raise
    return body
