"""Reading parameters from a request in any of the encodings the SDKs use (spec section 2).

Admin endpoints: query string plus a JSON, form-urlencoded or multipart body, on any method
including DELETE. Bodies are read as they arrive: at most `max_body_bytes` and `MAX_FIELDS`
fields per body, and while the request is not yet authenticated every byte held is charged to
its budget lease (see budget.py). Values the signature leaves out are dropped (params.drop_blank).
"""

import functools
import json
from urllib.parse import parse_qsl

from aiohttp import BodyPartReader, MultipartReader, hdrs, web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.multipart import content_disposition_filename, parse_content_disposition

from versionstore.errors import BadRequest, TooLarge
from versionstore.http.budget import Lease
from versionstore.http.keys import CONFIG
from versionstore.params import Params, drop_blank, merge_json, merge_pairs

#: Fields per body (multipart parts or form pairs): Cloudinary's id lists stop at 1000.
MAX_FIELDS = 2000
#: One multipart field (a remote URL, a context string); the file part is not a field.
FIELD_LIMIT = 64 * 1024
_READ = 64 * 1024


class BodyAllowance:
    """Counts one body's fields and bytes against the per-body caps and the request's lease."""

    def __init__(self, limit: int, lease: Lease | None) -> None:
        self.limit = limit
        self.lease = lease
        self.fields = 0
        self.size = 0

    def field(self) -> None:
        self.fields += 1
        if self.fields > MAX_FIELDS:
            raise BadRequest(f"Too many fields in the request body (maximum is {MAX_FIELDS})")

    def charge(self, size: int) -> None:
        """Bytes the request keeps (in memory or spooled)."""
        self.skip(size)
        if self.lease is not None:
            self.lease.take(size)

    def skip(self, size: int) -> None:
        """Bytes read and dropped: not held, but still bounded."""
        self.size += size
        if self.size > self.limit:
            raise TooLarge(f"Request body too large. Maximum is {self.limit} bytes.")


def decode(data: bytes | bytearray, charset: str, what: str) -> str:
    try:
        return data.decode(charset, errors="strict")
    except LookupError:
        raise BadRequest(f"Unknown charset {charset!r} in {what}") from None
    except UnicodeDecodeError:
        raise BadRequest(f"Invalid {charset} text in {what}") from None


def media_type(request: web.Request) -> str:
    """The request's media type, lower-cased, without parameters: what `request.content_type`
    answers, without aiohttp's e-mail header parser, which caches nothing when every request
    carries a new multipart boundary (docs/performance.md, "Per-request cost of an upload")."""
    return request.headers.get(hdrs.CONTENT_TYPE, "").partition(";")[0].strip().lower() or "application/octet-stream"


def part_names(part: BodyPartReader) -> tuple[str | None, str | None]:
    """A part's (name, filename), as `part.name` and `part.filename` answer them: aiohttp parses
    the Content-Disposition anew for every part of every request (~0.1-0.3 ms each), while the
    SDKs send the same few field headers every time, so the parse is cached per header."""
    return disposition(part.headers.get(hdrs.CONTENT_DISPOSITION))


@functools.lru_cache(maxsize=256)  # bounded: a part header is at most aiohttp's 8 KiB line limit
def disposition(header: str | None) -> tuple[str | None, str | None]:
    """(name, filename) of a Content-Disposition header, parsed as aiohttp parses it."""
    _, params = parse_content_disposition(header)
    return content_disposition_filename(params, "name"), content_disposition_filename(params, "filename")


async def read_field(part: BodyPartReader, allowance: BodyAllowance, first: bytes = b"") -> str:
    allowance.field()
    data = bytearray(first)
    while chunk := await part.read_chunk(8192):
        allowance.charge(len(chunk))
        data += chunk
        if len(data) > FIELD_LIMIT:
            raise _field_too_large(part_names(part)[0])
    return field_text(part_names(part)[0], data, part.get_charset(default="utf-8"))  # part_names is cached


def field_text(name: str | None, data: bytes | bytearray, charset: str) -> str:
    """A whole field's bytes as text, as `read_field` answers (http/small_body.py's parts)."""
    if len(data) > FIELD_LIMIT:
        raise _field_too_large(name)
    try:
        return data.decode(charset)
    except (UnicodeDecodeError, LookupError):
        return decode(data, charset, f"field {name!r}")  # raises the clear error


def _field_too_large(name: str | None) -> BadRequest:
    return BadRequest(f"Field {name!r} is larger than {FIELD_LIMIT} bytes")


async def multipart_reader(request: web.Request) -> MultipartReader:
    try:
        return await request.multipart()
    except (ValueError, AssertionError, HttpProcessingError) as exc:
        raise BadRequest(f"Malformed multipart body: {exc}") from None


async def next_part(reader: MultipartReader) -> BodyPartReader | None:
    try:
        part = await reader.next()
    except (ValueError, HttpProcessingError) as exc:  # e.g. InvalidHeader in a part
        raise BadRequest(f"Malformed multipart body: {exc}") from None
    if part is not None and not isinstance(part, BodyPartReader):
        raise BadRequest("Nested multipart bodies are not supported")
    return part

#: Most values (counted by their `,` and `:` separators) in a JSON body; bounds decoding time.
MAX_JSON_VALUES = 20_000


#: Raw query string -> its parameters (list-free ones only, as items): clients repeat the same
#: few query strings (`versions=true`, a signed download URL used again), and parsing one cost
#: the read path microseconds. Bounded: strings up to _QUERY_CHARS, dropped all at once when
#: _QUERIES is full (a client sending ever new ones only makes it miss).
_QUERY_CACHE: dict[str, tuple[tuple[str, object], ...]] = {}
_QUERIES = 1024
_QUERY_CHARS = 2048


def _query_pairs(request: web.Request) -> Params:
    """`merge_pairs(request.query.items())`, a new dict per call (callers add to it)."""
    raw = request.rel_url.raw_query_string
    known = _QUERY_CACHE.get(raw)
    if known is not None:
        return dict(known)
    params = merge_pairs(request.query.items())
    if len(raw) <= _QUERY_CHARS and not any(isinstance(value, list) for value in params.values()):  # lists are filled in later
        if len(_QUERY_CACHE) >= _QUERIES:
            _QUERY_CACHE.clear()
        _QUERY_CACHE[raw] = tuple(params.items())
    return params


def query_params(request: web.Request) -> Params:
    return drop_blank(_query_pairs(request))


async def _read_all(request: web.Request, allowance: BodyAllowance) -> bytearray:
    data = bytearray()
    while chunk := await request.content.read(_READ):
        allowance.charge(len(chunk))
        data += chunk
    return data


async def _multipart_fields(request: web.Request, allowance: BodyAllowance, params: Params) -> None:
    """Text parts become parameters; file parts are read and ignored (no endpoint here takes one)."""
    reader = await multipart_reader(request)
    while (part := await next_part(reader)) is not None:
        name, filename = part_names(part)
        if filename is None:
            merge_pairs([(name or "", await read_field(part, allowance))], params)
            continue
        while chunk := await part.read_chunk(_READ):
            allowance.skip(len(chunk))


async def admin_params(request: web.Request, lease: Lease | None = None) -> Params:
    params = _query_pairs(request)
    if not request.body_exists:
        return drop_blank(params)
    allowance = BodyAllowance(request.app[CONFIG].max_body_bytes, lease)
    ctype = media_type(request)
    if ctype == "application/json":
        raw = await _read_all(request, allowance)
        if raw.strip():
            if raw.count(b",") + raw.count(b":") > MAX_JSON_VALUES:
                # decoding is GIL-bound: 800k small values take ~0.3 s of the event loop
                raise BadRequest(f"JSON body has too many values (max {MAX_JSON_VALUES})")
            try:
                body = json.loads(raw)
            except (ValueError, RecursionError):  # RecursionError: nesting deeper than the parser's stack
                raise BadRequest("Malformed JSON body") from None
            merge_json(body, params)
    elif ctype == "application/x-www-form-urlencoded":
        text = decode(await _read_all(request, allowance), request.charset or "utf-8", "the form body")
        try:
            pairs = parse_qsl(text, keep_blank_values=True, max_num_fields=MAX_FIELDS)
        except ValueError:
            raise BadRequest(f"Too many fields in the request body (maximum is {MAX_FIELDS})") from None
        merge_pairs(pairs, params)
    elif ctype == "multipart/form-data":
        await _multipart_fields(request, allowance, params)
    else:  # unknown body type: ignore it, parameters may be in the query
        while chunk := await request.content.read(_READ):
            allowance.skip(len(chunk))
    return drop_blank(params)
