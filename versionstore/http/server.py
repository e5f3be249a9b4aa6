"""`versionstore serve`: bind, open, listen, and only then say so.

The order is for the operator at the terminal: the port is bound first (a busy port fails
before anything is opened), the service's resources are opened next (the database, the
stores; a failure releases what was opened), and "listening on" and the demo environment's
CLOUDINARY_URL are printed once requests are accepted. Any start-up failure is a `StartupError`:
one line for the operator, no traceback, and the process exits because nothing is left open.

`serve_workers` (`serve --workers N`): the parent binds the port once, applies the schema
migrations once, and forks N worker processes that accept on the inherited socket (the kernel
spreads connections among them). It prints the banner once all are listening, restarts a
worker that dies, and on SIGTERM/SIGINT stops them all. The workers share the database (SQLite
in WAL) and the stores; what keeps them correct together is in versionstore/claims.py.
"""

import asyncio
import contextlib
import errno
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from aiohttp import web

from versionstore import bootstrap, gclog, heap, stall_log
from versionstore.config import Config, StartupError
from versionstore.http.app import create_app
from versionstore.http.keys import IN_FLIGHT, META
from versionstore.http.metrics import prepare_multiprocess
from versionstore.http.shutdown import CANCEL_WAIT, STOP_MARGIN, Watchdog, stop_serving
from versionstore.repository import MetadataRepository

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run(main)`: asyncio's own event loop. (uvloop was measured and dropped: less CPU
    per request but a p99 four to five times worse on the quiet machine, docs/performance.md.)"""
    with asyncio.Runner() as runner:
        return runner.run(main)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (IPv4 preferred when the name has both)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise StartupError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    family, _, _, _, address = sorted(infos, key=lambda info: info[0] != socket.AF_INET)[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise StartupError(
                f"cannot listen on {host}:{port}: the port is already in use "
                "(another versionstore serve? pick another with --port)"
            ) from None
        raise StartupError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


async def serve(
    config: Config,
    *,
    access_log: bool,
    ready: Callable[[MetadataRepository, str], Awaitable[None]] | None = None,
    sock: socket.socket | None = None,
    listening: Callable[[], None] | None = None,
) -> None:
    """Serve until SIGTERM or SIGINT, then stop within `config.shutdown_grace` plus a few
    seconds (http/shutdown.py). `ready(meta, base_url)` runs once requests are accepted;
    a worker of `serve_workers` gets the parent's `sock` and says `listening()` instead."""
    config.check()
    gc_log_ms = gclog.threshold_from_env()
    stall_log_ms = stall_log.threshold_from_env()
    sock = sock or bind(config.host, config.port)
    stop = asyncio.Event()
    watchdog = Watchdog(config.shutdown_grace)

    def on_signal() -> None:
        watchdog.arm()
        stop.set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    app = create_app(config)
    runner = web.AppRunner(
        app, access_log=logging.getLogger("aiohttp.access") if access_log else None,
        keepalive_timeout=75.0, shutdown_timeout=CANCEL_WAIT,
    )
    slow_collections: gclog.SlowCollections | None = None
    stalls: stall_log.StallWatch | None = None
    try:
        try:
            await runner.setup()
        except Exception as exc:
            raise StartupError(f"cannot start: {one_line(exc)}") from None
        heap.settle()  # the app has started: what is allocated now stays for the process's life
        slow_collections = gclog.install(gc_log_ms, loop.call_soon_threadsafe)  # VERSIONSTORE_GC_LOG_MS (docs/operations.md)
        stalls = stall_log.install(stall_log_ms, loop)  # VERSIONSTORE_STALL_LOG_MS (docs/operations.md)
        await web.SockSite(runner, sock).start()
        base_url = _base_url(config, sock)
        if listening is not None:
            listening()
        if ready is not None and not stop.is_set():
            try:
                await ready(runner.app[META], base_url)
            except Exception as exc:
                raise StartupError(f"cannot start: {one_line(exc)}") from None
        await stop.wait()
    finally:
        await stop_serving(runner, app[IN_FLIGHT], config.shutdown_grace)
        gclog.uninstall(slow_collections)
        stall_log.uninstall(stalls)
        heap.unsettle()
        sock.close()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


def _base_url(config: Config, sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{config.host if config.host not in ('0.0.0.0', '::', '') else host}:{port}"


#: A worker that dies this soon after its start is restarted only after RESTART_DELAY, so a
#: worker that cannot start does not spin the machine.
FAST_EXIT = 5.0
RESTART_DELAY = 1.0


def serve_workers(
    config: Config,
    workers: int,
    *,
    access_log: bool,
    ready: Callable[[MetadataRepository, str], Awaitable[None]] | None = None,
) -> None:
    """Run `workers` service processes on one port and supervise them until SIGTERM/SIGINT."""
    config.check()
    sock = bind(config.host, config.port)
    try:
        asyncio.run(_migrate(config))  # once, before any worker opens the database
    except Exception as exc:
        sock.close()
        raise StartupError(f"cannot start: {one_line(exc)}") from None
    # Metric values in files every worker writes, summed at scrape time (docs/operations.md).
    prepare_multiprocess(config.metrics_dir or config.data_dir / "metrics")
    supervisor = _Supervisor(config, sock, access_log)
    try:
        supervisor.start(workers)
        if ready is not None:
            asyncio.run(_announce(config, _base_url(config, sock), ready))
        supervisor.supervise()
    finally:
        supervisor.stop()
        sock.close()


async def _migrate(config: Config) -> None:
    config.data_dir.mkdir(parents=True, exist_ok=True)
    meta = await bootstrap.open_metadata(config)
    await meta.close()


async def _announce(config: Config, base_url: str, ready: Callable[[MetadataRepository, str], Awaitable[None]]) -> None:
    meta = await bootstrap.open_metadata(config)
    try:
        await ready(meta, base_url)
    finally:
        await meta.close()


class _Supervisor:
    """Forks the workers (from a parent with no threads and no event loop running), restarts
    the ones that die, stops them all on SIGTERM/SIGINT."""

    def __init__(self, config: Config, sock: socket.socket, access_log: bool) -> None:
        self.config = config
        self.sock = sock
        self.access_log = access_log
        self.children: dict[int, tuple[int, float]] = {}  # pid -> (slot, started at)
        self.stopping = False
        self.waiting = False  # blocked in os.wait(): a stop signal interrupts it (_Stopping)

    def start(self, workers: int) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        ready_read, ready_write = os.pipe()
        try:
            for slot in range(workers):
                self._spawn(slot, ready_write)
            os.close(ready_write)
            ready_write = -1
            for _ in range(workers):
                if not os.read(ready_read, 1):  # every worker died before listening
                    raise StartupError("cannot start: the workers exited before listening (see the log above)")
        finally:
            os.close(ready_read)
            if ready_write >= 0:
                os.close(ready_write)
        if self.stopping:
            raise StartupError("stopped during start-up")

    def _spawn(self, slot: int, ready_fd: int | None) -> None:
        # Stop signals are held across the fork: a worker must never run the supervisor's
        # handler (it would signal its siblings from its copy of `children`), and the
        # supervisor's handler must find every worker it has forked in `children`.
        stops = {signal.SIGTERM, signal.SIGINT}
        signal.pthread_sigmask(signal.SIG_BLOCK, stops)
        try:
            pid = os.fork()
            if pid == 0:
                for sig in stops:
                    signal.signal(sig, signal.SIG_DFL)
            else:
                self.children[pid] = (slot, time.monotonic())
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, stops)
        if pid == 0:  # the worker
            code = 0
            try:

                def listening() -> None:
                    if ready_fd is not None:
                        os.write(ready_fd, b"1")
                        os.close(ready_fd)

                run(serve(self.config, access_log=self.access_log, sock=self.sock, listening=listening))
            except StartupError as exc:
                print(f"error: worker {slot}: {exc}", file=sys.stderr, flush=True)
                code = 1
            except BaseException:
                logging.getLogger("versionstore").exception("worker %d failed", slot)
                code = 1
            finally:
                logging.shutdown()
                os._exit(code)

    def _on_signal(self, signum: int, _frame: object) -> None:
        self.stopping = True
        self.sock.close()  # with the workers' copies closed too, new connections are refused
        for pid in list(self.children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        if self.waiting:
            raise _Stopping

    def supervise(self) -> None:
        """Until a stop signal: restart the workers that die. The stop itself, bounded, is `stop()`."""
        log = logging.getLogger("versionstore")
        while self.children and not self.stopping:
            try:
                self.waiting = True
                pid, status = os.wait()
            except (ChildProcessError, _Stopping):
                break
            finally:
                self.waiting = False
            slot, started = self.children.pop(pid, (None, 0.0))
            if slot is None or self.stopping:
                continue
            log.warning("worker %d (pid %d) exited (%s); starting a new one", slot, pid, _describe(status))
            if time.monotonic() - started < FAST_EXIT:
                time.sleep(RESTART_DELAY)
            if not self.stopping:
                self._spawn(slot, None)

    def stop(self) -> None:
        """Stop the workers still running and reap them (an error or a signal in the parent);
        one still there after its own stop's bound (grace + margin, and a second) is killed."""
        self._on_signal(signal.SIGTERM, None)
        deadline = time.monotonic() + self.config.shutdown_grace + STOP_MARGIN + 1
        while self.children and time.monotonic() < deadline:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid:
                self.children.pop(pid, None)
            else:
                time.sleep(0.05)
        for pid in self.children:
            os.kill(pid, signal.SIGKILL)


class _Stopping(Exception):
    """Raised by the supervisor's signal handler to end its wait for a worker's exit."""


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"signal {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit code {os.waitstatus_to_exitcode(status)}"
