"""Other processes' commits on PostgreSQL, heard as they happen (LISTEN/NOTIFY).

SQLite's commit epoch (`PRAGMA data_version`) moves at every commit of any process, so what
versionstore/epoch_cache.py keeps is dropped at once. PostgreSQL has no such counter per
connection; instead every write transaction of the gateway (versionstore/pg.py) sends
`pg_notify(CHANNEL, <its process's instance id>)` with its COMMIT. PostgreSQL delivers a
notification to every session listening on the channel in the same database, only once the
transaction is committed and visible, never for a rollback, and once per transaction however
many statements wrote.

Each process keeps one connection that listens (`CommitListener`): a notification from
another instance bumps `heard`, which is part of the gateway's epoch. While that connection
is not open (not yet, or lost) `listening` is False and the gateway has no epoch: nothing is
cached until it listens again, and each new connection bumps `generation`, so nothing read
before the gap is served after it (notifications sent in the gap are lost). A connection
that died without the socket noticing (no reset from a peer that vanished) is found by a
trivial query every PROBE_SECONDS; the epoch's time bucket (pg.CACHE_SECONDS) bounds the lag
until then.
"""

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

import asyncpg

#: The NOTIFY channel of commits (channels are per database: clusters shared with other
#: databases do not hear each other).
CHANNEL = "versionstore_commits"
#: Seconds between liveness probes of the listening connection, and how long one may take.
PROBE_SECONDS = 5.0
PROBE_TIMEOUT = 3.0
#: Seconds a (re)connection may take; then waits between attempts, doubling up to the last.
CONNECT_SECONDS = 5.0
RETRY_FIRST = 0.1
RETRY_LAST = 5.0
#: What a lost or refused connection raises.
_LOST = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)

log = logging.getLogger(__name__)


class CommitListener:
    """Counts the commits of other processes (`heard`) while connected (`listening`)."""

    def __init__(self, connect: Callable[[], Awaitable[asyncpg.Connection]], instance: str) -> None:
        #: This process's payload: its own notifications are not counted (its commits are
        #: counted where they are made, when COMMIT returns).
        self.instance = instance
        self.heard = 0
        self.generation = 0
        self._connect = connect
        self._conn: asyncpg.Connection | None = None
        self._task: asyncio.Task[None] | None = None
        self._lost = asyncio.Event()
        self._closed = False

    @property
    def listening(self) -> bool:
        """Connected and listening (a connection lost a moment ago counts as lost, before
        asyncpg's termination callback has run)."""
        conn = self._conn
        return conn is not None and not conn.is_closed()

    @property
    def pid(self) -> int | None:
        """The listening session's backend process id (pg_stat_activity), while connected."""
        return None if self._conn is None else self._conn.get_server_pid()

    async def start(self) -> None:
        """Listen now if the database answers (so the first requests can already cache), then
        keep listening, reconnecting in the background."""
        with contextlib.suppress(*_LOST):
            await self._listen()
        self._task = asyncio.create_task(self._keep_listening(), name="versionstore commit listener")

    async def close(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(*_LOST):  # asyncpg cuts a connection it could not close
                await conn.close(timeout=PROBE_TIMEOUT)

    async def _listen(self) -> None:
        conn = await asyncio.wait_for(self._connect(), CONNECT_SECONDS)
        try:
            conn.add_termination_listener(self._terminated)
            await asyncio.wait_for(conn.add_listener(CHANNEL, self._notified), CONNECT_SECONDS)
        except BaseException:
            conn.terminate()
            raise
        if self._closed:
            conn.terminate()
            return
        # Only now: a read under the new epoch starts after LISTEN, so it sees every commit
        # whose notification this connection will not deliver.
        self.generation += 1
        self._conn = conn

    def _notified(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        if payload != self.instance:
            self.heard += 1

    def _terminated(self, conn: object) -> None:
        if conn is self._conn:
            self._conn = None
            self._lost.set()

    async def _keep_listening(self) -> None:
        wait = RETRY_FIRST
        while True:
            if self._conn is None:
                try:
                    await self._listen()
                    wait = RETRY_FIRST
                except Exception as exc:  # whatever it is, keep trying: meanwhile nothing is cached
                    if wait == RETRY_FIRST:
                        log.warning("commit listener cannot connect (caches off until it does): %s: %s", type(exc).__name__, exc)
                    await asyncio.sleep(wait)
                    wait = min(2 * wait, RETRY_LAST)
                continue
            self._lost.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._lost.wait(), PROBE_SECONDS)
                continue  # lost: reconnect at once
            await self._probe()

    async def _probe(self) -> None:
        """A trivial query on the listening connection; no answer in PROBE_TIMEOUT: it is
        dropped (epoch None) and replaced."""
        conn = self._conn
        if conn is None:
            return
        try:
            await asyncio.wait_for(conn.fetchval("SELECT 1"), PROBE_TIMEOUT)
        except Exception as exc:
            log.warning("commit listener did not answer its probe, reconnecting: %s: %s", type(exc).__name__, exc)
            conn.terminate()
            if self._conn is conn:
                self._conn = None
