"""The read path in statements (issue 11): on PostgreSQL each statement is a round trip, so
the hot reads (`versions=true`, `download_backup`) send as few as they can, on both backends.

Counted on the real app over HTTP: the store's point reads and scans are wrapped to note the
statements they send, the environment lookup aside (it is cached, and re-read at most once a
second on PostgreSQL, so whether a request pays it depends on the clock)."""

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient

from tests.conftest import BASIC_HEADERS, CLOUD, METADATA_BACKENDS, Api, sign
from versionstore.config import Config
from versionstore.http.app import create_app
from versionstore.http.keys import META
from versionstore.metadata import MetadataStore
from versionstore.pg import PgGateway


class Statements:
    def __init__(self, meta: Any) -> None:
        self.sent: list[str] = []
        for name in ("_one", "_all", "_scan"):
            setattr(meta, name, self._noting(getattr(meta, name)))

    def _noting(self, read: Callable[[str, Sequence[Any]], Awaitable[Any]]) -> Callable[[str, Sequence[Any]], Awaitable[Any]]:
        async def noted(sql: str, args: Sequence[Any] = ()) -> Any:
            if not sql.startswith("SELECT name, api_key, api_secret"):
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


def _repeat_cost(client: TestClient) -> int:
    """Statements a repeated read sends while nothing commits: none where the store's epoch
    sees every commit (SQLite, versionstore/epoch_cache.py), one on PostgreSQL."""
    return 1 if client.app[META].commit_epoch() is None else 0


async def test_a_download_reads_its_version_and_every_check_in_one_statement(api: Api, client: TestClient) -> None:
    up = await api.upload(b"revision bytes", public_id="cost/d")
    count = Statements(client.app[META])
    params = sign({"asset_id": up["asset_id"], "version_id": up["version_id"]})

    async def download() -> None:
        await _ok(await client.get(f"/v1_1/{CLOUD}/download_backup", params=params))

    assert len(await count.of(download())) == 1
    assert len(await count.of(download())) == _repeat_cost(client)


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
    assert len(await count.of(versions("image/upload/cost/v"))) == _repeat_cost(client)
    assert len(await count.of(versions(first["asset_id"]))) == 1
    assert len(await count.of(versions(first["asset_id"]))) == _repeat_cost(client)


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
