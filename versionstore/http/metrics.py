"""`GET /metrics`: Prometheus text format, and what the request middleware records per request.

Counters and histograms live in `versionstore/telemetry.py` (updated as the service works);
the queue depth, job progress and verify outcomes are read from the metadata store at scrape
time, so they are right whichever process changed them. Who may scrape: see `allowed()` and
docs/threat-model.md.

Several processes (`serve --workers N`): call `prepare_multiprocess(dir)` once in the parent,
before the workers are forked; every worker then writes its values to files in `dir` and a
scrape of any worker reports the sum over all of them.
"""

import asyncio
import hmac
import ipaddress
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from versionstore import telemetry
from versionstore.errors import ApiError
from versionstore.repository import MetadataRepository

#: How long verify outcome counts are reused between scrapes (they need a scan of blob_checks).
VERIFY_SUMMARY_TTL = 60.0
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"})
#: Headers a reverse proxy adds: a request that carries one did not come from this host.
_PROXY_HEADERS = ("Forwarded", "X-Forwarded-For", "X-Real-IP")


class MetricsRefused(ApiError):
    status = 403


def prepare_multiprocess(directory: Path) -> None:
    """Switch this process to file-backed metric values in `directory` (created; stale files
    of an earlier run removed). Call once in the parent of `serve --workers N`, before forking;
    workers inherit the setting and must not call it again (it would delete their files)."""
    telemetry.use_multiprocess(directory)


class _RequestSeries:
    """The labelled children one kind of request updates, looked up once: `labels()` takes a
    lock and builds a tuple per call, a visible share of a small request's cost."""

    def __init__(self, route: str, method: str, status: int) -> None:
        counters = telemetry.metrics()
        self.requests = counters.requests.labels(route, method, str(status))
        self.latency = counters.latency.labels(route, method)
        self.received = counters.received_bytes.labels(route)
        self.sent = counters.sent_bytes.labels(route)


#: (route, method, status) -> children; bounded like the labels (routes x methods x statuses).
_series: dict[tuple[str, str, int], _RequestSeries] = {}
_series_of: telemetry.Metrics | None = None


def observe(request: web.Request, route: str, status: int, response: web.StreamResponse | None, elapsed: float) -> None:
    """Record one answered request (called by the middleware, for every request)."""
    global _series_of
    if _series_of is not telemetry.metrics():  # first use, or the metrics were remade (multi-process)
        _series.clear()
        _series_of = telemetry.metrics()
    method = request.method if request.method in _METHODS else "OTHER"
    key = (route, method, status)
    series = _series.get(key)
    if series is None:
        series = _series[key] = _RequestSeries(route, method, status)
    series.requests.inc()
    series.latency.observe(elapsed)
    received = request.content.total_bytes if request.body_exists else 0
    if received:
        series.received.inc(received)
    sent = _body_length(response)
    if sent:
        series.sent.inc(sent)


def _body_length(response: web.StreamResponse | None) -> int:
    if response is None:
        return 0
    if response.prepared:
        return response.body_length  # streamed by the handler: what was written
    if isinstance(response, web.Response) and type(body := response.body) is bytes:
        return len(body)  # what content_length answers, without its isinstance check against an ABC
    return response.content_length or 0


def allowed(request: web.Request, token: str | None) -> bool:
    """With a metrics token: only `Authorization: Bearer <token>`. Without one: only a client on
    this host (a loopback peer) whose request no reverse proxy forwarded."""
    if token:
        offered = request.headers.get("Authorization", "")
        return offered.startswith("Bearer ") and hmac.compare_digest(offered[7:].encode(), token.encode())
    if any(name in request.headers for name in _PROXY_HEADERS):
        return False
    try:
        return ipaddress.ip_address(request.remote or "").is_loopback
    except ValueError:
        return False


class _Fixed(Collector):
    """Families computed before the scrape (the database reads are async; collect() is not)."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


class ScrapeTimeCollector:
    """The gauges read from the metadata store per scrape, for every environment."""

    def __init__(self, meta: Callable[[], MetadataRepository]) -> None:
        self._meta = meta  # opened at start-up, after this is made
        self._verify: tuple[float, list[Metric]] | None = None

    @property
    def meta(self) -> MetadataRepository:
        return self._meta()

    async def families(self) -> list[Metric]:
        clouds = [cloud.name for cloud in await self.meta.list_clouds()]
        depth = GaugeMetricFamily("versionstore_pending_revisions", "Revisions waiting for their backup target", labels=["cloud"])
        waiting = GaugeMetricFamily("versionstore_pending_bytes", "Bytes of the revisions waiting for their backup target",
                                    labels=["cloud"])
        oldest = GaugeMetricFamily("versionstore_pending_oldest_age_seconds", "Age of the oldest revision waiting for its "
                                   "backup target (0 when none waits)", labels=["cloud"])
        now = time.time()
        for cloud in clouds:
            count, size, queued_at = await self.meta.pending_summary(cloud)
            depth.add_metric([cloud], count)
            waiting.add_metric([cloud], size)
            oldest.add_metric([cloud], max(0.0, now - queued_at) if queued_at is not None else 0.0)
        return [depth, waiting, oldest, *await self._jobs(), *await self._verify_families(clouds, now), *await self._outcomes()]

    async def _outcomes(self) -> list[Metric]:
        """The last outcome of snapshots, retention runs and restore drills (alerts.py)."""
        failing = GaugeMetricFamily("versionstore_operation_failing", "1 while the environment's last snapshot, retention run "
                                    "or restore drill (operation) failed or found a mismatch", labels=["cloud", "operation"])
        success = GaugeMetricFamily("versionstore_operation_last_success_timestamp_seconds", "When the environment's last "
                                    "snapshot, retention run or restore drill succeeded (unix seconds)", labels=["cloud", "operation"])
        for state in await self.meta.alert_states():
            failing.add_metric([state.cloud, state.operation], int(state.failing))
            if state.last_success_at is not None:
                success.add_metric([state.cloud, state.operation], state.last_success_at)
        return [failing, success]

    async def _jobs(self) -> list[Metric]:
        open_jobs = GaugeMetricFamily("versionstore_jobs_open", "Jobs pending or running, by kind and status",
                                      labels=["cloud", "kind", "status"])
        progress = GaugeMetricFamily("versionstore_job_progress", "Numeric progress fields of open jobs (docs/jobs.md)",
                                     labels=["cloud", "kind", "job_id", "field"])
        counts: dict[tuple[str, str, str], int] = {}
        for job in await self.meta.open_jobs():
            key = (job.cloud, job.kind, job.status)
            counts[key] = counts.get(key, 0) + 1
            for field, value in job.progress.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    progress.add_metric([job.cloud, job.kind, job.id, field], float(value))
        for key, count in counts.items():
            open_jobs.add_metric(list(key), count)
        return [open_jobs, progress]

    async def _verify_families(self, clouds: Iterable[str], now: float) -> list[Metric]:
        if self._verify is not None and now - self._verify[0] < VERIFY_SUMMARY_TTL:
            return self._verify[1]
        outcomes = GaugeMetricFamily("versionstore_verify_revisions", "Revisions by the outcome of their last check "
                                     "(ok, missing, corrupt, ...), per store copy (backup, primary)", labels=["cloud", "store", "outcome"])
        last = GaugeMetricFamily("versionstore_verify_last_checked_timestamp_seconds", "When a revision of the environment "
                                 "was last checked (unix seconds)", labels=["cloud"])
        for cloud in clouds:
            summary = await self.meta.check_summary(cloud)
            for store, counts in summary.items():
                if isinstance(counts, dict):
                    for outcome, count in counts.items():
                        outcomes.add_metric([cloud, store, outcome], count)
            if summary.get("last_verified_at") is not None:
                last.add_metric([cloud], summary["last_verified_at"])
        self._verify = (now, [outcomes, last])
        return self._verify[1]


async def exposition(scrape: ScrapeTimeCollector) -> bytes:
    """The whole text exposition: this process's (or, multi-process, every worker's) counters
    and histograms, then the scrape-time gauges."""
    directory = telemetry.multiprocess_dir()
    if directory is not None:
        registry = CollectorRegistry()
        MultiProcessCollector(registry, str(directory))  # type: ignore[no-untyped-call]
        counted = await asyncio.to_thread(generate_latest, registry)  # reads every worker's files
    else:
        counted = generate_latest(telemetry.metrics().registry)
    read = CollectorRegistry()
    read.register(_Fixed(await scrape.families()))
    return counted + generate_latest(read)


CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
