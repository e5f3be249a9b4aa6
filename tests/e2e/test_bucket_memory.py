"""Uploads with backup to an S3 or GCS bucket, and their download_backup, in bounded memory.

Issue 10 / house rule "stream, don't buffer": a 256 MiB upload with backup to moto grew the
service by up to 231 MiB, while a local backup keeps it flat. A real `versionstore serve`
backs up to moto_server (S3) and fake-gcs-server (GCS); its RSS is sampled while a 128 MiB body
streams in and goes to the bucket, then while the revision streams back out. The growth must
stay under the bound docs/operations.md gives per upload (`UPLOAD_BOUND`), whatever the size.
"""

import asyncio
import time
from pathlib import Path

import aiohttp
import blake3
import cloudinary.utils
import psutil
import pytest

from tests.e2e.conftest import ServerProcess, configure_sdk, download_digest, running_server, stream_upload
from tests.e2e.test_bucket_targets import AWS, FAST, PREFIX, set_target, wait_migrated
from tests.e2e.test_memory import RssSampler, blocks
from tests.servers import FakeGcsServer, MotoServer
from tests.test_buckets import Bucket

MiB = 1 << 20
TOTAL = 128 * MiB + 4321  # not a multiple of a part or a chunk
# docs/operations.md: per upload to a bucket, about 8 MiB of buffers plus the interpreter's and
# the SDK's working set; the spool and the HTTP layer add their own few MiB. Before the fix: 80-230.
UPLOAD_BOUND = 48 * MiB
DOWNLOAD_BOUND = 16 * MiB  # docs/operations.md: a download holds two 1 MiB pieces (GCS) or one chunk (S3); before: 41 (GCS)


async def upload(server: ServerProcess) -> tuple[dict[str, object], str, RssSampler]:
    sent = blake3.blake3()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        # Warm-up: the SDK clients, botocore's models and the first request paths load once per process.
        await stream_upload(session, server.base_url, blocks(9 * MiB, blake3.blake3()), public_id="mem/warm.bin", backup="1")
        await asyncio.sleep(0.3)
        with RssSampler(server.pid, interval=0.02) as sampler:
            result = await stream_upload(session, server.base_url, blocks(TOTAL, sent), public_id="mem/big.bin", backup="1")
    return result, sent.hexdigest(), sampler


@pytest.mark.parametrize("kind", ["s3", "gcs"])
def test_bucket_backup_memory_is_bounded(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    env = {**FAST, **AWS}
    if kind == "s3":
        moto: MotoServer = request.getfixturevalue("moto_server")
        bucket, env = Bucket("s3", moto.url), {**env, **moto.client_env()}
    else:
        gcs: FakeGcsServer = request.getfixturevalue("gcs_server")
        bucket = Bucket("gs", gcs.url)
    bucket.mark()
    with running_server(tmp_path, env) as server:
        configure_sdk(server.base_url)
        url = bucket.operator_url(PREFIX)
        wait_migrated(server, url, set_target(server, url, env))
        started = time.monotonic()
        result, digest, up = asyncio.run(upload(server))
        took = time.monotonic() - started
        assert result["bytes"] == TOTAL and result["backup"] is True and result["blake3"] == digest
        growth = max(up.samples) - up.samples[0]  # from after the warm-up: SDK clients and models load once per process
        print(f"{kind}: upload with backup {took:.1f} s, RSS growth {growth / MiB:.1f} MiB ({len(up.samples)} samples)")
        assert growth < UPLOAD_BOUND, f"{kind}: RSS grew {growth / MiB:.0f} MiB (samples {[round(s / MiB) for s in up.samples[::10]]})"

        link = cloudinary.utils.download_backedup_asset(result["asset_id"], result["version_id"])
        before = psutil.Process(server.pid).memory_info().rss
        with RssSampler(server.pid, interval=0.02) as down:
            assert download_digest(link) == (200, TOTAL, digest)
        growth = max(down.samples) - before
        print(f"{kind}: download_backup RSS growth {growth / MiB:.1f} MiB")
        assert growth < DOWNLOAD_BOUND, f"{kind}: download grew RSS by {growth / MiB:.0f} MiB"
    cloudinary.reset_config()
