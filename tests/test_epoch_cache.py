"""EpochCache (versionstore/epoch_cache.py): what is reused until anything commits; and the
commit epoch of PostgreSQL, which other processes' commits move through LISTEN/NOTIFY."""

import asyncio
import functools
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import pytest

from tests.conftest import METADATA_BACKENDS
from versionstore import pg, pg_commits
from versionstore.epoch_cache import EpochCache
from versionstore.gateway import IntegrityError, migrations
from versionstore.metadata import MetadataStore
from versionstore.pg import PgGateway
from versionstore.pg_commits import CHANNEL, CommitListener

T = TypeVar("T")


def test_a_value_is_served_only_under_the_epoch_it_was_read_under() -> None:
    cache: EpochCache[str, bytes] = EpochCache(100, len)
    assert cache.get("a", 1) is None
    cache.put("a", 1, b"one")
    assert cache.get("a", 1) == b"one"
    assert cache.get("a", 2) is None  # something committed: every entry is dropped
    assert cache.get("a", 1) is None  # ... and does not come back with the old epoch


def test_a_value_read_across_a_commit_is_not_kept() -> None:
    """Read under epoch 1 while another request already saw epoch 2: the value may predate the
    commit that moved it, so it is dropped rather than served under epoch 2."""
    cache: EpochCache[str, bytes] = EpochCache(100, len)
    assert cache.get("a", 1) is None
    assert cache.get("b", 2) is None
    cache.put("a", 1, b"stale?")
    assert cache.get("a", 2) is None


def test_without_an_exact_epoch_nothing_is_cached() -> None:
    cache: EpochCache[str, bytes] = EpochCache(100, len)
    assert cache.get("a", None) is None
    cache.put("a", None, b"x")
    assert cache.get("a", None) is None


def test_the_budget_drops_the_oldest_entries_and_refuses_huge_values() -> None:
    cache: EpochCache[str, bytes] = EpochCache(40, len)
    cache.get("", 7)
    for name in "abcd":
        cache.put(name, 7, name.encode() * 10)
    cache.put("e", 7, b"e" * 10)  # over 40 bytes: "a" goes first
    assert [cache.get(n, 7) is not None for n in "abcde"] == [False, True, True, True, True]
    cache.put("huge", 7, b"h" * 11)  # more than a quarter of the budget
    assert cache.get("huge", 7) is None
    assert cache.get("b", 7) == b"b" * 10


# --- PostgreSQL: the epoch that other processes' commits move (versionstore/pg_commits.py) ----
# Two gateways on one database stand for two processes. CACHE_SECONDS is raised where a test
# must show that a notification, not the once-a-second time bucket, moved the epoch.

pg_only = pytest.mark.skipif("postgresql" not in METADATA_BACKENDS, reason="VERSIONSTORE_TEST_METADATA=sqlite")


async def until(check: Callable[[], T | None], seconds: float, what: str) -> T:
    """Poll `check` (without blocking the loop) until it returns something truthy."""
    deadline = time.monotonic() + seconds
    while not (found := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {seconds} s: {what}")
        await asyncio.sleep(0.002)
    return found


class Spy:
    """A plain connection listening on the commits channel: the payloads in delivery order."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn
        self.payloads: list[str] = []

    @classmethod
    async def on(cls, url: str) -> "Spy":
        spy = cls(await asyncpg.connect(url))
        await spy.conn.add_listener(CHANNEL, lambda _c, _p, _ch, payload: spy.payloads.append(payload))
        return spy

    async def drained(self) -> list[str]:
        """Everything committed so far: notifications arrive in commit order, so once our own
        marker is in, so is all that came before it."""
        await self.conn.execute(f"NOTIFY {CHANNEL}, 'marker'")
        await until(lambda: "marker" in self.payloads, 5, "the marker notification")
        heard, self.payloads = self.payloads[: self.payloads.index("marker")], []
        return heard


_INSERT = "INSERT INTO clouds (name, api_key, api_secret, auto_backup, created_at) VALUES (?, ?, ?, ?, ?)"


async def _insert(db: Any, name: str) -> None:
    await db.execute(_INSERT, (name, f"key-{name}", "s", 0, 0.0))


async def _add_cloud(gate: PgGateway, name: str) -> None:
    async with gate.transaction() as db:
        await _insert(db, name)


@pg_only
async def test_each_write_transaction_notifies_once_at_commit_and_nothing_else_does(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """And moves its own process's epoch when COMMIT returns; nothing else does."""
    monkeypatch.setattr(pg, "CACHE_SECONDS", 3600.0)
    a, b = await PgGateway.open(postgres_url), await PgGateway.open(postgres_url)
    spy = await Spy.on(postgres_url)
    try:
        b_heard, own = b._listener.heard, a.commit_epoch()
        async with a.transaction() as db:  # read-only
            await db.execute("SELECT COUNT(*) FROM clouds")
            await db.execute("UPDATE clouds SET auto_backup = 1 WHERE name = ?", ("no such",))
        with pytest.raises(RuntimeError):
            async with a.transaction() as db:  # rolled back
                await _insert(db, "rolled-back")
                raise RuntimeError("changed my mind")
        assert a.commit_epoch() == own
        await _add_cloud(a, "taken")
        assert a.commit_epoch() != own
        with pytest.raises(IntegrityError):
            await _add_cloud(a, "taken")  # refused
        assert await spy.drained() == [a._listener.instance]
        async with a.transaction() as db:  # two writes, one notification
            await _insert(db, "one")
            await _insert(db, "two")
        assert await spy.drained() == [a._listener.instance]
        assert await a.one("SELECT COUNT(*) FROM clouds") == (3,)
        # b heard a's two writes and the spy's two markers; a only the markers (not itself).
        await until(lambda: b._listener.heard == b_heard + 4, 5, "b hears every commit but its own")
        await until(lambda: a._listener.heard == 2, 5, "a hears the markers")
    finally:
        await spy.conn.close()
        await asyncio.gather(a.close(), b.close())


@pg_only
async def test_a_transaction_cancelled_mid_statement_is_rolled_back_and_the_pool_keeps_working(
    postgres_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Transactions are begun and committed by hand (the COMMIT carries the notification), not
    by asyncpg's transaction object: one cut short mid-statement still leaves nothing behind,
    and its connection goes back to the pool cleanly."""
    gate = await PgGateway.open(postgres_url)
    try:

        async def slow() -> None:
            async with gate.transaction() as db:
                await _insert(db, "cancelled")
                await db.execute("SELECT pg_sleep(30)")

        with pytest.raises(TimeoutError):
            await asyncio.wait_for(slow(), 0.3)
        await _add_cloud(gate, "after")
        assert await gate.all("SELECT name FROM clouds") == [("after",)]
        assert not [r.getMessage() for r in caplog.records if "active transaction" in r.getMessage()]
    finally:
        await gate.close()


@pg_only
async def test_each_migration_notifies(postgres: Any) -> None:
    """A schema block may rewrite rows other processes hold in their caches."""
    database = postgres.new_database(migrated=False)
    url = postgres.url(database)
    spy = await Spy.on(url)
    try:
        gate = await PgGateway.open(url)
        try:
            assert await spy.drained() == [gate._listener.instance] * len(migrations())
        finally:
            await gate.close()
    finally:
        await spy.conn.close()
        postgres.drop_database(database)


@pg_only
async def test_another_process_commit_moves_the_epoch_and_a_read_across_it_is_not_kept(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pg, "CACHE_SECONDS", 3600.0)  # only a notification can move b's epoch
    a, b = await PgGateway.open(postgres_url), await PgGateway.open(postgres_url)
    try:
        cache: EpochCache[str, object] = EpochCache(10)
        read_under = b.commit_epoch()
        assert read_under is not None and cache.get("clouds", read_under) is None
        before = await b.all("SELECT name FROM clouds")  # ... and another process commits
        own = a.commit_epoch()
        await _add_cloud(a, "new")
        assert a.commit_epoch() != own  # its own commit: at once
        now = await until(lambda: (e := b.commit_epoch()) != read_under and e, 1.0, "b's epoch moves")
        assert cache.get("clouds", now) is None  # a request under the new epoch
        cache.put("clouds", read_under, before)  # the read that straddled the commit ends
        assert cache.get("clouds", now) is None
        cache.put("clouds", now, await b.all("SELECT name FROM clouds"))
        assert cache.get("clouds", b.commit_epoch()) == [("new",)]
    finally:
        await asyncio.gather(a.close(), b.close())


@pg_only
async def test_nothing_is_cached_while_the_listener_is_cut_off_and_a_reconnect_starts_a_new_epoch(postgres_url: str) -> None:
    gate = await PgGateway.open(postgres_url)
    killer = await asyncpg.connect(postgres_url)
    try:
        before = gate.commit_epoch()
        assert isinstance(before, tuple)
        pid = gate._listener.pid
        names = await killer.fetch("SELECT application_name FROM pg_stat_activity WHERE pid = $1", pid)
        assert [r[0] for r in names] == ["versionstore commit listener"]
        reconnect = asyncio.Event()  # held until the test has seen the gap
        connect = gate._listener._connect

        async def held() -> asyncpg.Connection:
            await reconnect.wait()
            return await connect()

        gate._listener._connect = held
        assert await killer.fetchval("SELECT pg_terminate_backend($1)", pid)
        await until(lambda: gate.commit_epoch() is None, 5, "no epoch once the listener is gone")
        await asyncio.sleep(0.2)
        assert gate.commit_epoch() is None
        reconnect.set()
        after = await until(gate.commit_epoch, 5, "listening again")
        assert isinstance(after, tuple) and after[2] == before[2] + 1  # the generation
        assert gate._listener.pid not in (None, pid)
        cache: EpochCache[str, int] = EpochCache(10)
        cache.get("k", after)
        cache.put("k", after, 1)
        assert cache.get("k", gate.commit_epoch()) == 1  # caching again
    finally:
        await killer.close()
        await gate.close()


@pg_only
async def test_closing_leaves_no_listening_connection(postgres_url: str) -> None:
    """The CLI opens and closes the store in one short process; a closed store listens no more."""
    watcher = await asyncpg.connect(postgres_url)
    listeners = (
        "SELECT COUNT(*) FROM pg_stat_activity WHERE application_name = 'versionstore commit listener' AND datname = current_database()"
    )
    try:
        meta = await MetadataStore.open(postgres_url)
        assert await watcher.fetchval(listeners) == 1
        await meta.close()
        assert await watcher.fetchval(listeners) == 0
    finally:
        await watcher.close()


class FreezingRelay:
    """A TCP relay to the database whose open connections can be frozen: their bytes stop
    flowing, their sockets stay open (a peer that vanished without a reset). New connections
    wait while `accepting` is clear."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.accepting = asyncio.Event()
        self.accepting.set()
        self._frozen: list[asyncio.Event] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._pipe, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    def freeze(self) -> None:
        for frozen in self._frozen:
            frozen.set()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self.accepting.wait()
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        frozen = asyncio.Event()
        self._frozen.append(frozen)

        async def relay(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            while data := await source.read(65536):
                if frozen.is_set():
                    await asyncio.Future()  # hold it forever
                sink.write(data)
                await sink.drain()

        tasks = [asyncio.create_task(relay(reader, up_writer)), asyncio.create_task(relay(up_reader, writer))]
        self._tasks.update(tasks)
        await asyncio.gather(*tasks, return_exceptions=True)
        for w in (writer, up_writer):
            w.close()

    async def close(self) -> None:
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


@pg_only
async def test_a_listener_that_died_silently_is_found_by_its_probe_and_replaced(
    postgres: Any, postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pg_commits, "PROBE_SECONDS", 0.2)
    monkeypatch.setattr(pg_commits, "PROBE_TIMEOUT", 0.3)
    relay = FreezingRelay(postgres.port)
    port = await relay.start()
    url = postgres_url.replace(f":{postgres.port}/", f":{port}/")
    listener = CommitListener(functools.partial(asyncpg.connect, url), "me")
    try:
        await listener.start()
        assert listener.listening and listener.generation == 1
        relay.accepting.clear()
        relay.freeze()
        await until(lambda: not listener.listening, 3, "the probe finds the frozen connection")
        relay.accepting.set()
        await until(lambda: listener.listening, 5, "a new connection listens")
        assert listener.generation == 2
    finally:
        await listener.close()
        await relay.close()


# --- SQLite: the epoch is read once per event-loop iteration ----------------------------------


async def test_sqlite_epoch_is_shared_within_a_loop_iteration_and_moves_after_it(tmp_path: Path) -> None:
    """The requests one select() delivered share one `PRAGMA data_version` read; another
    connection's commit shows from the next iteration on, this gateway's own at once."""
    from versionstore.gateway import SqliteGateway

    path = tmp_path / "epoch.sqlite3"
    gate = await SqliteGateway.open(path)
    other = sqlite3.connect(path, isolation_level=None)
    try:
        read = gate.commit_epoch()
        other.execute(_INSERT, ("other", "key-other", "s", 0, 0.0))  # another process's commit
        assert gate.commit_epoch() == read  # the same iteration: the requests it serves arrived before the commit
        await asyncio.sleep(0)
        moved = gate.commit_epoch()
        assert moved != read
        await asyncio.sleep(0)
        assert gate.commit_epoch() == moved  # nothing committed since
        async with gate.transaction() as db:
            await _insert(db, "own")
        assert gate.commit_epoch() != moved  # its own commit: at once
        async with gate.point_transaction() as db:
            seen = gate.commit_epoch()
            await _insert(db, "own-point")
        assert gate.commit_epoch() != seen
    finally:
        other.close()
        await gate.close()
