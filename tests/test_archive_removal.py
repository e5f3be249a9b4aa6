"""Archive removal (docs/snapshots.md, "Removal") on both metadata backends, with an injected
clock (no sleeping): a prepared archive expires `keep_days` after it was written and is then
removed once, audited, by any number of processes; DELETE removes one now; an import's uploaded
tar goes once its job has ended; an export's temp file, or a CLI import's staging directory,
left by a kill goes once its job or process is gone; and an import without valid credentials is answered before any body byte is
spooled."""

import asyncio
import base64
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.conftest import API_KEY, BASIC_HEADERS, CLOUD
from tests.test_archives import OTHER, OTHER_HEADERS, export, other_env, post_import, wait_for
from versionstore import archive_removal, archives, layout, staging
from versionstore.archive_records import IMPORT_FILE, IMPORT_STAGING, ArchiveFile
from versionstore.config import Config
from versionstore.console.audit import AuditLog
from versionstore.http.keys import META, SERVICE
from versionstore.ids import new_hex_id
from versionstore.metadata import _job_row
from versionstore.models import Job

DAY = 86400.0


def seconds(iso: str) -> float:
    return datetime.strptime(iso, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()


@pytest.fixture
def config(tmp_path: Path, metadata_url: str | None) -> Config:
    return Config(data_dir=tmp_path / "data", max_upload_bytes=64 << 20, poll_interval=0.05, metadata_url=metadata_url,
                  archive_keep_days=3)


def stored(client: Any, key: str) -> bool:
    path = client.app[SERVICE].targets.store(None).local_path(key)
    return path is not None and Path(path).exists()


async def removals(client: Any) -> list[tuple[str, str | None, dict[str, Any]]]:
    return [(r.actor, r.target, r.detail) async for r in AuditLog(client.app[META]).records() if r.action.startswith("archive_remove")]


async def test_an_export_expires_keep_days_after_it_was_written_and_is_removed_once(api, client):
    await api.upload(b"keep me a while", public_id="exp/a")
    done, _ = await export(api, at=time.time(), keep_days=2)
    key, expires_at = done["progress"]["key"], seconds(done["expires_at"])
    assert expires_at == pytest.approx(seconds(done["completed_at"]) + 2 * DAY, abs=5)
    assert stored(client, key)
    service = client.app[SERVICE]
    assert await archive_removal.remove_due(service, expires_at - 60) == 0
    assert stored(client, key)

    # Three processes' loops at once past the expiry: the file goes, and one of them records it.
    results = await asyncio.gather(*(archive_removal.remove_due(service, expires_at + 1) for _ in range(3)))
    assert sum(results) == 1 and not stored(client, key)
    expired = {"kind": "export", "key": key, "reason": "expired"}
    assert await removals(client) == [(archive_removal.REMOVAL_ACTOR, done["archive_id"], expired)]
    described = await api.admin("GET", f"versionstore/archives/{done['archive_id']}")
    assert seconds(described["removed_at"]) == pytest.approx(expires_at + 1, abs=1) and "download_url" not in described
    link = urlsplit(done["download_url"])
    gone = await api.client.get(f"{link.path}?{link.query}")
    assert gone.status == 404 and "removed" in (await gone.json())["error"]["message"]


async def test_keep_days_defaults_to_the_servers_setting_and_is_checked(api, client):
    await api.upload(b"default", public_id="exp/b")
    done, _ = await export(api, at=time.time())
    assert seconds(done["expires_at"]) == pytest.approx(seconds(done["completed_at"]) + 3 * DAY, abs=5)  # config.archive_keep_days
    for bad in (0, -1, archive_removal.MAX_KEEP_DAYS + 1, "soon"):
        answer = await api.admin("POST", "versionstore/archives", expect=400, json={"at": time.time(), "keep_days": bad})
        assert "keep_days" in answer["error"]["message"]


async def test_an_environments_keep_days_default_is_set_checked_audited_and_used(api, client):
    """The environment's `archive_keep_days` (PUT versionstore/settings) is what an export
    without `keep_days` gets; an export's own `keep_days` still wins; clearing it goes back to
    the server's (VERSIONSTORE_ARCHIVE_KEEP_DAYS, 3 here). Bad values change nothing."""
    meta = client.app[META]
    settings = await api.admin("GET", "versionstore/settings")
    assert (settings["archive_keep_days"], settings["server_archive_keep_days"]) == (None, 3)
    assert (await api.admin("PUT", "versionstore/settings", json={"archive_keep_days": 30}))["archive_keep_days"] == 30
    for bad in (0, -5, archive_removal.MAX_KEEP_DAYS + 1, "soon", 1.5):
        answer = await api.admin("PUT", "versionstore/settings", expect=400, json={"archive_keep_days": bad, "auto_backup": False})
        assert "archive_keep_days" in answer["error"]["message"]
    settings = await api.admin("GET", "versionstore/settings")
    assert (settings["archive_keep_days"], settings["auto_backup"]) == (30, True)  # the refused request changed nothing

    await api.upload(b"kept by the environment's default", public_id="exp/env")
    done, _ = await export(api, at=time.time())
    assert seconds(done["expires_at"]) == pytest.approx(seconds(done["completed_at"]) + 30 * DAY, abs=5)
    own, _ = await export(api, at=time.time(), keep_days=2)
    assert seconds(own["expires_at"]) == pytest.approx(seconds(own["completed_at"]) + 2 * DAY, abs=5)
    # Form-encoded, as the SDKs send it; `default` clears it (a blank is no parameter: no change).
    for value, expected in (("", 30), ("default", None)):
        response = await api.client.put(f"/v1_1/{CLOUD}/versionstore/settings", data={"archive_keep_days": value},
                                        headers=BASIC_HEADERS)
        assert response.status == 200 and (await response.json())["archive_keep_days"] == expected
    back, _ = await export(api, at=time.time())
    assert seconds(back["expires_at"]) == pytest.approx(seconds(back["completed_at"]) + 3 * DAY, abs=5)

    changes = [r.detail async for r in AuditLog(meta).records() if r.action == "settings"]
    assert [(d["archive_keep_days"], d["via"]) for d in changes] == [(30, "api"), (None, "api")]
    assert await meta.get_archive_keep_days(CLOUD) is None


async def test_delete_removes_an_archive_now_and_is_refused_while_its_job_runs(api, client):
    await api.upload(b"delete me", public_id="exp/c")
    done, _ = await export(api, at=time.time())
    key = done["progress"]["key"]
    removed = await api.admin("DELETE", f"versionstore/archives/{done['archive_id']}")
    assert removed["status"] == "completed" and removed["removed_at"] and "download_url" not in removed
    assert not stored(client, key)
    again = await api.admin("DELETE", f"versionstore/archives/{done['archive_id']}")
    assert again["removed_at"] == removed["removed_at"]
    assert await removals(client) == [(f"api_key:{API_KEY}", done["archive_id"], {"kind": "export", "key": key, "via": "api"})]
    await api.admin("DELETE", f"versionstore/archives/{'e' * 32}", expect=404)

    # An export another process holds (its lease runs for an hour): 409, nothing removed.
    meta = client.app[META]
    running = Job(id=new_hex_id(), cloud=CLOUD, kind=archives.EXPORT, status="active", params={"at": time.time()},
                  created_at=time.time())
    assert await meta.create_job(running) is not None
    assert await meta.claim_job(running.id, "another-process", time.time() + 3600)
    await api.admin("DELETE", f"versionstore/archives/{running.id}", expect=409)


async def _removed(meta: Any, cloud: str, job_id: str) -> ArchiveFile:
    """The job's file record once its file is removed: an import reports `completed` first and
    drops its upload right after (archives.py, `_drop_upload`), so a poll can see the one
    before the other."""
    for _ in range(200):
        record = await meta.get_archive_file(cloud, job_id)
        if record is not None and record.removed_at is not None:
            return record
        await asyncio.sleep(0.025)
    raise AssertionError(f"{job_id}: its file was not removed")


async def test_an_imports_uploaded_tar_goes_when_its_job_ends_and_leftovers_are_swept(api, client):
    await api.upload(b"to import", public_id="imp/a")
    _, body = await export(api, at=time.time())
    await other_env(client)
    job = await post_import(api, body)
    finished = await wait_for(api, f"versionstore/archives/{job['archive_id']}", OTHER_HEADERS)
    assert finished["status"] == "completed"
    meta, service = client.app[META], client.app[SERVICE]
    record = await _removed(meta, OTHER, job["archive_id"])
    assert record.kind == IMPORT_FILE
    assert not stored(client, layout.archive_upload_key(OTHER, job["archive_id"]))

    # What a kill leaves: an ended import's tar still stored, and a tar whose job never came
    # to exist (a crash between storing it and creating the job). The first goes at the next
    # pass; the second once it is a day old (it may be an import being accepted right now).
    now = time.time()
    leftovers = {}
    for name, job_id in (("ended", job["archive_id"]), ("jobless", new_hex_id())):
        key = layout.archive_upload_key(OTHER, job_id)
        await meta.register_archive_file(ArchiveFile(job_id, OTHER, IMPORT_FILE, key, now, None))
        await _put(key, client)
        leftovers[name] = key
    assert await archive_removal.remove_due(service, now) == 1
    assert not stored(client, leftovers["ended"]) and stored(client, leftovers["jobless"])
    assert await archive_removal.remove_due(service, now + archive_removal.ORPHAN_AGE + 1) == 1
    assert not stored(client, leftovers["jobless"])


async def _put(key: str, client: Any) -> None:
    service = client.app[SERVICE]
    path = service.spool_dir / f"leftover-{new_hex_id()}"
    path.write_bytes(b"tar bytes")
    assert await service.targets.store(None).put_file(key, path)
    path.unlink()


async def test_an_export_temp_file_is_removed_once_its_job_is_no_longer_open(api, client):
    service, meta = client.app[SERVICE], client.app[META]
    held = Job(id=new_hex_id(), cloud=CLOUD, kind=archives.EXPORT, status="active", params={"at": time.time()}, created_at=time.time())
    # Inserted already held by another process, in one statement: created first and claimed
    # second, this app's job runner (polling every 50 ms) could take it in between and run it.
    row = {**_job_row(held), "owner": "another-process", "lease_until": time.time() + 3600}  # being written elsewhere: kept
    async with meta.transaction() as db:
        await db.execute(f"INSERT INTO jobs ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})", tuple(row.values()))
    ended = new_hex_id()  # a kill's leftover whose job failed or finished elsewhere since
    files = {}
    for job_id in (held.id, ended):
        temp = archive_removal.export_temp(service.spool_dir, job_id)
        files[job_id] = [temp, temp.with_name(temp.name + ".manifest")]
        for path in files[job_id]:
            path.write_bytes(b"half an archive")
    assert await archive_removal.remove_stale_files(service) == 2
    assert all(p.exists() for p in files[held.id]) and not any(p.exists() for p in files[ended])

    # A CLI import's staging directory: kept while its process holds it, removed once it is gone.
    live, dead = (staging.PrivateDirectory(service.spool_dir, IMPORT_STAGING) for _ in range(2))
    for directory in (live, dead):
        (directory.path / "staged.part").write_bytes(b"staged bytes")
    dead._lock.close()  # what a killed process leaves: the directory, its lock free
    assert await archive_removal.remove_stale_files(service) == 1
    assert (live.path / "staged.part").exists() and not dead.path.exists()
    live.remove()


@pytest.mark.parametrize("credentials", ["none", "bad_secret"])
async def test_an_import_without_valid_credentials_is_refused_before_any_body_byte_is_spooled(client, credentials):
    await other_env(client)
    spool = client.app[SERVICE].spool_dir
    before = set(spool.iterdir())
    auth = {"none": "", "bad_secret": "Authorization: Basic " + base64.b64encode(b"otherkey:wrong").decode() + "\r\n"}[credentials]
    reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    try:
        # A gigabyte announced, a few bytes sent: the answer must not wait for the rest.
        writer.write((f"POST /v1_1/{OTHER}/versionstore/archives/import HTTP/1.1\r\nHost: test\r\n{auth}"
                      "Content-Type: application/x-tar\r\nContent-Length: 1073741824\r\n\r\n").encode() + b"\0" * 1024)
        await writer.drain()
        status = await asyncio.wait_for(reader.readline(), timeout=5)
    finally:
        writer.close()
    assert status.split()[1] == b"401", status
    assert set(spool.iterdir()) == before
    assert await client.app[META].list_jobs(OTHER, archives.IMPORT, 10) == []
