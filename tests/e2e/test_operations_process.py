"""`versionstore serve` as a process: JSON log lines carrying the request id, and metrics kept
in a multi-process directory (what `serve --workers N` relies on)."""

import json
import time
import urllib.request
from pathlib import Path

import cloudinary.uploader

from tests.e2e.conftest import API_KEY, API_SECRET, CLOUD, configure_sdk, running_server


def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def test_json_log_lines_carry_the_request_id(tmp_path: Path) -> None:
    with running_server(tmp_path, env={"VERSIONSTORE_LOG_FORMAT": "json"}) as server:
        # A broken gzip body is logged (at info) while the request is handled.
        request = urllib.request.Request(
            f"{server.base_url}/v1_1/{CLOUD}/resources/image/upload/x", data=b"not gzip at all", method="POST",
            headers={"Content-Encoding": "gzip", "Content-Type": "application/x-www-form-urlencoded",
                     "X-Request-Id": "e2e-json-log-1", "Authorization": _basic()},
        )
        try:
            urllib.request.urlopen(request, timeout=10)
        except urllib.error.HTTPError as exc:
            assert exc.code == 400
            assert exc.headers["X-Request-Id"] == "e2e-json-log-1"
        deadline = time.monotonic() + 5
        while "e2e-json-log-1" not in server.log_tail(100_000) and time.monotonic() < deadline:
            time.sleep(0.05)
        lines = [line for line in server.log_tail(100_000).splitlines() if line.startswith("{")]
    records = [json.loads(line) for line in lines]  # every log line is one JSON object
    assert records and all({"time", "level", "logger", "message"} <= set(r) for r in records)
    mine = [r for r in records if r.get("request_id") == "e2e-json-log-1"]
    assert mine, records
    assert "bad request body" in mine[0]["message"]


def _basic() -> str:
    import base64

    return "Basic " + base64.b64encode(f"{API_KEY}:{API_SECRET}".encode()).decode()


def test_metrics_in_a_multiprocess_directory(tmp_path: Path) -> None:
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    (metrics_dir / "counter_12345.db").write_bytes(b"stale file of an earlier run")
    with running_server(tmp_path, env={"VERSIONSTORE_METRICS_DIR": str(metrics_dir)}) as server:
        configure_sdk(server.base_url)
        cloudinary.uploader.upload(b"multiprocess metrics" * 50, public_id="mp/one", backup=True, resource_type="raw")
        status, headers, body = _get(f"{server.base_url}/metrics")
        assert status == 200, body
        text = body.decode()
        assert not (metrics_dir / "counter_12345.db").exists()  # stale values are not summed in
        assert list(metrics_dir.glob("*.db"))  # values live in files a scrape of any worker reads
        upload = [line for line in text.splitlines()
                  if line.startswith("versionstore_http_requests_total{") and '"/v1_1/{cloud_name}/{rt}/upload"' in line]
        assert upload and float(upload[0].rsplit(" ", 1)[1]) == 1.0, text
        assert "versionstore_revisions_written_total" in text
        assert 'versionstore_pending_revisions{cloud="demo"} 0.0' in text
