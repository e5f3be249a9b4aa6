"""Several service processes on one installation, driven by the official SDK.

`versionstore serve --workers 3` (one port, a supervising parent) and three separate `serve`
processes: uploads to one public_id from all at once, restores, deletions and version
deletions, each through another process; the chunks of one upload sent to three different
processes; processes SIGKILLed mid-upload and mid-job. Afterwards: the job finished in another
process within the lease, no duplicate versions, and every listed version downloads
byte-identical.

Each test runs on two deployments (`deployment`): the embedded default (SQLite and local
stores in the data directory) and the scale-out one (PostgreSQL metadata, primary and backup
stores in S3). The processes share one data directory, which on the scale-out deployment holds
only the spool: the shared spool directory docs/scale-out.md requires for chunks of one upload
to reach different processes.
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
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cloudinary
import cloudinary.api
import cloudinary.exceptions
import cloudinary.uploader
import pytest

from tests.e2e.conftest import API_KEY, API_SECRET, CLOUD, ServerProcess, cli, configure_sdk, wait_for
from tests.e2e.test_sdk import download, fetch, versions
from tests.test_blobstore_contract import make_s3_bucket

LEASE = 2.0
ENV = {
    "VERSIONSTORE_LEASE_SECONDS": str(LEASE),
    "VERSIONSTORE_POLL_INTERVAL": "0.1",
    "VERSIONSTORE_JOURNAL_SWEEP_INTERVAL": "0.5",
}


@dataclass
class Deployment:
    """Where the processes keep their metadata and blobs, and a way to read the metadata as an
    operator would (`rows`: every value as text, NULL as "")."""

    name: str
    data_dir: Path
    env: dict[str, str]
    rows: Callable[[str], list[list[str]]]


def _sqlite_rows(path: Path) -> Callable[[str], list[list[str]]]:
    def rows(statement: str) -> list[list[str]]:
        db = sqlite3.connect(path, timeout=30)
        try:
            with db:
                return [["" if v is None else str(v) for v in row] for row in db.execute(statement).fetchall()]
        finally:
            db.close()

    return rows


@pytest.fixture(params=["sqlite-local", "postgres-s3"])
def deployment(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Deployment]:
    """One environment created by the CLI on the deployment; PostgreSQL and moto are the
    session's servers, with a fresh database and fresh buckets per test."""
    data_dir = tmp_path / "data"
    if request.param == "sqlite-local":
        found = Deployment(request.param, data_dir, {}, _sqlite_rows(data_dir / "metadata.sqlite3"))
        cli("cloud", "create", CLOUD, "--api-key", API_KEY, "--api-secret", API_SECRET, data_dir=data_dir)
        yield found
        return
    postgres, moto = request.getfixturevalue("postgres"), request.getfixturevalue("moto_server")
    database = postgres.new_database()
    env = {"VERSIONSTORE_METADATA_URL": postgres.url(database), **moto.client_env()}
    for role in ("primary", "backup"):
        bucket = f"vs-{role}-{secrets.token_hex(6)}"
        make_s3_bucket(moto.url, bucket)
        env[f"VERSIONSTORE_{role.upper()}_STORE"] = f"s3://{bucket}/vs?endpoint_url={moto.url}&region=us-east-1"

    def rows(statement: str) -> list[list[str]]:
        return [line.split("|") for line in postgres.sql(statement, database).splitlines()]

    cli("cloud", "create", CLOUD, "--api-key", API_KEY, "--api-secret", API_SECRET, data_dir=data_dir, env=env)
    try:
        yield Deployment(request.param, data_dir, env, rows)
    finally:
        postgres.drop_database(database)


def children(pid: int) -> set[int]:
    return {int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}



def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def workers(deployment: Deployment, tmp_path: Path) -> Iterator[ServerProcess]:
    server = ServerProcess(deployment.data_dir, tmp_path, {**ENV, **deployment.env, "VERSIONSTORE_WORKERS": "3"})
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


def test_a_job_whose_worker_is_killed_finishes_in_another(workers: ServerProcess, deployment: Deployment) -> None:
    """A verify job read-throttled to take seconds; its worker is SIGKILLed mid-job; another
    worker takes it over once the lease has passed and completes it."""
    job_id = start_slow_verify(deployment)
    first_owner = wait_for(lambda: job_holder(deployment, job_id), 20, "a worker to claim the job")
    victim = int(first_owner.split(":")[1])
    assert victim in children(workers.pid)
    time.sleep(0.5)
    os.kill(victim, signal.SIGKILL)
    assert_taken_over_and_completed(deployment, job_id, first_owner, time.monotonic())


#: The slow verify job's revisions: 600 KB read at 0.25 MB/s take 2.4 s, long past the kill
#: half a second after the claim is seen, and short enough not to be most of the test's time.
JOB_REVISIONS, JOB_REVISION_BYTES, JOB_RATE_MB_S = 8, 75_000, 0.25


def start_slow_verify(deployment: Deployment) -> str:
    """Uploads JOB_REVISIONS revisions, then queues a verify job of the environment, read-throttled
    to take seconds, as an operator would through the database (any process's runner takes it)."""
    for i in range(JOB_REVISIONS):
        cloudinary.uploader.upload(secrets.token_bytes(JOB_REVISION_BYTES), public_id=f"job/{i}.bin", resource_type="raw")
    job_id = secrets.token_hex(16)
    deployment.rows(
        "INSERT INTO jobs (id, cloud, kind, status, params, created_at) "
        f"VALUES ('{job_id}', '{CLOUD}', 'verify', 'pending', '{json.dumps({'rate_mb_s': JOB_RATE_MB_S})}', {time.time()})"
    )
    return job_id


def job_holder(deployment: Deployment, job_id: str) -> str | None:
    found = deployment.rows(f"SELECT owner, status FROM jobs WHERE id = '{job_id}'")
    return found[0][0] if found and found[0][0] and found[0][1] == "active" else None


def assert_taken_over_and_completed(deployment: Deployment, job_id: str, first_owner: str, killed_at: float) -> None:
    """Another process took the job over within the lease (plus a collector pass) and
    completed it, every revision checked once, none found damaged."""
    def taken_over() -> str | None:
        owner = deployment.rows(f"SELECT owner FROM jobs WHERE id = '{job_id}'")[0][0]
        return owner if owner and owner != first_owner else None

    second_owner = wait_for(taken_over, LEASE + 10, "another process to take the job over")
    assert time.monotonic() - killed_at < LEASE + 5
    assert second_owner.split(":")[1] != first_owner.split(":")[1]

    def finished() -> str | None:
        status = deployment.rows(f"SELECT status FROM jobs WHERE id = '{job_id}'")[0][0]
        return status if status in ("completed", "failed") else None

    assert wait_for(finished, 60, "the job to finish") == "completed"
    progress = json.loads(deployment.rows(f"SELECT progress FROM jobs WHERE id = '{job_id}'")[0][0])
    assert progress["revisions"] == JOB_REVISIONS and progress["problems"] == 0


@pytest.fixture
def three(deployment: Deployment, tmp_path: Path) -> Iterator[list[ServerProcess]]:
    servers = [ServerProcess(deployment.data_dir, tmp_path / f"s{index}", {**ENV, **deployment.env}) for index in range(3)]
    try:
        for server in servers:
            server.log_dir.mkdir()
        with ThreadPoolExecutor(3) as pool:  # started at once: the start-up is most of the test's time
            list(pool.map(ServerProcess.start, servers))
        configure_sdk(servers[0].base_url)
        yield servers
    finally:
        for server in servers:
            server.stop()
        cloudinary.reset_config()


def test_three_processes_one_upload_in_chunks_and_one_name(three: list[ServerProcess]) -> None:
    """Each chunk of one upload to a different process (the SDK's own chunk call, pointed at
    each server in turn), uploads to one public_id from all three at once, then a deletion, a
    restore and a version deletion each through another process."""
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
    listed = assert_history_intact(public_id, by_version)
    assert len(listed) == 9

    configure_sdk(three[1].base_url)
    cloudinary.api.delete_resources([public_id], resource_type="raw")
    configure_sdk(three[2].base_url)
    first = listed[0]["version_id"]
    restored = cloudinary.api.restore([public_id], resource_type="raw", versions=[first])[public_id]
    assert restored["bytes"] == len(by_version[first])
    by_version[restored["version_id"]] = by_version[first]
    configure_sdk(three[0].base_url)
    gone = [v["version_id"] for v in listed[1:4]]
    deleted = cloudinary.api.delete_backed_up_assets(results[0]["asset_id"], gone)
    assert sorted(deleted["deleted_version_ids"]) == sorted(gone)
    for version_id in gone:
        del by_version[version_id]
    for server in three:  # every process sees the same history
        configure_sdk(server.base_url)
        assert len(assert_history_intact(public_id, by_version)) == 9 - 3 + 1


def test_three_processes_one_killed_mid_job_and_one_mid_upload(three: list[ServerProcess], deployment: Deployment) -> None:
    """A process SIGKILLed while it runs a job: the job finishes in one of the others within
    the lease. A process SIGKILLed while it receives an upload: the others serve an intact
    history (the cut-off upload's blobs are the write journal's to collect), and so does the
    process once started again."""
    job_id = start_slow_verify(deployment)
    first_owner = wait_for(lambda: job_holder(deployment, job_id), 20, "a process to claim the job")
    holder = next(server for server in three if server.pid == int(first_owner.split(":")[1]))
    time.sleep(0.5)
    holder.kill()
    assert_taken_over_and_completed(deployment, job_id, first_owner, time.monotonic())
    holder.start()

    public_id = f"killed/{secrets.token_hex(4)}.bin"
    first = secrets.token_bytes(5000)
    configure_sdk(three[0].base_url)
    uploaded = dict(cloudinary.uploader.upload(first, public_id=public_id, resource_type="raw"))
    by_version = {uploaded["version_id"]: first}
    big = secrets.token_bytes(24 << 20)
    victim = three[1]
    killer = threading.Timer(0.15, victim.kill)
    killer.start()
    with contextlib.suppress(Exception):  # cut off by the kill (or first to finish: one more intact version)
        cloudinary.uploader.upload(big, public_id=public_id, resource_type="raw", upload_prefix=victim.base_url)
    killer.join()
    configure_sdk(three[2].base_url)
    listed = versions(public_id, resource_type="raw")
    by_version.update({v["version_id"]: big for v in listed if v["version_id"] not in by_version})
    assert_history_intact(public_id, by_version)
    victim.start()  # started again on the same installation: the same history
    configure_sdk(victim.base_url)
    assert_history_intact(public_id, by_version)


@pytest.mark.parametrize("deployment", ["postgres-s3"], indirect=True)
def test_a_chunk_sent_to_a_process_without_the_shared_spool_is_refused_clearly(
    three: list[ServerProcess], deployment: Deployment, tmp_path: Path
) -> None:
    """A process of the same installation on another machine (its own data directory, so
    another spool) that receives the last chunk of an upload whose first chunk it cannot read
    answers 409 naming the topology rule, and publishes nothing; the client's retry of that
    chunk on a process that shares the spool completes the upload (docs/scale-out.md)."""
    elsewhere = ServerProcess(tmp_path / "other-machine", tmp_path / "m", {**ENV, **deployment.env})
    elsewhere.log_dir.mkdir()
    elsewhere.start()
    try:
        chunk = 5 << 20
        data = secrets.token_bytes(chunk + 999)
        upload_id = secrets.token_hex(8)

        def send(server: ServerProcess, start: int, end: int, **options: Any) -> dict[str, Any]:
            headers = {"Content-Range": f"bytes {start}-{end - 1}/{len(data)}", "X-Unique-Upload-Id": upload_id}
            return dict(cloudinary.uploader.upload_large_part(
                ("big.bin", data[start:end]), upload_prefix=server.base_url, http_headers=headers, **options))

        first = send(three[0], 0, chunk)
        with pytest.raises(cloudinary.exceptions.Error, match="shared spool directory or sticky routing"):
            send(elsewhere, chunk, len(data), public_id=first["public_id"])
        configure_sdk(three[0].base_url)
        with pytest.raises(cloudinary.exceptions.NotFound):
            cloudinary.api.resource(first["public_id"], resource_type="raw")
        final = send(three[1], chunk, len(data), public_id=first["public_id"])
        assert final["bytes"] == len(data)
        assert download(final["asset_id"], final["version_id"])[2] == data
    finally:
        elsewhere.stop()
