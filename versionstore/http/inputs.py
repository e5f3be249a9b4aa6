"""Reading parameters from a request in any of the encodings the SDKs use (spec section 2).

Admin endpoints: query string plus a JSON, form-urlencoded or multipart body, on any method
including DELETE. Bodies here are small; aiohttp's client_max_size bounds them.
"""

import json

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from versionstore.errors import BadRequest
from versionstore.params import Params, merge_json, merge_pairs

#: Most values (counted by their `,` and `:` separators) in a JSON body; bounds decoding time.
MAX_JSON_VALUES = 20_000


def query_params(request: web.Request) -> Params:
    return merge_pairs(request.query.items())


async def admin_params(request: web.Request) -> Params:
    params = query_params(request)
    if not request.body_exists:
        return params
    ctype = request.content_type
    if ctype == "application/json":
        raw = await request.read()
        if raw.strip():
            if raw.count(b",") + raw.count(b":") > MAX_JSON_VALUES:
                # decoding is GIL-bound: 800k small values take ~0.3 s of the event loop
                raise BadRequest(f"JSON body has too many values (max {MAX_JSON_VALUES})")
            try:
                body = json.loads(raw)
            except (ValueError, RecursionError):  # RecursionError: nesting deeper than the parser's stack
                raise BadRequest("Malformed JSON body") from None
            merge_json(body, params)
    elif ctype in ("application/x-www-form-urlencoded", "multipart/form-data"):
        try:
            form = await request.post()
        except (ValueError, HttpProcessingError) as exc:  # e.g. InvalidHeader in a part
            raise BadRequest(f"Malformed {ctype} body: {exc}") from None
        merge_pairs(((k, v) for k, v in form.items() if isinstance(v, str)), params)
    else:
        await request.read()  # unknown body type: ignore it, parameters may be in the query
    return params
