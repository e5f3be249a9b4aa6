"""Operations endpoints over HTTP: /readyz, /metrics (counters, bounded labels, who may scrape)
and the request id every response carries."""

import re
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from tests.conftest import API_KEY, API_SECRET, BASIC_HEADERS, CLOUD, Api
from tests.test_bad_input import download_query
from versionstore.config import Config
from versionstore.http.app import create_app
from versionstore.http.keys import META

# --- /readyz -------------------------------------------------------------------------------------


async def test_readyz_is_ready_when_database_stores_and_disk_are(client: TestClient) -> None:
    response = await client.get("/readyz")
    body = await response.json()
    assert response.status == 200, body
    assert body["status"] == "ready"
    assert {"database", "primary_store", "backup_store", "disk_space"} <= set(body["checks"])
    assert all(check["ok"] for check in body["checks"].values())


async def test_readyz_says_503_and_which_store_when_a_store_is_unreachable(client: TestClient, config: Config) -> None:
    primary = config.data_dir / "primary"
    moved = config.data_dir / "primary-unmounted"
    primary.rename(moved)  # what an unmounted volume looks like to the service
    try:
        response = await client.get("/readyz")
        body = await response.json()
        assert response.status == 503, body
        assert body["status"] == "not_ready"
        assert body["checks"]["primary_store"]["ok"] is False
        assert "missing" in body["checks"]["primary_store"]["error"]
        assert body["checks"]["backup_store"]["ok"] is True and body["checks"]["database"]["ok"] is True
    finally:
        moved.rename(primary)
    assert (await client.get("/readyz")).status == 200
    assert (await client.get("/healthz")).status == 200  # liveness never depended on it


async def test_readyz_says_503_when_disk_space_is_low(aiohttp_client: Any, tmp_path: Path) -> None:
    client = await aiohttp_client(create_app(Config(data_dir=tmp_path / "data", min_free_bytes=1 << 62)))
    response = await client.get("/readyz")
    body = await response.json()
    assert response.status == 503, body
    assert body["checks"]["disk_space"]["ok"] is False and body["checks"]["disk_space"]["low_space"] is True


# --- /metrics ------------------------------------------------------------------------------------


def samples(text: str) -> dict[str, float]:
    """{'name{labels}': value} of a text exposition."""
    found = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            found[key] = float(value)
    return found


async def scrape(client: TestClient, **kwargs: Any) -> dict[str, float]:
    response = await client.get("/metrics", **kwargs)
    text = await response.text()
    assert response.status == 200, text
    assert response.headers["Content-Type"].startswith("text/plain")
    return samples(text)


def value(found: dict[str, float], name: str, **labels: str) -> float:
    """The sample of `name` whose labels include `labels` (0 when absent)."""
    total = 0.0
    for key, number in found.items():
        metric, _, rest = key.partition("{")
        if metric == name and all(f'{k}="{v}"' in rest for k, v in labels.items()):
            total += number
    return total


UPLOAD_ROUTE = "/v1_1/{cloud_name}/{rt}/upload"


async def test_a_scrape_after_an_upload_shows_its_counters(client: TestClient, api: Api) -> None:
    before = await scrape(client)
    data = b"metrics upload " * 1000
    await api.upload(data, public_id="metrics/one", backup="true")
    await api.upload(data, public_id="metrics/two", backup="true")  # same bytes: no new revision
    after = await scrape(client)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("versionstore_http_requests_total", route=UPLOAD_ROUTE, method="POST", status="200") == 2
    assert delta("versionstore_http_request_duration_seconds_count", route=UPLOAD_ROUTE, method="POST") == 2
    assert delta("versionstore_http_received_bytes_total", route=UPLOAD_ROUTE) > 2 * len(data)
    assert delta("versionstore_http_sent_bytes_total", route=UPLOAD_ROUTE) > 0
    assert delta("versionstore_revisions_written_total") == 1
    assert delta("versionstore_dedup_hits_total") == 1
    assert delta("versionstore_store_operations_total", operation="put", outcome="written") >= 2  # original + revision
    assert value(after, "versionstore_pending_revisions", cloud=CLOUD) == 0
    assert f'versionstore_pending_oldest_age_seconds{{cloud="{CLOUD}"}}' in after


async def test_a_download_counts_its_bytes(client: TestClient, api: Api) -> None:
    result = await api.upload(b"download me" * 100, public_id="metrics/dl", backup="true")
    before = await scrape(client)
    response = await client.get(f"/v1_1/{CLOUD}/download_backup?{download_query(result['asset_id'], result['version_id'])}")
    assert response.status == 200 and len(await response.read()) == 1100
    after = await scrape(client)
    route = "/v1_1/{cloud_name}/download_backup"
    assert value(after, "versionstore_http_sent_bytes_total", route=route) - value(before, "versionstore_http_sent_bytes_total",
                                                                                  route=route) == 1100


async def test_labels_stay_bounded_whatever_the_urls(client: TestClient, api: Api) -> None:
    """1000 distinct public_ids (and unknown paths) do not make 1000 series: routes are labelled
    by their canonical path, never by the URL."""
    await api.upload(b"x", public_id="metrics/bounded-0")
    before = await scrape(client)  # the registry is per process: other tests' series are there too
    for n in range(1000):
        response = await client.get(f"/v1_1/{CLOUD}/resources/image/upload/metrics/bounded-{n}", headers=BASIC_HEADERS)
        assert response.status in (200, 404)
    for n in range(50):
        assert (await client.get(f"/no/such/path/{n}")).status == 404
        assert (await client.get(f"/v1_1/{CLOUD}/nothing-{n}")).status == 404
    text = await (await client.get("/metrics")).text()
    assert "bounded-" not in text and "nothing-" not in text and "/no/such" not in text
    after = samples(text)
    new_series = {key for key in after if key not in before and key.startswith("versionstore_http_requests_total")}
    assert len(new_series) < 30, new_series  # a few routes x statuses, not one per URL
    route = "/v1_1/{cloud_name}/resources/{rt}/{type}/{public_id}"
    counted = value(after, "versionstore_http_requests_total", route=route, status="404") - value(
        before, "versionstore_http_requests_total", route=route, status="404")
    assert counted == 999


async def test_metrics_refuse_requests_a_proxy_forwarded(client: TestClient) -> None:
    for header in ("X-Forwarded-For", "Forwarded", "X-Real-IP"):
        response = await client.get("/metrics", headers={header: "203.0.113.9"})
        assert response.status == 403
        assert "error" in await response.json()


async def test_metrics_token_opens_metrics_to_its_holder_only(aiohttp_client: Any, tmp_path: Path) -> None:
    client = await aiohttp_client(create_app(Config(data_dir=tmp_path / "data", metrics_token="s3cret-token")))
    assert (await client.get("/metrics")).status == 403  # a local client without the token too
    assert (await client.get("/metrics", headers={"Authorization": "Bearer wrong"})).status == 403
    await scrape(client, headers={"Authorization": "Bearer s3cret-token", "X-Forwarded-For": "203.0.113.9"})


# --- request ids -----------------------------------------------------------------------------


async def test_every_response_carries_a_fresh_request_id(client: TestClient) -> None:
    ids = set()
    for path in ("/healthz", f"/v1_1/{CLOUD}/ping", "/nowhere"):
        response = await client.get(path, headers=BASIC_HEADERS)
        ids.add(response.headers["X-Request-Id"])
    assert len(ids) == 3 and all(re.fullmatch(r"[0-9a-f]+", i) for i in ids)


async def test_a_sane_incoming_request_id_is_echoed(client: TestClient) -> None:
    for sane in ("abc-123", "3f2c8a1e-5b7d-4c0e-9a61-2f1d0b9c7e44", "trace:span.1_2+x/y="):
        response = await client.get("/healthz", headers={"X-Request-Id": sane})
        assert response.headers["X-Request-Id"] == sane


@pytest.mark.parametrize("insane", ["x" * 129, "has space", "quote\"d", "<script>", "\u00e9t\u00e9", "-leading-dash"])
async def test_an_unsafe_incoming_request_id_is_replaced(client: TestClient, insane: str) -> None:
    """A header value we echo into responses and logs: bounded length, plain characters only."""
    response = await client.get("/healthz", headers={"X-Request-Id": insane.encode().decode("latin-1")})
    echoed = response.headers["X-Request-Id"]
    assert echoed != insane and re.fullmatch(r"[0-9a-f]+", echoed)


async def test_cloud_credentials_are_not_needed_for_probes(aiohttp_client: Any, tmp_path: Path) -> None:
    app = create_app(Config(data_dir=tmp_path / "data"))
    client = await aiohttp_client(app)
    await app[META].create_cloud(CLOUD, API_KEY, API_SECRET, auto_backup=True)
    for path in ("/healthz", "/readyz", "/metrics"):
        assert (await client.get(path)).status == 200


async def test_readyz_says_503_when_an_s3_store_does_not_answer(
    aiohttp_client: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, moto_server: Any
) -> None:
    """A real S3 server answers: ready. A backup store whose endpoint nobody listens on: 503
    within the probe's deadline, naming the store; the process stays alive (/healthz)."""
    import time

    from tests.servers import free_port
    from tests.test_blobstore_contract import make_s3_bucket

    for name, value in moto_server.client_env().items():
        monkeypatch.setenv(name, value)
    make_s3_bucket(moto_server.url, "readyz-ok")
    ok = await aiohttp_client(create_app(Config(data_dir=tmp_path / "ok", backup_store="s3://readyz-ok/vs")))
    response = await ok.get("/readyz")
    assert response.status == 200, await response.text()

    dead = f"s3://readyz-dead/vs?endpoint_url=http://127.0.0.1:{free_port()}&region=us-east-1"
    down = await aiohttp_client(create_app(Config(data_dir=tmp_path / "down", backup_store=dead)))
    started = time.monotonic()
    response = await down.get("/readyz")
    body = await response.json()
    assert response.status == 503, body
    assert body["checks"]["backup_store"]["ok"] is False and body["checks"]["primary_store"]["ok"] is True
    assert time.monotonic() - started < 10
    assert (await down.get("/healthz")).status == 200
