"""The initial-backup job over the real app: start, one at a time, counts, skips, notification.

A restart in the middle (a killed server process) is in tests/e2e/test_initial_backup_job.py.
"""

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from tests.conftest import CLOUD, Api
from versionstore.config import Config
from versionstore.http.keys import META, SERVICE


@pytest.fixture
def config(tmp_path: Path, metadata_url: str | None) -> Config:
    # the notification receiver below listens on loopback, which the egress policy denies by default
    return Config(data_dir=tmp_path / "data", max_upload_bytes=64 << 20, poll_interval=0.05, fetch_allow=("127.0.0.1",),
                  metadata_url=metadata_url)


async def wait_done(api: Api, job_id: str, timeout: float = 20.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job = await api.admin("GET", f"operations/initial_backup/{job_id}")
        if job["status"] in ("completed", "failed"):
            return job
        assert time.monotonic() < deadline, job
        await asyncio.sleep(0.05)


async def set_auto_backup(api: Api, enabled: bool) -> None:
    await api.admin("PUT", "versionstore/settings", json={"auto_backup": enabled})


async def current_restorable(api: Api, public_id: str, rt: str = "image", type_: str = "upload") -> bool:
    body = await api.admin("GET", f"resources/{rt}/{type_}/{public_id}", params={"versions": "true"})
    return next(v["restorable"] for v in body["versions"] if v["version_id"] == body["version_id"])


async def add_remote_asset(client: Any, public_id: str) -> None:
    from versionstore.ids import new_hex_id
    from versionstore.models import Asset, Version

    now = time.time()
    version = Version(new_hex_id(), int(now), "f" * 64, 10, "jpg", False, None, now)
    asset = Asset(None, CLOUD, new_hex_id(), "image", "fetch", public_id, "live", version.digest, "jpg", 10, None, None,
                  version.version, version.version_id, None, created_at=now, uploaded_at=now)
    await client.app[META].save_version(asset, version)


async def test_refused_while_automatic_backup_is_off(api: Api):
    await set_auto_backup(api, False)
    body = await api.admin("POST", "operations/initial_backup", expect=400, json={})
    assert body["error"]["message"].startswith("Backup for new uploads isn't enabled")


async def test_backs_up_what_has_no_revision_and_skips_the_rest(api: Api, client: Any, config: Config):
    await set_auto_backup(api, False)
    plain = [await api.upload(f"library item {i}".encode() * 50, public_id=f"lib/{i}") for i in range(6)]
    await api.upload(b"an older version, not backed up", public_id="lib/0")  # lib/0's current version changes
    already = await api.upload(b"backed up by its upload", public_id="lib/backed", backup="true")
    await add_remote_asset(client, "lib/remote")  # the Upload API refuses type=fetch; an import could add one
    await api.admin("DELETE", "resources/image/upload", params={"public_ids[]": "lib/5"})  # deleted: not a live asset
    await set_auto_backup(api, True)

    started = await api.admin("POST", "operations/initial_backup", json={})
    assert started["ok"] is True
    job = await wait_done(api, started["id"])
    assert job["status"] == "completed", job
    assert job["processed_assets_count"] == 5  # lib/0..lib/4 (lib/0's current version)
    assert job["already_backed_up_count"] == 1 and job["skipped_assets_count"] == 1 and job["failed_assets_count"] == 0
    assert job["total_assets"] == 6 and job["bytes"] == sum(len(f"library item {i}".encode() * 50) for i in range(1, 5)) + 31
    assert job["start_time"] and job["completion_time"]
    for i in range(5):
        assert await current_restorable(api, f"lib/{i}")
    assert await current_restorable(api, "lib/backed")
    assert not await current_restorable(api, "lib/remote", type_="fetch")
    assert already["backup"] is True and plain
    # The bytes really are in the backup store, and download through the signed URL.
    revisions = [p for p in (config.data_dir / "backup").rglob("*") if p.is_file()]
    assert len(revisions) == 6
    # A second run finds nothing to do.
    again = await wait_done(api, (await api.admin("POST", "operations/initial_backup", json={}))["id"])
    assert again["processed_assets_count"] == 0 and again["already_backed_up_count"] == 6
    listing = await api.admin("GET", "operations/initial_backup", params={"max_results": 1})
    assert [b["id"] for b in listing["initial_backups"]] == [again["id"]] and listing["next_cursor"]
    rest = await api.admin("GET", "operations/initial_backup", params={"max_results": 1, "next_cursor": listing["next_cursor"]})
    assert [b["id"] for b in rest["initial_backups"]] == [started["id"]] and "next_cursor" not in rest


async def test_one_at_a_time_and_unknown_ids(api: Api, client: Any):
    await set_auto_backup(api, False)
    await api.upload(b"waiting", public_id="one/a")
    await set_auto_backup(api, True)
    service = client.app[SERVICE]
    # Hold the environment's revision writes so the first job cannot finish yet.
    async with service.claims.switching_target(CLOUD):
        first = await api.admin("POST", "operations/initial_backup", json={})
        second = await api.admin("POST", "operations/initial_backup", expect=409, json={})
        assert first["id"] in second["error"]["message"]
    assert (await wait_done(api, first["id"]))["processed_assets_count"] == 1
    await api.admin("GET", "operations/initial_backup/nope", expect=404)
    missing = await api.admin("GET", f"operations/initial_backup/{'0' * 32}", expect=404)
    assert missing["error"]["message"] == "Operation does not exist"
    await api.admin("POST", "operations/initial_backup", expect=400, json={"notification_url": "ftp://x"})


async def test_notification_is_posted_with_retries(api: Api, client: Any, aiohttp_server: Any):
    received: list[dict[str, Any]] = []
    calls = 0

    async def receiver(request: web.Request) -> web.Response:
        nonlocal calls
        calls += 1
        if calls == 1:
            return web.Response(status=503)  # the first delivery fails: retried
        received.append(json.loads(await request.text()))
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/hook", receiver)
    server = await aiohttp_server(app)
    await set_auto_backup(api, False)
    await api.upload(b"notify me", public_id="hook/a")
    await set_auto_backup(api, True)
    started = await api.admin("POST", "operations/initial_backup", json={"notification_url": str(server.make_url("/hook"))})
    await wait_done(api, started["id"])
    for _ in range(200):
        if received:
            break
        await asyncio.sleep(0.05)
    [summary] = received
    assert calls == 2
    assert summary["notification_type"] == "initial_backup" and summary["cloud_name"] == CLOUD
    assert summary["id"] == started["id"] and summary["status"] == "completed" and summary["processed_assets_count"] == 1


async def test_counts_are_exact_when_a_batch_is_examined_again(api: Api, client: Any):
    """What a restart does: the job resumes from its cursor and re-examines the batch it was
    in; assets it already backed up are neither redone nor counted twice."""
    from versionstore import initial_backup
    from versionstore.models import Job

    await set_auto_backup(api, False)
    for i in range(3):
        await api.upload(f"exact {i}".encode(), public_id=f"exact/{i}")
    await set_auto_backup(api, True)
    meta, service = client.app[META], client.app[SERVICE]
    job = Job(id="e" * 32, cloud=CLOUD, kind="test_only", status="active", created_at=time.time())
    await meta.create_job(job)
    rows = await meta.live_assets_after(CLOUD, 0, 10)
    await service.back_up_current_version(rows[0][0], rows[0][1], job.id)  # done before the "crash"
    job.kind = initial_backup.KIND
    await initial_backup.InitialBackup(service).run(job)
    described = await initial_backup.describe(meta, job)
    assert described["processed_assets_count"] == 3 and described["already_backed_up_count"] == 0


def test_the_batch_client_starts_without_the_service_modules() -> None:
    """`versionstore initial-backup` (versionstore/launch.py) does not import the CLI's service
    modules: their import was half of an unchanged library's re-run. Nor tqdm, until it draws bars,
    nor aiohttp (its HTTP is http.client's, versionstore/backup_http.py)."""
    import subprocess
    import sys

    probe = (
        "import sys\n"
        "from versionstore.launch import main\n"
        "try:\n"
        "    main(['initial-backup', '--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "kept_out = ('versionstore.cli', 'versionstore.metadata', 'versionstore.service', 'tqdm', 'aiohttp')\n"
        "print(sorted(m for m in kept_out if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]", out
