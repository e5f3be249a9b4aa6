"""The route table: read it to see the whole API.

aiohttp's router matches the raw path segment by segment, but Node sends `resources%2Fsearch`
and `docs%2Fsample`, so we match our own table against the fully percent-decoded path.
First match wins (`.../restore` before `.../<public_id>`).
"""

import re
from collections.abc import Awaitable, Callable

from aiohttp import web

from versionstore.errors import AppendOnlyRefused, NotFound, Unauthorized
from versionstore.http import admin_views as admin
from versionstore.http import append_only, archive_views, drill_views, purge_views, snapshot_views
from versionstore.http import audit_views as audit
from versionstore.http import backup_views as backup
from versionstore.http import library_views as library
from versionstore.http import operations_views as operations
from versionstore.http import upload_views as upload
from versionstore.http.audit_views import record_api
from versionstore.http.auth import check_basic
from versionstore.http.keys import EPOCH, META, RATE_LIMIT, ROUTE, error_response
from versionstore.http.ratelimit import RateLimitExceeded, is_admin_call
from versionstore.models import Cloud

Handler = Callable[[web.Request, Cloud, dict[str, str]], Awaitable[web.StreamResponse]]

RT = r"(?P<rt>image|video|raw|auto)"
ADMIN_RT = r"(?P<rt>image|video|raw)"
TYPE = r"(?P<type>[a-z_]+)"
HEX = r"(?P<asset_id>[0-9a-f]{32})"
FIELD = r"(?P<field>[^/]+)"

ROUTES: list[tuple[str, str, Handler]] = [
    ("GET", r"ping", admin.ping),
    # Upload API (signed parameters or Basic auth)
    ("POST", rf"{RT}/upload", upload.upload),
    ("POST", rf"{RT}/destroy", upload.destroy),
    ("POST", rf"{RT}/rename", upload.rename),
    ("POST", rf"{RT}/explicit", upload.explicit),
    ("POST", rf"{RT}/tags", upload.tags),
    ("POST", rf"{RT}/context", upload.context),
    ("POST", rf"{RT}/metadata", upload.metadata),
    # Signed download of one backed-up version
    ("GET", r"download_backup", admin.download_backup),
    # Admin API (Basic auth)
    ("GET|POST", r"resources/search", admin.search),
    ("GET", r"resources", library.resource_types),
    ("GET", rf"resources/{ADMIN_RT}/tags/(?P<tag>.+)", library.resources_by_tag),
    ("GET", rf"resources/{ADMIN_RT}/context", library.resources_by_context),
    ("GET", rf"tags/{ADMIN_RT}", library.tags),
    ("GET", r"usage", library.usage),
    ("GET", r"usage/(?P<date>[^/]+)", library.usage),
    ("GET", r"config", library.config),
    ("GET|POST", r"metadata_fields", library.metadata_fields),
    ("PUT|DELETE", rf"metadata_fields/{FIELD}/datasource", library.datasource),
    ("POST", rf"metadata_fields/{FIELD}/datasource_restore", library.datasource_restore),
    ("GET|PUT|DELETE", rf"metadata_fields/{FIELD}", library.metadata_field),
    ("GET", r"resources/by_asset_ids", admin.resources_by_asset_ids),
    ("POST", r"resources/restore", admin.restore_by_asset_ids),
    ("DELETE", r"resources", admin.delete_resources_by_asset_ids),
    ("DELETE", rf"resources/backup/{HEX}", admin.delete_backed_up_versions),
    ("GET", rf"resources/{HEX}", admin.resource_by_asset_id),
    ("GET", rf"resources/{ADMIN_RT}", admin.list_resources),
    ("GET", rf"resources/{ADMIN_RT}/{TYPE}", admin.list_resources),
    ("DELETE", rf"resources/{ADMIN_RT}/{TYPE}", admin.delete_resources),
    ("POST", rf"resources/{ADMIN_RT}/{TYPE}/restore", admin.restore),
    ("GET", rf"resources/{ADMIN_RT}/{TYPE}/(?P<public_id>.+)", admin.resource),
    ("POST|PUT", rf"resources/{ADMIN_RT}/{TYPE}/(?P<public_id>.+)", admin.update),
    # Initial backup of existing assets (durable jobs)
    ("POST|GET", r"operations/initial_backup", operations.initial_backups),
    ("GET", r"operations/initial_backup/(?P<job_id>[^/]+)", operations.one),
    # versionstore extensions (docs/api.md, versionstore/openapi.yaml)
    ("GET|PUT|POST", r"versionstore/settings", admin.settings),
    ("GET|PUT|POST|DELETE", r"versionstore/backup", backup.backup),
    ("GET", r"versionstore/jobs/(?P<job_id>[0-9a-f]{32})", backup.job),
    ("GET", r"versionstore/audit", audit.audit),
    ("GET", r"versionstore/purges", purge_views.purges),
    *snapshot_views.ROUTES,  # snapshots, their schedule and retention, point-in-time restore
    *drill_views.ROUTES,  # restore drills, their schedule, failure alerts
    *archive_views.ROUTES,  # archives: export as a tar, import, the signed download
]


def add_console(app: web.Application) -> None:
    """The support console's pages under /console/ (versionstore/http/console_views.py)."""
    from versionstore.http import console_views

    console_views.setup(app)


_COMPILED = [(set(methods.split("|")), re.compile(pattern + r"$", re.S), handler) for methods, pattern, handler in ROUTES]
_PREFIX = re.compile(r"^/v1_1/(?P<cloud>[^/]+)/(?P<rest>.*)$", re.S)


def _first_segments(pattern: str) -> list[str]:
    """The literal first path segments a route pattern can match: `resources/...` -> resources,
    `(?P<rt>image|video|raw|auto)/upload` -> image, video, raw, auto."""
    alternation = re.match(r"\(\?P<\w+>([\w|]+)\)(?:/|$)", pattern)
    if alternation:
        return alternation[1].split("|")
    literal = re.match(r"(\w+)(?:/|$)", pattern)
    assert literal is not None, f"route {pattern!r} must start with a literal segment or an alternation"
    return [literal[1]]


def canonical(pattern: str) -> str:
    """A route's path with its groups as `{name}`: a bounded label for metrics and logs."""
    return "/v1_1/{cloud_name}/" + re.sub(r"\(\?P<(\w+)>[^)]*\)", lambda m: f"{{{m[1]}}}", pattern)


# The table indexed by first segment, in table order: a request tries the few routes that can
# match instead of every pattern (a `resources/...` call walked ~38 regexes before this); and by
# first segment and method, which is what an answered request walks (the first route in table
# order that matches and takes the method answers). The first index only decides between "not
# found" and "method not supported".
_Route = tuple[set[str], re.Pattern[str], Handler, str]
_BY_FIRST: dict[str, list[_Route]] = {}
_BY_METHOD: dict[tuple[str, str], list[_Route]] = {}
for _route, (_methods, _compiled, _handler) in zip(ROUTES, _COMPILED, strict=True):
    for _segment in _first_segments(_route[1]):
        _BY_FIRST.setdefault(_segment, []).append((_methods, _compiled, _handler, canonical(_route[1])))
        for _method in _methods:
            _BY_METHOD.setdefault((_segment, _method), []).append(_BY_FIRST[_segment][-1])


def _answering(first: str, method: str, rest: str) -> tuple[_Route, re.Match[str]] | None:
    """The first route in table order that matches `rest` and takes `method`, and its match."""
    for entry in _BY_METHOD.get((first, method), ()):
        if (found := entry[1].match(rest)) is not None:
            return entry, found
    return None


#: (method, decoded path) -> what answers it: (cloud name, handler, route, groups, the route's
#: append-only policy, whether it is an Admin API call).
#: Clients repeat the same few paths (an SDK's reads, a signed download), and the prefix match,
#: the split and the walk over the route patterns cost several microseconds a request. Bounded:
#: only paths up to _RESOLVED_PATH characters, and the whole map is dropped when it is full (a
#: client sending ever new paths only makes it miss).
_Resolved = tuple[str, Handler, str, dict[str, str], str, bool]
_RESOLVED: dict[tuple[str, str], _Resolved] = {}
_RESOLVED_MAX = 4096
_RESOLVED_PATH = 512


def _resolve(request: web.Request) -> _Resolved:
    """The route answering the request (NotFound when none does), noted in _RESOLVED."""
    match = _PREFIX.match(request.path)  # request.path is fully percent-decoded
    if match is None:
        raise NotFound("Not found")
    rest = match["rest"]
    first = rest.split("/", 1)[0]
    answering = _answering(first, request.method, rest)
    if answering is None:
        matching = [route for _, pattern, _, route in _BY_FIRST.get(first, ()) if pattern.match(rest)]
        if matching:
            request[ROUTE] = matching[-1]  # the metrics label the old full walk gave a refused method
        raise NotFound("Method not supported for this path" if matching else f"Not found - {rest}")
    (_, _, handler, route), found = answering
    groups = {k: v for k, v in found.groupdict().items() if v is not None}
    resolved = (match["cloud"], handler, route, groups, append_only.policy(request.method, route), is_admin_call(rest))
    if len(request.path) <= _RESOLVED_PATH:
        if len(_RESOLVED) >= _RESOLVED_MAX:
            _RESOLVED.clear()
        _RESOLVED[(request.method, request.path)] = resolved
    return resolved


async def dispatch(request: web.Request) -> web.StreamResponse:
    cloud_name, handler, route, groups, policy, admin_call = _RESOLVED.get((request.method, request.path)) or _resolve(request)
    request[ROUTE] = route
    request[append_only.POLICY] = policy
    meta = request.app[META]
    epoch = request[EPOCH] = meta.commit_epoch()
    cloud = await meta.get_cloud(cloud_name, epoch)
    if cloud is None:
        raise Unauthorized(f"Invalid cloud_name {cloud_name}")
    try:
        if not admin_call:
            return await handler(request, cloud, dict(groups))
        return await _rate_limited(request, cloud, handler, dict(groups))
    except AppendOnlyRefused as refused:
        await record_api(request, cloud, "append_only_refused", route, outcome="refused",
                         detail={"method": request.method, "error": refused.message}, key=cloud.append_key)
        raise


async def _rate_limited(request: web.Request, cloud: Cloud, handler: Handler, groups: dict[str, str]) -> web.StreamResponse:
    """An Admin API call: authenticated first (a stranger must not spend the environment's
    quota), counted, and answered with Cloudinary's rate-limit headers (ratelimit.py)."""
    check_basic(request, cloud)
    try:
        headers = request.app[RATE_LIMIT].hit(cloud.name)
    except RateLimitExceeded as exc:
        refused = error_response(exc.status, exc.message)
        refused.headers.update(exc.headers)
        return refused
    response = await handler(request, cloud, groups)
    if not response.prepared:
        response.headers.update(headers)
    return response
