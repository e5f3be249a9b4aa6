"""Who is calling: Basic auth (Admin API, also accepted on uploads) and signed parameters.

A product environment's credentials only open that environment; a key of another one is
refused like a wrong key (401), without saying which environment it belongs to. Its
append-only key pair (protection.py) is accepted too, under the route's policy (append_only.py).
"""

import base64
import binascii
import hmac
import time
from functools import lru_cache

from aiohttp import web

from versionstore import signing
from versionstore.errors import BadRequest, Unauthorized
from versionstore.http import append_only as append_only_key
from versionstore.http.budget import Lease
from versionstore.http.keys import UNAUTH_BUDGET
from versionstore.models import Cloud
from versionstore.params import Params
from versionstore.purposes import check_purpose

MAX_AGE = 3600
MAX_SKEW = 300


def basic_credentials(request: web.Request) -> tuple[str, str] | None:
    header = request.headers.get("Authorization", "")
    if not header.lower().startswith("basic "):
        return None
    return _decoded(header)


@lru_cache(maxsize=64)
def _decoded(header: str) -> tuple[str, str]:
    """(key, secret) of a Basic header: a client sends the same one on every request, and the
    validating base64 decode showed in profiles. Only the parse is reused, never a verdict."""
    try:
        decoded = base64.b64decode(header[6:].strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        raise Unauthorized("Invalid Authorization header") from None
    key, sep, secret = decoded.partition(":")
    if not sep:
        raise Unauthorized("Invalid Authorization header")
    return key, secret


#: Request key: the environment whose Basic credentials this request already proved (an Admin
#: call is checked by the rate limiter and again by its handler; the second check is free).
_BASIC_OK = web.RequestKey("basic_ok", str)


def check_basic(request: web.Request, cloud: Cloud) -> None:
    if request.get(_BASIC_OK) == cloud.name:
        return
    credentials = basic_credentials(request)
    if credentials is None:
        raise Unauthorized("Must supply api_key")
    key, secret = credentials
    expected, append_only = _secret_for(cloud, key)
    if not hmac.compare_digest(secret, expected):
        raise Unauthorized("api_secret mismatch")
    if append_only:
        append_only_key.proved(request)
    request[_BASIC_OK] = cloud.name


def _secret_for(cloud: Cloud, key: str) -> tuple[str, bool]:
    """The secret of the key pair `key` names (main or append-only), and whether it is the
    append-only one; Unauthorized for any other key."""
    given = key.encode()  # bytes: compare_digest refuses non-ASCII str (a 500 otherwise)
    if hmac.compare_digest(given, cloud.api_key.encode()):
        return cloud.api_secret, False
    if cloud.append_key is not None and cloud.append_secret is not None and hmac.compare_digest(given, cloud.append_key.encode()):
        return cloud.append_secret, True
    raise Unauthorized(f"Invalid api_key {key}")


def check_signed(
    params: Params, cloud: Cloud, *, purpose: str, optional_skip: bool = False, request: web.Request | None = None
) -> bool:
    """Signed parameters: api_key, a fresh timestamp and a signature over the rest, carrying
    nothing that belongs to another purpose (purposes.py). The one check for every signed
    endpoint, download_backup included. Signed with the append-only key, the request's route
    policy applies (append_only.py); without `request` (an early check before the body is
    read) the final check_upload_auth applies it. True when the append-only key signed."""
    api_key = params.get("api_key")
    if not api_key:
        raise Unauthorized("Must supply api_key")
    secret, append_only = _secret_for(cloud, str(api_key))
    check_fresh(params.get("timestamp"))
    signature = str(params.get("signature") or "")
    if not signature:
        raise BadRequest("Missing required parameter - signature")
    check_purpose(purpose, params)
    ok, to_sign = signing.verify(params, secret, signature, optional_skip=optional_skip)
    if not ok:
        raise Unauthorized(f"Invalid Signature {signature}. String to sign - '{to_sign}'.")
    if append_only and request is not None:
        append_only_key.proved(request)
    return append_only


def check_fresh(timestamp: object) -> None:
    if timestamp in (None, ""):
        raise BadRequest("Missing required parameter - timestamp")
    try:
        value = int(str(timestamp))
    except ValueError:
        raise BadRequest(f"Invalid timestamp - {timestamp}") from None
    now = time.time()
    if value < now - MAX_AGE:
        raise BadRequest(f"Stale request - reported time is {value} which is more than 1 hour ago")
    if value > now + MAX_SKEW:
        raise Unauthorized("Request timestamp expired")


def check_upload_auth(
    request: web.Request, params: Params, cloud: Cloud, *, purpose: str = "upload", optional_skip: bool = False
) -> None:
    """Upload API: Basic auth when the header is there, signed parameters otherwise."""
    if basic_credentials(request) is not None:
        check_basic(request, cloud)
    else:
        check_signed(params, cloud, purpose=purpose, optional_skip=optional_skip, request=request)


def pre_auth_lease(request: web.Request, cloud: Cloud) -> Lease:
    """The request's share of the unauthenticated budget (budget.py), already settled when it
    carries valid Basic credentials; the caller settles it once the signature is checked."""
    lease = request.app[UNAUTH_BUDGET].lease()
    if basic_credentials(request) is not None:
        check_basic(request, cloud)
        lease.settle()
    return lease
