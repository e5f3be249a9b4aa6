"""Commits of a write (issue 10: the upload row). Each metadata commit is a synchronous fsync
on SQLite (and a round trip plus a WAL flush on PostgreSQL), so a write commits no more often
than its crash rules need: an overwrite journals its blob writes and the original it replaces
in one transaction, and a crash after its commit still leaves that original to orphan
collection. The replaced original's deletion claim is taken in the version commit, and ends
with the release row in one more commit: 3 commits per overwrite (there were 5)."""

import asyncio
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import blake3
import pytest
from aiohttp.test_utils import TestClient

from tests.conftest import CLOUD, Api, upload_form
from versionstore import layout
from versionstore.claims import DEFAULT_LEASE
from versionstore.config import Config
from versionstore.http.keys import META, SERVICE


def _original(config: Config, data: bytes) -> Path:
    return config.data_dir / "primary" / layout.original_key(CLOUD, blake3.blake3(data).hexdigest())


class Commits:
    """Counts the store's write transactions (and notes each one's end in `events`, if given)."""

    def __init__(self, meta: Any, events: list[str] | None = None) -> None:
        self.count = 0
        for name in ("transaction", "point_transaction"):
            setattr(meta, name, self._counted(getattr(meta, name), events))

    def _counted(
        self, opened: Callable[[], AbstractAsyncContextManager[Any]], events: list[str] | None
    ) -> Callable[[], AbstractAsyncContextManager[Any]]:
        @asynccontextmanager
        async def counted() -> AsyncIterator[Any]:
            self.count += 1
            async with opened() as db:
                yield db
            if events is not None:
                events.append("commit")

        return counted


async def test_an_overwrite_commits_three_times(api: Api, client: TestClient, config: Config) -> None:
    await api.upload(b"first bytes", public_id="w/a")
    commits = Commits(client.app[META])
    await api.upload(b"second bytes", public_id="w/a")
    # the journal (write rows and the replaced original's release row), the version with the
    # replaced original's deletion claim, then the claim and the release row dropped together
    assert commits.count == 3
    assert await client.app[META]._all("SELECT role FROM inflight_writes") == []
    assert await client.app[META]._all("SELECT digest FROM blob_deletions") == []
    assert not _original(config, b"first bytes").exists()
    assert _original(config, b"second bytes").exists()


async def test_an_overwrite_cut_off_after_its_commit_leaves_the_replaced_original_to_orphan_collection(
    api: Api, client: TestClient, config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The release of the original it replaced fails after the commit: the release row journaled
    with the write names it (expired at once), so orphan collection removes it; the deletion
    claim the commit took is dropped."""
    await api.upload(b"old original", public_id="w/b", backup="0")
    service = client.app[SERVICE]

    async def failed(key: str) -> None:
        raise RuntimeError("stopped before the release")

    monkeypatch.setattr(service.primary, "delete", failed)
    response = await client.post(f"/v1_1/{CLOUD}/image/upload", data=upload_form(b"new original", public_id="w/b", backup="0"))
    assert response.status == 500
    monkeypatch.undo()
    assert await client.app[META]._all("SELECT digest FROM blob_deletions") == []
    current = await client.app[META].get_asset(CLOUD, "image", "upload", "w/b")
    assert current is not None and current.digest == blake3.blake3(b"new original").hexdigest()  # committed
    assert _original(config, b"old original").exists()
    roles = await client.app[META]._all("SELECT role, digest, lease_until FROM inflight_writes")
    assert roles == [("release", blake3.blake3(b"old original").hexdigest(), 0)]
    await service.collect_expired_writes()
    assert not _original(config, b"old original").exists()
    assert _original(config, b"new original").exists()
    assert await client.app[META]._all("SELECT role FROM inflight_writes") == []


async def test_an_overwrite_killed_after_its_commit_leaves_the_claim_and_the_original_to_start_up(
    api: Api, client: TestClient, config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The process dies right after the version commit, which holds the replaced original's
    deletion claim: nothing of the release ran (no clean-up either). What start-up does for a
    dead process (its leases ended, then orphan collection) removes the original."""
    await api.upload(b"old kept", public_id="w/c")
    service = client.app[SERVICE]
    old = blake3.blake3(b"old kept").hexdigest()

    @asynccontextmanager
    async def killed(*args: Any) -> AsyncIterator[bool]:
        raise RuntimeError("killed")
        yield True

    monkeypatch.setattr(service.claims, "deleting_claimed", killed)
    response = await client.post(f"/v1_1/{CLOUD}/image/upload", data=upload_form(b"new kept", public_id="w/c"))
    assert response.status == 500
    monkeypatch.undo()
    meta = client.app[META]
    assert [(d, o == service.claims.owner) for d, o in await meta._all("SELECT digest, owner FROM blob_deletions")] == [(old, True)]
    assert await meta._all("SELECT role, digest FROM inflight_writes") == [("release", old)]
    assert _original(config, b"old kept").exists()
    await meta.expire_owner(service.claims.owner)  # Claims.expire_dead_owners, for the dead process
    await service.collect_expired_writes()
    assert not _original(config, b"old kept").exists()
    assert _original(config, b"new kept").exists()
    assert await meta._all("SELECT role FROM inflight_writes") == []


async def test_an_overwrite_waits_for_a_deletion_claim_held_elsewhere_before_releasing(
    api: Api, client: TestClient, config: Config
) -> None:
    """Another process holds the deletion claim on the original being replaced: the version
    commits without taking it, and the release waits for that claim, then removes the original."""
    await api.upload(b"claimed elsewhere", public_id="w/d")
    meta = client.app[META]
    old = blake3.blake3(b"claimed elsewhere").hexdigest()
    assert await meta.claim_deletion(CLOUD, old, "other-host:1:x", time.time() + DEFAULT_LEASE)
    upload = asyncio.ensure_future(api.upload(b"replacing it", public_id="w/d"))
    for _ in range(200):
        current = await meta.get_asset(CLOUD, "image", "upload", "w/d")
        if current is not None and current.digest != old:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.1)
    assert not upload.done()  # committed, waiting for the claim
    assert _original(config, b"claimed elsewhere").exists()
    await meta.release_deletion(CLOUD, old, "other-host:1:x")
    await asyncio.wait_for(upload, 10)
    assert not _original(config, b"claimed elsewhere").exists()
    assert await meta._all("SELECT digest FROM blob_deletions") == []
    assert await meta._all("SELECT role FROM inflight_writes") == []


async def test_an_upload_makes_its_bytes_and_links_durable_before_its_version_commit(
    api: Api, client: TestClient, config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The spool file's fsync runs after the journal commit, in the worker call that links the
    file (it ran beside the journal commit before): it still comes before any store links the
    file, and every link's directory is fsynced before the version commit. The real calls run;
    what they were given is recorded, in order."""
    await api.upload(b"durable first", public_id="w/e")
    events: list[str] = []
    real_fsync, real_link = os.fsync, os.link

    def fsync(fd: int) -> None:
        real_fsync(fd)
        events.append("fsync " + os.readlink(f"/proc/self/fd/{fd}"))

    def link(source: Any, target: Any, *args: Any, **kwargs: Any) -> None:
        real_link(source, target, *args, **kwargs)
        events.append(f"link {source} {target}")

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "link", link)
    Commits(client.app[META], events)
    await api.upload(b"durable second", public_id="w/e")
    monkeypatch.undo()
    links = [e.split() for e in events if e.startswith("link ")]
    assert len(links) == 2  # the original and the revision
    spool = links[0][1]
    assert all(source == spool for _, source, _ in links)
    synced = [e.split(" ", 1)[1] for e in events if e.startswith("fsync ")]
    first_link = min(events.index(" ".join(e)) for e in links)
    assert events.index(f"fsync {spool}") < first_link  # bytes durable before any name points at them
    version_commit = [i for i, e in enumerate(events) if e == "commit"][1]  # the journal's, then the version's
    for _, _, target in links:
        directory = os.path.dirname(target)
        assert directory in synced and events.index(f"fsync {directory}") < version_commit


async def test_a_point_transaction_rolls_back_whole_and_leaves_the_connection_usable(client: TestClient) -> None:
    """A point transaction (statements inline, BEGIN and COMMIT on the commit thread) that fails
    or is cancelled writes nothing, and the next one commits (both backends)."""
    meta = client.app[META]
    insert = "INSERT INTO generations (name, value) VALUES (?, 1)"
    with pytest.raises(RuntimeError):
        async with meta.point_transaction() as db:
            await db.execute(insert, ("point-a",))
            raise RuntimeError("refused")
    with pytest.raises(sqlite3.IntegrityError):  # the gateway's IntegrityError, on both backends
        async with meta.point_transaction() as db:
            await db.execute(insert, ("point-b",))
            await db.execute(insert, ("point-b",))

    async def held() -> None:
        async with meta.point_transaction() as db:
            await db.execute(insert, ("point-c",))
            await asyncio.sleep(10)

    task = asyncio.ensure_future(held())
    await asyncio.sleep(0.2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    async with meta.point_transaction() as db:
        await db.execute(insert, ("point-d",))
        assert (await (await db.execute("SELECT value FROM generations WHERE name = ?", ("point-d",))).fetchone())[0] == 1
    names = await meta._all("SELECT name FROM generations WHERE name LIKE 'point-%'")
    assert names == [("point-d",)]


async def test_a_point_transaction_waits_off_the_loop_for_another_processs_writer(client: TestClient, config: Config) -> None:
    """BEGIN IMMEDIATE runs on the event loop only when the write lock is free: while another
    process's writer holds it, the point transaction waits on the commit thread (the loop keeps
    answering) and commits once the lock is released, instead of failing as locked."""
    if config.metadata_url is not None:
        pytest.skip("SQLite's write lock")
    meta = client.app[META]
    other = sqlite3.connect(config.db_path, isolation_level=None)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    async def point() -> None:
        async with meta.point_transaction() as db:
            await db.execute("INSERT INTO generations (name, value) VALUES (?, 1)", ("waited",))

    running = asyncio.ensure_future(ticker())
    try:
        other.execute("BEGIN IMMEDIATE")
        task = asyncio.ensure_future(point())
        await asyncio.sleep(0.3)
        assert not task.done() and ticks >= 10  # waiting, and not on the loop
        other.execute("COMMIT")
        await asyncio.wait_for(task, 5)
    finally:
        running.cancel()
        other.close()
    assert await meta._all("SELECT name FROM generations WHERE name = 'waited'") == [("waited",)]


class Hops:
    """Counts the event loop's hand-offs to worker threads (`run_in_executor`, which
    `asyncio.to_thread` and the SQLite commit thread go through): each costs the loop a future,
    a queue put, a thread wake-up and a self-pipe wake-up back (docs/performance.md)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        loop = asyncio.get_running_loop()
        real = loop.run_in_executor

        def counted(executor: Any, func: Callable[..., Any], *args: Any) -> Any:
            self.count += 1
            return real(executor, func, *args)

        monkeypatch.setattr(loop, "run_in_executor", counted)


async def test_a_small_upload_hands_work_to_threads_four_times(
    api: Api, client: TestClient, config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A small upload with its revision to a local target: the spool file (created, written,
    hashed), the journal's COMMIT, the publication (the spool file's fsync and both links with
    their directories' fsyncs) and the version's COMMIT: four hops on SQLite (the BEGINs run on
    the loop when the write lock is free), none for the commits on PostgreSQL. There were eight:
    a hop for each BEGIN, for the fsync and for each store's link. An overwrite adds its
    release: one more commit and the replaced original's unlink."""
    await api.upload(b"warm the caches", public_id="w/warm")  # the target's marker check, the client's resolver
    hops = Hops(monkeypatch)
    await api.upload(b"a new asset", public_id="w/hops")
    sqlite = config.metadata_url is None
    assert hops.count == (4 if sqlite else 2)
    hops.count = 0
    await api.upload(b"its second version", public_id="w/hops")
    assert hops.count == (6 if sqlite else 3)


async def test_an_upload_removes_its_spool_file_once(api: Api, config: Config, monkeypatch: pytest.MonkeyPatch) -> None:
    """The service consumes the spool file (it removes it whatever happens); the handler removes
    it only when it never reached the service (a refused upload): one unlink, not two."""
    removed: list[Path] = []
    real = Path.unlink

    def unlink(path: Path, missing_ok: bool = False) -> None:
        if path.parent == config.spool_dir:
            removed.append(path)
        real(path, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", unlink)
    await api.upload(b"spooled once", public_id="w/once")
    assert len(removed) == 1
    removed.clear()
    await api.upload(b"refused", public_id="w/../bad", expect=400)
    assert len(removed) == 1 and not removed[0].exists()


async def test_a_begin_waits_behind_what_is_still_queued_on_the_commit_thread(client: TestClient, config: Config) -> None:
    """A COMMIT or ROLLBACK whose caller was cancelled may still be queued on the commit thread
    when the next point transaction starts: its BEGIN must run after it on that thread, not
    inline on the loop beside it (one connection, one transaction at a time)."""
    if config.metadata_url is not None:
        pytest.skip("SQLite's commit thread")
    meta = client.app[META]
    gateway = meta._gate
    order: list[str] = []
    queued = gateway._on_commit_thread(lambda: (time.sleep(0.3), order.append("queued job")))
    async with meta.point_transaction() as db:
        order.append("transaction")
        await db.execute("INSERT INTO generations (name, value) VALUES (?, 1)", ("behind",))
    await queued
    assert order == ["queued job", "transaction"]
