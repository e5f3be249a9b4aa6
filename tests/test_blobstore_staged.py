"""The S3 staged put (`S3BlobStore.stage`), against a real moto_server: parts go up under a
staging key while the body arrives; the digest key appears only at `publish`, after the staged
bytes were checked; abandoned staging (abort, error, a killed process) leaves no digest key and
is cleaned. moto's minimum part size is 256 KiB here (tests/servers.py)."""

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import boto3
import pytest

from tests.test_blobstore_contract import new_bucket_url, read_all
from tests.test_blobstore_s3 import PART, SMALL_PARTS
from versionstore.blobstore import BlobStoreError, open_store, s3

ROOT = Path(__file__).resolve().parents[1]
STAGING = "demo/staging/"
KEY = "demo/blobs/ab/cd/abcdef"


@pytest.fixture(autouse=True)
def aws_env(monkeypatch, tmp_path):
    for name, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                        "AWS_CONFIG_FILE": str(tmp_path / "none"), "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none")}.items():
        monkeypatch.setenv(name, value)


@pytest.fixture
async def store(request):
    store = open_store(new_bucket_url(request, "s3") + SMALL_PARTS)
    assert isinstance(store, s3.S3BlobStore)
    yield store
    await store.close()


def leftovers(endpoint: str, store: s3.S3BlobStore) -> tuple[list[str], list[str]]:
    """(unfinished multipart uploads, objects) under the staging area, seen by a plain client."""
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="test", aws_secret_access_key="test")
    prefix = store.prefix + STAGING
    uploads = [u["Key"] for u in client.list_multipart_uploads(Bucket=store.bucket, Prefix=prefix).get("Uploads", [])]
    objects = [o["Key"] for o in client.list_objects_v2(Bucket=store.bucket, Prefix=prefix).get("Contents", [])]
    return uploads, objects


async def write_in_pieces(staged: s3.StagedPut, data: bytes, piece: int = 100_003) -> None:
    for start in range(0, len(data), piece):
        await staged.write(data[start : start + piece])


async def test_parts_go_up_before_publish_and_the_key_appears_only_at_publish(store, moto_server):
    data = os.urandom(6 * PART + 777)
    staged = await store.stage(STAGING)
    await write_in_pieces(staged, data)
    await staged._drain()
    assert await store.stat(KEY) is None  # nothing at the digest key while the body is staged
    assert [k async for k in store.list("demo/blobs/")] == []
    uploads, _ = leftovers(moto_server.url, store)
    assert len(uploads) == 1 and len(staged.parts) == 6  # six full parts were sent while "receiving"
    assert await staged.publish(KEY) is True
    assert await read_all(store, KEY) == data
    assert leftovers(moto_server.url, store) == ([], [])  # staging upload and object gone


async def test_a_body_smaller_than_a_part_is_never_staged(store, moto_server):
    staged = await store.stage(STAGING)
    await staged.write(b"small body")
    assert staged.upload_id is None and leftovers(moto_server.url, store) == ([], [])
    assert await staged.publish(KEY) is True
    assert await read_all(store, KEY) == b"small body"


async def test_publish_is_create_only(store, moto_server):
    data = os.urandom(3 * PART)
    for expected in (True, False):
        staged = await store.stage(STAGING)
        await write_in_pieces(staged, data)
        assert await staged.publish(KEY) is expected
    assert await read_all(store, KEY) == data
    assert leftovers(moto_server.url, store) == ([], [])


async def test_abort_leaves_no_digest_key_and_no_staging(store, moto_server):
    staged = await store.stage(STAGING)
    await write_in_pieces(staged, os.urandom(3 * PART + 5))
    await staged.abort()
    assert await store.stat(KEY) is None
    assert leftovers(moto_server.url, store) == ([], [])
    with pytest.raises(BlobStoreError):
        await staged.write(b"more")


async def test_staged_bytes_that_differ_from_what_was_written_are_not_published(store, moto_server):
    """Another client replaces a staged part (same length, other bytes) behind the store's back:
    publish refuses, and nothing appears at the digest key."""
    data = os.urandom(3 * PART)
    staged = await store.stage(STAGING)
    await write_in_pieces(staged, data)
    await staged._drain()
    client = boto3.client("s3", endpoint_url=moto_server.url, region_name="us-east-1", aws_access_key_id="test",
                          aws_secret_access_key="test")
    client.upload_part(Bucket=store.bucket, Key=staged.staging_key, UploadId=staged.upload_id, PartNumber=2, Body=os.urandom(PART))
    with pytest.raises(BlobStoreError):
        await staged.publish(KEY)
    assert await store.stat(KEY) is None
    assert leftovers(moto_server.url, store) == ([], [])


KILLED = """
import asyncio, os, signal, sys
from versionstore.blobstore import open_store

async def main():
    store = open_store(sys.argv[1])
    staged = await store.stage("demo/staging/")
    for _ in range(3):
        await staged.write(os.urandom(256 * 1024))
    await staged._drain()
    print(staged.staging_key, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # killed halfway: before publish, before abort

asyncio.run(main())
"""


async def test_a_staged_put_killed_halfway_leaves_no_digest_key_and_is_collected(store, moto_server, request):
    url = f"s3://{store.bucket}/{store.prefix.rstrip('/')}?endpoint_url={moto_server.url}&region=us-east-1{SMALL_PARTS}"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = await asyncio.to_thread(subprocess.run, [sys.executable, "-c", KILLED, url], capture_output=True, text=True, env=env,
                                   timeout=60)
    assert done.returncode == -9, done.stderr
    staging_key = done.stdout.strip()
    assert staging_key.startswith(store.prefix + STAGING)
    assert await store.stat(KEY) is None and [k async for k in store.list("demo/blobs/")] == []
    assert leftovers(moto_server.url, store) == ([staging_key], [])  # the abandoned upload is still billed...
    assert await store.collect_staging(STAGING, older_than=0) == 1  # ...until collected
    assert leftovers(moto_server.url, store) == ([], [])
