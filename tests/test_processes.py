"""Several service processes on one data directory (docs/design.md, "Processes, claims and leases").

Each test runs two complete apps on the same database and stores, in one test process: each
has its own database connections, service, claims owner, job runner and drainer, exactly as two
`versionstore serve` processes would (tests/e2e/test_workers.py does it with real processes).
"""

import asyncio
import os
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import blake3
import pytest
from aiohttp.test_utils import TestClient

from tests.conftest import API_KEY, API_SECRET, CLOUD, Api
from tests.test_chunks import MIN, download, ok, send_chunk
from versionstore import layout
from versionstore.config import Config
from versionstore.http.app import create_app
from versionstore.http.keys import META, SERVICE
from versionstore.jobs import JobRunner
from versionstore.metadata import MetadataStore
from versionstore.models import Job
from versionstore.spool import SpoolFile


@pytest.fixture
def shared(tmp_path: Path) -> Config:
    return Config(
        data_dir=tmp_path / "data", max_upload_bytes=64 << 20, poll_interval=0.05, lease_seconds=1.0,
        journal_sweep_interval=0.2,
    )


@pytest.fixture
async def two(aiohttp_client: Any, shared: Config) -> AsyncIterator[tuple[TestClient, TestClient]]:
    first: TestClient = await aiohttp_client(create_app(shared))
    await first.app[META].create_cloud(CLOUD, API_KEY, API_SECRET, auto_backup=True)
    second: TestClient = await aiohttp_client(create_app(shared))
    yield first, second


def original(config: Config, data: bytes) -> Path:
    return config.data_dir / "primary" / layout.original_key(CLOUD, blake3.blake3(data).hexdigest())


async def test_a_deletion_in_one_process_keeps_bytes_another_is_committing(two: tuple[TestClient, TestClient], shared: Config) -> None:
    """The digest rule across processes: B deletes the only asset using some bytes while A has
    written the same bytes for a new asset and is about to commit it. Before the write journal
    B's per-process digest lock could not see A's write, and A's new version lost its bytes."""
    a, b = two
    data = b"shared bytes " + secrets.token_bytes(16)
    await Api(b).upload(data, public_id="x", backup="0")
    service_a = a.app[SERVICE]
    name = (CLOUD, "image", "upload", "y")
    # Hold A's commit of "y" (its blob is written by then), as if A were slow to commit.
    async with service_a._field_updates.hold((CLOUD, name)):
        upload = asyncio.create_task(Api(a).upload(data, public_id="y", backup="0"))
        for _ in range(500):  # until A's upload waits for the held commit (its blob is written)
            if service_a._field_updates._locks[(CLOUD, name)][1] == 2:
                break
            await asyncio.sleep(0.01)
        assert not upload.done()
        await Api(b).admin("DELETE", "resources/image/upload", json={"public_ids": ["x"]})
    y = await upload
    assert original(shared, data).exists(), "a committed version points at deleted bytes"
    assert (await Api(b).admin("GET", "resources/image/upload/y"))["asset_id"] == y["asset_id"]


async def test_a_deletion_waits_for_nothing_once_the_write_is_gone(two: tuple[TestClient, TestClient], shared: Config) -> None:
    """A write that ended without a commit (overwrite=false lost the race) leaves an expired
    journal row; orphan collection in any process removes its unreferenced blob."""
    a, b = two
    service_a = a.app[SERVICE]
    data = secrets.token_bytes(64)
    digest = blake3.blake3(data).hexdigest()
    async with service_a.claims.writing(CLOUD, digest, [("original", None)]):
        path = original(shared, data)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)  # what a crashed or superseded upload leaves behind
    assert await b.app[SERVICE].collect_expired_writes() == 1
    assert not path.exists()


async def test_start_up_collection_reads_the_journal_not_the_store(aiohttp_client: Any, shared: Config) -> None:
    """Start-up orphan collection costs what crashed writes left, not one look-up per blob: a
    blob with no journal row (a crash before the journal existed) waits for `gc --full`."""
    first: TestClient = await aiohttp_client(create_app(shared))
    meta = first.app[META]
    await meta.create_cloud(CLOUD, API_KEY, API_SECRET, auto_backup=True)
    crashed, unjournaled = secrets.token_bytes(40), secrets.token_bytes(41)
    for data in (crashed, unjournaled):
        original(shared, data).parent.mkdir(parents=True, exist_ok=True)
        original(shared, data).write_bytes(data)
    # A writer that died mid-upload: its lease ran out, nobody renews it.
    await meta.begin_writes(CLOUD, blake3.blake3(crashed).hexdigest(), [("original", None)], "dead:1:x", time.time() - 1)
    await first.close()
    again: TestClient = await aiohttp_client(create_app(shared))
    for _ in range(100):
        if not original(shared, crashed).exists():
            break
        await asyncio.sleep(0.02)
    assert not original(shared, crashed).exists()
    assert original(shared, unjournaled).exists()
    cloud = await again.app[META].get_cloud(CLOUD)
    assert cloud is not None and await again.app[SERVICE].collect_orphans(cloud) == 1
    assert not original(shared, unjournaled).exists()


async def test_start_up_keeps_another_process_spool_files(two: tuple[TestClient, TestClient], aiohttp_client: Any, shared: Config) -> None:
    """A starting process removed every spool/*.part, including another worker's upload in
    flight. Now only files no process holds locked go (a spool file is locked until its upload
    is done with it)."""
    a, _ = two
    in_flight = SpoolFile(shared.spool_dir, 1 << 20)
    await in_flight.write(b"arriving")
    # Unlocked, so a crash's: the running processes' own sweeps (every 0.2 s here) may take it
    # even before the third process starts; its age does not matter for a `.part` file.
    stale = shared.spool_dir / "left-by-a-crash.part"
    stale.write_bytes(b"old")
    await aiohttp_client(create_app(shared))  # a third process starts
    assert in_flight.path.exists()
    assert not stale.exists()
    spooled = await in_flight.finish()
    assert spooled.size == 8
    in_flight.discard()
    assert a.app[SERVICE]  # the first process is untouched


async def test_a_restorable_flag_changed_by_one_process_shows_in_another(two: tuple[TestClient, TestClient]) -> None:
    """The versions JSON cache is keyed on a generation kept in the database: an initial backup
    run by A makes B's cached `restorable: false` stale at once."""
    a, b = two
    await Api(b).upload(b"not kept yet", public_id="g", backup="0")
    listed = await Api(b).admin("GET", "resources/image/upload/g", params={"versions": "true"})
    assert [v["restorable"] for v in listed["versions"]] == [False]
    asset = await a.app[META].get_asset(CLOUD, "image", "upload", "g")
    assert asset is not None
    found = await a.app[META].version_of(CLOUD, asset.asset_id, asset.version_id)
    assert found is not None
    version_pk = (await a.app[META].live_assets_after(CLOUD, 0, 10))[0][1]
    assert await a.app[SERVICE].back_up_current_version(asset, version_pk, "job-test") == "backed_up"
    listed = await Api(b).admin("GET", "resources/image/upload/g", params={"versions": "true"})
    assert [v["restorable"] for v in listed["versions"]] == [True]


async def test_a_target_switch_in_one_process_holds_revision_writes_in_another(two: tuple[TestClient, TestClient]) -> None:
    a, b = two
    async with a.app[SERVICE].claims.switching_target(CLOUD):
        upload = asyncio.create_task(Api(b).upload(b"waits for the switch", public_id="t"))
        await asyncio.sleep(0.3)
        assert not upload.done()
    assert (await upload)["bytes"] == len(b"waits for the switch")


async def test_chunks_of_one_upload_may_reach_different_processes(two: tuple[TestClient, TestClient]) -> None:
    a, b = two
    data = secrets.token_bytes(MIN + 1234)
    upload_id = secrets.token_hex(8)
    first = await ok(await send_chunk(a, upload_id, data[:MIN], 0, len(data)))
    final = await ok(await send_chunk(b, upload_id, data[MIN:], MIN, len(data), public_id=first["public_id"]))
    assert final["bytes"] == len(data)
    assert await download(a, final) == data


async def test_a_chunk_on_another_machines_spool_is_a_clear_error_not_a_short_file(
    two: tuple[TestClient, TestClient], shared: Config
) -> None:
    """Servers on several machines with separate spools: the part is recorded in the shared
    database but its file is elsewhere. The upload is refused with a 409 that names the cause,
    nothing is published, and the session stays open for the chunk to be sent where it belongs."""
    a, b = two
    data = secrets.token_bytes(MIN + 99)
    upload_id = secrets.token_hex(8)
    first = await ok(await send_chunk(a, upload_id, data[:MIN], 0, len(data)))
    chunks = shared.spool_dir / "chunks"
    hidden = {path: path.read_bytes() for path in chunks.glob("*.chunk")}
    for path in hidden:
        path.chmod(0o644)
        path.unlink()  # "another machine's disk"
    response = await send_chunk(b, upload_id, data[MIN:], MIN, len(data), public_id=first["public_id"])
    body = await response.json()
    assert response.status == 409, body
    assert "shared spool" in body["error"]["message"] and "sticky routing" in body["error"]["message"]
    assert await b.app[META].get_asset(CLOUD, "raw", "upload", first["public_id"]) is None
    for path, content in hidden.items():  # back on "its machine": the retry there completes it
        path.write_bytes(content)
    final = await ok(await send_chunk(a, upload_id, data[MIN:], MIN, len(data), public_id=first["public_id"]))
    assert await download(a, final) == data


async def test_a_retried_chunk_replaces_a_copy_on_another_machines_spool(
    two: tuple[TestClient, TestClient], shared: Config
) -> None:
    """The first chunk on machine A, the last on machine B (a balancer without sticky
    routing): B answers 409. The client retries the last chunk on A, which holds the first:
    B's copy of that range, recorded but on B's disk, is replaced by A's, and A completes the
    upload (before, the recorded copy stayed and every retry answered 409 again)."""
    a, b = two
    data = secrets.token_bytes(MIN + 77)
    upload_id = secrets.token_hex(8)
    chunks = shared.spool_dir / "chunks"
    first = await ok(await send_chunk(a, upload_id, data[:MIN], 0, len(data)))
    on_a = {path: path.read_bytes() for path in chunks.glob("*.chunk")}
    for path in on_a:  # A's disk, which B cannot see
        path.chmod(0o644)
        path.unlink()
    response = await send_chunk(b, upload_id, data[MIN:], MIN, len(data), public_id=first["public_id"])
    assert response.status == 409, await response.json()
    for path in set(chunks.glob("*.chunk")):  # B's disk, which A cannot see
        path.chmod(0o644)
        path.unlink()
    for path, content in on_a.items():
        path.write_bytes(content)
    final = await ok(await send_chunk(a, upload_id, data[MIN:], MIN, len(data), public_id=first["public_id"]))
    assert await download(a, final) == data


async def test_a_job_runs_in_one_process_and_moves_when_its_holder_dies(shared: Config) -> None:
    """Two runners on one database, separate connections and owners: the job runs once while
    its holder renews the lease; when the holder stops dead (no release, like SIGKILL) the
    other takes it over within the lease and finishes it from its cursor."""
    shared.data_dir.mkdir(parents=True)
    metas = [await MetadataStore.open(shared.db_path) for _ in range(2)]
    await metas[0].create_cloud(CLOUD, API_KEY, API_SECRET, auto_backup=True)
    started: list[tuple[str, int]] = []
    release = asyncio.Event()

    def handler(name: str, meta: MetadataStore):
        async def run(job: Job) -> None:
            started.append((name, int(job.cursor.get("step", 0))))
            job.cursor = {"step": 1}
            await meta.save_job(job)
            if name == "first":
                await asyncio.Event().wait()  # stalls: only a kill ends it
            await release.wait()
            job.status, job.completed_at = "completed", time.time()
            await meta.save_job(job)
        return run

    runners = [
        JobRunner(meta, {"test": handler(name, meta)}, poll_interval=0.05, owner=name, lease=1.0)
        for name, meta in zip(("first", "second"), metas, strict=True)
    ]
    job = Job(id=secrets.token_hex(8), cloud=CLOUD, kind="test", status="pending", created_at=time.time())
    await metas[0].create_job(job)
    first = asyncio.create_task(runners[0].run())
    for _ in range(100):
        if started:
            break
        await asyncio.sleep(0.02)
    second = asyncio.create_task(runners[1].run())
    await asyncio.sleep(2.5)  # two and a half leases: the holder renews, nobody else starts it
    assert started == [("first", 0)]
    first.cancel()  # the holder dies: its tasks stop, no release, its lease just runs out
    for task in list(runners[0]._tasks.values()):
        task.cancel()
    await asyncio.gather(first, *runners[0]._tasks.values(), return_exceptions=True)
    killed_at = time.monotonic()
    for _ in range(200):
        if len(started) == 2:
            break
        await asyncio.sleep(0.02)
    assert started == [("first", 0), ("second", 1)]
    assert time.monotonic() - killed_at < 2.0
    release.set()
    for _ in range(100):
        done = await metas[1].get_job(CLOUD, job.id)
        if done is not None and not done.open:
            break
        await asyncio.sleep(0.02)
    assert done is not None and done.status == "completed"
    second.cancel()
    await runners[1].close()
    await asyncio.gather(second, return_exceptions=True)
    for meta in metas:
        await meta.close()


async def test_a_pending_revision_is_drained_by_one_process_at_a_time(shared: Config) -> None:
    shared.data_dir.mkdir(parents=True)
    metas = [await MetadataStore.open(shared.db_path) for _ in range(2)]
    await metas[0].create_cloud(CLOUD, API_KEY, API_SECRET, auto_backup=True)
    from versionstore.models import Asset, Version

    now = time.time()
    version = Version(version_id="v1", version=int(now), digest="ab" * 32, bytes=3, format=None, backed_up=True,
                      restored_from=None, created_at=now)
    asset = Asset(pk=None, cloud=CLOUD, asset_id="a1", resource_type="image", type="upload", public_id="p", status="live",
                  digest="ab" * 32, format=None, bytes=3, width=None, height=None, version=int(now), version_id="v1",
                  original_filename=None, created_at=now, uploaded_at=now)
    await metas[0].save_version(asset, version, pending=True)
    assert [r.digest for r in await metas[0].claim_pending(time.time(), 10, "first", time.time() + 1)] == ["ab" * 32]
    assert await metas[1].claim_pending(time.time(), 10, "second", time.time() + 1) == []
    await asyncio.sleep(1.1)  # the first drainer died: its lease runs out
    assert [r.digest for r in await metas[1].claim_pending(time.time(), 10, "second", time.time() + 1)] == ["ab" * 32]
    for meta in metas:
        await meta.close()


async def test_backup_health_recorded_by_one_process_is_seen_by_another(two: tuple[TestClient, TestClient]) -> None:
    """B cached "healthy" after an upload; A then records the target failing. B's next
    successful revision write must notice (a generation in the database) and record the
    recovery, instead of trusting its own cache while the status says failing."""
    a, b = two
    await Api(b).upload(b"first", public_id="h")
    await a.app[SERVICE].targets.record_failure(CLOUD, "failing", "ConnectionError: seen by A")
    health = await b.app[META].get_health(CLOUD)
    assert health is not None and health.state == "failing"
    await Api(b).upload(b"second", public_id="h")
    health = await a.app[META].get_health(CLOUD)
    assert health is not None and health.state == "healthy"


async def test_the_claims_of_a_dead_process_on_this_host_end_at_once(shared: Config, aiohttp_client: Any) -> None:
    """A SIGKILLed worker's leases would run for `lease_seconds`; its pid is gone, so they end
    as soon as another process of the host looks, and its crashed write is collected."""
    import socket
    import sys

    first: TestClient = await aiohttp_client(create_app(shared))
    meta = first.app[META]
    await meta.create_cloud(CLOUD, API_KEY, API_SECRET, auto_backup=True)
    gone = await asyncio.create_subprocess_exec(sys.executable, "-c", "pass")
    await gone.wait()
    dead = f"{socket.gethostname()}:{gone.pid}:abcd"
    data = secrets.token_bytes(33)
    original(shared, data).parent.mkdir(parents=True, exist_ok=True)
    original(shared, data).write_bytes(data)
    await meta.begin_writes(CLOUD, blake3.blake3(data).hexdigest(), [("original", None)], dead, time.time() + 3600)
    alive = f"{socket.gethostname()}:{os.getpid()}:efgh"  # this process: alive, kept
    await meta.begin_writes(CLOUD, "ef" * 32, [("original", None)], alive, time.time() + 3600)
    service = first.app[SERVICE]
    # The app's own collector (every 0.2 s here) may get there first: either way, at once.
    assert await service.claims.expire_dead_owners() in ([dead], [])
    await service.collect_expired_writes()
    for _ in range(50):
        if not original(shared, data).exists():
            break
        await asyncio.sleep(0.02)
    assert not original(shared, data).exists()
    assert await meta.lease_owners(time.time()) == {alive}


async def test_a_release_cut_off_by_a_crash_is_finished_by_orphan_collection(two: tuple[TestClient, TestClient], shared: Config) -> None:
    """A deletion commits, then its process dies before it removes the blob: the `release`
    journal row it wrote first lets orphan collection in another process finish the job
    (before, only a walk of every blob at the next start found it)."""
    a, b = two
    data = secrets.token_bytes(50)
    await Api(a).upload(data, public_id="r", backup="0")
    asset = await a.app[META].get_asset(CLOUD, "image", "upload", "r")
    assert asset is not None
    # What A does, cut after its commit: the release row with A's lease, the metadata change.
    await a.app[META].begin_writes(CLOUD, asset.digest, [("release", None)], "elsewhere:1:dead", time.time() + 0.3)
    await a.app[META].delete_asset(asset, time.time())
    assert original(shared, data).exists()
    await asyncio.sleep(0.4)  # the dead process's lease runs out
    await b.app[SERVICE].collect_expired_writes()
    assert not original(shared, data).exists()
