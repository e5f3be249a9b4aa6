"""The batch client's HTTP (versionstore/backup_io.py's `Api`): each exchange runs whole on a
worker thread with blocking `http.client`, over connections kept alive between exchanges.

Why not aiohttp, the service's own framework and the client's until 0.6: a batch client sends
one file per request and waits for a small JSON answer, which needs neither an event loop per
socket nor aiohttp's per-request machinery. Importing aiohttp was ~0.13 s of the client's cold
start, during which the server has nothing to do, and its per-request CPU competed with the
server's for the same cores: on the `--scale 0.2` library the first run took ~10 % less wall
time on `http.client` (docs/performance.md, "The batch client on http.client").

The event loop of versionstore/backup_client.py only waits for exchanges. One that is
cancelled (Ctrl-C) is aborted by shutting its socket down, so its thread ends at once instead
of at the next timeout.
"""

import concurrent.futures
import contextlib
import http.client
import socket
import threading
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

CONNECT_TIMEOUT = 30.0
#: Per socket operation (a send or a read), not per exchange: a large upload may take minutes,
#: a server that stops answering for this long fails the exchange (retried as transient).
READ_TIMEOUT = 300.0
USER_AGENT = "versionstore-initial-backup"


class ExchangeError(Exception):
    """The exchange failed on the way (connect, send, or reading the answer): the request may or
    may not have reached the server, so the caller retries it as transient."""


class Body(Protocol):
    """A request body that sends itself: `head` goes out with the headers, the rest by `send`."""

    length: int
    content_type: str
    head: bytes

    def send(self, sock: socket.socket) -> None: ...


@dataclass(frozen=True)
class Answer:
    status: int
    reason: str
    headers: http.client.HTTPMessage
    body: bytes


class Ticket:
    """One exchange's socket while it runs, so that another thread can abort it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._aborted = False

    def attach(self, sock: socket.socket | None) -> None:
        with self._lock:
            if self._aborted:
                raise ExchangeError("aborted")
            self._sock = sock

    @property
    def aborted(self) -> bool:
        return self._aborted

    def detach(self) -> None:
        with self._lock:
            self._sock = None

    def abort(self) -> None:
        """Shut the socket down: the exchange's blocking send or read fails at once."""
        with self._lock:
            self._aborted = True
            sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


class Endpoint:
    """Kept-alive connections to one `scheme://host:port/path` and the threads that use them,
    each connection by one exchange at a time."""

    def __init__(self, base: str, workers: int) -> None:
        parts = urlsplit(base)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {base!r}")
        self.https = parts.scheme == "https"
        self.host, self.port = parts.hostname, parts.port
        self.path = parts.path.rstrip("/")
        self.executor = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="initial-backup-http")
        self._idle: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()
        self._context: Any = None
        if self.https:  # made once, before any thread connects; ssl is imported only for https targets
            import ssl

            self._context = ssl.create_default_context()

    def exchange(self, method: str, target: str, headers: dict[str, str], body: "bytes | Body | None", ticket: Ticket) -> Answer:
        """Send one request (`target`: the path under the base, with its query) and read the
        whole answer. A failure on the way raises ExchangeError; the connection then goes."""
        connection = self._take()
        try:
            ticket.attach(connection.sock)
            connection.putrequest(method, self.path + target)
            connection.putheader("User-Agent", USER_AGENT)
            for name, value in headers.items():
                connection.putheader(name, value)
            if body is None:
                connection.endheaders()
            elif isinstance(body, bytes):
                connection.putheader("Content-Length", str(len(body)))
                connection.endheaders(body)
            else:
                connection.putheader("Content-Type", body.content_type)
                connection.putheader("Content-Length", str(body.length))
                connection.endheaders(body.head)  # with the headers, in one send
                assert connection.sock is not None
                body.send(connection.sock)
            response = connection.getresponse()
            data = response.read()
        except (OSError, http.client.HTTPException) as exc:
            connection.close()
            raise ExchangeError(str(exc) or type(exc).__name__) from exc
        except BaseException:
            connection.close()
            raise
        finally:
            ticket.detach()
        if response.will_close:
            connection.close()
        else:
            with self._lock:
                self._idle.append(connection)
        return Answer(response.status, response.reason, response.headers, data)

    def _take(self) -> http.client.HTTPConnection:
        with self._lock:
            if self._idle:
                return self._idle.pop()
        if self.https:
            connection: http.client.HTTPConnection = http.client.HTTPSConnection(
                self.host, self.port, timeout=CONNECT_TIMEOUT, context=self._context)
        else:
            connection = http.client.HTTPConnection(self.host, self.port, timeout=CONNECT_TIMEOUT)
        try:
            connection.connect()  # sets TCP_NODELAY
        except OSError as exc:
            connection.close()
            raise ExchangeError(f"cannot connect to {self.host}:{self.port}: {exc}") from exc
        assert connection.sock is not None
        connection.sock.settimeout(READ_TIMEOUT)
        return connection

    def close(self) -> None:
        self.executor.shutdown(wait=True)
        with self._lock:
            idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()
