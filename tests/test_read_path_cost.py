"""The read path in statements (issue 11): on PostgreSQL each statement is a round trip, so
the hot reads (`versions=true`, `download_backup`) send as few as they can, on both backends.

Counted on the real app over HTTP: the store's point reads and scans are wrapped to note the
statements they send, the environment lookup aside (it is cached like the rest, and counted
where it is the subject). What is reused until something commits is checked across two apps
on one database (two processes): on SQLite a commit shows in the very next request, on
PostgreSQL as its notification is delivered (versionstore/pg_commits.py)."""

import asyncio
import base64
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import asyncpg
import pytest
from aiohttp.test_utils import TestClient

from tests.conftest import BASIC_HEADERS, CLOUD, METADATA_BACKENDS, Api, sign
from versionstore import pg
from versionstore.config import Config
from versionstore.http.app import create_app
from versionstore.http.keys import META
from versionstore.metadata import CLOUDS_CACHED, MetadataStore
from versionstore.pg import PgGateway

T = TypeVar("T")


def _in_background() -> bool:
    """Is this statement sent by one of the app's background loops (orphan collection, job
    runner, schedules: tasks it names, app.py) rather than by the request being counted? One
    of them running during a count made it flaky."""
    task = asyncio.current_task()
    return task is not None and not task.get_name().startswith("Task-")


class Statements:
    def __init__(self, meta: Any, *, environments: bool = False) -> None:
        self.sent: list[str] = []
        self._environments = environments
        for name in ("_one", "_all", "_scan"):
            setattr(meta, name, self._noting(getattr(meta, name)))

    def _noting(self, read: Callable[[str, Sequence[Any]], Awaitable[Any]]) -> Callable[[str, Sequence[Any]], Awaitable[Any]]:
        async def noted(sql: str, args: Sequence[Any] = ()) -> Any:
            if not _in_background() and (self._environments or not sql.startswith("SELECT name, api_key, api_secret")):
                self.sent.append(sql)
            return await read(sql, args)

        return noted

    async def of(self, request: Awaitable[Any]) -> list[str]:
        self.sent.clear()
        await request
        return list(self.sent)


async def _ok(response: Any) -> None:
    assert response.status == 200, await response.text()
    await response.read()


async def _repeated(client: TestClient, count: Statements, read: Callable[[], Awaitable[Any]]) -> int:
    """Statements `read` sends when it repeats itself while nothing commits: none, on both
    backends (versionstore/epoch_cache.py). PostgreSQL's epoch also moves once a second (its
    time bucket): a pair of reads across that move is measured again."""
    meta = client.app[META]
    for _attempt in range(5):
        epoch = meta.commit_epoch()
        assert epoch is not None
        await read()
        sent = len(await count.of(read()))
        if meta.commit_epoch() == epoch:
            return sent
    raise AssertionError("the epoch kept moving")


async def _shows(read: Callable[[], Awaitable[T]], expected: T, within: float = 1.0) -> None:
    """A change just committed by another app shows in `read` (a fresh request each time)
    within `within` seconds."""
    deadline = time.monotonic() + within
    while (got := await read()) != expected:
        assert time.monotonic() < deadline, f"still {got!r}, {within} s after the commit (expected {expected!r})"
        await asyncio.sleep(0.005)


async def test_a_download_reads_its_version_and_every_check_in_one_statement(api: Api, client: TestClient) -> None:
    up = await api.upload(b"revision bytes", public_id="cost/d")
    count = Statements(client.app[META])
    params = sign({"asset_id": up["asset_id"], "version_id": up["version_id"]})

    async def download() -> None:
        await _ok(await client.get(f"/v1_1/{CLOUD}/download_backup", params=params))

    assert len(await count.of(download())) == 1
    assert await _repeated(client, count, download) == 0


async def test_versions_true_reads_the_asset_and_what_its_cached_versions_depend_on_in_one_statement(
    api: Api, client: TestClient
) -> None:
    for n in range(3):
        await api.upload(f"version {n}".encode(), public_id="cost/v")
    count = Statements(client.app[META])

    async def versions(path: str) -> dict[str, Any]:
        response = await client.get(f"/v1_1/{CLOUD}/resources/{path}", params={"versions": "true"}, headers=BASIC_HEADERS)
        assert response.status == 200, await response.text()
        body: dict[str, Any] = await response.json()
        return body

    first = await versions("image/upload/cost/v")
    assert len(first["versions"]) == 3
    assert await _repeated(client, count, lambda: versions("image/upload/cost/v")) == 0
    assert len(await count.of(versions(first["asset_id"]))) == 1
    assert await _repeated(client, count, lambda: versions(first["asset_id"])) == 0


@pytest.mark.parametrize("metadata_url", ["sqlite"], indirect=True)
async def test_a_version_added_through_another_process_shows_in_versions_at_once(
    aiohttp_client: Any, client: TestClient, config: Config
) -> None:
    """Two apps on one database stand for two `serve` processes: the second one's cached
    versions JSON is keyed on what the statement reads, never on time, so it cannot lag."""
    other: TestClient = await aiohttp_client(create_app(config))
    await Api(client).upload(b"first", public_id="cost/shared")

    async def listed(via: TestClient) -> list[str]:
        body = await Api(via).admin("GET", "resources/image/upload/cost/shared", params={"versions": "true"})
        return [v["version_id"] for v in body["versions"]]

    before = await listed(other)
    added = await Api(client).upload(b"second", public_id="cost/shared")
    assert await listed(other) == [*before, added["version_id"]]


@pytest.mark.parametrize("metadata_url", ["sqlite"], indirect=True)
async def test_what_another_process_commits_shows_in_a_repeated_read_at_once(
    aiohttp_client: Any, client: TestClient, config: Config
) -> None:
    """The reads a process reuses until something commits (resource bodies, a download's
    checks) never lag a commit made by another process: a changed tag, a new version and a
    backup copy found corrupt each show in the very next request."""
    other: TestClient = await aiohttp_client(create_app(config))
    up = await Api(client).upload(b"first", public_id="cost/seen", tags="a")
    params = sign({"asset_id": up["asset_id"], "version_id": up["version_id"]})

    async def shown(path: str, **query: str) -> dict[str, Any]:
        return await Api(other).admin("GET", path, params=query)

    async def download_status() -> int:
        response = await other.get(f"/v1_1/{CLOUD}/download_backup", params=params)
        await response.read()
        return response.status

    for _ in range(2):  # the second read is the reused one
        assert (await shown("resources/image/upload/cost/seen"))["tags"] == ["a"]
        assert len((await shown(f"resources/{up['asset_id']}", versions="true"))["versions"]) == 1
        assert await download_status() == 200
    await Api(client).admin("POST", "resources/image/upload/cost/seen", data={"tags": "b"})
    assert (await shown("resources/image/upload/cost/seen"))["tags"] == ["b"]
    await Api(client).upload(b"second", public_id="cost/seen")
    assert len((await shown(f"resources/{up['asset_id']}", versions="true"))["versions"]) == 2
    await client.app[META].record_checks(CLOUD, up["blake3"], {"backup": ("corrupt", "flipped bits")})
    assert await download_status() == 404


pg_only = pytest.mark.skipif("postgresql" not in METADATA_BACKENDS, reason="VERSIONSTORE_TEST_METADATA=sqlite")
#: An environment another app creates during a test, and its credentials.
FRESH_KEYS = ("freshkey", "freshsecret")
FRESH_HEADERS = {"Authorization": "Basic " + base64.b64encode(":".join(FRESH_KEYS).encode()).decode()}


@pg_only
@pytest.mark.parametrize("metadata_url", ["postgresql"], indirect=True)
async def test_what_another_process_commits_shows_in_a_repeated_read_as_its_notification_arrives(
    aiohttp_client: Any, client: TestClient, config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL: `other` reuses its reads (each repeat costs no statement) until a commit of
    `client` is heard. The once-a-second time bucket is held still here, so only the
    notification can move other's epoch: a changed tag, a new version, a deleted version, a
    backup copy found corrupt and a new environment each show within a second."""
    monkeypatch.setattr(pg, "CACHE_SECONDS", 3600.0)
    other: TestClient = await aiohttp_client(create_app(config))
    count = Statements(other.app[META], environments=True)
    first = await Api(client).upload(b"first", public_id="cost/seen", tags="a")
    second = await Api(client).upload(b"second", public_id="cost/seen")
    old = sign({"asset_id": first["asset_id"], "version_id": first["version_id"]})

    async def tags() -> list[str]:
        body = await Api(other).admin("GET", "resources/image/upload/cost/seen")
        return list(body["tags"])

    async def versions() -> int:
        return len((await Api(other).admin("GET", f"resources/{first['asset_id']}", params={"versions": "true"}))["versions"])

    async def download_status() -> int:
        response = await other.get(f"/v1_1/{CLOUD}/download_backup", params=old)
        await response.read()
        return response.status

    for read, before in ((tags, ["a"]), (versions, 2), (download_status, 200)):
        assert await read() == before
        assert await _repeated(other, count, read) == 0
    await Api(client).admin("POST", "resources/image/upload/cost/seen", data={"tags": "b"})
    await _shows(tags, ["b"])
    await Api(client).upload(b"third", public_id="cost/seen")
    await _shows(versions, 3)
    await Api(client).admin("DELETE", f"resources/backup/{first['asset_id']}", json={"version_ids": [first["version_id"]]})
    await _shows(versions, 2)
    await _shows(download_status, 404)

    current = sign({"asset_id": first["asset_id"], "version_id": second["version_id"]})

    async def current_status() -> int:
        response = await other.get(f"/v1_1/{CLOUD}/download_backup", params=current)
        await response.read()
        return response.status

    assert await current_status() == 200
    assert await _repeated(other, count, current_status) == 0
    await client.app[META].record_checks(CLOUD, second["blake3"], {"backup": ("corrupt", "flipped bits")})
    await _shows(current_status, 404)

    async def fresh_status() -> int:
        response = await other.get("/v1_1/fresh/resources/image", headers=FRESH_HEADERS)
        await response.read()
        return response.status

    assert await fresh_status() == 401
    assert await _repeated(other, count, fresh_status) == 0  # the missing environment is cached too
    await client.app[META].create_cloud("fresh", *FRESH_KEYS, auto_backup=False)
    await _shows(fresh_status, 200)


@pg_only
@pytest.mark.parametrize("metadata_url", ["postgresql"], indirect=True)
async def test_a_long_transaction_of_another_process_shows_once_it_commits(
    aiohttp_client: Any, client: TestClient, config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`other` reads (and keeps) the row while `client`'s transaction that changes it is still
    open: what it kept is the committed state, and the commit, heard later, drops it."""
    monkeypatch.setattr(pg, "CACHE_SECONDS", 3600.0)
    other: TestClient = await aiohttp_client(create_app(config))
    up = await Api(client).upload(b"first", public_id="cost/long", tags="a")

    async def tags() -> list[str]:
        return list((await Api(other).admin("GET", "resources/image/upload/cost/long"))["tags"])

    async with client.app[META].transaction() as db:
        await db.execute("UPDATE assets SET tags = ? WHERE asset_id = ?", ('["b"]', up["asset_id"]))
        assert await tags() == ["a"]  # uncommitted: not seen, and now kept under other's epoch
        assert await tags() == ["a"]
    await _shows(tags, ["b"])


@pg_only
@pytest.mark.parametrize("metadata_url", ["postgresql"], indirect=True)
async def test_a_commit_whose_notification_never_comes_shows_within_the_time_bucket(
    aiohttp_client: Any, client: TestClient, config: Config
) -> None:
    """A write that notifies nobody (here: a plain connection, as psql would) lags at most
    pg.CACHE_SECONDS: the epoch's time bucket is the bound if a notification is lost."""
    assert config.metadata_url is not None

    async def fresh_status() -> int:
        response = await client.get("/v1_1/fresh/resources/image", headers=FRESH_HEADERS)
        await response.read()
        return response.status

    assert await fresh_status() == 401
    conn = await asyncpg.connect(config.metadata_url)
    try:
        insert = "INSERT INTO clouds (name, api_key, api_secret, auto_backup, created_at) VALUES ($1, $2, $3, 0, 0)"
        await conn.execute(insert, "fresh", *FRESH_KEYS)
    finally:
        await conn.close()
    await _shows(fresh_status, 200, within=pg.CACHE_SECONDS)


@pytest.mark.skipif("postgresql" not in METADATA_BACKENDS, reason="VERSIONSTORE_TEST_METADATA=sqlite")
async def test_point_reads_survive_a_read_cut_short_and_a_refused_statement(postgres_url: str) -> None:
    """PostgreSQL's point reads have their own few connections (versionstore/pg.py): one cut
    short is dropped (not handed to the next read mid-statement), one the database refused is
    reused, and many reads at once share them."""
    meta = await MetadataStore.open(postgres_url)
    try:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(meta._one("SELECT pg_sleep(30)"), 0.3)
        with pytest.raises(asyncpg.UndefinedTableError):
            await meta._one("SELECT 1 FROM no_such_table")
        answers = await asyncio.gather(*(meta._one("SELECT ?::bigint", (n,)) for n in range(40)))
        assert answers == [(n,) for n in range(40)]
    finally:
        await asyncio.wait_for(meta.close(), 5)


#: glibc's default mmap threshold: a read buffer this large or larger is mapped afresh.
MMAP_THRESHOLD = 128 * 1024


@pytest.mark.skipif("postgresql" not in METADATA_BACKENDS, reason="VERSIONSTORE_TEST_METADATA=sqlite")
async def test_every_database_connection_reads_its_replies_into_reused_memory(postgres_url: str) -> None:
    """asyncio reads a socket 256 KiB at a time: above glibc's mmap threshold, so a new
    process mapped, resized and unmapped a buffer for every reply (three system calls, about
    40 µs of CPU per round trip under strace's count and process_time; a third of a point
    read's client cost). The connections of point reads, scans and transactions read less
    than the threshold at a time."""
    gate = await PgGateway.open(postgres_url)
    try:
        await asyncio.gather(*(gate.one("SELECT ?::bigint", (n,)) for n in range(8)))
        await gate.scan("SELECT generate_series(1, ?)", (3,))
        async with gate.transaction() as db:
            await db.execute("SELECT 1")
        connections = [*gate._reads._open, *(h._con for h in gate._pool._holders if h._con is not None)]
        assert len(connections) >= 2
        for conn in connections:
            assert conn._transport.max_size < MMAP_THRESHOLD
    finally:
        await asyncio.wait_for(gate.close(), 5)


@pytest.mark.skipif("postgresql" not in METADATA_BACKENDS, reason="VERSIONSTORE_TEST_METADATA=sqlite")
async def test_every_database_connection_keeps_bounded_reads_in_one_process(postgres_url: str) -> None:
    """At 10M assets PostgreSQL's default parallel_setup_cost (1000) let the planner start two
    worker processes for the count of `tags=xyz` (1,001 index probes): 56-86 ms against 14-30
    ms in one process (docs/scale-out.md). Every connection raises it, so a read bounded by a
    LIMIT stays in one process while a whole-library aggregate may still use workers."""
    gate = await PgGateway.open(postgres_url)
    try:
        seen = [*await asyncio.gather(*(gate.one("SELECT current_setting('parallel_setup_cost')") for _ in range(8)))]
        seen += await gate.scan("SELECT current_setting('parallel_setup_cost')")
        async with gate.transaction() as db:
            seen.append(await (await db.execute("SELECT current_setting('parallel_setup_cost')")).fetchone())
        assert {row[0] for row in seen} == {"10000"}
    finally:
        await asyncio.wait_for(gate.close(), 5)


async def test_environment_names_from_requests_occupy_a_bounded_cache(client: TestClient) -> None:
    """Each request's environment name comes from its path and every one was kept, found or
    not, until the next commit: a stranger asking for ever new names grew the cache without
    bound on an idle server. The oldest names now leave (they are read again)."""
    meta = client.app[META]
    count = Statements(meta, environments=True)
    epoch = ("an epoch that stays",)
    for n in range(CLOUDS_CACHED + 1):
        assert await meta.get_cloud(f"nosuch{n}", epoch) is None
    assert await count.of(meta.get_cloud(f"nosuch{CLOUDS_CACHED}", epoch)) == []
    assert len(await count.of(meta.get_cloud("nosuch0", epoch))) == 1


async def test_an_environment_read_across_an_epoch_move_is_not_kept(client: TestClient) -> None:
    """A lookup that started under one epoch and ended after another request had seen a newer
    one (PostgreSQL: the two statements are in flight at once) was stored for the newer epoch,
    and could be served as current though it predates the commit that moved it."""
    meta = client.app[META]
    count = Statements(meta, environments=True)
    older, newer = ("before",), ("after",)
    for name in (CLOUD, "nosuch"):
        await asyncio.gather(meta.get_cloud(name, older), meta.get_cloud("another", newer))
        assert len(await count.of(meta.get_cloud(name, newer))) == 1
        newer, older = (newer[0] + "+",), newer
