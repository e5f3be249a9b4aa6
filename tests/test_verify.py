"""Corruption is noticed (issue 8.10) and scrubbed (verify and repair).

Reads verify: a download of damaged bytes never answers a clean 200, a missing revision is a
JSON 404 at every size, restore proves the revision before it commits. `versionstore verify`
(here its domain part, `verify.Scrubber`) re-reads every copy, records the outcome, flips
`restorable`, counts it in the backup status, and repairs from an intact copy.
"""

import asyncio
import os
import shutil
import time
from pathlib import Path

import aiohttp
import blake3
import pytest

from tests.conftest import CLOUD, sign
from tests.test_blobstore_contract import other_filesystem_dir
from versionstore import layout, verify
from versionstore.config import Config
from versionstore.http.download import SMALL_BLOB
from versionstore.http.keys import JOBS, META, SERVICE

SIZES = [1000, SMALL_BLOB + 12345]


@pytest.fixture(params=["shared", "separate", "remote"])
def storage(request, tmp_path):
    """shared: the embedded default (one inode for primary and backup); separate: the backup on
    another filesystem (its own copy); remote: a store without local paths (streamed reads)."""
    other = None
    if request.param == "separate":
        other = other_filesystem_dir(tmp_path)
        backup = str(other / "backup")
    elif request.param == "remote":
        backup = "memory:"
    else:
        backup = None
    yield request.param, backup
    if other is not None:
        shutil.rmtree(other, ignore_errors=True)


@pytest.fixture
def config(tmp_path: Path, storage) -> Config:
    return Config(data_dir=tmp_path / "data", max_upload_bytes=64 << 20, backup_store=storage[1], verify_interval=0)


def digest_of(data: bytes) -> str:
    return blake3.blake3(data).hexdigest()


def backup_store(client):
    return client.server.app[SERVICE].targets.default


def damage(client, data: bytes, how: str) -> None:
    """Flip one byte of the stored revision, or remove it, behind the service's back."""
    store = backup_store(client)
    key = layout.revision_key(CLOUD, digest_of(data))
    path = store.local_path(key)
    if path is None:  # the memory store
        blobs = store.inner._blobs
        if how == "delete":
            del blobs[key]
        else:
            blobs[key] = bytes([blobs[key][0] ^ 1]) + blobs[key][1:]
        return
    if how == "delete":
        os.unlink(path)
        return
    os.chmod(path, 0o644)  # the bad block of the story; the service never opens blobs for writing
    with open(path, "r+b") as handle:
        handle.seek(len(data) // 2)
        byte = handle.read(1)
        handle.seek(len(data) // 2)
        handle.write(bytes([byte[0] ^ 0xFF]))


async def download(client, asset_id: str, version_id: str, **headers: str):
    params = sign({"asset_id": asset_id, "version_id": version_id})
    return await client.get(f"/v1_1/{CLOUD}/download_backup", params=params, headers=headers)


async def versions(api, public_id: str) -> list[dict]:
    return (await api.admin("GET", f"resources/raw/upload/{public_id}", params={"versions": "true"}))["versions"]


async def body_or_failure(response) -> bytes | None:
    """The body, or None when the transfer broke (what a client sees of an aborted response)."""
    try:
        return await response.read()
    except aiohttp.ClientPayloadError:
        return None


@pytest.mark.parametrize("size", SIZES)
async def test_a_flipped_byte_is_never_served_as_a_clean_200_and_marks_the_revision(api, client, storage, size):
    data = os.urandom(size)
    up = await api.upload(data, rt="raw", public_id="v/flip")
    assert (await versions(api, "v/flip"))[0]["restorable"] is True  # cached before the damage
    damage(client, data, "flip")
    response = await download(client, up["asset_id"], up["version_id"])
    body = await body_or_failure(response)
    if storage[0] == "remote" or size > SMALL_BLOB:  # streamed: headers went out, the last bytes never do
        assert body is None or body != data and len(body) < size
    else:  # hashed before the first byte: a JSON error instead
        assert response.status == 500, body
        assert "failed verification" in (await response.json())["error"]["message"]
    listed = (await versions(api, "v/flip"))[0]
    assert listed["restorable"] is False and listed["backup_integrity"] == "corrupt"
    again = await download(client, up["asset_id"], up["version_id"])
    assert again.status == 404 and "corrupt" in (await again.json())["error"]["message"]
    ranged = await download(client, up["asset_id"], up["version_id"], Range="bytes=0-9")
    assert ranged.status == 404  # ranges rely on the recorded state


@pytest.mark.parametrize("size", SIZES)
async def test_a_missing_revision_is_a_json_404_at_every_size_and_not_restorable(api, client, size):
    data = os.urandom(size)
    up = await api.upload(data, rt="raw", public_id="v/gone")
    damage(client, data, "delete")
    response = await download(client, up["asset_id"], up["version_id"])
    assert response.status == 404
    assert "missing" in (await response.json())["error"]["message"]
    listed = (await versions(api, "v/gone"))[0]
    assert listed["restorable"] is False and listed["backup_integrity"] == "missing"
    status = await api.admin("GET", "versionstore/backup")
    assert status["verify"]["backup"]["missing"] == 1 and status["verify"]["not_restorable"] == 1


async def test_restore_verifies_the_revision_even_when_a_primary_copy_exists(api, client, storage):
    if storage[0] == "shared":
        pytest.skip("one inode: the primary copy is damaged too; see the scrub test of shared storage")
    old, new = os.urandom(5000), os.urandom(5000)
    first = await api.upload(old, rt="raw", public_id="v/doc")
    await api.upload(new, rt="raw", public_id="v/doc")
    await api.upload(old, rt="raw", public_id="v/other", backup="false")  # keeps a primary copy of `old`
    damage(client, old, "flip")
    body = await api.admin("POST", "resources/raw/upload/restore", json={"public_ids": ["v/doc"], "versions": [first["version_id"]]})
    assert body["v/doc"]["error"] == "failed" and body["v/doc"]["reason"] == "revision_corrupt"
    asset = await api.admin("GET", "resources/raw/upload/v/doc", params={"versions": "true"})
    assert asset["blake3"] == digest_of(new)  # nothing committed
    assert asset["versions"][0]["restorable"] is False
    put_back(client, old)  # the operator restores the bytes from elsewhere: the next read clears the mark
    body = await api.admin("POST", "resources/raw/upload/restore", json={"public_ids": ["v/doc"], "versions": [first["version_id"]]})
    assert "error" not in body["v/doc"], body
    assert (await versions(api, "v/doc"))[0]["restorable"] is True


def put_back(client, data: bytes) -> None:
    store = backup_store(client)
    key = layout.revision_key(CLOUD, digest_of(data))
    path = store.local_path(key)
    if path is None:
        store.inner._blobs[key] = data
        return
    os.chmod(path, 0o644)
    Path(path).write_bytes(data)


async def scrub(client, **kwargs) -> verify.Report:
    service = client.server.app[SERVICE]
    cloud = await service.meta.get_cloud(CLOUD)
    return await verify.Scrubber(service, **kwargs).run(cloud)


async def test_scrub_repairs_a_corrupt_revision_from_the_intact_primary_copy(api, client, storage):
    if storage[0] == "shared":
        pytest.skip("needs a separate copy")
    data = os.urandom(SMALL_BLOB * 3)
    await api.upload(data, rt="raw", public_id="v/fix")
    assert (await versions(api, "v/fix"))[0]["restorable"] is True
    store, key = backup_store(client), layout.revision_key(CLOUD, digest_of(data))
    damage(client, data, "flip")
    evidence = None
    if store.local_path(key):
        evidence = Path(store.local_path(key)).with_name("evidence")
        os.link(store.local_path(key), evidence)  # the bad inode, to prove nobody wrote into it
    report = await scrub(client)
    assert report.counts == {"backup_repaired": 1, "primary_ok": 1} and report.problem_count == 1
    assert b"".join([c async for c in store.read(key)]) == data
    if evidence is not None:
        assert evidence.read_bytes() != data and not os.path.samefile(evidence, store.local_path(key))
        evidence.unlink()
    assert (await versions(api, "v/fix"))[0]["restorable"] is True
    status = await api.admin("GET", "versionstore/backup")
    assert status["verify"]["backup"]["repaired"] == 1 and status["verify"]["not_restorable"] == 0
    assert status["backup_shares_storage_with_primary"] is False
    clean = await scrub(client)
    assert clean.problem_count == 0 and clean.counts == {"backup_ok": 1, "primary_ok": 1}


async def test_scrub_of_shared_storage_finds_both_copies_damaged_and_says_why(api, client, storage):
    if storage[0] != "shared":
        pytest.skip("the embedded default only")
    data = os.urandom(4000)
    await api.upload(data, rt="raw", public_id="v/one")
    status = await api.admin("GET", "versionstore/backup")
    assert status["backup_shares_storage_with_primary"] is True
    damage(client, data, "flip")
    report = await scrub(client)
    assert report.counts == {"backup_corrupt": 1, "primary_corrupt": 1}
    listed = (await versions(api, "v/one"))[0]
    assert listed["restorable"] is False
    status = await api.admin("GET", "versionstore/backup")
    assert status["verify"]["backup"]["corrupt"] == 1 and status["verify"]["primary"]["corrupt"] == 1


async def test_scrub_finds_a_missing_revision_without_another_copy(api, client):
    old, new = os.urandom(3000), os.urandom(3000)
    await api.upload(old, rt="raw", public_id="v/m")
    await api.upload(new, rt="raw", public_id="v/m")  # the primary copy of `old` is released
    damage(client, old, "delete")
    report = await scrub(client, sample=1.0)
    assert report.counts.get("backup_missing") == 1 and report.problem_count == 1
    assert [v["restorable"] for v in await versions(api, "v/m")] == [False, True]


async def test_scheduled_verify_job_checks_and_records(api, client, storage):
    if storage[0] != "separate":
        pytest.skip("one store layout is enough for the job")
    data = os.urandom(2000)
    await api.upload(data, rt="raw", public_id="v/job")
    damage(client, data, "delete")
    meta = client.server.app[META]
    done = await _run_verify_job(client)
    assert done.status == "completed" and done.progress["counts"] == {"backup_repaired": 1, "primary_ok": 1}
    assert await meta.last_verified_at(CLOUD, digest_of(data), "backup") is not None
    assert (await versions(api, "v/job"))[0]["restorable"] is True


async def _run_verify_job(client):
    app = client.server.app
    meta, runner = app[META], app[JOBS]
    task = asyncio.create_task(verify.schedule(meta, runner.wake.set, 0.05, rate_mb_s=None, check_every=0.05))
    try:
        for _ in range(200):
            jobs = await meta.list_jobs(CLOUD, verify.KIND, 1)
            if jobs and not jobs[0].open:
                return jobs[0]
            await asyncio.sleep(0.05)
    finally:
        task.cancel()
    raise AssertionError("the verify job did not finish")


async def test_throttle_keeps_the_rate():
    throttle = verify.Throttle(10e6)
    started = time.monotonic()
    for _ in range(5):
        await throttle.spent(1_000_000)
    assert time.monotonic() - started >= 0.45


async def test_a_mark_does_not_outlive_the_bytes_it_was_about(api, client):
    """A revision recorded missing, then deleted; the same bytes uploaded later start unmarked."""
    old, new = os.urandom(3000), os.urandom(3000)
    first = await api.upload(old, rt="raw", public_id="v/again")
    await api.upload(new, rt="raw", public_id="v/again")
    damage(client, old, "delete")
    assert (await scrub(client)).counts.get("backup_missing") == 1
    await api.admin("DELETE", f"resources/backup/{first['asset_id']}", json={"version_ids": [first["version_id"]]})
    await api.upload(old, rt="raw", public_id="v/again")
    assert [v["restorable"] for v in await versions(api, "v/again")] == [True, True]


async def test_a_rate_limited_scrub_leaves_uploads_responsive(api, client, storage):
    if storage[0] != "shared":
        pytest.skip("one layout is enough")
    for n in range(3):
        await api.upload(os.urandom(1 << 20), rt="raw", public_id=f"v/slow{n}")
    service = client.server.app[SERVICE]
    cloud = await service.meta.get_cloud(CLOUD)
    started = time.monotonic()
    scrubbing = asyncio.create_task(verify.Scrubber(service, rate=1e6).run(cloud))  # ~3 s at 1 MB/s
    await asyncio.sleep(0.2)
    upload_started = time.monotonic()
    await api.upload(os.urandom(100_000), rt="raw", public_id="v/meanwhile")
    assert time.monotonic() - upload_started < 1.0 and not scrubbing.done()
    report = await scrubbing
    assert report.problem_count == 0 and time.monotonic() - started >= 2.5


async def test_restore_replaces_a_damaged_primary_copy_from_the_proven_revision(api, client, storage):
    if storage[0] != "separate":
        pytest.skip("needs a primary copy independent of the revision")
    old, new = os.urandom(5000), os.urandom(5000)
    first = await api.upload(old, rt="raw", public_id="v/p")
    await api.upload(new, rt="raw", public_id="v/p")
    await api.upload(old, rt="raw", public_id="v/keep", backup="false")  # keeps a primary copy of `old`
    primary = client.server.app[SERVICE].primary
    path = Path(primary.local_path(layout.original_key(CLOUD, digest_of(old))))
    os.chmod(path, 0o644)
    path.write_bytes(b"rot" + old[3:])
    body = await api.admin("POST", "resources/raw/upload/restore", json={"public_ids": ["v/p"], "versions": [first["version_id"]]})
    assert "error" not in body["v/p"], body
    assert path.read_bytes() == old
