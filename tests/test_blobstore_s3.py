"""S3-specific behaviour beyond the shared contract, against a real moto_server.

The session's server (the `moto_server` fixture) serves every test here but two: the outage test
stops and restarts a server of its own, and the racing-writers test needs one that serves a
request at a time (see SerialMotoServer). moto's minimum part size is lowered to 256 KiB
(tests/servers.py), so multipart uploads stay small and fast.
"""

import asyncio
import os
import re
import sys
import uuid
from datetime import UTC, datetime, timedelta

import boto3
import pytest
from botocore.exceptions import ClientError

from tests.servers import MotoServer
from tests.test_blobstore_contract import make_s3_bucket, new_bucket_url, read_all
from versionstore.blobstore import PermanentStoreError, TransientStoreError, open_store, parse_store_url, s3

PART = 256 * 1024
SMALL_PARTS = f"&part_size={PART}&multipart_threshold={PART}"


@pytest.fixture(autouse=True)
def aws_env(monkeypatch, tmp_path):
    """Test credentials, and no config or credentials file of the machine running the tests."""
    for name, value in {
        "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"), "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials"),
    }.items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION"):
        monkeypatch.delenv(name, raising=False)


def boto(endpoint: str):
    """A plain boto3 client beside the store, to look at what it left in the bucket."""
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="test", aws_secret_access_key="test")


@pytest.fixture
async def small_part_store(request):
    store = open_store(new_bucket_url(request, "s3") + SMALL_PARTS)
    yield store
    await store.close()


@pytest.mark.parametrize("size", [6 * PART, 6 * PART + 1234])  # a whole number of parts, and a short last part
async def test_multipart_upload_and_ranged_reads_across_parts(small_part_store, moto_server, tmp_path, size):
    store = small_part_store
    source = tmp_path / "big.bin"
    data = os.urandom(size)
    source.write_bytes(data)
    assert (store.part_size, store.multipart_threshold) == (PART, PART)
    assert await store.put_file("c/big", source) is True
    assert await store.put_file("c/big", source) is False
    assert (await store.stat("c/big")).size == size
    assert await read_all(store, "c/big") == data

    head = boto(moto_server.url).head_object(Bucket=store.bucket, Key=store.prefix + "c/big")
    assert head["ETag"].strip('"').endswith(f"-{-(-size // PART)}")  # really a multipart upload, with that many parts
    for start, end in [(0, PART), (PART - 1, PART + 1), (PART - 10, 3 * PART + 10), (5 * PART + 3, None), (size - 5, size + 100), (7, 7)]:
        assert await read_all(store, "c/big", start, end) == data[start:end], (start, end)


def test_part_size_grows_to_stay_within_ten_thousand_parts():
    store = s3.S3BlobStore.from_url(parse_store_url(f"s3://bucket/vs?part_size={PART}"))
    size = 20 << 30
    part = store.part_size_for(size)
    assert part > PART and -(-size // part) <= s3.MAX_PARTS
    assert store.part_size_for(10 << 20) == PART  # small files keep the configured size
    assert s3.S3BlobStore("bucket").part_size_for(size) == 16 << 20  # the default already fits 20 GiB (1,280 parts)
    assert store.part_size_for(PART * s3.MAX_PARTS) == PART
    assert store.part_size_for(PART * s3.MAX_PARTS + 1) == PART + 1


class SerialMotoServer(MotoServer):
    """moto serving one request at a time. moto_server is always threaded, and its conditional
    CompleteMultipartUpload is a check-then-act without a lock: simultaneous completes of one key
    can all get 200 (seen with plain boto3 too), where S3 lets exactly one win. One request at a
    time makes each conditional complete atomic, as S3's is."""

    name = "moto-serial"

    def command(self) -> list[str]:
        script = (
            "import sys; from werkzeug.serving import run_simple; "
            "from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app; "
            "run_simple('127.0.0.1', int(sys.argv[1]), DomainDispatcherApplication(create_backend_app), "
            "threaded=False, request_handler=MotoRequestHandler)"
        )
        return [sys.executable, "-c", script, str(self.port)]

    def statuses(self, method: str) -> list[int]:
        """The status of every `method /...?uploadId=` request in the request log (werkzeug's
        lines, colour codes and all): POST is CompleteMultipartUpload, DELETE is Abort."""
        pattern = re.compile(rf'{method} /\S+\?uploadId=\S+ HTTP/[\d.]+(?:\x1b\[0m)?" (\d{{3}})')
        return [int(match[1]) for match in pattern.finditer(self.log_path.read_text(errors="replace"))]


async def test_six_racing_multipart_writers_on_separate_stores_one_wins(tmp_path):
    """Separate store objects: the in-process writer lock cannot serialise them, the conditional
    CompleteMultipartUpload decides; the losers abort their uploads."""
    server = SerialMotoServer(tmp_path)
    server.start()
    stores = []
    try:
        make_s3_bucket(server.url, "race")
        stores = [open_store(f"s3://race/vs?endpoint_url={server.url}&region=us-east-1" + SMALL_PARTS) for _ in range(6)]
        for store in stores:
            assert await store.stat("race") is None  # clients made before the race, so all start together
        sources = [tmp_path / f"src{n}.bin" for n in range(6)]
        for n, path in enumerate(sources):
            path.write_bytes(bytes([n]) * (4 * PART + 1000))  # distinct bytes show which writer won
        results = await asyncio.gather(*(store.put_file("race", path) for store, path in zip(stores, sources, strict=True)))
        assert results.count(True) == 1
        assert await read_all(stores[0], "race") == sources[results.index(True)].read_bytes()
        assert boto(server.url).list_multipart_uploads(Bucket="race").get("Uploads", []) == []
        completes, aborts = server.statuses("POST"), server.statuses("DELETE")
        assert sorted(completes) == [200] + [412] * 5, completes  # every loser lost at the conditional complete
        assert aborts == [204] * completes.count(412)
    finally:
        for store in stores:
            await store.close()
        server.stop()


async def test_conditional_complete_refuses_an_existing_key_and_aborts(small_part_store, moto_server, tmp_path):
    """The loser's side of the race made deterministic: the key appears between the store's HEAD
    and its CompleteMultipartUpload, so only the conditional write stands in the way."""
    store = small_part_store
    s3_client = boto(moto_server.url)
    s3_client.put_object(Bucket=store.bucket, Key=store.prefix + "k", Body=b"the first writer")
    source = tmp_path / "big.bin"
    source.write_bytes(os.urandom(3 * PART))
    client = await store._client()
    with pytest.raises(ClientError) as raised:
        await store._put_multipart(client, store.prefix + "k", source, 3 * PART)
    assert raised.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412
    assert s3_client.list_multipart_uploads(Bucket=store.bucket).get("Uploads", []) == []
    assert await read_all(store, "k") == b"the first writer"


@pytest.fixture
async def locked(request, moto_server):
    """A store in Object Lock mode on a bucket created with Object Lock enabled."""
    name = f"b-{uuid.uuid4().hex[:20]}"
    make_s3_bucket(moto_server.url, name, ObjectLockEnabledForBucket=True)
    store = open_store(f"s3://{name}/vs?endpoint_url={moto_server.url}&region=us-east-1&object_lock_days=1" + SMALL_PARTS)
    yield store
    await store.close()


def versions_of(client, bucket: str, key: str) -> list[str]:
    listing = client.list_object_versions(Bucket=bucket, Prefix=key)
    entries = listing.get("Versions", []) + listing.get("DeleteMarkers", [])
    return [entry["VersionId"] for entry in entries if entry["Key"] == key]


async def test_object_lock_retains_in_governance_mode_and_delete_bypasses_it(locked, moto_server, tmp_path):
    store, client = locked, boto(moto_server.url)
    source = tmp_path / "x.bin"
    source.write_bytes(b"locked bytes")
    assert store.object_lock_days == 1
    before = datetime.now(UTC)
    assert await store.put_file("k", source) is True
    assert await store.put_file("k2", source) is True  # shares the prefix "k": must survive the delete of "k"
    assert await read_all(store, "k") == b"locked bytes"

    head = client.head_object(Bucket=store.bucket, Key="vs/k")  # moto has no GetObjectRetention: HeadObject carries it
    assert head["ObjectLockMode"] == "GOVERNANCE"
    until = head["ObjectLockRetainUntilDate"]
    assert before + timedelta(days=1) - timedelta(minutes=1) <= until <= datetime.now(UTC) + timedelta(days=1, minutes=1)
    with pytest.raises(ClientError) as refused:  # without the bypass, governance holds
        client.delete_object(Bucket=store.bucket, Key="vs/k", VersionId=head["VersionId"])
    assert refused.value.response["Error"]["Code"] == "AccessDenied"
    assert await store.stat("k") is not None

    client.delete_object(Bucket=store.bucket, Key="vs/k")  # no VersionId: only a delete marker on top
    assert await store.stat("k") is None
    assert len(versions_of(client, store.bucket, "vs/k")) == 2

    await store.delete("k")  # every version and marker, bypassing governance
    assert versions_of(client, store.bucket, "vs/k") == []
    assert await store.stat("k2") is not None and len(versions_of(client, store.bucket, "vs/k2")) == 1
    await store.delete("k")  # nothing left: still no error
    assert [key async for key in store.list("")] == ["k2"]


async def test_object_lock_multipart_upload(locked, moto_server, tmp_path):
    """moto 5.2 drops the lock headers of CreateMultipartUpload (its CompleteMultipartUpload stores
    the object without retention; real S3 keeps them), so what the store sends is checked on the
    wire, through botocore's own before-send event."""
    store, client = locked, boto(moto_server.url)
    source = tmp_path / "big.bin"
    data = os.urandom(3 * PART + 7)
    source.write_bytes(data)
    sent: dict[str, dict[str, str]] = {}

    def record(request, **_kwargs):
        operation = _kwargs["event_name"].rsplit(".", 1)[-1]
        sent.setdefault(operation, {k.lower(): v.decode() if isinstance(v, bytes) else v for k, v in request.headers.items()})

    (await store._client()).meta.events.register("before-send.s3", record)
    before = datetime.now(UTC)
    assert await store.put_file("big", source) is True
    assert await read_all(store, "big") == data
    assert {"CreateMultipartUpload", "UploadPart", "CompleteMultipartUpload"} <= set(sent)
    assert "PutObject" not in sent
    create = sent["CreateMultipartUpload"]
    assert create["x-amz-object-lock-mode"] == "GOVERNANCE"
    until = datetime.fromisoformat(create["x-amz-object-lock-retain-until-date"].replace("Z", "+00:00"))
    assert abs(until - (before + timedelta(days=1))) < timedelta(minutes=1)
    assert "x-amz-checksum-crc32" in sent["UploadPart"]  # Object Lock refuses uploads without a checksum
    assert sent["CompleteMultipartUpload"]["if-none-match"] == "*"

    assert len(versions_of(client, store.bucket, "vs/big")) == 1
    await store.delete("big")
    assert versions_of(client, store.bucket, "vs/big") == []
    assert client.list_multipart_uploads(Bucket=store.bucket).get("Uploads", []) == []


async def test_missing_bucket_is_a_permanent_error(moto_server, tmp_path):
    source = tmp_path / "x.bin"
    source.write_bytes(b"x")
    store = open_store(f"s3://no-such-bucket-here/vs?endpoint_url={moto_server.url}&region=us-east-1")
    try:
        with pytest.raises(PermanentStoreError, match="NoSuchBucket"):
            await store.put_file("k", source)
        with pytest.raises(PermanentStoreError, match="NoSuchBucket"):
            _ = [key async for key in store.list("")]
        with pytest.raises(PermanentStoreError, match="NoSuchBucket"):
            await read_all(store, "k")
        with pytest.raises(PermanentStoreError, match="NoSuchBucket"):
            await store.delete("k")
        # A HEAD's 404 has no body to tell a missing bucket from a missing key, so stat says "absent"
        # (as the GCS store does); the put above is what surfaces the missing bucket.
        assert await store.stat("k") is None
    finally:
        await store.close()


async def test_stopped_server_is_a_transient_error_and_the_store_recovers(tmp_path):
    server = MotoServer(tmp_path)  # our own: the session's server must keep running
    server.start()
    try:
        make_s3_bucket(server.url, "outage")
        source = tmp_path / "x.bin"
        source.write_bytes(b"before the outage")
        store = open_store(f"s3://outage/vs?endpoint_url={server.url}&region=us-east-1")
        try:
            assert await store.put_file("k", source) is True
            server.stop()
            with pytest.raises(TransientStoreError):
                await store.stat("k")
            with pytest.raises(TransientStoreError):
                await read_all(store, "k")
            with pytest.raises(TransientStoreError):
                await store.put_file("k2", source)
            with pytest.raises(TransientStoreError):
                _ = [key async for key in store.list("")]
            server.start()  # same port, but moto keeps state in memory: the bucket is gone
            make_s3_bucket(server.url, "outage")
            assert await store.stat("k") is None
            assert await store.put_file("k", source) is True
            assert await read_all(store, "k") == b"before the outage"
            assert [key async for key in store.list("")] == ["k"]
        finally:
            await store.close()
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("endpoint=http://x", "endpoint"),
        ("part_size=big", "part_size"),
        ("multipart_threshold=1.5", "multipart_threshold"),
        ("part_concurrency=0", "part_concurrency"),
        ("object_lock_days=0", "object_lock_days"),
        ("object_lock_days=one", "object_lock_days"),
        ("addressing_style=sideways", "addressing_style"),
    ],
)
def test_bad_url_options_are_refused(query, message):
    with pytest.raises(ValueError, match=message):
        open_store(f"s3://bucket/vs?{query}")


async def test_prefixes_isolate_stores_on_one_bucket(request, tmp_path):
    url = new_bucket_url(request, "s3", prefix="one")
    stores = [open_store(url), open_store(url.replace("/one?", "/two/deeper?")), open_store(url.replace("/one?", "?"))]
    one, two, root = stores
    assert (one.name, two.name) == (url.split("?")[0], url.split("?")[0].replace("/one", "/two/deeper"))
    try:
        source = tmp_path / "x.bin"
        source.write_bytes(b"x")
        for store in (one, two):
            assert await store.put_file("a/k", source) is True
        assert await one.put_file("a/only-one", source) is True
        assert [k async for k in one.list("")] == ["a/k", "a/only-one"]
        assert [k async for k in two.list("a/")] == ["a/k"]
        assert [k async for k in two.list("")] == ["a/k"]
        assert [k async for k in root.list("")] == ["one/a/k", "one/a/only-one", "two/deeper/a/k"]
        await two.delete("a/k")
        assert await one.stat("a/k") is not None and await two.stat("a/k") is None
    finally:
        for store in stores:
            await store.close()


async def test_empty_blob_and_empty_ranges_read_nothing(request, tmp_path):
    store = open_store(new_bucket_url(request, "s3"))
    try:
        empty = tmp_path / "empty.bin"
        empty.write_bytes(b"")
        assert await store.put_file("c/empty", empty) is True
        assert (await store.stat("c/empty")).size == 0
        assert [chunk async for chunk in store.read("c/empty")] == []
        for start, end in [(0, 10), (0, None), (5, None), (3, 3)]:
            assert [chunk async for chunk in store.read("c/empty", start, end)] == [], (start, end)

        small = tmp_path / "small.bin"
        small.write_bytes(b"0123456789")
        await store.put_file("c/small", small)
        for start, end in [(4, 4), (10, None), (10, 20), (50, None), (6, 2)]:
            assert [chunk async for chunk in store.read("c/small", start, end)] == [], (start, end)
        assert await read_all(store, "c/small", 8, 100) == b"89"
    finally:
        await store.close()


async def test_readers_that_stop_early_leave_the_store_usable(request, tmp_path):
    store = open_store(new_bucket_url(request, "s3"))
    try:
        source = tmp_path / "big.bin"
        data = os.urandom(4 * s3.CHUNK + 99)
        source.write_bytes(data)
        assert await store.put_file("big", source) is True
        async with asyncio.timeout(10):  # a connection left half-read in the pool would hang here
            for _ in range(40):  # more than the connection pool holds (32)
                async for chunk in store.read("big"):
                    assert chunk == data[: len(chunk)] and chunk
                    break
            reader = store.read("big", 5)
            first = await anext(reader)
            assert first and first == data[5 : 5 + len(first)]
            await reader.aclose()
            assert (await store.stat("big")).size == len(data)
            assert await read_all(store, "big") == data
            assert await store.put_file("big2", source) is True
            assert [key async for key in store.list("")] == ["big", "big2"]
    finally:
        await store.close()


async def test_credentials_and_endpoint_from_the_environment(moto_server, request, tmp_path, monkeypatch):
    url = new_bucket_url(request, "s3")
    for name, value in moto_server.client_env().items():
        monkeypatch.setenv(name, value)
    store = open_store(url.split("?")[0])
    assert (store.endpoint_url, store.region, store.addressing_style) == (None, None, None)  # all left to botocore
    try:
        source = tmp_path / "x.bin"
        source.write_bytes(b"via the environment")
        assert await store.put_file("k", source) is True
        assert (await store.stat("k")).size == len(b"via the environment")
        assert await read_all(store, "k") == b"via the environment"
        assert [key async for key in store.list("")] == ["k"]
        await store.delete("k")
        assert await store.stat("k") is None
    finally:
        await store.close()


def test_store_name_and_no_local_path():
    store = open_store("s3://bucket/some/prefix?region=eu-west-1")
    assert store.name == "s3://bucket/some/prefix"
    assert store.local_path("k") is None
    assert isinstance(store, s3.S3BlobStore)
    assert open_store("s3://bucket?endpoint_url=http://x").addressing_style == "path"  # custom endpoints: path style
