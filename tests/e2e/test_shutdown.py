"""SIGTERM stops `versionstore serve` promptly, whatever its clients are doing (http/shutdown.py).

The stop waits for the requests in flight up to the grace (VERSIONSTORE_SHUTDOWN_GRACE), cuts
what is left, and the process exits 0 within the grace plus a small margin. Before this, a
flood of early-answered bodies held the stop for aiohttp's 10 s of "lingering" reads, and a
client that stopped sending mid-body held it for 60 s (the e2e fixture SIGKILLed it at 10 s).
"""

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import cloudinary.api
import cloudinary.exceptions
import cloudinary.uploader
import pytest

from tests.e2e.conftest import CLOUD, ServerProcess, cli, configure_sdk, running_server, stream_upload, wait_for
from tests.e2e.test_crash import spooled_parts
from tests.e2e.test_unauth_memory import send
from versionstore.http.shutdown import STOP_MARGIN

#: What the test allows for a process to exit when nothing is in flight at the signal.
PROMPT = 3.0


def stop_timed(server: ServerProcess, limit: float = 40.0, sig: int = signal.SIGTERM) -> tuple[float, int | None]:
    """Signal the server's process group: (seconds to exit, exit status); SIGKILL past `limit`."""
    assert server.proc is not None
    proc, started = server.proc, time.monotonic()
    os.killpg(proc.pid, sig)
    try:
        code: int | None = proc.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        server.kill()
        code = None
    server.proc = None
    return time.monotonic() - started, code


@contextlib.contextmanager
def stuck_clients(port: int) -> Iterator[None]:
    """Connections that never finish: idle keep-alive, half-sent headers, bodies cut short
    (unauthenticated, and a form whose file part never ends)."""
    sockets = []
    try:
        for _ in range(3):
            idle = socket.create_connection(("127.0.0.1", port))
            idle.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert idle.recv(4096).startswith(b"HTTP/1.1 200")
            headers = socket.create_connection(("127.0.0.1", port))
            headers.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            body = socket.create_connection(("127.0.0.1", port))
            body.sendall(
                f"POST /v1_1/{CLOUD}/raw/upload HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000\r\n"
                "Content-Type: multipart/form-data; boundary=b\r\n\r\n--b\r\n"
                'Content-Disposition: form-data; name="file"; filename="x.bin"\r\n\r\n'.encode() + b"x" * 5000
            )
            sockets += [idle, headers, body]
        time.sleep(0.3)  # the server has read what was sent
        yield
    finally:
        for sock in sockets:
            sock.close()


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_after_an_unauthenticated_flood_exits_at_once(fresh_server: ServerProcess, sig: int) -> None:
    async def flood() -> list[int]:
        url = f"{fresh_server.base_url}/v1_1/{CLOUD}/image/upload"
        async with aiohttp.ClientSession() as session:
            return await asyncio.gather(*(send(session, url) for _ in range(6)))

    assert set(asyncio.run(flood())) <= {0, 400, 429}
    elapsed, code = stop_timed(fresh_server, sig=sig)
    assert code == 0, fresh_server.log_tail()
    assert elapsed < PROMPT, f"exit took {elapsed:.1f} s after the signal, nothing was in flight"


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_with_stuck_clients_exits_within_the_grace(tmp_path: Path, workers: int) -> None:
    grace = 2.0
    env = {"VERSIONSTORE_SHUTDOWN_GRACE": str(grace), "VERSIONSTORE_WORKERS": str(workers)}
    with running_server(tmp_path, env) as server, stuck_clients(server.port):
        wait_for(lambda: "versionstore listening on" in server.log_tail(), 30, "every worker listening")
        assert server.proc is not None
        proc, started = server.proc, time.monotonic()
        os.killpg(proc.pid, signal.SIGTERM)
        time.sleep(0.5)
        assert proc.poll() is None, "the bodies in flight get their grace"
        assert refused(server.port), "a stopping server accepts no new connection"
        try:
            code: int | None = proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            server.kill()
            code = None
        elapsed = time.monotonic() - started
        server.proc = None
    assert code == 0, server.log_tail()
    assert grace <= elapsed < grace + STOP_MARGIN, f"exit {elapsed:.1f} s after SIGTERM (grace {grace} s)"
    assert "still running after the 2 s grace; cancelling them" in server.log_tail(20_000)


async def slow_body(blocks: int | None, delay: float) -> AsyncIterator[bytes]:
    """256 KiB blocks, `delay` s apart; `blocks` None: never ends."""
    sent = 0
    while blocks is None or sent < blocks:
        yield os.urandom(256 * 1024)
        sent += 1
        await asyncio.sleep(delay)


def test_sigterm_mid_upload_finishes_what_fits_the_grace_and_publishes_nothing_half(tmp_path: Path) -> None:
    grace = 6.0  # the finishing upload needs about 2 s more after the signal: room for a loaded machine
    env = {"VERSIONSTORE_SHUTDOWN_GRACE": str(grace), "VERSIONSTORE_POLL_INTERVAL": "0.05"}
    with running_server(tmp_path, env) as server:
        configure_sdk(server.base_url)
        before = cloudinary.uploader.upload(b"v1", public_id="stop/existing", resource_type="raw")

        async def uploads() -> tuple[BaseException | dict[str, object], ...]:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
                base = server.base_url
                cut_new = stream_upload(session, base, slow_body(None, 0.05), public_id="stop/cut-new")
                cut_existing = stream_upload(session, base, slow_body(None, 0.05), public_id="stop/existing")
                finishing = stream_upload(session, base, slow_body(10, 0.2), public_id="stop/finished")
                tasks = [asyncio.ensure_future(c) for c in (cut_new, cut_existing, finishing)]
                while len(spooled_parts(server.data_dir)) < 3:
                    assert not any(t.done() for t in tasks), [t.result() for t in tasks if t.done()]
                    await asyncio.sleep(0.02)
                stopping = asyncio.ensure_future(asyncio.to_thread(stop_timed, server))
                results = await asyncio.gather(*tasks, return_exceptions=True)
                elapsed, code = await stopping
                assert code == 0, server.log_tail()
                assert elapsed < grace + STOP_MARGIN, f"exit {elapsed:.1f} s after SIGTERM (grace {grace} s)"
                return tuple(results)

        cut_new, cut_existing, finished = asyncio.run(uploads())
        assert isinstance(cut_new, (aiohttp.ClientError, asyncio.TimeoutError)), cut_new
        assert isinstance(cut_existing, (aiohttp.ClientError, asyncio.TimeoutError)), cut_existing
        assert isinstance(finished, dict) and finished["bytes"] == 10 * 256 * 1024, finished
        assert not spooled_parts(server.data_dir), "a cut upload's spool file is removed by the stop"

        result = cli("verify", "--quiet", data_dir=server.data_dir, check=False)
        assert result.returncode == 0, result.stdout + result.stderr
        server.start()
        configure_sdk(server.base_url)
        assert cloudinary.api.resource("stop/finished", resource_type="raw")["bytes"] == 10 * 256 * 1024
        with pytest.raises(cloudinary.exceptions.NotFound):
            cloudinary.api.resource("stop/cut-new", resource_type="raw")
        history = cloudinary.api.resource("stop/existing", resource_type="raw", versions=True)["versions"]
        assert [v["version_id"] for v in history] == [before["version_id"]]


def test_the_watchdog_ends_a_process_that_hangs_in_its_stop(tmp_path: Path) -> None:
    """Whatever blocks the stop (here a non-daemon thread that never returns, which the
    interpreter joins at exit), the process ends: exit status 1 and the threads' stacks."""
    script = (
        "import threading, time\n"
        "from versionstore.http.shutdown import Watchdog\n"
        "threading.Thread(target=lambda: time.sleep(3600)).start()\n"
        "watchdog = Watchdog(0)\n"
        "watchdog.limit = 0.5\n"
        "watchdog.arm()\n"
    )
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert time.monotonic() - started < 10
    assert "exiting now" in result.stderr and "most recent call first" in result.stderr, result.stderr
