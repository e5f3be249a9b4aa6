"""`versionstore serve`: bind, open, listen, and only then say so.

The order is for the operator at the terminal: the port is bound first (a busy port fails
before anything is opened), the service's resources are opened next (the database, the
stores; a failure releases what was opened), and "listening on" and the demo environment's
CLOUDINARY_URL are printed once requests are accepted. Any start-up failure is a `StartupError`:
one line for the operator, no traceback, and the process exits because nothing is left open.
"""

import asyncio
import errno
import logging
import signal
import socket
from collections.abc import Awaitable, Callable

from aiohttp import web

from versionstore.config import Config, StartupError
from versionstore.http.app import META, create_app
from versionstore.repository import MetadataRepository

#: Seconds in-flight requests get to finish after SIGTERM/SIGINT (aiohttp's run_app default).
SHUTDOWN_TIMEOUT = 60.0


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
) -> None:
    """Serve until SIGTERM or SIGINT. `ready(meta, base_url)` runs once requests are accepted."""
    config.check()
    sock = bind(config.host, config.port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runner = web.AppRunner(
        create_app(config), access_log=logging.getLogger("aiohttp.access") if access_log else None,
        keepalive_timeout=75.0, shutdown_timeout=SHUTDOWN_TIMEOUT,
    )
    try:
        try:
            await runner.setup()
        except Exception as exc:
            raise StartupError(f"cannot start: {one_line(exc)}") from None
        await web.SockSite(runner, sock).start()
        host, port = sock.getsockname()[:2]
        base_url = f"http://{config.host if config.host not in ('0.0.0.0', '::', '') else host}:{port}"
        if ready is not None and not stop.is_set():
            try:
                await ready(runner.app[META], base_url)
            except Exception as exc:
                raise StartupError(f"cannot start: {one_line(exc)}") from None
        await stop.wait()
    finally:
        await runner.cleanup()
        sock.close()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
