"""App factory: typed app keys, cleanup contexts for every resource, the error middleware."""

import asyncio
import contextlib
import inspect
import itertools
import logging
import os
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import PayloadAccessError, RequestPayloadError

from versionstore import archive_removal, archives, bootstrap, drills, initial_backup, logs, migration, pitr, protection, retention, verify
from versionstore.alerts import Alerts
from versionstore.chunks import ChunkAssembler
from versionstore.config import Config
from versionstore.console import bulk_restore, passwords
from versionstore.disk_space import is_disk_full, space_report
from versionstore.egress import EgressPolicy
from versionstore.epoch_cache import EpochCache
from versionstore.errors import ApiError
from versionstore.http import metrics, render
from versionstore.http.body_tap import close_tapped
from versionstore.http.budget import UnauthBudget
from versionstore.http.fetch import guarded_session
from versionstore.http.keys import (
    ALERTS,
    CHUNKS,
    CONFIG,
    EGRESS,
    FETCHER,
    IN_FLIGHT,
    JOBS,
    META,
    RATE_LIMIT,
    RENDERED_ROWS,
    RESOURCE_BODIES,
    ROUTE,
    SCRAPE,
    SERVICE,
    UNAUTH_BUDGET,
    VERIFIED_BLOBS,
    VERSIONS_CACHE,
    error_response,
)
from versionstore.http.notify import Notifier, alert_sender
from versionstore.http.ratelimit import AdminRateLimit
from versionstore.http.resource_rows import RenderedRows
from versionstore.http.shutdown import InFlight
from versionstore.http.versions_cache import VersionsJsonCache
from versionstore.jobs import Handler, JobRunner
from versionstore.models import Job
from versionstore.pending import PendingDrainer
from versionstore.repository import MetadataRepository
from versionstore.service import VersionService
from versionstore.snapshots import Snapshots
from versionstore.spool import remove_stale_parts

log = logging.getLogger("versionstore")

# Request ids: a random per-process prefix and a counter (a random id per request showed up
# in profiles of the download path).
_ID_PREFIX = secrets.token_hex(4)
_ID_COUNTER = itertools.count(1)


def _new_request_id() -> str:
    return f"{_ID_PREFIX}{next(_ID_COUNTER):x}"


def _new_id_prefix() -> None:
    """A forked worker (`serve --workers`) gets its own prefix: ids stay unique across workers."""
    global _ID_PREFIX
    _ID_PREFIX = secrets.token_hex(4)


os.register_at_fork(after_in_child=_new_id_prefix)


@web.middleware
async def errors_as_json(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    """Every failure leaves as `{"error": {"message": ...}}` with a status both SDKs accept.
    Also the request's id (`X-Request-Id`, in every log line) and its metrics: one middleware,
    one coroutine, because each layer costs the read path (docs/performance.md). And the
    requests in flight, which a stop waits for (http/shutdown.py)."""
    started = time.perf_counter()
    request_id = logs.accepted_id(request.headers.get("X-Request-Id"), _new_request_id)
    logs.REQUEST_ID.set(request_id)
    if (task := asyncio.current_task()) is not None:  # aiohttp's task for this request, through its answer's last byte
        request.app[IN_FLIGHT].add(task, request.protocol)
    try:
        response = await handler(request)
    except ApiError as exc:
        response = error_response(exc.status, exc.message)
    except ConnectionResetError as exc:
        # The client closed the connection mid-request (an aborted upload): nothing failed
        # here, and nobody is left to answer. One line, no traceback.
        log.info("%s %s: client went away mid-request (%s)", request.method, request.path, exc)
        response = error_response(400, "Client disconnected")
    except web.HTTPRequestEntityTooLarge as exc:
        response = error_response(400, f"Request body too large: {exc.text}")
    except web.HTTPException as exc:
        if exc.status < 400:  # a redirect: aiohttp answers it
            close_tapped(request, exc)
            metrics.observe(request, _route(request), exc.status, None, time.perf_counter() - started)
            raise
        status = exc.status if exc.status in (400, 401, 403, 404) else 404 if exc.status == 405 else 400
        response = error_response(status, exc.reason)
    except Exception as exc:
        response = _unexpected(request, exc)
    except BaseException:  # cancelled: the client went away before the answer (nginx's 499), or a stop cut it
        metrics.observe(request, _route(request), 499, None, time.perf_counter() - started)
        raise
    if not response.prepared:
        response.headers["X-Request-Id"] = request_id
    close_tapped(request, response)
    metrics.observe(request, _route(request), response.status, response, time.perf_counter() - started)
    return response


def _route(request: web.Request) -> str:
    """The canonical route (never the raw URL: labels stay bounded); `unmatched` for 404s."""
    route: str | None = request.get(ROUTE)
    if route is not None:
        return route
    resource = request.match_info.route.resource
    return "unmatched" if resource is None or resource.canonical.startswith("/v1_1/") else resource.canonical


# What a client can break while we read its body: a bad Content-Encoding, a truncated or
# malformed chunked body, a part the multipart parser refuses. Client errors, not ours.
_CLIENT_BODY_ERRORS = (RequestPayloadError, HttpProcessingError, PayloadAccessError)

INSUFFICIENT_STORAGE = "Insufficient storage - the server is out of disk space; nothing was stored"


class _ClientBodyErrorsAtInfo(logging.Filter):
    """aiohttp itself logs, at ERROR with a traceback, a client's broken body that it meets
    outside our handler (parsing the framing, or draining the rest of a body we answered
    early). Those are client errors: keep the line, at INFO, without the traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if record.levelno >= logging.ERROR and isinstance(exc, (*_CLIENT_BODY_ERRORS, ConnectionResetError)):
            record.msg = f"{record.getMessage()}: client error: {type(exc).__name__}: {exc}"
            record.args = ()
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.exc_info, record.exc_text = None, None
        return True


_AIOHTTP_FILTER = _ClientBodyErrorsAtInfo()


def _unexpected(request: web.Request, exc: Exception) -> web.Response:
    """An exception no handler turned into an ApiError: a client-side failure while reading the
    body (400, logged at info), a full disk (500 "Insufficient storage", logged without a
    traceback: an operator problem, not a bug) or a real bug (500 with a traceback)."""
    where = f"{request.method} {request.path}"
    if isinstance(exc, _CLIENT_BODY_ERRORS):
        log.info("bad request body on %s: %s", where, exc)
        response = error_response(400, "Malformed request body (bad encoding, length or framing)")
        response.force_close()  # the rest of the body cannot be framed: no keep-alive
        return response
    if isinstance(exc, ConnectionResetError) and (request.transport is None or request.transport.is_closing()):
        log.info("client went away during %s", where)
        return error_response(400, "Connection lost while reading the request")
    if is_disk_full(exc):
        # 500, not 507: both SDKs raise a clean exception with our message for 500, while Node
        # rejects 507 as "unexpected status code" and drops the message (spec section 4).
        log.error("insufficient storage on %s: %s", where, exc)
        return error_response(500, INSUFFICIENT_STORAGE)
    log.exception("unhandled error on %s", where)
    return error_response(500, "General error")


async def _resources(app: web.Application) -> AsyncIterator[None]:
    """Open everything the service uses; whatever was opened is released again, also when a
    later step of the start-up fails (an open database thread keeps the process alive)."""
    config = app[CONFIG]
    config.data_dir.mkdir(parents=True, exist_ok=True)
    config.spool_dir.mkdir(exist_ok=True)
    # A crash mid-upload left these; never another live process's upload (see remove_stale_parts).
    await asyncio.to_thread(remove_stale_parts, config.spool_dir)
    # Warmed beside the start-up, so the first unknown-account sign-in costs what a wrong password does.
    warming = asyncio.ensure_future(asyncio.to_thread(passwords.dummy_hash))
    async with contextlib.AsyncExitStack() as opened:
        opened.push_async_callback(lambda: asyncio.wait([warming]))
        service = app[SERVICE] = await opened.enter_async_context(bootstrap.open_service(config))
        meta = app[META] = service.meta
        claims = service.claims
        chunks = app[CHUNKS] = ChunkAssembler(meta, config, service.new_spool)
        await chunks.sweep()
        app[FETCHER] = guarded_session(app[EGRESS], auto_decompress=False)
        opened.push_async_callback(app[FETCHER].close)
        notifier = Notifier(app[FETCHER], partial(_describe_job, meta), app[EGRESS], base_delay=config.poll_interval)
        alerts = app[ALERTS] = Alerts(meta, alert_sender(notifier))
        handlers: dict[str, Handler] = {
            migration.KIND: migration.BackupMigration(service, retry_delay=config.poll_interval * 5).run,
            initial_backup.KIND: initial_backup.InitialBackup(service).run,
            verify.KIND: verify.VerifyJob(service, rate=config.verify_rate * 1e6 or None).run,
            bulk_restore.KIND: bulk_restore.BulkRestore(service).run,
            pitr.KIND: pitr.PointInTimeRestore(service).run,
            drills.KIND: drills.DrillJob(service, alerts).run,
            archives.EXPORT: archives.ArchiveExport(service).run,
            archives.IMPORT: archives.ArchiveImport(service).run,
        }
        runner = app[JOBS] = JobRunner(meta, handlers, poll_interval=config.poll_interval, owner=claims.owner, lease=config.lease_seconds)
        opened.push_async_callback(runner.close)
        runner.on_finish.append(notifier)
        drainer = PendingDrainer(service, interval=config.poll_interval, max_backoff=config.pending_retry_max)
        background = [  # the lease heartbeat is open_service's: it outlives these
            asyncio.create_task(_collect_orphans(service, config), name="orphan collection"),
            asyncio.create_task(drainer.run(), name="pending drainer"),
            asyncio.create_task(runner.run(), name="job runner"),
            asyncio.create_task(chunks.run_sweeper(), name="chunk session sweeper"),
            asyncio.create_task(retention.run_schedules(Snapshots(service, alerts), config.poll_interval), name="snapshot schedules"),
            asyncio.create_task(drills.run_schedules(service, config.poll_interval, runner.wake.set), name="drill schedules"),
            asyncio.create_task(protection.run_purges(service, config.poll_interval), name="scheduled purges"),
            asyncio.create_task(archive_removal.run_removals(service), name="archive removals"),
        ]
        if config.verify_interval > 0:
            scheduled = verify.schedule(meta, runner.wake.set, config.verify_interval, rate_mb_s=config.verify_rate or None)
            background.append(asyncio.create_task(scheduled, name="verify schedule"))
        opened.push_async_callback(_stop, background)
        yield


async def _stop(tasks: list["asyncio.Task[None]"]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def _describe_job(meta: MetadataRepository, job: Job) -> dict[str, Any]:
    if job.kind == initial_backup.KIND:
        return await initial_backup.describe(meta, job)
    if job.kind == drills.KIND:
        from versionstore.http.drill_views import drill_body

        return drill_body(job)
    if job.kind in archives.KINDS and (cloud := await meta.get_cloud(job.cloud)) is not None:
        return {**render.job(job), **await archives.described(meta, job, cloud, time.time())}  # download_url: a path here
    return render.job(job)


async def _collect_orphans(service: VersionService, config: Config) -> None:
    """At start and then periodically: remove the blobs of writes that crashed or ended without
    a commit, found from the write journal's expired rows (docs/design.md), and stale spool
    files. The cost follows those writes, not the number of blobs; a full store walk is
    `versionstore gc --full`."""
    while True:
        try:
            await service.claims.expire_dead_owners()
            settled = await service.collect_expired_writes()
            if settled:
                log.info("orphan collection settled %d expired blob write(s)", settled)
            await asyncio.to_thread(remove_stale_parts, config.spool_dir)
            await archive_removal.remove_stale_files(service)
        except Exception:
            log.exception("orphan collection failed; retrying in %s s", config.journal_sweep_interval)
        await asyncio.sleep(config.journal_sweep_interval)


# aiohttp >= 3.14 refuses forms of more than 1000 fields; a bulk call of the largest id list
# we accept (1000 `public_ids[]`) plus its other parameters needs a little more.
MAX_FORM_FIELDS = 1100
_MAX_FIELDS: dict[str, Any] = (
    {"client_max_fields": MAX_FORM_FIELDS} if "client_max_fields" in inspect.signature(web.Application).parameters else {}
)


def create_app(config: Config) -> web.Application:
    from versionstore.http.routes import add_console, dispatch

    server_log = logging.getLogger("aiohttp.server")
    if _AIOHTTP_FILTER not in server_log.filters:
        server_log.addFilter(_AIOHTTP_FILTER)
    app = web.Application(middlewares=[errors_as_json], client_max_size=config.max_body_bytes, **_MAX_FIELDS)
    app[CONFIG] = config
    app[EGRESS] = EgressPolicy(config.fetch_allow)
    app[VERSIONS_CACHE] = VersionsJsonCache()
    app[RENDERED_ROWS] = RenderedRows(weigh=render.row_weight)
    app[RESOURCE_BODIES] = EpochCache[tuple[object, ...], bytes](16 << 20, len)  # bounded by bytes held
    app[VERIFIED_BLOBS] = EpochCache[tuple[str, str], bytes](16 << 20, len)
    app[UNAUTH_BUDGET] = UnauthBudget(config.unauth_budget_bytes, config.max_body_bytes)
    app[RATE_LIMIT] = AdminRateLimit(config.admin_rate_limit)
    app[SCRAPE] = metrics.ScrapeTimeCollector(lambda: app[META])
    app[IN_FLIGHT] = InFlight()
    app.cleanup_ctx.append(_resources)
    app.router.add_route("*", "/v1_1/{tail:.*}", dispatch)
    app.router.add_route("GET", "/healthz", _healthz)
    app.router.add_route("GET", "/readyz", _readyz)
    app.router.add_route("GET", "/metrics", _metrics)
    add_console(app)
    return app


async def _readyz(request: web.Request) -> web.Response:
    """Readiness: database, stores, disk space (readiness.py); 503 naming what is not ready."""
    from versionstore.http.readiness import readiness

    service = request.app[SERVICE]
    stores = {"primary_store": service.primary, "backup_store": service.targets.default}
    ready, body = await readiness(request.app[CONFIG], request.app[META], stores)
    return web.json_response(body, status=200 if ready else 503)


async def _metrics(request: web.Request) -> web.Response:
    """Prometheus text format, for local clients or the metrics token holder (metrics.py)."""
    if not metrics.allowed(request, request.app[CONFIG].metrics_token):
        raise metrics.MetricsRefused("Metrics are served to local clients, or to any client with the metrics token")
    body = await metrics.exposition(request.app[SCRAPE])
    return web.Response(body=body, headers={"Content-Type": metrics.CONTENT_TYPE})


async def _healthz(request: web.Request) -> web.Response:
    """Liveness plus the data dir's free space (`low_space` below VERSIONSTORE_MIN_FREE_BYTES).
    Low space stays 200: reads and restores still work, and a balancer should not drop us."""
    config = request.app[CONFIG]
    return web.json_response({"status": "ok", "data_dir": space_report(config.data_dir, config.min_free_bytes)})
