"""`GET /metrics`: Prometheus text format, and what the request middleware records per request.

Counters and histograms live in `versionstore/telemetry.py` (updated as the service works),
except the HTTP request series, which are counted here (see "per request" below); the queue
depth, job progress and verify outcomes are read from the metadata store at scrape time, so
they are right whichever process changed them. Who may scrape: see `allowed()` and
docs/threat-model.md.

Several processes (`serve --workers N`): call `prepare_multiprocess(dir)` once in the parent,
before the workers are forked; every worker then writes its values to files in `dir` and a
scrape of any worker reports the sum over all of them.
"""

import asyncio
import hmac
import ipaddress
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from itertools import accumulate
from pathlib import Path

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

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


# --- per request ----------------------------------------------------------------------------
# The HTTP series (requests, latency, bytes received and sent) are counted on every request,
# so their cost is the read path's: prometheus-client's `inc()`/`observe()` (a lock and several
# calls each, four per request) were ~5-9 % of a small request's CPU (docs/performance.md). One
# process (`serve`): plain numbers the event loop adds to, turned into metric families at scrape
# time (the scrape runs on the same loop: it sees every answered request). Several processes
# (`serve --workers N`): prometheus-client's file-backed values, written at once, because a
# scrape of any worker must see the others' requests.

REQUESTS = ("versionstore_http_requests", "HTTP requests answered, by route, method and status")
LATENCY = ("versionstore_http_request_duration_seconds", "Time from the request's headers to the end of its response, "
           "by route and method")
RECEIVED = ("versionstore_http_received_bytes", "Request body bytes read, by route")
SENT = ("versionstore_http_sent_bytes", "Response body bytes sent, by route")
_BOUNDS = telemetry.LATENCY_BUCKETS
_LE = [*map(floatToGoString, _BOUNDS), "+Inf"]


class _Counts:
    """One (route, method, status)'s answered requests: `buckets[i]` counts latencies of at
    most `_BOUNDS[i]` seconds and above the bound before it (the last: above every bound)."""

    __slots__ = ("count", "seconds", "buckets", "received", "sent")

    def __init__(self) -> None:
        self.count = 0
        self.seconds = 0.0
        self.buckets = [0] * (len(_BOUNDS) + 1)
        self.received = 0
        self.sent = 0


class RequestCounts(Collector):
    """The HTTP series of one process, kept as `_Counts` and collected at scrape time."""

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str, int], _Counts] = {}

    def record(self, key: tuple[str, str, int], elapsed: float, received: int, sent: int) -> None:
        counts = self.counts.get(key)
        if counts is None:
            counts = self.counts[key] = _Counts()
        counts.count += 1
        counts.seconds += elapsed
        counts.buckets[bisect_left(_BOUNDS, elapsed)] += 1  # `le`: a latency equal to a bound is in its bucket
        counts.received += received
        counts.sent += sent

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(*REQUESTS, labels=("route", "method", "status"))
        latency: dict[tuple[str, str], tuple[list[int], list[float]]] = {}
        received: dict[str, int] = {}
        sent: dict[str, int] = {}
        for (route, method, status), counts in self.counts.items():
            requests.add_metric((route, method, str(status)), counts.count)
            buckets, seconds = latency.setdefault((route, method), ([0] * len(counts.buckets), [0.0]))
            for i, n in enumerate(counts.buckets):
                buckets[i] += n
            seconds[0] += counts.seconds
            received[route] = received.get(route, 0) + counts.received
            sent[route] = sent.get(route, 0) + counts.sent
        durations = HistogramMetricFamily(*LATENCY, labels=("route", "method"))
        for labels, (buckets, seconds) in latency.items():
            durations.add_metric(labels, list(zip(_LE, accumulate(buckets), strict=True)), seconds[0])
        families: list[Metric] = [requests, durations]
        for (name, documentation), totals in ((RECEIVED, received), (SENT, sent)):
            family = CounterMetricFamily(name, documentation, labels=("route",))
            for route, total in totals.items():
                family.add_metric((route,), total)
            families.append(family)
        return iter(families)


class _FileBackedSeries:
    """Several processes: one (route, method, status)'s labelled children, looked up once
    (`labels()` takes a lock and builds a tuple per call)."""

    def __init__(self, metrics: "_FileBacked", route: str, method: str, status: int) -> None:
        self.requests = metrics.requests.labels(route, method, str(status))
        self.latency = metrics.latency.labels(route, method)
        self.received = metrics.received.labels(route)
        self.sent = metrics.sent.labels(route)


class _FileBacked:
    """The HTTP series as prometheus-client metrics (file-backed in multi-process mode)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(*REQUESTS, ("route", "method", "status"), registry=registry)
        self.latency = Histogram(*LATENCY, ("route", "method"), buckets=_BOUNDS, registry=registry)
        self.received = Counter(*RECEIVED, ("route",), registry=registry)
        self.sent = Counter(*SENT, ("route",), registry=registry)
        self.series: dict[tuple[str, str, int], _FileBackedSeries] = {}

    def record(self, key: tuple[str, str, int], elapsed: float, received: int, sent: int) -> None:
        series = self.series.get(key)
        if series is None:
            series = self.series[key] = _FileBackedSeries(self, *key)
        series.requests.inc()
        series.latency.observe(elapsed)
        if received:
            series.received.inc(received)
        if sent:
            series.sent.inc(sent)


#: The HTTP series of the current telemetry.metrics() (remade with them, multi-process).
_sink: tuple[telemetry.Metrics, RequestCounts | _FileBacked] | None = None


def _request_sink() -> RequestCounts | _FileBacked:
    global _sink
    current = telemetry.metrics()
    if _sink is None or _sink[0] is not current:
        if telemetry.multiprocess_dir() is not None:
            sink: RequestCounts | _FileBacked = _FileBacked(current.registry)
        else:
            sink = RequestCounts()
            current.registry.register(sink)
        _sink = (current, sink)
    return _sink[1]


def observe(request: web.Request, route: str, status: int, response: web.StreamResponse | None, elapsed: float) -> None:
    """Record one answered request (called by the middleware, for every request)."""
    sink = _sink[1] if _sink is not None and _sink[0] is telemetry.metrics() else _request_sink()
    method = request.method if request.method in _METHODS else "OTHER"
    received = request.content.total_bytes if request.body_exists else 0
    sink.record((route, method, status), elapsed, received, _body_length(response))


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
