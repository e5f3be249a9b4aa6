"""The application's and requests' typed keys, in a module of their own.

Views, the route table and tests import these; `app.py` builds the application and imports the
views' modules, so keeping the keys there made every view import the module that imports it.
"""

import aiohttp
from aiohttp import web

from versionstore.alerts import Alerts
from versionstore.chunks import ChunkAssembler
from versionstore.config import Config
from versionstore.egress import EgressPolicy
from versionstore.epoch_cache import EpochCache
from versionstore.http import metrics
from versionstore.http.budget import UnauthBudget
from versionstore.http.ratelimit import AdminRateLimit
from versionstore.http.resource_rows import RenderedRows
from versionstore.http.shutdown import InFlight
from versionstore.http.versions_cache import VersionsJsonCache
from versionstore.jobs import JobRunner
from versionstore.repository import MetadataRepository
from versionstore.service import VersionService

CONFIG = web.AppKey("config", Config)
META: web.AppKey[MetadataRepository] = web.AppKey("meta")
SERVICE = web.AppKey("service", VersionService)
CHUNKS = web.AppKey("chunks", ChunkAssembler)
FETCHER = web.AppKey("fetcher", aiohttp.ClientSession)
VERSIONS_CACHE = web.AppKey("versions_cache", VersionsJsonCache)
#: Rendered resource bodies (with or without `versions`), reused until anything commits.
RESOURCE_BODIES: web.AppKey[EpochCache[tuple[object, ...], bytes]] = web.AppKey("resource_bodies")
#: Small local revisions' bytes, proven against their digest, by (path, digest): reused until
#: anything commits (versionstore/http/download.py).
VERIFIED_BLOBS: web.AppKey[EpochCache[tuple[str, str], bytes]] = web.AppKey("verified_blobs")
#: Listing and search items' JSON, reused while their rows read the same.
RENDERED_ROWS = web.AppKey("rendered_rows", RenderedRows)
JOBS = web.AppKey("jobs", JobRunner)
UNAUTH_BUDGET = web.AppKey("unauth_budget", UnauthBudget)
EGRESS = web.AppKey("egress", EgressPolicy)
RATE_LIMIT = web.AppKey("rate_limit", AdminRateLimit)
SCRAPE = web.AppKey("scrape", metrics.ScrapeTimeCollector)
#: Failed snapshots, retention runs and drills raise the alarm here (versionstore/alerts.py).
ALERTS = web.AppKey("alerts", Alerts)
#: The requests whose handler runs: what a stop waits for, up to its grace (http/shutdown.py).
IN_FLIGHT = web.AppKey("in_flight", InFlight)
#: Request key: the canonical path of the route `routes.dispatch` matched (metrics, logs).
ROUTE = web.RequestKey("route", str)
#: Request key: the metadata's `commit_epoch()` as `routes.dispatch` read it, once per request;
#: what the request reuses from caches keyed on it is current as of the request's start (on
#: PostgreSQL: as of the other processes' commits heard by then, at most a second behind).
EPOCH: web.RequestKey[object | None] = web.RequestKey("epoch")


def error_response(status: int, message: str) -> web.Response:
    """A Cloudinary-style JSON error."""
    return web.json_response({"error": {"message": message}}, status=status)
