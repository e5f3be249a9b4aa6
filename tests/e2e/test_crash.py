"""SIGKILL the server in the middle of concurrent uploads, restart it on the same data dir.

After the restart: every listed version of every asset downloads with its listed size (and
the acknowledged ones with the bytes we sent), no cut upload ever appears as a version, and
no `*.part` spool file is left behind.
"""

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import blake3
import cloudinary
import cloudinary.api
import cloudinary.exceptions
import cloudinary.uploader
import cloudinary.utils
import pytest

from tests.e2e.conftest import ServerProcess, configure_sdk, download_digest, stream_upload

MiB = 1 << 20
SLOW_BLOCK = 256 * 1024
SLOW_NOMINAL = 512 * MiB  # a cut upload would need many seconds to finish: it never does here
CUT_AT_LEAST = 3 * MiB  # every slow upload has this much spooled when the server is killed
BASE_IDS = [f"crash/base{i}.bin" for i in range(3)]
CUT_NEW_IDS = [f"crash/cut-new{i}.bin" for i in range(2)]
CUT_EXISTING_IDS = BASE_IDS[:2]
FAST_IDS = [f"crash/fast{i}.bin" for i in range(3)]


def digest(data: bytes) -> str:
    return blake3.blake3(data).hexdigest()


async def slow_body() -> AsyncIterator[bytes]:
    block = os.urandom(SLOW_BLOCK)
    sent = 0
    while sent < SLOW_NOMINAL:
        yield block
        sent += len(block)
        await asyncio.sleep(0.004)


def spooled_parts(data_dir: Path) -> dict[Path, int]:
    sizes = {}
    for path in (data_dir / "spool").glob("*.part"):
        with contextlib.suppress(FileNotFoundError):  # finished and removed meanwhile
            sizes[path] = path.stat().st_size
    return sizes


async def crash_during_uploads(server: ServerProcess) -> tuple[dict[str, dict[str, Any]], int]:
    """Run slow and fast uploads concurrently; SIGKILL once every slow one is well under way.

    Returns the acknowledged fast uploads (version_id -> what we sent) and how many spool
    files were in flight at the kill.
    """
    acked: dict[str, dict[str, Any]] = {}
    killed = asyncio.Event()
    timeout = aiohttp.ClientTimeout(total=60)

    async with aiohttp.ClientSession(timeout=timeout) as session:

        async def slow(public_id: str) -> None:
            await stream_upload(session, server.base_url, slow_body(), filename="cut.bin", public_id=public_id, backup="1")
            raise AssertionError(f"slow upload of {public_id} finished before the kill")

        async def fast(worker: int) -> None:
            n = 0
            while not killed.is_set():
                data = os.urandom(32 * 1024 + worker * 1000 + n)
                public_id = FAST_IDS[(worker + n) % len(FAST_IDS)]
                n += 1

                async def body(data: bytes = data) -> AsyncIterator[bytes]:
                    yield data[: len(data) // 2]
                    yield data[len(data) // 2 :]

                result = await stream_upload(session, server.base_url, body(), filename="fast.bin", public_id=public_id, backup="1")
                acked[str(result["version_id"])] = {
                    "asset_id": result["asset_id"], "public_id": public_id, "size": len(data), "digest": digest(data),
                }

        slow_ids = CUT_EXISTING_IDS + CUT_NEW_IDS
        tasks = [asyncio.create_task(slow(pid)) for pid in slow_ids]
        tasks += [asyncio.create_task(fast(w)) for w in range(2)]

        deadline = time.monotonic() + 30
        while True:
            big = [p for p, size in spooled_parts(server.data_dir).items() if size >= CUT_AT_LEAST]
            if len(big) >= len(slow_ids) and len(acked) >= 3:
                break
            done = [t for t in tasks if t.done()]
            if done:
                done[0].result()  # surface an early failure
            assert time.monotonic() < deadline, f"uploads did not get under way; log:\n{server.log_tail()}"
            await asyncio.sleep(0.02)

        await asyncio.to_thread(server.kill)
        killed.set()
        in_flight = len(spooled_parts(server.data_dir))
        results = await asyncio.gather(*tasks, return_exceptions=True)
    for result in results:
        # Every task was cut by the kill (a fast one may also have just finished its loop).
        assert result is None or isinstance(result, (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError)), repr(result)
    return acked, in_flight


def all_assets() -> list[dict[str, Any]]:
    found = cloudinary.Search().expression("public_id=crash/*").max_results(500).execute()
    assert "next_cursor" not in found
    return list(found["resources"])


def test_sigkill_mid_upload_then_restart(fresh_server: ServerProcess) -> None:
    server = fresh_server
    configure_sdk(server.base_url)

    # Committed history before the crash: three assets with two versions each.
    baseline: dict[str, list[str]] = {}
    sent: dict[str, dict[str, Any]] = {}
    for public_id in BASE_IDS:
        for _ in range(2):
            data = os.urandom(100_000)
            up = cloudinary.uploader.upload(data, public_id=public_id, resource_type="raw", backup=True)
            baseline.setdefault(public_id, []).append(up["version_id"])
            sent[up["version_id"]] = {"asset_id": up["asset_id"], "public_id": public_id, "size": len(data), "digest": digest(data)}

    acked, in_flight = asyncio.run(crash_during_uploads(server))
    sent.update(acked)
    assert in_flight >= len(CUT_EXISTING_IDS + CUT_NEW_IDS)
    assert spooled_parts(server.data_dir), "SIGKILL should have left spool files behind"

    server.start()
    configure_sdk(server.base_url)
    assert not spooled_parts(server.data_dir), "restart must clear stale *.part spool files"

    # Every listed version of every asset downloads with the listed size.
    assets = all_assets()
    listed_ids: set[str] = set()
    for asset in assets:
        full = cloudinary.api.resource_by_asset_id(asset["asset_id"], versions=True)
        assert full["versions"], full
        assert full["version_id"] == full["versions"][-1]["version_id"]
        for version in full["versions"]:
            listed_ids.add(version["version_id"])
            assert version["restorable"] is True  # everything here was uploaded with backup on
            assert version["size"] < CUT_AT_LEAST, f"a cut upload appeared as a version: {version}"
            url = cloudinary.utils.download_backedup_asset(asset["asset_id"], version["version_id"])
            status, size, got = download_digest(url)
            assert (status, size) == (200, version["size"]), (full["public_id"], version)
            if version["version_id"] in sent:
                assert got == sent[version["version_id"]]["digest"]
                assert size == sent[version["version_id"]]["size"]

    # Nothing acknowledged was lost; nothing cut was committed.
    assert set(sent) <= listed_ids
    public_ids = {a["public_id"] for a in assets}
    # An upload cut after its commit but before its answer may exist unacknowledged.
    acked_ids = {entry["public_id"] for entry in acked.values()}
    assert set(BASE_IDS) | acked_ids <= public_ids <= set(BASE_IDS) | set(FAST_IDS)
    for public_id in CUT_EXISTING_IDS:
        history = cloudinary.api.resource(public_id, resource_type="raw", versions=True)["versions"]
        assert [v["version_id"] for v in history] == baseline[public_id]
    for public_id in CUT_NEW_IDS:
        with pytest.raises(cloudinary.exceptions.NotFound):
            cloudinary.api.resource(public_id, resource_type="raw")

    # The restarted server is fully usable, including on the ids whose upload was cut.
    again = cloudinary.uploader.upload(b"after the crash", public_id=CUT_NEW_IDS[0], resource_type="raw")
    assert again["bytes"] == len(b"after the crash")
    extra = cloudinary.uploader.upload(b"next version", public_id=CUT_EXISTING_IDS[0], resource_type="raw")
    history = cloudinary.api.resource(CUT_EXISTING_IDS[0], resource_type="raw", versions=True)["versions"]
    assert [v["version_id"] for v in history] == [*baseline[CUT_EXISTING_IDS[0]], extra["version_id"]]
