"""GCS-specific behaviour beyond the shared contract, against a real fake-gcs-server.

The session's server (the `gcs_server` fixture) serves every test here but the outage test,
which stops and restarts a server of its own.
"""

import asyncio
import os

import pytest

from tests.servers import FakeGcsServer
from tests.test_blobstore_contract import make_gcs_bucket, new_bucket_url, read_all
from versionstore.blobstore import PermanentStoreError, TransientStoreError, gcs, open_store

SMALL_CHUNKS = "&chunk_size=262144&resumable_threshold=262144"


@pytest.fixture
async def small_chunk_store(request):
    store = open_store(new_bucket_url(request, "gs") + SMALL_CHUNKS)
    yield store
    await store.close()


@pytest.mark.parametrize("size", [6 << 18, (6 << 18) + 1234])  # a whole number of chunks, and a short last chunk
async def test_resumable_upload_and_ranged_reads_across_pieces(small_chunk_store, tmp_path, monkeypatch, size):
    monkeypatch.setattr(gcs, "PIECE", 100_000)  # many pieces per read, boundaries at odd offsets
    source = tmp_path / "big.bin"
    data = os.urandom(size)
    source.write_bytes(data)
    store = small_chunk_store
    assert await store.put_file("c/big", source) is True
    assert await store.put_file("c/big", source) is False
    assert (await store.stat("c/big")).size == size
    assert await read_all(store, "c/big") == data
    for start, end in [(0, 100_000), (99_999, 100_001), (150_000, 1_000_003), (size - 5, None), (size - 5, size + 100), (7, 7)]:
        assert await read_all(store, "c/big", start, end) == data[start:end], (start, end)
    pieces = [len(piece) async for piece in store.read("c/big", 50_000, 350_000)]
    assert pieces == [100_000, 100_000, 100_000]

    reader = store.read("c/big")
    assert await anext(reader) == data[:100_000]
    await reader.aclose()  # abandoned mid-blob: the prefetched piece is dropped, the store still works

    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    assert await store.put_file("c/empty", empty) is True
    assert (await store.stat("c/empty")).size == 0
    assert [piece async for piece in store.read("c/empty")] == []


async def test_racing_resumable_writers_leave_one_whole_blob(small_chunk_store, tmp_path):
    """fake-gcs-server 1.54 ignores ifGenerationMatch on resumable uploads (real GCS does not), so
    several racers may report True here; what is checked is that chunks never mix."""
    sources = [tmp_path / f"src{n}.bin" for n in range(6)]
    for n, path in enumerate(sources):
        path.write_bytes(bytes([n]) * (5 << 18))
    results = await asyncio.gather(*(small_chunk_store.put_file("race", path) for path in sources))
    assert True in results
    assert await read_all(small_chunk_store, "race") in [path.read_bytes() for path in sources]


async def test_missing_bucket_is_a_permanent_error(gcs_server, tmp_path):
    source = tmp_path / "x.bin"
    source.write_bytes(b"x")
    store = open_store(f"gs://no-such-bucket-here/vs?endpoint_url={gcs_server.url}&anonymous=true")
    try:
        with pytest.raises(PermanentStoreError, match="404"):
            await store.put_file("k", source)
        with pytest.raises(PermanentStoreError):
            _ = [key async for key in store.list("")]
        assert await store.stat("k") is None
    finally:
        await store.close()


async def test_stopped_server_is_a_transient_error_and_the_store_recovers(tmp_path):
    server = FakeGcsServer(tmp_path)  # our own: the session's server must keep running
    server.start()
    try:
        make_gcs_bucket(server.url, "outage")
        source = tmp_path / "x.bin"
        source.write_bytes(b"before the outage")
        store = open_store(f"gs://outage/vs?endpoint_url={server.url}&anonymous=true")
        try:
            assert await store.put_file("k", source) is True
            server.stop()
            with pytest.raises(TransientStoreError):
                await store.stat("k")
            with pytest.raises(TransientStoreError):
                await read_all(store, "k")
            with pytest.raises(TransientStoreError):
                await store.put_file("k2", source)
            server.start()  # same port, filesystem backend: the bucket and blob survive
            assert await read_all(store, "k") == b"before the outage"
        finally:
            await store.close()
    finally:
        server.stop()


async def test_storage_emulator_host_needs_no_options(gcs_server, request, tmp_path, monkeypatch):
    url = new_bucket_url(request, "gs")
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_server.url)
    for name in ("GOOGLE_APPLICATION_CREDENTIALS", "GOOGLE_CLOUD_PROJECT"):
        monkeypatch.delenv(name, raising=False)
    store = open_store(url.split("?")[0])
    try:
        source = tmp_path / "x.bin"
        source.write_bytes(b"via the environment")
        assert await store.put_file("k", source) is True
        assert await read_all(store, "k") == b"via the environment"
        assert [key async for key in store.list("")] == ["k"]
    finally:
        await store.close()


@pytest.mark.parametrize(
    ("query", "message"),
    [("endpoint=http://x", "endpoint"), ("chunk_size=1000", "chunk_size"), ("anonymous=yes", "anonymous"), ("workers=many", "many"),
     ("resumable_threshold=33554433", "resumable_threshold")],  # one-request uploads hold their body in memory
)
def test_bad_url_options_are_refused(query, message):
    with pytest.raises(ValueError, match=message):
        open_store(f"gs://bucket/vs?{query}")


async def test_prefixes_isolate_stores_on_one_bucket(request, tmp_path):
    url = new_bucket_url(request, "gs", prefix="one")
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
        assert [k async for k in root.list("")] == ["one/a/k", "one/a/only-one", "two/deeper/a/k"]
        await two.delete("a/k")
        assert await one.stat("a/k") is not None and await two.stat("a/k") is None
    finally:
        for store in stores:
            await store.close()


def test_store_name_and_no_local_path():
    store = open_store("gs://bucket/some/prefix?anonymous=true")
    assert store.name == "gs://bucket/some/prefix"
    assert store.local_path("k") is None
    assert isinstance(store, gcs.GCSBlobStore)
