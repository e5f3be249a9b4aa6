"""App factory: typed app keys, cleanup contexts for every resource, the error middleware."""

import asyncio
import itertools
import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from typing import Any

import aiohttp
from aiohttp import web

from versionstore import initial_backup, migration, verify
from versionstore.blobstore import open_store
from versionstore.blobstore.resilient import resilient
from versionstore.chunks import ChunkAssembler
from versionstore.config import Config
from versionstore.errors import ApiError
from versionstore.http import render
from versionstore.http.notify import Notifier
from versionstore.http.versions_cache import VersionsJsonCache
from versionstore.jobs import Handler, JobRunner
from versionstore.metadata import MetadataStore
from versionstore.models import Job
from versionstore.pending import PendingDrainer
from versionstore.service import VersionService
from versionstore.targets import BackupTargets

log = logging.getLogger("versionstore")

CONFIG = web.AppKey("config", Config)
META = web.AppKey("meta", MetadataStore)
SERVICE = web.AppKey("service", VersionService)
CHUNKS = web.AppKey("chunks", ChunkAssembler)
FETCHER = web.AppKey("fetcher", aiohttp.ClientSession)
VERSIONS_CACHE = web.AppKey("versions_cache", VersionsJsonCache)
JOBS = web.AppKey("jobs", JobRunner)


def error_response(status: int, message: str) -> web.Response:
    return web.json_response({"error": {"message": message}}, status=status)


# Request ids: a random per-process prefix and a counter (a random id per request showed up
# in profiles of the download path).
_ID_PREFIX = secrets.token_hex(4)
_ID_COUNTER = itertools.count(1)


@web.middleware
async def errors_as_json(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Every failure leaves as `{"error": {"message": ...}}` with a status both SDKs accept."""
    request_id = request.headers.get("X-Request-Id") or f"{_ID_PREFIX}{next(_ID_COUNTER):x}"
    try:
        response = await handler(request)
    except ApiError as exc:
        response = error_response(exc.status, exc.message)
    except web.HTTPRequestEntityTooLarge as exc:
        response = error_response(400, f"Request body too large: {exc.text}")
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        status = exc.status if exc.status in (400, 401, 403, 404) else 404 if exc.status == 405 else 400
        response = error_response(status, exc.reason)
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        response = error_response(500, "General error")
    if not response.prepared:
        response.headers["X-Request-Id"] = request_id
    return response


async def _resources(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    config.data_dir.mkdir(parents=True, exist_ok=True)
    config.spool_dir.mkdir(exist_ok=True)
    for stale in config.spool_dir.glob("*.part"):
        stale.unlink(missing_ok=True)  # a crash mid-upload left it; nothing references it
    meta = await MetadataStore.open(config.db_path)
    app[META] = meta
    primary = resilient(open_store(config.primary_url))
    targets = BackupTargets(meta, resilient(open_store(config.backup_url)), marker_ttl=config.marker_ttl)
    service = app[SERVICE] = VersionService(meta, primary, targets, config.spool_dir, config.max_upload_bytes)
    app[CHUNKS] = ChunkAssembler(meta, config.spool_dir, config.max_upload_bytes)
    await app[CHUNKS].sweep()
    app[FETCHER] = aiohttp.ClientSession(auto_decompress=False)
    handlers: dict[str, Handler] = {
        migration.KIND: migration.BackupMigration(service, retry_delay=config.poll_interval * 5).run,
        initial_backup.KIND: initial_backup.InitialBackup(service).run,
        verify.KIND: verify.VerifyJob(service, rate=config.verify_rate * 1e6 or None).run,
    }
    runner = app[JOBS] = JobRunner(meta, handlers, poll_interval=config.poll_interval)
    runner.on_finish.append(Notifier(app[FETCHER], partial(_describe_job, meta), base_delay=config.poll_interval))
    drainer = PendingDrainer(service, interval=config.poll_interval, max_backoff=config.pending_retry_max)
    background = [
        asyncio.create_task(_collect_orphans(service, meta), name="orphan collection"),
        asyncio.create_task(drainer.run(), name="pending drainer"),
        asyncio.create_task(runner.run(), name="job runner"),
    ]
    if config.verify_interval > 0:
        scheduled = verify.schedule(meta, runner.wake.set, config.verify_interval, rate_mb_s=config.verify_rate or None)
        background.append(asyncio.create_task(scheduled, name="verify schedule"))
    yield
    for task in background:
        task.cancel()
    await asyncio.gather(*background, return_exceptions=True)
    await runner.close()
    await app[FETCHER].close()
    await targets.close()
    await primary.close()
    await meta.close()


async def _describe_job(meta: MetadataStore, job: Job) -> dict[str, Any]:
    if job.kind == initial_backup.KIND:
        return await initial_backup.describe(meta, job)
    return render.job(job)


async def _collect_orphans(service: VersionService, meta: MetadataStore) -> None:
    """Once per start: remove blobs a crash left without metadata (see docs/design.md)."""
    try:
        for cloud in await meta.list_clouds():
            removed = await service.collect_orphans(cloud)
            if removed:
                log.info("removed %d orphan blob(s) of %s", removed, cloud.name)
    except Exception:
        log.exception("orphan collection failed; it will run again at the next start")


def create_app(config: Config) -> web.Application:
    from versionstore.http.routes import dispatch

    app = web.Application(middlewares=[errors_as_json], client_max_size=config.max_body_bytes)
    app[CONFIG] = config
    app[VERSIONS_CACHE] = VersionsJsonCache()
    app.cleanup_ctx.append(_resources)
    app.router.add_route("*", "/v1_1/{tail:.*}", dispatch)
    app.router.add_route("GET", "/healthz", _healthz)
    return app


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})
