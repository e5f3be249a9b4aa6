"""The HTTP request series of one process (versionstore/http/metrics.py `RequestCounts`): kept
as plain numbers on the event loop and collected at scrape time, they must expose exactly what
prometheus-client's own Counter and Histogram expose for the same requests."""

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from versionstore import telemetry
from versionstore.http import metrics

ROUTE_A = "/v1_1/{cloud_name}/download_backup"
ROUTE_B = "/v1_1/{cloud_name}/resources/{rt}/{type}/{public_id}"
# Every bound itself (a latency equal to a bound is in that bound's bucket), values between,
# below the first and above the last bound.
LATENCIES = [*telemetry.LATENCY_BUCKETS, 0.0, 0.0007, 0.003, 0.0199999, 0.75, 45.0, 61.0, 1e-9]


def _http_lines(text: bytes) -> list[str]:
    return sorted(line for line in text.decode().splitlines() if "versionstore_http_" in line)


def test_request_counts_expose_what_prometheus_metrics_expose() -> None:
    telemetry.metrics()  # the service's settings: no `_created` series
    counts = metrics.RequestCounts()
    ours = CollectorRegistry()
    ours.register(counts)
    reference = CollectorRegistry()
    requests = Counter(*metrics.REQUESTS, ("route", "method", "status"), registry=reference)
    latency = Histogram(*metrics.LATENCY, ("route", "method"), buckets=telemetry.LATENCY_BUCKETS, registry=reference)
    received = Counter(*metrics.RECEIVED, ("route",), registry=reference)
    sent = Counter(*metrics.SENT, ("route",), registry=reference)
    calls = []
    for n, elapsed in enumerate(LATENCIES):
        calls.append((ROUTE_A, "GET", 200, elapsed, 0, 21))
        calls.append((ROUTE_B, "GET", 404 if n % 3 else 200, elapsed * 2, 0, 0))  # one route, two statuses
        calls.append((ROUTE_B, "PUT", 200, elapsed / 3, 1000 + n, 50))
    for route, method, status, elapsed, body_in, body_out in calls:
        counts.record((route, method, status), elapsed, body_in, body_out)
        requests.labels(route, method, str(status)).inc()
        latency.labels(route, method).observe(elapsed)
        received.labels(route).inc(body_in)
        sent.labels(route).inc(body_out)
    assert _http_lines(generate_latest(ours)) == _http_lines(generate_latest(reference))


def test_the_service_registers_its_request_counts_once_per_metrics_registry() -> None:
    counts = metrics._request_sink()
    assert metrics._request_sink() is counts
    assert isinstance(counts, metrics.RequestCounts)  # one process: plain numbers, not prometheus-client values
    text = generate_latest(telemetry.metrics().registry).decode()
    assert text.count("# TYPE versionstore_http_request_duration_seconds histogram") == 1
