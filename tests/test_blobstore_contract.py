"""One contract every blob store passes; each backend only says how to build one.

S3 runs against a real moto_server and GCS against a real fake-gcs-server, both started by the
test session (tests/servers.py); each test gets a fresh bucket and a store under a prefix.
The local store runs twice: beside the source files (puts are hard links) and on another
filesystem (puts copy to a temp file, then link it), and the retry wrapper runs around it.
"""

import asyncio
import os
import shutil
import stat
import tempfile
import uuid
from pathlib import Path

import pytest

from versionstore.blobstore import BlobNotFound, BlobStoreError, open_store
from versionstore.blobstore.resilient import ResilientStore

BACKENDS = ["memory", "local", "local-other-fs", "s3", "gcs", "resilient"]
#: Where a store on another filesystem than the test's temp dir can live; tmpfs here.
OTHER_FILESYSTEMS = [os.environ.get("VERSIONSTORE_TEST_OTHER_FS", ""), "/dev/shm", "/run/user", "/var/tmp", "/tmp"]


def other_filesystem_dir(beside: Path) -> Path:
    """A fresh directory on another filesystem than `beside`; fails loudly when there is none,
    because a silently skipped cross-filesystem run hid a race (issue 8.9)."""
    device = os.stat(beside).st_dev
    for candidate in OTHER_FILESYSTEMS:
        if candidate and os.path.isdir(candidate) and os.access(candidate, os.W_OK) and os.stat(candidate).st_dev != device:
            return Path(tempfile.mkdtemp(dir=candidate, prefix="vs-contract-"))
    pytest.fail(f"no writable filesystem other than {beside}'s among {OTHER_FILESYSTEMS}: set VERSIONSTORE_TEST_OTHER_FS")


def new_bucket_url(request: pytest.FixtureRequest, scheme: str, prefix: str = "vs") -> str:
    """A fresh bucket on the session's server; the URL points the store at it explicitly."""
    name = f"b-{uuid.uuid4().hex[:20]}"
    if scheme == "s3":
        server = request.getfixturevalue("moto_server")
        make_s3_bucket(server.url, name)
        return f"s3://{name}/{prefix}?endpoint_url={server.url}&region=us-east-1"
    server = request.getfixturevalue("gcs_server")
    make_gcs_bucket(server.url, name)
    return f"gs://{name}/{prefix}?endpoint_url={server.url}&anonymous=true"


def make_s3_bucket(endpoint: str, name: str, **kwargs) -> None:
    import boto3

    client = boto3.client(
        "s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="test", aws_secret_access_key="test"
    )
    client.create_bucket(Bucket=name, **kwargs)


def make_gcs_bucket(endpoint: str, name: str) -> None:
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    client = storage.Client(project="test", credentials=AnonymousCredentials(), client_options={"api_endpoint": endpoint})
    client.create_bucket(name)


@pytest.fixture(params=BACKENDS)
async def store(request, tmp_path, monkeypatch):
    for name, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test"}.items():
        monkeypatch.setenv(name, value)
    other_fs = None
    if request.param == "memory":
        url = "memory:"
    elif request.param == "local":
        url = str(tmp_path / "store")
    elif request.param in ("local-other-fs", "resilient"):
        other_fs = other_filesystem_dir(tmp_path)
        url = str(other_fs / "store")
    else:
        url = new_bucket_url(request, request.param)
    opened = open_store(url)
    if request.param == "resilient":
        opened = ResilientStore(opened)
    yield opened
    await opened.close()
    if other_fs is not None:
        shutil.rmtree(other_fs, ignore_errors=True)


@pytest.fixture
def source(tmp_path) -> Path:
    path = tmp_path / "source.bin"
    path.write_bytes(os.urandom(3 << 20) + b"tail")
    return path


async def read_all(store, key, start=0, end=None) -> bytes:
    return b"".join([chunk async for chunk in store.read(key, start, end)])


async def test_put_is_create_only_and_already_exists_is_success(store, source, tmp_path):
    assert await store.put_file("c/blobs/aa/bb/x", source) is True
    other = tmp_path / "other.bin"
    other.write_bytes(b"different")
    assert await store.put_file("c/blobs/aa/bb/x", other) is False
    assert await read_all(store, "c/blobs/aa/bb/x") == source.read_bytes()
    assert source.exists()  # the caller owns the source file


async def test_stat_and_ranged_reads(store, source):
    await store.put_file("k", source)
    data = source.read_bytes()
    assert (await store.stat("k")).size == len(data)
    assert await store.stat("missing") is None
    assert await read_all(store, "k", 10, 20) == data[10:20]
    assert await read_all(store, "k", len(data) - 4) == b"tail"


async def test_missing_blob_raises_not_found_and_delete_is_idempotent(store):
    with pytest.raises(BlobNotFound):
        await read_all(store, "nothing")
    await store.delete("nothing")


async def test_list_by_prefix(store, source):
    for key in ("a/blobs/1", "a/blobs/2", "b/blobs/1"):
        await store.put_file(key, source)
    assert [k async for k in store.list("a/")] == ["a/blobs/1", "a/blobs/2"]
    await store.delete("a/blobs/1")
    assert [k async for k in store.list("a/")] == ["a/blobs/2"]


async def test_racing_writers_of_one_key_all_succeed_and_one_wins(store, source):
    """Eight writers of the same file: every one succeeds (already exists is success), one wrote."""
    for _ in range(3):
        key = f"race/{uuid.uuid4().hex}"
        results = await asyncio.gather(*(store.put_file(key, source) for _ in range(8)))
        assert results.count(True) == 1
        assert await read_all(store, key) == source.read_bytes()
        await assert_no_temp_files(store)


async def test_racing_writers_of_different_bytes_leave_one_whole_blob(store, tmp_path):
    """Eight writers with distinct sources (as streamed uploads spooled to separate files would
    be): one wins, the blob is exactly one writer's bytes, no temp file stays behind."""
    sources = [tmp_path / f"src{n}.bin" for n in range(8)]
    for n, path in enumerate(sources):
        path.write_bytes(bytes([n]) * (1 << 20) + os.urandom(1000))
    results = await asyncio.gather(*(store.put_file("race", path) for path in sources))
    assert results.count(True) == 1
    assert await read_all(store, "race") == sources[results.index(True)].read_bytes()
    await assert_no_temp_files(store)


async def test_a_failed_copy_leaves_no_temp_file(store, tmp_path):
    """A source that disappears mid-put: the put fails, and nothing half-written stays."""
    with pytest.raises((OSError, BlobStoreError)):  # GCS classes a local read error as transient
        await store.put_file("gone", tmp_path / "no-such-source.bin")
    assert await store.stat("gone") is None
    await assert_no_temp_files(store)


async def assert_no_temp_files(store) -> None:
    local = store.local_path("probe")
    if local is None:
        return
    root = Path(local).parent
    leftovers = [p.name for p in root.rglob("*") if p.is_file() and p.name.startswith(".")]
    assert leftovers == [], leftovers


async def test_local_blobs_are_read_only_and_keys_cannot_escape(tmp_path, source):
    store = open_store(f"file://{tmp_path / 'store'}")
    await store.put_file("k", source)
    mode = os.stat(store.local_path("k")).st_mode
    assert not mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)
    with pytest.raises(ValueError):
        await store.put_file("../escape", source)


@pytest.fixture
def synced(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The paths the local store fsyncs (by path), in order; the real fsyncs still run."""
    from versionstore.blobstore import local

    paths: list[Path] = []
    real = local.fsync_path

    def recording(path: Path | str) -> None:
        paths.append(Path(path))
        real(path)

    monkeypatch.setattr(local, "fsync_path", recording)
    return paths


@pytest.mark.parametrize("many", [False, True], ids=["put_file", "put_files"])
async def test_local_fan_out_directories_are_made_durable_before_a_link(tmp_path, source, synced, many):
    """A blob under new fan-out directories (`aa/bb/`): every new directory's entry is fsynced in
    its parent, not only the link's own directory (which would not survive a crash if the
    directory holding it did not). The real fsyncs run; the paths they were given are recorded."""
    root = tmp_path / "store"
    store = open_store(f"file://{root}")
    if many:
        await store.put_files([("x/aa/bb/k", source)])
    else:
        await store.put_file("x/aa/bb/k", source)
    for new in (root / "x", root / "x" / "aa", root / "x" / "aa" / "bb"):
        assert new.parent in synced, f"{new}'s entry was never made durable"
    assert (root / "x" / "aa" / "bb") in synced  # the link's own directory, as before
    synced.clear()
    await store.put_file("x/aa/bb/k2", source)  # existing directories: only the link's directory
    assert synced == [root / "x" / "aa" / "bb"]


def test_local_publish_syncs_the_source_and_every_new_directory_before_any_link(tmp_path, source, monkeypatch):
    """`publish` (an upload's fsync and links into two local stores in one worker call) keeps
    `put_file`'s rules in its own order: the source fsynced before any link, each new fan-out
    directory's entry fsynced in its parent before anything is linked into it, each link's
    directory fsynced after the link; the files linked read-only."""
    from versionstore.blobstore import local

    events: list[tuple[str, Path]] = []
    real_link = os.link

    def link(src, dst, *args, **kwargs):
        real_link(src, dst, *args, **kwargs)
        events.append(("link", Path(dst)))

    monkeypatch.setattr(os, "link", link)
    monkeypatch.setattr(local, "fsync_path", lambda path, real=local.fsync_path: (events.append(("fsync", Path(path))), real(path))[1])
    first, second = open_store(str(tmp_path / "one")), open_store(str(tmp_path / "two"))
    assert local.publish(source, True, [(first, "c/aa/bb/k"), (second, "c/aa/bb/k")]) == [True, True]
    fsyncs = [path for kind, path in events if kind == "fsync"]
    links = [(i, path) for i, (kind, path) in enumerate(events) if kind == "link"]
    assert fsyncs[0] == source and events.index(("fsync", source)) < links[0][0]
    for index, target in links:
        for new in (target.parent, target.parent.parent, target.parent.parent.parent):  # bb/, aa/, c/: all new
            assert ("fsync", new.parent) in events[:index], f"{new}'s entry was not durable before the link"
        assert ("fsync", target.parent) in events[index:]
        assert not os.stat(target).st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)
    assert local.publish(source, False, [(first, "c/aa/bb/k")]) == [False]  # already there: its directory fsynced again
    assert events[-1] == ("fsync", links[0][1].parent)


def test_unknown_store_urls_are_refused():
    with pytest.raises(ValueError):
        open_store("ftp://nowhere")


async def test_local_store_on_another_filesystem_copies_then_links(tmp_path, source):
    """The spool and the store on different filesystems: link(2) fails with EXDEV, so the
    store copies to a temp file, fsyncs it and links that (still create-only)."""
    root = other_filesystem_dir(tmp_path)
    try:
        store = open_store(str(root))
        assert await store.put_file("k", source) is True
        assert await store.put_file("k", source) is False
        assert await read_all(store, "k") == source.read_bytes()
        assert [p.name for p in root.iterdir()] == ["k"]  # no temp file left behind
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("many", [False, True], ids=["put_file", "put_files"])
async def test_local_blob_found_already_there_is_made_durable_before_put_returns(tmp_path, source, synced, many):
    """A blob another writer linked a moment ago (in another process: here a second store over
    the same root) may not be durable yet: that writer's directory fsync runs after its link.
    A put that finds it there must fsync its directory (and the directories above, once per
    process) itself before the caller commits a version that names it."""
    root = tmp_path / "store"
    other = open_store(f"file://{root}")
    await other.put_file("x/aa/bb/k", source)  # stands for a link whose fsyncs have not run yet
    synced.clear()
    store = open_store(f"file://{root}")  # this process: has made none of these durable itself
    if many:
        assert await store.put_files([("x/aa/bb/k", source)]) == [False]
    else:
        assert await store.put_file("x/aa/bb/k", source) is False
    for directory in (root, root / "x", root / "x" / "aa", root / "x" / "aa" / "bb"):
        assert directory in synced, f"{directory} was not fsynced"
    synced.clear()
    assert await store.put_file("x/aa/bb/k", source) is False  # directories known durable: only the link's
    assert synced == [root / "x" / "aa" / "bb"]
