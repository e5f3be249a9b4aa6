"""A 200+ MiB upload streams through the server without its memory growing with the file.

The body is generated on the fly (never on disk on the client side), sent as a chunked
multipart request, and the stored version is verified by streaming its download through a hash.
"""

import asyncio
import os
import threading
import time
from collections.abc import AsyncIterator

import aiohttp
import blake3
import cloudinary.api
import cloudinary.utils
import psutil

from tests.e2e.conftest import ServerProcess, configure_sdk, stream_upload

MiB = 1 << 20
TOTAL = 208 * MiB + 12345  # not a multiple of any block size on either side
RSS_LIMIT = 100 * MiB


class RssSampler:
    """Samples a process's RSS every ~50 ms in a thread."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.process = psutil.Process(pid)
        self.interval = interval
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(self.process.memory_info().rss)
            self._stop.wait(self.interval)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append(self.process.memory_info().rss)


def blocks(total: int, hasher: blake3.blake3) -> AsyncIterator[bytes]:
    """Deterministic-enough, incompressible, non-repeating data: random blocks + a counter."""
    pool = [os.urandom(MiB) for _ in range(4)]

    async def generate() -> AsyncIterator[bytes]:
        sent, index = 0, 0
        while sent < total:
            block = index.to_bytes(8, "big") + pool[index % 4][8:]
            block = block[: total - sent]
            hasher.update(block)
            sent += len(block)
            index += 1
            yield block
            if index % 16 == 0:
                await asyncio.sleep(0)

    return generate()


async def upload_and_verify(server: ServerProcess) -> tuple[dict[str, object], str, RssSampler]:
    sent_hash = blake3.blake3()
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        # Warm the server up (imports, first request paths) before taking the baseline.
        async def tiny() -> AsyncIterator[bytes]:
            yield b"warm-up"

        await stream_upload(session, server.base_url, tiny(), public_id="memory/warmup.bin", backup="1")
        await asyncio.sleep(0.2)
        with RssSampler(server.pid) as sampler:
            result = await stream_upload(
                session, server.base_url, blocks(TOTAL, sent_hash), filename="big.bin",
                public_id="memory/big.bin", backup="1",
            )
    return result, sent_hash.hexdigest(), sampler


async def download_digest(url: str) -> tuple[int, int, str]:
    hasher = blake3.blake3()
    size = 0
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session, session.get(url) as response:
        status = response.status
        async for data in response.content.iter_chunked(MiB):
            hasher.update(data)
            size += len(data)
    return status, size, hasher.hexdigest()


def test_large_upload_memory_is_bounded(fresh_server: ServerProcess) -> None:
    configure_sdk(fresh_server.base_url)
    started = time.monotonic()
    baseline = psutil.Process(fresh_server.pid).memory_info().rss
    result, sent_digest, sampler = asyncio.run(upload_and_verify(fresh_server))
    upload_seconds = time.monotonic() - started

    assert result["bytes"] == TOTAL
    assert result["backup"] is True
    assert result["blake3"] == sent_digest  # BLAKE3 of what we streamed
    assert len(sampler.samples) >= 5, "upload too fast to sample; raise TOTAL"
    start_rss = min(sampler.samples[0], baseline)
    growth = max(sampler.samples) - start_rss
    print(f"rss growth {growth / MiB:.1f} MiB over {len(sampler.samples)} samples in {upload_seconds:.2f}s")
    assert growth < RSS_LIMIT, (
        f"server RSS grew {growth / MiB:.1f} MiB during a {TOTAL / MiB:.0f} MiB upload "
        f"(samples MiB: {[round(s / MiB) for s in sampler.samples[::10]]}, took {upload_seconds:.1f}s)"
    )

    listed = cloudinary.api.resource("memory/big.bin", resource_type="raw", versions=True)["versions"]
    assert [(v["version_id"], v["size"], v["restorable"]) for v in listed] == [(result["version_id"], TOTAL, True)]
    url = cloudinary.utils.download_backedup_asset(result["asset_id"], result["version_id"])
    status, size, digest = asyncio.run(download_digest(url))
    assert (status, size) == (200, TOTAL)
    assert digest == sent_digest
