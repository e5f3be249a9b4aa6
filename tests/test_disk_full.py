"""A full disk (issue 8 item 13): the client is told "Insufficient storage", nothing half-written
stays behind (no spool file, no version without bytes), and health and status report low space.

The server runs on a real, small file system: a tmpfs mounted in a private mount namespace of
the server process (`unshare --mount`, plus `--user --map-root-user` when not root), so nothing
outside the test sees it and the real disk is never filled. Where namespaces are unavailable
the end-to-end tests skip; the classification tests below always run.
"""

import errno
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import API_KEY, API_SECRET, BASIC_HEADERS, CLOUD, sign
from tests.servers import free_port, wait_http_ready
from versionstore.disk_space import is_disk_full, space_report

FS_BYTES = 6 << 20


# --- recognising a full disk wherever it surfaces ------------------------------------------------


def _chained(outer: Exception, inner: BaseException) -> Exception:
    try:
        try:
            raise inner
        except BaseException as exc:
            raise outer from exc
    except Exception as exc:
        return exc


@pytest.mark.parametrize(
    "exc",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        OSError(errno.EDQUOT, "Disk quota exceeded"),
        sqlite3.OperationalError("database or disk is full"),
        ExceptionGroup("task group", [ValueError("x"), OSError(errno.ENOSPC, "full")]),
        _chained(RuntimeError("store put failed"), OSError(errno.ENOSPC, "full")),
    ],
    ids=["ENOSPC", "EDQUOT", "sqlite full", "in a group", "as a cause"],
)
def test_full_disk_is_recognised(exc: BaseException) -> None:
    assert is_disk_full(exc)


@pytest.mark.parametrize("exc", [OSError(errno.EIO, "io"), sqlite3.OperationalError("database is locked"), ValueError("no")])
def test_other_errors_are_not_a_full_disk(exc: BaseException) -> None:
    assert not is_disk_full(exc)


def test_space_report(tmp_path: Path) -> None:
    report = space_report(tmp_path, 1)
    assert report["free_bytes"] > 0 and report["low_space"] is False
    assert space_report(tmp_path, 1 << 62)["low_space"] is True


# --- a real small file system ---------------------------------------------------------------------


def _unshare_prefix() -> list[str] | None:
    unshare = shutil.which("unshare")
    if unshare is None:
        return None
    candidates = [[unshare, "--mount", "--propagation", "private"]]
    candidates.append([unshare, "--user", "--map-root-user", "--mount", "--propagation", "private"])
    with tempfile.TemporaryDirectory() as where:
        for prefix in candidates if os.geteuid() == 0 else candidates[1:]:
            probe = subprocess.run([*prefix, "sh", "-c", 'mount -t tmpfs -o size=1m tmpfs "$0"', where], capture_output=True, timeout=20)
            if probe.returncode == 0:
                return prefix
    return None


class SmallDiskServer:
    """`versionstore serve` whose data dir is a tmpfs of FS_BYTES in its own mount namespace."""

    def __init__(self, prefix: list[str], data_dir: Path, log_path: Path, env: dict[str, str]) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        data_dir.mkdir(parents=True)
        script = (
            'mount -t tmpfs -o size="$1" tmpfs "$2" && '
            '"$3" -m versionstore cloud create "$4" --api-key "$5" --api-secret "$6" --data-dir "$2" >/dev/null && '
            'exec "$3" -m versionstore serve --data-dir "$2" --host 127.0.0.1 --port "$7"'
        )
        args = [str(FS_BYTES), str(data_dir), sys.executable, CLOUD, API_KEY, API_SECRET, str(self.port)]
        self.log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            [*prefix, "sh", "-c", script, "sh", *args], stdout=self.log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True, env={**os.environ, **env},
        )
        if not wait_http_ready(self.proc, f"{self.url}/healthz"):
            self.stop()
            raise AssertionError(f"server on a small disk did not start: {log_path.read_text()[-3000:]}")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def inside(self) -> Path:
        """The data dir as the server sees it (its mount namespace), through /proc."""
        return Path(f"/proc/{self.proc.pid}/root") / str(self.data_dir).lstrip("/")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.log.close()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[SmallDiskServer]:
    prefix = _unshare_prefix()
    if prefix is None:
        pytest.skip("no private mount namespace with a tmpfs available here (unshare --mount)")
    env = {"VERSIONSTORE_MIN_FREE_BYTES": str(2 << 20), "VERSIONSTORE_POLL_INTERVAL": "0.2"}
    server = SmallDiskServer(prefix, tmp_path / "data", tmp_path / "serve.log", env)
    yield server
    server.stop()


async def _upload(session: aiohttp.ClientSession, url: str, data: bytes, public_id: str) -> tuple[int, dict[str, Any]]:
    form = aiohttp.FormData()
    for key, value in sign({"public_id": public_id}).items():
        form.add_field(key, value)
    form.add_field("file", data, filename="f.bin", content_type="application/octet-stream")
    async with session.post(f"{url}/v1_1/{CLOUD}/raw/upload", data=form) as response:
        return response.status, await response.json()


def _insufficient(status: int, body: dict[str, Any]) -> bool:
    return status == 500 and body["error"]["message"].startswith("Insufficient storage")


async def test_upload_larger_than_the_free_space(small_disk: SmallDiskServer) -> None:
    async with aiohttp.ClientSession() as session:
        status, body = await _upload(session, small_disk.url, os.urandom(FS_BYTES + (1 << 20)), "big/one")
        assert _insufficient(status, body), (status, body)
        assert [p for p in (small_disk.inside / "spool").rglob("*") if p.is_file()] == []  # the partial spool file is gone
        async with session.get(f"{small_disk.url}/v1_1/{CLOUD}/resources/raw/upload/big/one", headers=BASIC_HEADERS) as response:
            assert response.status == 404  # nothing was recorded
        status, body = await _upload(session, small_disk.url, b"small", "small/one")  # space is back
        assert status == 200, body
    log = (small_disk.data_dir.parent / "serve.log").read_text()
    assert "Traceback" not in log and "insufficient storage" in log


async def test_filling_the_disk_step_by_step(small_disk: SmallDiskServer) -> None:
    """Uploads, then metadata-only writes (SQLite) until the disk is full: each failure says
    insufficient storage, never "General error"; health reports low space; what was
    acknowledged is still there, whole."""
    url = small_disk.url
    acknowledged: dict[str, int] = {}
    failures: list[tuple[str, int, dict[str, Any]]] = []
    async with aiohttp.ClientSession() as session:
        for size in (512 << 10, 64 << 10, 4 << 10, 512):
            for i in range(200):
                public_id = f"fill/{size}/{i}"
                status, body = await _upload(session, url, os.urandom(size), public_id)
                if status != 200:
                    failures.append(("upload", status, body))
                    break
                acknowledged[public_id] = size
        tag_failures = 0
        for i in range(300):
            form = sign({"tag": f"t{i}-" + "x" * 200, "command": "add", "public_ids": list(acknowledged)[:20]})
            form = {k: ",".join(v) if isinstance(v, list) else v for k, v in form.items()}
            async with session.post(f"{url}/v1_1/{CLOUD}/raw/tags", data=form) as response:
                if response.status != 200:
                    failures.append(("tags", response.status, await response.json()))
                    tag_failures += 1
                    if tag_failures >= 3:
                        break
        assert failures, "the disk never filled up"
        for what, status, body in failures:
            assert _insufficient(status, body), (what, status, body)
        async with session.get(f"{url}/healthz") as response:
            health = await response.json()
        assert health["data_dir"]["low_space"] is True and health["data_dir"]["free_bytes"] < (2 << 20), health
        async with session.get(f"{url}/v1_1/{CLOUD}/versionstore/backup", headers=BASIC_HEADERS) as response:
            status_body = await response.json()
        assert response.status == 200 and status_body["data_dir"]["low_space"] is True, status_body
        assert [p for p in (small_disk.inside / "spool").rglob("*") if p.is_file()] == []
        for public_id, size in list(acknowledged.items())[:: max(1, len(acknowledged) // 10)]:
            async with session.get(f"{url}/v1_1/{CLOUD}/resources/raw/upload/{public_id}", headers=BASIC_HEADERS) as response:
                resource = await response.json()
            assert response.status == 200 and resource["bytes"] == size, resource
    assert "Traceback" not in (small_disk.data_dir.parent / "serve.log").read_text()
