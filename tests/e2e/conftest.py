"""End-to-end fixtures: `versionstore serve` as a real process, driven by the official SDK.

Nothing here imports the service in-process: the server is started with `python -m versionstore
serve` in its own process group, its output goes to a log file, and tests talk to it over real
sockets on 127.0.0.1 only.
"""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import aiohttp
import blake3
import cloudinary
import pytest

from tests.servers import wait_http_ready

CLOUD = "demo"
API_KEY = "key123"
API_SECRET = "secret456"
READY_TIMEOUT = 30.0
POLL_INTERVAL = 0.02


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/e2e/" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(pytest.mark.e2e)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cli(
    *args: str, data_dir: Path, check: bool = True, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run `python -m versionstore ...` (the real CLI) against a data directory.

    `env` adds variables to this process's environment (e.g. AWS_* to reach a bucket).
    """
    result = subprocess.run(
        [sys.executable, "-m", "versionstore", *args, "--data-dir", str(data_dir)],
        capture_output=True, text=True, timeout=60, env={**os.environ, **env} if env else None,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"CLI {args} failed ({result.returncode}): {result.stdout}\n{result.stderr}")
    return result


class ServerProcess:
    """One `versionstore serve` process on a data dir; restartable on the same dir."""

    def __init__(self, data_dir: Path, log_dir: Path, env: dict[str, str] | None = None) -> None:
        self.data_dir = data_dir
        self.log_dir = log_dir
        self.env = env or {}
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.last_returncode: int | None = None
        self.log_path: Path | None = None
        self.starts = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log_tail(self, limit: int = 4000) -> str:
        if self.log_path is None or not self.log_path.exists():
            return "<no log>"
        return self.log_path.read_text(errors="replace")[-limit:]

    def start(self) -> None:
        assert self.proc is None, "already running"
        last_error = ""
        for _attempt in range(3):  # a port picked by bind(0) can be taken before serve binds it
            self.starts += 1
            self.port = free_port()
            self.log_path = self.log_dir / f"serve-{self.starts}.log"
            # the file server and notification receivers of these tests listen on loopback,
            # which the egress policy denies unless allowed
            env = {**os.environ, "PYTHONUNBUFFERED": "1", "VERSIONSTORE_FETCH_ALLOW": "127.0.0.1", **self.env}
            with open(self.log_path, "wb") as log:
                self.proc = subprocess.Popen(
                    [sys.executable, "-m", "versionstore", "serve", "--data-dir", str(self.data_dir),
                     "--host", "127.0.0.1", "--port", str(self.port)],
                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    start_new_session=True, env=env,
                )
            try:
                ready = self._wait_ready()
            except BaseException:  # interrupted (Ctrl-C, a test timeout): no server left behind
                self._terminate()
                raise
            if ready:
                return
            last_error = self.log_tail()
            self._terminate()
        raise AssertionError(f"versionstore serve did not become ready; log tail:\n{last_error}")

    def _wait_ready(self) -> bool:
        assert self.proc is not None
        return wait_http_ready(self.proc, f"{self.base_url}/healthz", READY_TIMEOUT, POLL_INTERVAL)

    def _signal_group(self, sig: int) -> None:
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)

    def _terminate(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self._signal_group(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                self.proc.wait(timeout=10)
        self.last_returncode = self.proc.returncode
        self.proc = None

    def stop(self) -> None:
        """Graceful: SIGTERM, then SIGKILL if it does not exit."""
        self._terminate()

    def kill(self) -> None:
        """A crash: SIGKILL the whole process group, no cleanup runs."""
        if self.proc is None:
            return
        self._signal_group(signal.SIGKILL)
        self.proc.wait(timeout=10)
        self.last_returncode = self.proc.returncode
        self.proc = None

    def restart(self, *, crash: bool = False) -> None:
        """Stop (or kill) and start again on the same data dir; the port changes."""
        self.kill() if crash else self.stop()
        self.start()
        configure_sdk(self.base_url)


def configure_sdk(base_url: str, cloud_name: str = CLOUD, api_key: str = API_KEY, api_secret: str = API_SECRET) -> None:
    cloudinary.reset_config()
    cloudinary.config(cloud_name=cloud_name, api_key=api_key, api_secret=api_secret, upload_prefix=base_url)


def bodies_read(server: ServerProcess) -> dict[str, float]:
    """`versionstore_upload_bodies_total` by reader (`small`, `stream`) from the server's /metrics."""
    with urllib.request.urlopen(f"{server.base_url}/metrics", timeout=30) as response:
        text = response.read().decode()
    prefix = 'versionstore_upload_bodies_total{reader="'
    return {line[len(prefix) :].split('"')[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix)}


@contextlib.contextmanager
def running_server(tmp: Path, env: dict[str, str] | None = None) -> Iterator[ServerProcess]:
    data_dir = tmp / "data"
    cli("cloud", "create", CLOUD, "--api-key", API_KEY, "--api-secret", API_SECRET, data_dir=data_dir)
    server = ServerProcess(data_dir, tmp, env)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One server per test module (fast); tests use distinct public ids."""
    with running_server(tmp_path_factory.mktemp("vs")) as srv:
        yield srv


@pytest.fixture
def fresh_server(tmp_path: Path) -> Iterator[ServerProcess]:
    """A server of its own, for tests that kill or measure it."""
    with running_server(tmp_path) as srv:
        yield srv


@pytest.fixture
def sdk(server: ServerProcess) -> Iterator[ServerProcess]:
    """The SDK configured against the module's server, per test."""
    configure_sdk(server.base_url)
    yield server
    cloudinary.reset_config()


# --- a local HTTP file server for remote-URL uploads ------------------------------------------


class FileServer:
    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        handler = self._handler()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def add(self, path: str, data: bytes) -> str:
        self.files["/" + path.lstrip("/")] = data
        return f"{self.base_url}/{path.lstrip('/')}"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        files = self.files

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802
                data = files.get(self.path.split("?", 1)[0])
                if data is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass

        return Handler


@pytest.fixture(scope="session")
def file_server() -> Iterator[FileServer]:
    fs = FileServer()
    fs.thread.start()
    try:
        yield fs
    finally:
        fs.httpd.shutdown()
        fs.httpd.server_close()


# --- streamed uploads without the SDK's in-memory body (memory and crash tests) ---------------


def signed_fields(**params: object) -> dict[str, str]:
    """Upload params signed by the SDK's own signer (needs `configure_sdk` first)."""
    import cloudinary.utils

    params = {"timestamp": str(cloudinary.utils.now()), **params}
    return {k: str(v) for k, v in cloudinary.utils.sign_request(params, {}).items()}


async def stream_upload(
    session: aiohttp.ClientSession, base_url: str, body: AsyncIterable[bytes], *, filename: str = "stream.bin",
    resource_type: str = "raw", **params: object,
) -> dict[str, object]:
    """A signed multipart upload whose file part comes from an async generator (chunked request)."""
    import aiohttp
    import aiohttp.payload

    with aiohttp.MultipartWriter("form-data") as writer:
        for key, value in signed_fields(**params).items():
            part = writer.append(value)
            part.set_content_disposition("form-data", name=key)
        part = writer.append_payload(
            aiohttp.payload.AsyncIterablePayload(body, content_type="application/octet-stream")
        )
        part.set_content_disposition("form-data", name="file", filename=filename)
        async with session.post(f"{base_url}/v1_1/{CLOUD}/{resource_type}/upload", data=writer) as response:
            result = await response.json()
            assert response.status == 200, result
            return dict(result)


_READ = 1 << 20


def download_digest(url: str, timeout: float = 60) -> tuple[int, int, str]:
    """(status, size, BLAKE3) of a download, streamed (the bytes are not kept)."""
    hasher = blake3.blake3()
    size = 0
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            status = response.status
            while data := response.read(_READ):
                hasher.update(data)
                size += len(data)
    except urllib.error.HTTPError as exc:
        return exc.code, 0, ""
    return status, size, hasher.hexdigest()


def wait_for(condition: Any, timeout: float, what: str, interval: float = 0.02) -> Any:
    """Poll `condition()` until it returns something truthy (returned), or fail naming `what`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")
