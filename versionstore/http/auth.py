"""Who is calling: Basic auth (Admin API, also accepted on uploads) and signed parameters.

A product environment's credentials only open that environment; a key of another one is
refused like a wrong key (401), without saying which environment it belongs to.
"""

import base64
import binascii
import hmac
import time

from aiohttp import web

from versionstore import signing
from versionstore.errors import BadRequest, Unauthorized
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
    if not hmac.compare_digest(key, cloud.api_key):
        raise Unauthorized(f"Invalid api_key {key}")
    if not hmac.compare_digest(secret, cloud.api_secret):
        raise Unauthorized("api_secret mismatch")
    request[_BASIC_OK] = cloud.name


def check_signed(params: Params, cloud: Cloud, *, purpose: str, optional_skip: bool = False) -> None:
    """Signed parameters: api_key, a fresh timestamp and a signature over the rest, carrying
    nothing that belongs to another purpose (purposes.py). The one check for every signed
    endpoint, download_backup included."""
    api_key = params.get("api_key")
    if not api_key:
        raise Unauthorized("Must supply api_key")
    if not hmac.compare_digest(str(api_key).encode(), cloud.api_key.encode()):  # str: ASCII only (a 500 otherwise)
        raise Unauthorized(f"Invalid api_key {api_key}")
    check_fresh(params.get("timestamp"))
    signature = str(params.get("signature") or "")
    if not signature:
        raise BadRequest("Missing required parameter - signature")
    check_purpose(purpose, params)
    ok, to_sign = signing.verify(params, cloud.api_secret, signature, optional_skip=optional_skip)
    if not ok:
        raise Unauthorized(f"Invalid Signature {signature}. String to sign - '{to_sign}'.")


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
        check_signed(params, cloud, purpose=purpose, optional_skip=optional_skip)


def pre_auth_lease(request: web.Request, cloud: Cloud) -> Lease:
    """The request's share of the unauthenticated budget (budget.py), already settled when it
    carries valid Basic credentials; the caller settles it once the signature is checked."""
    lease = request.app[UNAUTH_BUDGET].lease()
    if basic_credentials(request) is not None:
        check_basic(request, cloud)
        lease.settle()
    return lease
