"""Signed query strings already checked: a download link fetched again skips its signature.

A signed GET (`download_backup`) carries its whole input in its query string, so whether it
passes `check_signed` is a function of the query string, the purpose and the environment's key
pairs alone, except for the freshness of its timestamp, which depends on the clock. A success
is remembered under exactly those (the string, the purpose, the environment's name, its key,
secret, append-only key and append-only secret); a request with the same string and the same
credentials is then checked for freshness only, by `check_fresh` itself, so a link expires on
the same second as before. A rotated secret, a new append-only key pair or another environment
is another key: a miss, checked in full (and the old entry is never reached again). A deleted
environment never gets here (the dispatcher refuses it first). Failures are never remembered.
Bounded: strings up to _QUERY_CHARS characters, _ENTRIES entries, dropped whole when full.
"""

from collections.abc import Iterable

from aiohttp import web

from versionstore.errors import BadRequest
from versionstore.http import append_only
from versionstore.http.auth import check_fresh, check_signed
from versionstore.http.inputs import query_params
from versionstore.models import Cloud
from versionstore.params import Params

_Key = tuple[str, str, str, str, str, str | None, str | None]
#: -> (the parameters as items, their timestamp, whether the append-only key signed them)
_CHECKED: dict[_Key, tuple[tuple[tuple[str, object], ...], object, bool]] = {}
_ENTRIES = 4096
_QUERY_CHARS = 2048


def signed_query(request: web.Request, cloud: Cloud, *, purpose: str, required: Iterable[str]) -> Params:
    """The request's query parameters, with every name in `required` present and signed for
    `purpose` with one of `cloud`'s key pairs (check_signed); a new dict per call."""
    raw = request.rel_url.raw_query_string
    key = (raw, purpose, cloud.name, cloud.api_key, cloud.api_secret, cloud.append_key, cloud.append_secret)
    known = _CHECKED.get(key)
    if known is not None:
        items, timestamp, by_append_key = known
        check_fresh(timestamp)  # the clock is the one input that moves: checked on every request
        if by_append_key:
            append_only.proved(request)  # the route's policy, as check_signed applies it
        return dict(items)
    params = query_params(request)
    for name in required:
        if not params.get(name):
            raise BadRequest(f"Missing required parameter - {name}")
    by_append_key = check_signed(params, cloud, purpose=purpose, request=request)
    if len(raw) <= _QUERY_CHARS:
        if len(_CHECKED) >= _ENTRIES:
            _CHECKED.clear()
        _CHECKED[key] = (tuple(params.items()), params.get("timestamp"), by_append_key)
    return params
