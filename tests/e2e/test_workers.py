"""Several service processes on one data directory, driven by the official SDK.

`versionstore serve --workers 3` (one port, a supervising parent) and three separate `serve`
processes on one data dir: uploads to one public_id from all at once, restores, deletions and
version deletions; the chunks of one upload sent to three different processes; workers
SIGKILLed mid-upload and mid-job. Afterwards: the job finished in another process within the
lease, no duplicate versions, and every listed version downloads byte-identical.
"""

import contextlib
import hashlib
import json
import os
import secrets
import signal
import sqlite3
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import cloudinary
import cloudinary.api
import cloudinary.uploader
import pytest

from tests.e2e.conftest import CLOUD, ServerProcess, cli, configure_sdk
from tests.e2e.test_sdk import download, fetch, versions

LEASE = 2.0
ENV = {
    "VERSIONSTORE_LEASE_SECONDS": str(LEASE),
    "VERSIONSTORE_POLL_INTERVAL": "0.1",
    "VERSIONSTORE_JOURNAL_SWEEP_INTERVAL": "0.5",
}


def children(pid: int) -> set[int]:
    return {int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}


def wait_for(condition: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[ServerProcess]:
    data_dir = tmp_path / "data"
    cli("cloud", "create", CLOUD, "--api-key", "key123", "--api-secret", "secret456", data_dir=data_dir)
    server = ServerProcess(data_dir, tmp_path, {**ENV, "VERSIONSTORE_WORKERS": "3"})
    server.start()
    configure_sdk(server.base_url)
    try:
        yield server
    finally:
        server.stop()
        cloudinary.reset_config()


def upload_many_at_once(public_id: str, payloads: list[bytes], prefixes: list[str] | None = None) -> list[dict[str, Any]]:
    """Every payload uploaded to one public_id at the same moment (a barrier), from threads."""
    barrier = threading.Barrier(len(payloads))

    def one(index: int) -> dict[str, Any]:
        options = {"upload_prefix": prefixes[index % len(prefixes)]} if prefixes else {}
        barrier.wait()
        return dict(cloudinary.uploader.upload(payloads[index], public_id=public_id, resource_type="raw", **options))

    with ThreadPoolExecutor(len(payloads)) as pool:
        return list(pool.map(one, range(len(payloads))))


def assert_history_intact(public_id: str, expected: dict[str, bytes]) -> list[dict[str, Any]]:
    """No duplicate versions, and every listed version downloads byte-identical."""
    listed = versions(public_id, resource_type="raw")
    ids = [v["version_id"] for v in listed]
    assert len(ids) == len(set(ids))
    numbers = [int(v["version"]) for v in listed]
    assert numbers == sorted(numbers) and len(set(numbers)) == len(numbers)
    asset_id = cloudinary.api.resource(public_id, resource_type="raw")["asset_id"]
    for version in listed:
        status, _, body = download(asset_id, version["version_id"])
        assert status == 200, body
        assert sha(body) in {sha(v) for v in expected.values()}
        if version["version_id"] in expected:
            assert body == expected[version["version_id"]]
    return listed


def test_workers_share_one_port_and_one_history(workers: ServerProcess) -> None:
    parent = workers.pid
    pids = wait_for(lambda: children(parent) if len(children(parent)) == 3 else None, 10, "three workers")
    # Connections spread over the workers: each one names itself in X-Request-Id's prefix.
    def request_id(_: int) -> str:
        with urllib.request.urlopen(f"{workers.base_url}/healthz", timeout=10) as response:
            return str(response.headers["X-Request-Id"])[:8]

    # One accept queue: which worker takes a connection is the kernel's choice, not balanced,
    # so ask a few times.
    prefixes: set[str] = set()
    for _ in range(10):
        with ThreadPoolExecutor(24) as pool:
            prefixes |= set(pool.map(request_id, range(240)))
        if len(prefixes) >= 2:
            break
    assert len(prefixes) >= 2, prefixes

    public_id = f"workers/{secrets.token_hex(4)}.bin"
    payloads = [secrets.token_bytes(2000 + i) for i in range(12)]
    results = upload_many_at_once(public_id, payloads)
    assert len({r["asset_id"] for r in results}) == 1
    by_version = {r["version_id"]: p for r, p in zip(results, payloads, strict=True)}
    listed = assert_history_intact(public_id, by_version)
    assert len(listed) == 12

    # Deletion, restore and version deletion, each on its own connection (any worker).
    cloudinary.api.delete_resources([public_id], resource_type="raw")
    first = listed[0]["version_id"]
    restored = cloudinary.api.restore([public_id], resource_type="raw", versions=[first])[public_id]
    assert restored["bytes"] == len(by_version[first])
    by_version[restored["version_id"]] = by_version[first]
    asset_id = results[0]["asset_id"]
    gone = [v["version_id"] for v in listed[1:4]]
    result = cloudinary.api.delete_backed_up_assets(asset_id, gone)
    assert sorted(result["deleted_version_ids"]) == sorted(gone)
    for version_id in gone:
        del by_version[version_id]
    assert len(assert_history_intact(public_id, by_version)) == 12 - 3 + 1

    # A worker SIGKILLed mid-upload: the upload fails, the supervisor starts a new worker, and
    # nothing listed is damaged.
    big = secrets.token_bytes(24 << 20)
    running = children(parent)  # every worker now (the three started, or their replacements)
    killer = threading.Timer(0.15, lambda: [os.kill(pid, signal.SIGKILL) for pid in running])
    killer.start()
    with contextlib.suppress(Exception):  # cut off by the kill (or first to finish: one more intact version)
        cloudinary.uploader.upload(big, public_id=public_id, resource_type="raw")
    killer.join()
    def replaced() -> set[int] | None:
        now = children(parent)
        return now if len(now) == 3 and not now & running else None

    new_pids = wait_for(replaced, 30, "three new workers")
    assert len(pids) == 3
    configure_sdk(workers.base_url)
    wait_for(lambda: fetch(f"{workers.base_url}/healthz")[0] == 200, 20, "workers answering again")
    listed_after = versions(public_id, resource_type="raw")
    extra = {v["version_id"] for v in listed_after} - set(by_version)
    by_version.update({version_id: big for version_id in extra})
    assert_history_intact(public_id, by_version)

    # SIGTERM to the parent stops every worker.
    os.kill(parent, signal.SIGTERM)
    assert workers.proc is not None
    assert workers.proc.wait(timeout=30) == 0
    assert workers.log_tail(1 << 20).count("versionstore listening on") == 1  # the banner, once
    for pid in new_pids:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()


def test_a_job_whose_worker_is_killed_finishes_in_another(workers: ServerProcess) -> None:
    """A verify job read-throttled to take seconds; its worker is SIGKILLed mid-job; another
    worker takes it over once the lease has passed and completes it."""
    for i in range(8):
        cloudinary.uploader.upload(secrets.token_bytes(150_000), public_id=f"job/{i}.bin", resource_type="raw")
    db = sqlite3.connect(workers.data_dir / "metadata.sqlite3", timeout=30)
    job_id = secrets.token_hex(16)
    with db:
        db.execute(
            "INSERT INTO jobs (id, cloud, kind, status, params, created_at) VALUES (?, ?, 'verify', 'pending', ?, ?)",
            (job_id, CLOUD, json.dumps({"rate_mb_s": 0.25}), time.time()),
        )

    def holder() -> str | None:
        row = db.execute("SELECT owner, status FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return row[0] if row and row[0] and row[1] == "active" else None

    first_owner = wait_for(holder, 20, "a worker to claim the job")
    victim = int(first_owner.split(":")[1])
    assert victim in children(workers.pid)
    time.sleep(0.5)
    os.kill(victim, signal.SIGKILL)
    killed_at = time.monotonic()

    def taken_over() -> str | None:
        owner = db.execute("SELECT owner FROM jobs WHERE id = ?", (job_id,)).fetchone()[0]
        return owner if owner and owner != first_owner else None

    second_owner = wait_for(taken_over, LEASE + 10, "another worker to take the job over")
    assert time.monotonic() - killed_at < LEASE + 5
    assert int(second_owner.split(":")[1]) != victim
    status = wait_for(
        lambda: (row := db.execute("SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchone()) and row[0] in ("completed", "failed")
        and row[0], 60, "the job to finish",
    )
    assert status == "completed"
    progress = json.loads(db.execute("SELECT progress FROM jobs WHERE id = ?", (job_id,)).fetchone()[0])
    assert progress["revisions"] == 8 and progress["problems"] == 0
    db.close()


@pytest.fixture
def three(tmp_path: Path) -> Iterator[list[ServerProcess]]:
    data_dir = tmp_path / "data"
    cli("cloud", "create", CLOUD, "--api-key", "key123", "--api-secret", "secret456", data_dir=data_dir)
    servers = []
    try:
        for index in range(3):
            server = ServerProcess(data_dir, tmp_path / f"s{index}", ENV)
            server.log_dir.mkdir()
            server.start()
            servers.append(server)
        configure_sdk(servers[0].base_url)
        yield servers
    finally:
        for server in servers:
            server.stop()
        cloudinary.reset_config()


def test_three_processes_one_upload_in_chunks_and_one_name(three: list[ServerProcess]) -> None:
    """Each chunk of one upload to a different process (the SDK's own chunk call, pointed at
    each server in turn), and uploads to one public_id from all three at once."""
    chunk = 5 << 20
    data = secrets.token_bytes(3 * chunk + 4321)
    upload_id = secrets.token_hex(8)
    result: dict[str, Any] = {}
    for index, start in enumerate(range(0, len(data), chunk)):
        part = data[start : start + chunk]
        headers = {"Content-Range": f"bytes {start}-{start + len(part) - 1}/{len(data)}", "X-Unique-Upload-Id": upload_id}
        options: dict[str, Any] = {"upload_prefix": three[index % 3].base_url, "http_headers": headers}
        if result.get("public_id"):
            options["public_id"] = result["public_id"]
        result = dict(cloudinary.uploader.upload_large_part(("big.bin", part), **options))
    assert result["bytes"] == len(data)
    assert download(result["asset_id"], result["version_id"])[2] == data

    public_id = f"three/{secrets.token_hex(4)}.bin"
    payloads = [secrets.token_bytes(3000 + i) for i in range(9)]
    results = upload_many_at_once(public_id, payloads, [server.base_url for server in three])
    assert len({r["asset_id"] for r in results}) == 1
    by_version = {r["version_id"]: p for r, p in zip(results, payloads, strict=True)}
    assert len(assert_history_intact(public_id, by_version)) == 9
