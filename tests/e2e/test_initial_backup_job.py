"""The initial-backup job in a real server process: killed in the middle, it resumes from its
cursor and completes with every asset backed up exactly once."""

import base64
import json
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import cloudinary
import cloudinary.api
import cloudinary.uploader

from tests.e2e.conftest import API_KEY, API_SECRET, CLOUD, ServerProcess, cli, configure_sdk

ASSETS = 600  # a few job batches (200 assets each), so a kill lands between two cursor saves


def admin(server: ServerProcess, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    request = urllib.request.Request(
        f"{server.base_url}/v1_1/{CLOUD}/{path}", method=method, data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": "Basic " + base64.b64encode(f"{API_KEY}:{API_SECRET}".encode()).decode(),
                 "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return dict(json.load(response))


def test_killed_in_the_middle_then_completed_without_duplicates(fresh_server: ServerProcess) -> None:
    server = fresh_server
    configure_sdk(server.base_url)
    cli("cloud", "set", CLOUD, "--auto-backup", "off", data_dir=server.data_dir)

    def upload(i: int) -> None:
        cloudinary.uploader.upload(f"library asset {i} ".encode() * 20, public_id=f"ib/{i:04d}", resource_type="raw")

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(upload, range(ASSETS)))
    cli("cloud", "set", CLOUD, "--auto-backup", "on", data_dir=server.data_dir)
    job_id = admin(server, "POST", "operations/initial_backup", {})["id"]

    seen_mid_way = None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        job = admin(server, "GET", f"operations/initial_backup/{job_id}")
        if job["status"] == "active" and 0 < job["processed_assets_count"] < ASSETS:
            seen_mid_way = job["processed_assets_count"]
            break
        assert job["status"] in ("pending", "active"), job
        time.sleep(0.01)
    assert seen_mid_way is not None, "the job was never seen mid-way"
    server.restart(crash=True)  # SIGKILL: no cleanup, the cursor is whatever was last committed

    deadline = time.monotonic() + 60
    while (job := admin(server, "GET", f"operations/initial_backup/{job_id}"))["status"] not in ("completed", "failed"):
        assert time.monotonic() < deadline, job
        time.sleep(0.05)
    assert job["status"] == "completed", job
    assert job["processed_assets_count"] == ASSETS and job["already_backed_up_count"] == 0 and job["failed_assets_count"] == 0
    assert job["bytes"] == sum(len(f"library asset {i} ".encode() * 20) for i in range(ASSETS))
    revisions = [p for p in (server.data_dir / "backup" / CLOUD / "blobs").rglob("*") if p.is_file()]
    assert len(revisions) == ASSETS
    for i in range(0, ASSETS, 37):
        resource = cloudinary.api.resource(f"ib/{i:04d}", resource_type="raw", versions=True)
        assert [v["restorable"] for v in resource["versions"]] == [True]  # one version, now a revision
    # Only one initial backup at a time, but a finished one does not block the next.
    again = admin(server, "POST", "operations/initial_backup", {})
    assert again["ok"] is True and again["id"] != job_id
    cloudinary.reset_config()
