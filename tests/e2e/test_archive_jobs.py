"""Archives on a real `versionstore serve` process, with SDK uploads: an export and an import
SIGKILLed mid-run resume after a restart and finish (the archive valid, nothing imported
twice); a 2 GiB export keeps the server's RSS growth under 100 MiB while it is prepared and
downloaded (composed from the revisions) (10 GiB: `scripts/bench_snapshots.py --archive-rss`)."""

import asyncio
import base64
import io
import json
import os
import tarfile
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import blake3
import psutil
import pytest

from tests.conftest import API_KEY, API_SECRET, CLOUD
from tests.e2e.conftest import ServerProcess, cli, configure_sdk, stream_upload, wait_for
from tests.e2e.test_memory import RssSampler

MiB = 1 << 20
LEASE = 2.0
OTHER, OTHER_KEY, OTHER_SECRET = "archived", "archkey", "archsecret"


def basic(key: str, secret: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{key}:{secret}".encode()).decode()}


def call(server: ServerProcess, method: str, path: str, body: bytes | None = None, cloud: str = CLOUD,
         headers: dict[str, str] | None = None) -> dict[str, Any]:
    auth = basic(API_KEY, API_SECRET) if cloud == CLOUD else basic(OTHER_KEY, OTHER_SECRET)
    request = urllib.request.Request(
        f"{server.base_url}/v1_1/{cloud}/{path}", data=body, method=method, headers={**auth, **(headers or {})}
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        return dict(json.loads(response.read()))



def finished(server: ServerProcess, archive_id: str, cloud: str = CLOUD, timeout: float = 120) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        job = call(server, "GET", f"versionstore/archives/{archive_id}", cloud=cloud)
        return job if job["status"] not in ("pending", "active") else None

    job: dict[str, Any] = wait_for(done, timeout, f"archive job {archive_id}")
    return job


@pytest.fixture
def two_envs(tmp_path: Path) -> Iterator[ServerProcess]:
    """A server with a short job lease (a killed holder's job is taken over in seconds) and a
    second environment to import into."""
    data_dir = tmp_path / "data"
    cli("cloud", "create", CLOUD, "--api-key", API_KEY, "--api-secret", API_SECRET, data_dir=data_dir)
    cli("cloud", "create", OTHER, "--api-key", OTHER_KEY, "--api-secret", OTHER_SECRET, data_dir=data_dir)
    server = ServerProcess(data_dir, tmp_path, {"VERSIONSTORE_LEASE_SECONDS": str(LEASE), "VERSIONSTORE_POLL_INTERVAL": "0.2"})
    server.start()
    configure_sdk(server.base_url)
    try:
        yield server
    finally:
        server.stop()


async def _repeated(block: bytes, total: int) -> AsyncIterator[bytes]:
    sent = 0
    while sent < total:
        yield block[: total - sent]
        sent += len(block)


async def upload_copies(server: ServerProcess, blobs: list[bytes], copies: int, size: int, prefix: str) -> None:
    """`copies` public_ids of each blob (content addressing stores each blob once; an archive
    repeats it per asset), each `size` bytes of its blob repeated."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        for b, blob in enumerate(blobs):
            for c in range(copies):
                await stream_upload(session, server.base_url, _repeated(blob, size), public_id=f"{prefix}/{b}-{c}.bin", backup="1")


def download(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=120) as response:
        return bytes(response.read())


def spool_file(server: ServerProcess, archive_id: str) -> Path:
    return server.data_dir / "spool" / f"archive-{archive_id}.tar.tmp"


def test_export_and_import_killed_mid_run_resume_and_finish(two_envs: ServerProcess) -> None:
    server = two_envs
    blobs = [os.urandom(MiB) for _ in range(4)]
    asyncio.run(upload_copies(server, blobs, 12, 8 * MiB, "kill"))  # 48 assets, a 384 MiB archive
    job = call(server, "POST", "versionstore/archives", json.dumps({"at": time.time()}).encode(),
               headers={"Content-Type": "application/json"})
    temp = spool_file(server, job["archive_id"])
    wait_for(temp.exists, 60, "the export to be under way", interval=0.005)
    server.restart(crash=True)  # SIGKILL mid-export (its layout described, its check pass under way): nothing published
    done = finished(server, job["archive_id"])
    assert done["status"] == "completed", (done, server.log_tail())
    assert not temp.exists()
    body = download(done["download_url"])
    assert blake3.blake3(body).hexdigest() == done["digest"] and len(body) == done["size"]
    with tarfile.open(fileobj=io.BytesIO(body)) as tar:
        names = tar.getnames()
        assert names[0] == "manifest.jsonl" and len(names) == 49
        manifest = [json.loads(line) for line in tar.extractfile("manifest.jsonl").read().splitlines()[1:]]  # type: ignore[union-attr]
        for entry in manifest[:3]:
            assert blake3.blake3(tar.extractfile(entry["path"]).read()).hexdigest() == entry["blake3"]  # type: ignore[union-attr]

    imported = call(server, "POST", "versionstore/archives/import", body, cloud=OTHER, headers={"Content-Type": "application/x-tar"})

    def some_applied() -> bool:
        listed = call(server, "GET", "resources/raw/upload", cloud=OTHER)["resources"]
        return len(listed) >= 3

    wait_for(some_applied, 60, "the import to be under way")
    server.restart(crash=True)  # SIGKILL mid-import
    done = finished(server, imported["archive_id"], cloud=OTHER)
    assert done["status"] == "completed", (done, server.log_tail())
    assert done["progress"]["imported"] + done["progress"]["unchanged"] >= 48
    listed = call(server, "GET", "resources/raw/upload?max_results=500", cloud=OTHER)["resources"]
    assert len(listed) == 48
    for entry in manifest:
        asset = call(server, "GET", f"resources/raw/upload/{entry['public_id']}?versions=true", cloud=OTHER)
        assert asset["bytes"] == entry["bytes"] and len(asset["versions"]) == 1, asset  # none imported twice
    # The kill may have cut a batch while its entries were staged: none of its files is left.
    assert not list((server.data_dir / "spool").glob("*.part"))


GiB = 1 << 30
SUITE_TOTAL = 2 * GiB
RSS_LIMIT = 100 * MiB


def export_rss(server: ServerProcess, total: int, blob_size: int = 64 * MiB) -> tuple[int, float, float]:
    """(RSS growth, export seconds, download seconds) of exporting and downloading `total`
    bytes of originals: a few distinct blobs, each under many public_ids."""
    blobs = [os.urandom(MiB) for _ in range(2)]
    copies = max(1, total // (blob_size * len(blobs)))
    asyncio.run(upload_copies(server, blobs, copies, blob_size, "rss"))
    process = psutil.Process(server.pid)
    baseline = process.memory_info().rss
    with RssSampler(server.pid) as sampler:
        started = time.monotonic()
        job = call(server, "POST", "versionstore/archives", json.dumps({"at": time.time(), "prefix": "rss/"}).encode(),
                   headers={"Content-Type": "application/json"})
        done = finished(server, job["archive_id"], timeout=1800)
        assert done["status"] == "completed", done
        exported = time.monotonic() - started
        started = time.monotonic()
        hasher, size = blake3.blake3(), 0
        with urllib.request.urlopen(done["download_url"], timeout=600) as response:
            while data := response.read(MiB):
                hasher.update(data)
                size += len(data)
        downloaded = time.monotonic() - started
    assert size == done["size"] and hasher.hexdigest() == done["digest"]
    assert size > copies * len(blobs) * blob_size
    return max(sampler.samples) - min(baseline, sampler.samples[0]), exported, downloaded


def test_a_2_gib_export_keeps_the_server_rss_bounded(two_envs: ServerProcess) -> None:
    growth, exported, downloaded = export_rss(two_envs, SUITE_TOTAL)
    print(f"2 GiB archive: rss growth {growth / MiB:.1f} MiB, export {exported:.1f}s, download {downloaded:.1f}s")
    assert growth < RSS_LIMIT, f"server RSS grew {growth / MiB:.1f} MiB"


def test_a_refused_import_over_http_names_the_member(two_envs: ServerProcess) -> None:
    try:
        call(two_envs, "POST", "versionstore/archives/import", b"\0" * 4096, cloud=OTHER)
    except urllib.error.HTTPError as exc:
        assert exc.code == 400 and "Archive refused" in json.loads(exc.read())["error"]["message"]
    else:
        raise AssertionError("an empty tar was accepted")
