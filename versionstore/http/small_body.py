"""Small multipart bodies, read whole and split in one pass with bytes operations.

Most uploads are small images, and for them aiohttp's `MultipartReader` was a third of the
event loop's CPU per upload: a `readline` per header line, a header parser and a part reader
per part, about 200 µs per part (docs/performance.md, "Per-upload cost of small files"). A body
of at most `Config.small_body_bytes` (by its Content-Length, or read that far when it is
chunked) is read at once instead and cut at its delimiters with `bytes.find`; each part's
header block goes through aiohttp's own header parser, cached per block, since the SDKs send
the same field headers every time. The file part's block differs per upload (its filename):
a filename of plain characters is cut out and the rest of the block parsed (and cached) with a
placeholder in its place (`_FILE_PART`).

Only bodies this module is sure aiohttp reads the same way take this path: `parts` answers
None for anything else (a preamble or epilogue, a part header other than Content-Disposition
and Content-Type, a nested multipart, a `_charset_` part, a bare CR or LF in a header block,
a boundary aiohttp refuses, ...), and the caller puts the bytes back (`put_back`) and streams
the body as before, so malformed input gets exactly the streaming path's error.
"""

import asyncio
import functools
import re
import warnings
from dataclasses import dataclass

from aiohttp import hdrs, web
from aiohttp.helpers import parse_mimetype
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.http_parser import HeadersParser

from versionstore.errors import ApiError
from versionstore.http.budget import Lease
from versionstore.http.inputs import disposition

#: What `Config.small_body_bytes` defaults to (256 KiB): a 100 KiB image and its fields with
#: room to spare, and the size of one socket read of asyncio's transport (so such a body has
#: usually arrived whole by the time the handler runs). Bounded memory: at most this much per
#: request, and while the request is not authenticated it is charged to its budget lease
#: (budget.py) like any field; larger bodies stream, where the per-part cost is small beside
#: the cost per byte.
SMALL_BODY = 256 << 10
_HEADER_BLOCK = 8190  # aiohttp's longest part header line: a longer block goes to aiohttp
_BOUNDARY = 70  # RFC 2046's longest boundary, which aiohttp enforces
_ALLOWED = frozenset({"content-disposition", "content-type"})
#: The file part's Content-Disposition as the SDKs and the batch client send it, with a quoted
#: filename of printable ASCII other than `"`, `\`, `/` and `;`: aiohttp's parser gives back
#: exactly those characters (it strips a leading `/` or `\`, unescapes `\`), so the filename
#: can be cut out and the rest of the block parsed, from the cache, with `_PLACEHOLDER` in its
#: place. Anything else (other names, quoting, `filename*`, non-ASCII) is parsed whole.
_FILE_PART = re.compile(rb'Content-Disposition: form-data; name="file"; filename="([ !#-.0-:<-\[\]-~]{1,255})"(?=\r\n|\Z)')
_PLACEHOLDER = b"f"


@dataclass(frozen=True)
class PartHead:
    name: str | None
    filename: str | None
    charset: str  # a field's text encoding, as aiohttp's `BodyPartReader.get_charset("utf-8")`


@dataclass(frozen=True)
class Part:
    head: PartHead
    data: bytes


async def read_whole(request: web.Request, limit: int) -> bytes | None:
    """The whole body when it is at most `limit` bytes and has no content coding; None (nothing
    consumed) otherwise. A body with a Content-Length is judged by it; a chunked one (the
    Node SDK sends every upload chunked) is read up to `limit` + 1 bytes and, when it turns out
    longer, put back to stream."""
    length = request.content_length
    if limit <= 0 or hdrs.CONTENT_ENCODING in request.headers or (length is not None and not 0 < length <= limit):
        return None
    if length is None:
        return await _read_chunked(request, limit) if request.headers.get(hdrs.TRANSFER_ENCODING, "").lower() == "chunked" else None
    try:
        return await request.content.readexactly(length)
    except asyncio.IncompleteReadError as short:  # the client stopped sending: the stream says so
        put_back(request, short.partial)
        return None


async def _read_chunked(request: web.Request, limit: int) -> bytes | None:
    held: list[bytes] = []
    size = 0
    while size <= limit and (data := await request.content.read(limit + 1 - size)):
        held.append(data)
        size += len(data)
    whole = b"".join(held)
    if size > limit or not whole:
        put_back(request, whole)
        return None
    return whole


def put_back(request: web.Request, data: bytes) -> None:
    """Return the bytes `read_whole` took, so the streaming reader starts from the beginning."""
    with warnings.catch_warnings():  # deprecated, but what aiohttp's own part reader does
        warnings.simplefilter("ignore", DeprecationWarning)
        request.content.unread_data(data)


def charge(lease: Lease, size: int) -> bool:
    """Charge the body to the request's lease; False when it does not fit now (then the body
    streams, and the streaming path charges and refuses exactly as before)."""
    try:
        lease.take(size)
    except ApiError:
        return False
    return True


def parts(request: web.Request, body: bytes) -> list[Part] | None:
    """The body's parts, in order, or None when the streaming reader must read it."""
    boundary = _boundary(request.headers.get(hdrs.CONTENT_TYPE, ""))
    if boundary is None:
        return None
    dash = b"--" + boundary
    delimiter = b"\r\n" + dash
    if not body.startswith(dash + b"\r\n"):
        return None
    found: list[Part] = []
    pos = len(dash) + 2
    while True:
        head_end = body.find(b"\r\n\r\n", pos)
        if head_end <= pos or head_end - pos > _HEADER_BLOCK:  # none, an empty header block, or a long one
            return None
        head = _part_head(body[pos:head_end])
        start = head_end + 4
        # Searched from the blank line's CRLF, as aiohttp's part reader does; a delimiter that
        # overlaps that CRLF (a body of zero bytes without its own CRLF) is left to aiohttp.
        end = body.find(delimiter, start - 2)
        if head is None or end < start:
            return None
        found.append(Part(head, body[start:end]))
        pos = end + len(delimiter)
        after = body[pos : pos + 2]
        if after == b"\r\n":
            pos += 2
            continue
        if after == b"--" and body[pos + 2 :] in (b"", b"\r\n"):
            return found
        return None


@functools.lru_cache(maxsize=64)
def _boundary(content_type: str) -> bytes | None:
    """The boundary aiohttp's MultipartReader would use, or None when it would not accept it
    (or it could not end a CRLF-delimited line). Cached: a client may reuse its boundary."""
    boundary = parse_mimetype(content_type).parameters.get("boundary")
    if not boundary or len(boundary) > _BOUNDARY or "\r" in boundary or "\n" in boundary:
        return None
    return boundary.encode()


def _part_head(block: bytes) -> PartHead | None:
    """One part's header block as aiohttp's parser reads it, or None when the streaming reader
    must read the part. A file part's plain filename is cut out first, so its block is a cache
    hit too (a miss, the whole parse, was 5 % of the event loop per upload: docs/performance.md)."""
    found = _FILE_PART.match(block)
    if found is None:
        return _parsed_head(block)
    head = _parsed_head(block[: found.start(1)] + _PLACEHOLDER + block[found.end(1) :])
    return None if head is None else PartHead(head.name, found.group(1).decode("ascii"), head.charset)


@functools.lru_cache(maxsize=256)  # bounded: each block is at most _HEADER_BLOCK bytes
def _parsed_head(block: bytes) -> PartHead | None:
    """One part's header block parsed by aiohttp's parser, or None when the streaming reader
    must read the part: the SDKs send the same field blocks every time, so most are cached."""
    lines = block.split(b"\r\n")
    if any(b"\r" in line or b"\n" in line for line in lines):
        return None
    try:
        headers, _ = HeadersParser(max_field_size=_HEADER_BLOCK).parse_headers([*lines, b""])
    except (ValueError, HttpProcessingError):
        return None
    if len(headers) != len({key.lower() for key in headers}) or not _ALLOWED.issuperset(key.lower() for key in headers):
        return None
    mimetype = parse_mimetype(headers.get(hdrs.CONTENT_TYPE, ""))
    if mimetype.type == "multipart":
        return None
    name, filename = disposition(headers.get(hdrs.CONTENT_DISPOSITION))
    if name == "_charset_" or hdrs.CONTENT_DISPOSITION not in headers:
        return None
    return PartHead(name, filename, mimetype.parameters.get("charset", "utf-8"))
