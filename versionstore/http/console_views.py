"""The support console under /console/: server-rendered pages over the console domain
(versionstore/console/) and VersionService; never the Admin API over HTTP.

Every response carries a strict Content-Security-Policy (no inline script or style), frame
and sniffing protection; every POST needs the session's CSRF token (403 without); revision
bytes never reach a page: previews are PNGs the server made, downloads are attachments.
"""

import hmac
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from typing import Any
from urllib.parse import urlencode

import aiohttp_jinja2
import jinja2
from aiohttp import web

from versionstore import archives, drills, ids, initial_backup, migration, pitr, protection, signing, verify
from versionstore.console import bulk_restore
from versionstore.console import find as finding
from versionstore.console.actions import ConsoleActions, actor, require
from versionstore.console.audit import AuditLog
from versionstore.console.previews import NoPreview, Previews, previewable_format
from versionstore.console.records import ConsoleSession, StaffMember
from versionstore.console.sessions import Sessions, csrf_ok
from versionstore.console.staff import SignInRefused, StaffAccounts
from versionstore.disk_space import space_report
from versionstore.errors import ApiError, BadRequest, Forbidden, NotFound
from versionstore.http.keys import CONFIG, JOBS, META, SERVICE
from versionstore.models import Cloud

PREFIX = "/console"
SESSION_COOKIE = "vs_console"
LOGIN_CSRF_COOKIE = "vs_login_csrf"
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; object-src 'none'; "
    "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cross-Origin-Opener-Policy": "same-origin",
}
#: Paths reachable without a session.
_PUBLIC = {f"{PREFIX}/login", f"{PREFIX}/static/console.css"}


@dataclass
class Console:
    """What the pages share, built on first use (the metadata store opens at start-up)."""

    staff: StaffAccounts
    sessions: Sessions
    audit: AuditLog
    actions: ConsoleActions
    previews: Previews


STATE = web.AppKey("console_state", dict)
MEMBER = web.RequestKey("console_member", StaffMember)
SESSION = web.RequestKey("console_session", ConsoleSession)


def _console(request: web.Request) -> Console:
    state: dict[str, Console] = request.app[STATE]
    if "console" not in state:
        meta, service = request.config_dict[META], request.config_dict[SERVICE]
        audit = AuditLog(meta)
        state["console"] = Console(StaffAccounts(meta), Sessions(meta), audit, ConsoleActions(service, audit), Previews(service))
    return state["console"]


def _address(request: web.Request) -> str:
    return request.remote or "unknown"


def _member(request: web.Request) -> StaffMember:
    return request[MEMBER]


# --- middlewares -------------------------------------------------------------------------------


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def security_headers(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Headers on every console response, errors included; errors become an HTML page."""
    response: web.StreamResponse
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        response = _error_page(request, exc.status, exc.reason) if exc.status >= 400 else exc
    except ApiError as exc:
        response = _error_page(request, exc.status, exc.message)
    response.headers.update(SECURITY_HEADERS)
    if request.path != f"{PREFIX}/static/console.css":
        response.headers.setdefault("Cache-Control", "no-store")
    if isinstance(response, web.HTTPException):
        raise response
    return response


@web.middleware
async def signed_in(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A live session for every page but sign-in; the CSRF token on every POST."""
    if request.path in _PUBLIC:
        return await handler(request)
    found = await _console(request).sessions.resolve(request.cookies.get(SESSION_COOKIE))
    if found is None:
        if request.method == "POST":
            raise Forbidden("Not signed in (or the session expired)")
        raise web.HTTPSeeOther(f"{PREFIX}/login?" + urlencode({"next": request.path_qs}))
    request[SESSION], request[MEMBER] = found[0], found[1]
    if request.method == "POST":
        form = await request.post()
        if not csrf_ok(found[0], form.get("csrf_token")):
            raise Forbidden("Missing or wrong CSRF token")
    return await handler(request)


def _error_page(request: web.Request, status: int, message: str) -> web.Response:
    return aiohttp_jinja2.render_template(
        "error.html", request, {"status": status, "message": message, **_base(request)}, status=status
    )


def _base(request: web.Request) -> dict[str, Any]:
    """What the layout needs: the member, the CSRF token, the environments they may see."""
    session: ConsoleSession | None = request.get(SESSION)
    member: StaffMember | None = request.get(MEMBER)
    return {
        "member": member, "csrf": session.csrf_token if session else "", "prefix": PREFIX,
        "cloud_name": request.match_info.get("cloud"),
    }


async def _cloud(request: web.Request, role: str = "viewer") -> Cloud:
    name = request.match_info["cloud"]
    require(_member(request), name, role)
    cloud = await request.config_dict[META].get_cloud(name)
    if cloud is None:
        raise NotFound(f"No product environment {name}")
    return cloud


def _page(name: str, request: web.Request, context: dict[str, Any], status: int = 200) -> web.Response:
    return aiohttp_jinja2.render_template(name, request, {**_base(request), **context}, status=status)


# --- sign in and out ---------------------------------------------------------------------------


def _safe_next(target: str | None) -> str:
    """Only a console path (never another host) after sign-in."""
    if target and target.startswith(f"{PREFIX}/") and not target.startswith("//") and "\\" not in target:
        return target
    return f"{PREFIX}/"


def _set_cookie(request: web.Request, response: web.StreamResponse, name: str, value: str, max_age: int | None) -> None:
    response.set_cookie(name, value, path=PREFIX, httponly=True, samesite="Lax", secure=request.secure, max_age=max_age)


async def login_form(request: web.Request) -> web.Response:
    token = request.cookies.get(LOGIN_CSRF_COOKIE) or ids.new_hex_id()
    response = _page("login.html", request, {"login_csrf": token, "next": _safe_next(request.query.get("next")), "error": None})
    _set_cookie(request, response, LOGIN_CSRF_COOKIE, token, None)
    return response


async def login(request: web.Request) -> web.StreamResponse:
    form = await request.post()
    token = request.cookies.get(LOGIN_CSRF_COOKIE)
    submitted = form.get("csrf_token")
    if not token or not isinstance(submitted, str) or not hmac.compare_digest(submitted.encode(), token.encode()):
        raise Forbidden("Missing or wrong CSRF token")
    console = _console(request)
    email, password = str(form.get("email") or ""), str(form.get("password") or "")
    address = _address(request)
    try:
        member = await console.staff.authenticate(email, password, address)
    except SignInRefused as refused:
        await console.audit.record(f"staff:{email.strip().lower()[:254]}", "sign_in", address=address, outcome="failed",
                                   detail={"reason": refused.reason})
        status = 429 if refused.reason in ("locked", "address_limited") else 401
        return _page("login.html", request, {"login_csrf": token, "next": _safe_next(str(form.get("next") or "")),
                                             "error": refused.message, "email": email}, status=status)
    cookie, _session = await console.sessions.start(member, address)
    await console.audit.record(actor(member), "sign_in", address=address)
    response = web.HTTPSeeOther(_safe_next(str(form.get("next") or "")))
    _set_cookie(request, response, SESSION_COOKIE, cookie, None)
    response.del_cookie(LOGIN_CSRF_COOKIE, path=PREFIX)
    raise response


async def logout(request: web.Request) -> web.StreamResponse:
    console = _console(request)
    await console.sessions.end(request.cookies.get(SESSION_COOKIE))
    await console.audit.record(actor(_member(request)), "sign_out", address=_address(request))
    response = web.HTTPSeeOther(f"{PREFIX}/login")
    response.del_cookie(SESSION_COOKIE, path=PREFIX)
    raise response


# --- pages -------------------------------------------------------------------------------------


async def home(request: web.Request) -> web.Response:
    member = _member(request)
    clouds = [c for c in await request.config_dict[META].list_clouds() if member.may_see(c.name)]
    if len(clouds) == 1:
        raise web.HTTPSeeOther(f"{PREFIX}/{clouds[0].name}/find")
    return _page("home.html", request, {"clouds": clouds})


def _date(value: str | None, field: str, *, end: bool = False) -> float | None:
    """A YYYY-MM-DD form field as unix seconds (UTC); `end` makes it the day after (exclusive)."""
    if not value:
        return None
    try:
        day = datetime.strptime(value, "%Y-%m-%d").replace(tzinfo=UTC).timestamp()
    except ValueError:
        raise BadRequest(f"{field}: give a date as YYYY-MM-DD") from None
    return day + 86400 if end else day


async def find_page(request: web.Request) -> web.Response:
    cloud = await _cloud(request)
    q = request.query
    query = finding.FindQuery(
        text=q.get("q", "").strip(), prefix=q.get("prefix", "").strip(), tag=q.get("tag", "").strip(),
        resource_type=q.get("resource_type", ""), status=q.get("status", "deleted"),
        deleted_from=_date(q.get("deleted_from"), "deleted from"), deleted_to=_date(q.get("deleted_to"), "deleted to", end=True),
        uploaded_from=_date(q.get("uploaded_from"), "uploaded from"),
        uploaded_to=_date(q.get("uploaded_to"), "uploaded to", end=True), after=q.get("after", ""),
    )
    found = await finding.find(request.config_dict[META], cloud.name, query)
    params = {k: v for k, v in q.items() if k != "after" and v}
    return _page("find.html", request, {
        "query": query, "form": q, "found": found,
        "next_url": f"?{urlencode({**params, 'after': found.next_cursor})}" if found.next_cursor else None,
        "first_url": f"?{urlencode(params)}" if query.after else None,
        "previewable": previewable_format,
    })


async def asset_page(request: web.Request) -> web.Response:
    cloud = await _cloud(request)
    console = _console(request)
    asset = await console.actions.asset(_member(request), cloud.name, request.match_info["asset_id"])
    rows = await console.actions.timeline(asset)
    return _page("asset.html", request, {
        "asset": asset, "rows": rows, "message": request.query.get("done"),
        "previewable": [r.version.version_id for r in rows if r.restorable and Previews.previewable(r.version)],
    })


async def compare_page(request: web.Request) -> web.Response:
    cloud = await _cloud(request)
    console = _console(request)
    asset = await console.actions.asset(_member(request), cloud.name, request.match_info["asset_id"])
    rows = {r.version.version_id: r for r in await console.actions.timeline(asset)}
    chosen = [rows[v] for v in (request.query.get("left", ""), request.query.get("right", "")) if v in rows]
    if len(chosen) != 2:
        raise BadRequest("Choose two versions of this asset to compare")
    return _page("compare.html", request, {"asset": asset, "pair": chosen})


async def restore(request: web.Request) -> web.StreamResponse:
    cloud = await _cloud(request, "restorer")
    console = _console(request)
    member = _member(request)
    asset = await console.actions.asset(member, cloud.name, request.match_info["asset_id"])
    form = await request.post()
    version_id = str(form.get("version_id") or "") or None
    if version_id is not None and not ids.is_hex_id(version_id):
        raise BadRequest("Illegal version id")
    outcome = await console.actions.restore(member, asset, version_id, _address(request))
    if outcome.error is not None:
        raise BadRequest(f"Restore failed: {outcome.error.message}")
    raise web.HTTPSeeOther(f"{PREFIX}/{cloud.name}/assets/{asset.asset_id}?" + urlencode({"done": "Restored."}))


async def bulk_restore_start(request: web.Request) -> web.StreamResponse:
    """Restore the selected search results as a job; its progress is on the operations page."""
    cloud = await _cloud(request, "restorer")
    form = await request.post()
    job = await bulk_restore.start(
        request.config_dict[META], _member(request), cloud.name, [str(v) for v in form.getall("asset_id", [])], _address(request)
    )
    request.config_dict[JOBS].wake.set()
    raise web.HTTPSeeOther(f"{PREFIX}/{cloud.name}/operations?" + urlencode({"job": job.id}))


async def delete_version_form(request: web.Request) -> web.Response:
    cloud = await _cloud(request, "admin")
    console = _console(request)
    asset = await console.actions.asset(_member(request), cloud.name, request.match_info["asset_id"])
    version_id = request.match_info["version_id"]
    return _page("confirm_delete.html", request, {"asset": asset, "version_id": version_id, "error": None})


async def delete_version(request: web.Request) -> web.StreamResponse:
    cloud = await _cloud(request, "admin")
    console = _console(request)
    member = _member(request)
    asset = await console.actions.asset(member, cloud.name, request.match_info["asset_id"])
    version_id = request.match_info["version_id"]
    form = await request.post()
    try:
        outcome = await console.actions.delete_version(member, asset, version_id, str(form.get("confirm") or ""), _address(request))
    except BadRequest as exc:
        return _page("confirm_delete.html", request, {"asset": asset, "version_id": version_id, "error": exc.message}, status=400)
    if not outcome.deleted:
        raise BadRequest("; ".join(f["error"] for f in outcome.failures) or "Nothing was deleted")
    raise web.HTTPSeeOther(f"{PREFIX}/{cloud.name}/assets/{asset.asset_id}?" + urlencode({"done": "Version deleted."}))


async def download(request: web.Request) -> web.StreamResponse:
    """To the signed one-hour `download_backup` URL (an attachment); restorer and up."""
    cloud = await _cloud(request, "restorer")
    asset_id, version_id = request.match_info["asset_id"], request.match_info["version_id"]
    await request.config_dict[SERVICE].version_for_download(cloud, asset_id, version_id)  # 404 before a link
    params: dict[str, object] = {"asset_id": asset_id, "version_id": version_id, "timestamp": str(int(time.time()))}
    params["signature"] = signing.sign(signing.string_to_sign(params), cloud.api_secret, "sha256")
    params["api_key"] = cloud.api_key
    await _console(request).audit.record(actor(_member(request)), "download", cloud=cloud.name, target=asset_id,
                                         address=_address(request), detail={"version_id": version_id})
    raise web.HTTPSeeOther(f"/v1_1/{cloud.name}/download_backup?{urlencode(params)}")


async def preview(request: web.Request) -> web.StreamResponse:
    cloud = await _cloud(request)
    try:
        png = await _console(request).previews.png(cloud, request.match_info["asset_id"], request.match_info["version_id"])
    except NoPreview as exc:
        raise NotFound(f"No preview: {exc}") from None
    return web.Response(body=png, content_type="image/png", headers={
        "Cache-Control": "private, max-age=3600", "Content-Disposition": "inline; filename=preview.png",
    })


async def audit_page(request: web.Request) -> web.Response:
    member = _member(request)
    q = request.query
    filters = {k: q[k] for k in ("cloud", "actor", "action", "outcome") if q.get(k)}
    if q.get("target"):
        filters["target_like"] = q["target"]
    if "cloud" in filters:
        require(member, filters["cloud"], "viewer")
    elif not member.may("admin") or "*" not in member.clouds:
        raise BadRequest("Choose an environment (the whole log is for admins of every environment)")
    try:
        before = int(q.get("before") or 0) or None
    except ValueError:
        raise BadRequest("before must be a number") from None
    records = await request.config_dict[META].audit_records(0, 100, before_seq=before or (1 << 62), filters=filters)
    params = {k: v for k, v in q.items() if k != "before" and v}
    older = f"?{urlencode({**params, 'before': records[-1].seq})}" if len(records) == 100 else None
    return _page("audit.html", request, {"records": records, "form": q, "older_url": older})


async def cloud_audit_redirect(request: web.Request) -> web.StreamResponse:
    raise web.HTTPSeeOther(f"{PREFIX}/audit?" + urlencode({"cloud": request.match_info["cloud"]}))


async def operations_page(request: web.Request) -> web.Response:
    from versionstore.http.backup_views import backup_status

    cloud = await _cloud(request)
    meta, config = request.config_dict[META], request.config_dict[CONFIG]
    status = await backup_status(meta, cloud, space_report(config.data_dir, config.min_free_bytes), (config.primary_url, config.backup_url))
    jobs = []
    for kind in OPERATION_KINDS:
        jobs += await meta.list_jobs(cloud.name, kind, 20)
    jobs.sort(key=lambda j: j.created_at, reverse=True)
    failing = [s for s in await meta.alert_states(cloud.name) if s.failing]  # snapshots, retention, drills (alerts.py)
    snapshots = await meta.list_snapshots(cloud.name, 20)
    return _page("operations.html", request, {
        "status": status, "jobs": jobs, "started": request.query.get("job"), "failing": failing, "snapshots": snapshots,
    })


#: The jobs the operations page lists: restores (bulk, point in time), backups, verify, drills, archives.
OPERATION_KINDS = (
    bulk_restore.KIND, pitr.KIND, initial_backup.KIND, migration.KIND, verify.KIND, drills.KIND, archives.EXPORT, archives.IMPORT,
)


async def purges_page(request: web.Request) -> web.Response:
    """Deletions the purge delay holds back (protection.py), each with an undo; admins only."""
    cloud = await _cloud(request, "admin")
    found = await request.config_dict[META].list_purges(cloud.name, "scheduled", 500)
    return _page("purges.html", request, {
        "purges": [protection.as_json(p) for p in found], "delay_days": cloud.purge_delay_days, "message": request.query.get("done"),
    })


async def undo_purge(request: web.Request) -> web.StreamResponse:
    cloud = await _cloud(request, "admin")
    purge_id = request.match_info["purge_id"]
    undone = await protection.undo(request.config_dict[META], purge_id, cloud.name, actor(_member(request)), _address(request))
    done = f"Deletion of {undone.public_id} undone: {len(undone.versions)} version(s) are back."
    raise web.HTTPSeeOther(f"{PREFIX}/{cloud.name}/purges?" + urlencode({"done": done}))


# --- setup -------------------------------------------------------------------------------------


def _when(value: float | None) -> str:
    return "" if value is None else datetime.fromtimestamp(value, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _size(value: int | None) -> str:
    if value is None:
        return ""
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return str(value)


def setup(app: web.Application) -> None:
    """Mount the console on `app` as a sub-application at /console/."""
    console = web.Application(middlewares=[security_headers, signed_in])
    console[STATE] = {}
    aiohttp_jinja2.setup(
        console, loader=jinja2.PackageLoader("versionstore.http", "console/templates"),
        autoescape=jinja2.select_autoescape(default=True, default_for_string=True),
        filters={"when": _when, "size": _size}, undefined=jinja2.StrictUndefined,
    )
    add = console.router.add_route
    cloud, asset = "/{cloud}", "/{cloud}/assets/{asset_id:[0-9a-f]{32}}"
    version = asset + "/versions/{version_id:[0-9a-f]{32}}"
    add("GET", "/", home)
    add("GET", "/login", login_form)
    add("POST", "/login", login)
    add("POST", "/logout", logout)
    add("GET", "/audit", audit_page)
    console.router.add_static("/static/", str(resources.files("versionstore.http").joinpath("console/static")))
    add("GET", cloud + "/find", find_page)
    add("GET", cloud + "/operations", operations_page)
    add("POST", cloud + "/bulk-restore", bulk_restore_start)
    add("GET", cloud + "/audit", cloud_audit_redirect)
    add("GET", cloud + "/purges", purges_page)
    add("POST", cloud + "/purges/{purge_id:[0-9a-f]{32}}/undo", undo_purge)
    add("GET", asset, asset_page)
    add("GET", asset + "/compare", compare_page)
    add("POST", asset + "/restore", restore)
    add("GET", version + "/delete", delete_version_form)
    add("POST", version + "/delete", delete_version)
    add("GET", version + "/download", download)
    add("GET", version + "/preview.png", preview)
    app.add_subapp(f"{PREFIX}/", console)
    app.router.add_get(PREFIX, _to_home)


async def _to_home(request: web.Request) -> web.StreamResponse:
    raise web.HTTPSeeOther(f"{PREFIX}/")
