"""Archives over HTTP on both metadata backends: export a snapshot or a point in time as a tar,
download it through the signed link (with Range), import it into another environment
byte-identical; a tampered, truncated, padded or inconsistent archive is refused whole."""

import asyncio
import base64
import hashlib
import io
import json
import tarfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import blake3
import pytest
from aiohttp import web

from tests.conftest import BASIC_HEADERS, CLOUD, sign
from versionstore.archive_format import MANIFEST, is_safe, member_name
from versionstore.config import Config
from versionstore.http.keys import META

OTHER, OTHER_KEY, OTHER_SECRET = "other", "otherkey", "othersecret"
OTHER_HEADERS = {"Authorization": "Basic " + base64.b64encode(f"{OTHER_KEY}:{OTHER_SECRET}".encode()).decode()}
#: Public IDs the API accepts that a careless tar writer would mangle: long, non-ASCII, `%`.
AWKWARD = ["deep/" * 30 + "x", "x" * 200, "ünï/cödé %41", "100%/sure", "with space/a.b.c"]
#: What the API refuses, but a name built from stored data must survive anyway.
HOSTILE = ["../../etc/passwd", "/abs/olute", "a//b/./c", "dir\\back", "ctl\x01\x7f"]


@pytest.fixture
def config(tmp_path: Path, metadata_url: str | None) -> Config:
    # the notification receiver below listens on loopback, which the egress policy denies by default
    return Config(data_dir=tmp_path / "data", max_upload_bytes=64 << 20, poll_interval=0.05, fetch_allow=("127.0.0.1",),
                  metadata_url=metadata_url)


async def wait_for(api: Any, path: str, headers: dict[str, str] | None = None) -> dict[str, Any]:
    """Poll a job of the demo environment, or of `other` with its `headers`."""
    cloud = OTHER if headers is OTHER_HEADERS else CLOUD
    for _ in range(600):
        response = await api.client.get(f"/v1_1/{cloud}/{path}", headers=headers or BASIC_HEADERS)
        job = await response.json()
        assert response.status == 200, job
        if job["status"] not in ("pending", "active"):
            return job
        await asyncio.sleep(0.05)
    raise AssertionError("job did not finish")


async def library(api: Any) -> dict[str, dict[str, Any]]:
    made = {"plain": await api.upload(b"plain bytes" * 1000, public_id="lib/plain", tags="t1,t2", context="k=v")}
    for number, public_id in enumerate(AWKWARD):
        made[public_id] = await api.upload(f"hostile {number}".encode() * 50, public_id=public_id)
    made["raw"] = await api.upload(b"raw text", rt="raw", public_id="lib/notes.txt")
    return made


async def export(api: Any, **selection: Any) -> tuple[dict[str, Any], bytes]:
    job = await api.admin("POST", "versionstore/archives", json=selection)
    done = await wait_for(api, f"versionstore/archives/{job['archive_id']}")
    assert done["status"] == "completed", done
    response = await api.client.get(urlsplit(done["download_url"]).path + "?" + urlsplit(done["download_url"]).query)
    assert response.status == 200
    body = await response.read()
    assert len(body) == done["size"] and blake3.blake3(body).hexdigest() == done["digest"]
    return done, body


async def other_env(client: Any) -> None:
    await client.app[META].create_cloud(OTHER, OTHER_KEY, OTHER_SECRET, auto_backup=True)


async def exported_for_other(api: Any, client: Any, tmp_path: Path, prefix: str, count: int, repeat: int) -> tuple[Path, Any]:
    """`count` uploads under `prefix/`, the library's archive written to a file, and the other
    environment (made here) to import it into: (the archive's path, that environment)."""
    for number in range(count):
        await api.upload(f"{prefix} {number} ".encode() * repeat, public_id=f"{prefix}/{number}")
    _, body = await export(api, at=time.time())
    path = tmp_path / "archive.tar"
    path.write_bytes(body)
    await other_env(client)
    other = await client.app[META].get_cloud(OTHER)
    assert other is not None
    return path, other


async def post_import(api: Any, body: bytes, expect: int = 200) -> dict[str, Any]:
    response = await api.client.post(f"/v1_1/{OTHER}/versionstore/archives/import", data=body, headers=OTHER_HEADERS)
    answer = await response.json()
    assert response.status == expect, answer
    return answer


def members(body: bytes) -> list[tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(body)) as tar:
        return tar.getmembers()


def rebuild(body: bytes, change: Any) -> bytes:
    """The archive re-tarred after `change(name, data) -> [(name, data), ...]` per member."""
    out = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(body)) as source, tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info in source.getmembers():
            data = source.extractfile(info).read()  # type: ignore[union-attr]
            for name, new in change(info.name, data):
                item = tarfile.TarInfo(name)
                item.size = len(new)
                tar.addfile(item, io.BytesIO(new))
    return out.getvalue()


async def test_round_trip_from_a_snapshot_into_another_environment_is_byte_identical(api, client):
    made = await library(api)
    snapshot = await api.admin("POST", "versionstore/snapshots", json={"note": "to archive"})
    done, body = await export(api, snapshot_id=snapshot["id"])
    assert done["kind"] == "archive_export" and done["progress"]["count"] == len(made)

    names = [m.name for m in members(body)]
    assert names[0] == MANIFEST and len(names) == len(made) + 1
    assert all(is_safe(n) and not n.startswith("/") and ".." not in n.split("/") for n in names)
    lines = [json.loads(line) for line in (tarfile.open(fileobj=io.BytesIO(body)).extractfile(MANIFEST).read().splitlines())]  # type: ignore[union-attr]
    header, entries = lines[0], lines[1:]
    assert header["format"] == "versionstore-archive/1" and header["cloud"] == CLOUD and header["snapshot_id"] == snapshot["id"]
    plain = next(e for e in entries if e["public_id"] == "lib/plain")
    assert plain["tags"] == ["t1", "t2"] and plain["context"] == {"k": "v"} and plain["md5"] == made["plain"]["etag"]
    assert {e["public_id"] for e in entries} == {"lib/plain", "lib/notes.txt", *AWKWARD}

    await other_env(client)
    job = await post_import(api, body)
    assert job["kind"] == "archive_import"
    finished = await wait_for(api, f"versionstore/archives/{job['archive_id']}", OTHER_HEADERS)
    assert finished["status"] == "completed" and finished["progress"] == {"imported": len(made), "unchanged": 0}, finished
    meta = client.app[META]
    for entry in entries:
        asset = await meta.get_asset(OTHER, entry["resource_type"], entry["type"], entry["public_id"])
        assert asset is not None and asset.digest == entry["blake3"] and asset.bytes == entry["bytes"], entry["public_id"]
        found = await meta.version_of(OTHER, asset.asset_id, asset.version_id)
        assert found is not None and found[1].restored_from == f"archive:{CLOUD}/{entry['asset_id']}/{entry['version_id']}"
        assert found[1].backed_up
    imported = await meta.get_asset(OTHER, "image", "upload", "lib/plain")
    assert imported is not None and imported.tags == ["t1", "t2"] and imported.context == {"k": "v"}

    # Importing the same archive again adds nothing: every entry is already the current bytes.
    again = await wait_for(api, f"versionstore/archives/{(await post_import(api, body))['archive_id']}", OTHER_HEADERS)
    assert again["progress"] == {"imported": 0, "unchanged": len(made)}

    # Exporting the imported environment gives back the same originals, byte for byte.
    second = await api.client.post(f"/v1_1/{OTHER}/versionstore/archives", json={"at": time.time()}, headers=OTHER_HEADERS)
    job2 = await second.json()
    done2 = await wait_for(api, f"versionstore/archives/{job2['archive_id']}", OTHER_HEADERS)
    response = await api.client.get(urlsplit(done2["download_url"]).path + "?" + urlsplit(done2["download_url"]).query)
    with tarfile.open(fileobj=io.BytesIO(body)) as a, tarfile.open(fileobj=io.BytesIO(await response.read())) as b:
        first = {m.name: a.extractfile(m).read() for m in a.getmembers()[1:]}  # type: ignore[union-attr]
        copied = {m.name: b.extractfile(m).read() for m in b.getmembers()[1:]}  # type: ignore[union-attr]
    assert first == copied


async def test_point_in_time_export_under_a_prefix_and_the_signed_link(api, client):
    await api.upload(b"old a", public_id="lib/a")
    await api.upload(b"outside", public_id="elsewhere/x")
    at = time.time()
    await api.upload(b"new a", public_id="lib/a")
    await api.upload(b"later", public_id="lib/later")
    done, body = await export(api, at=at, prefix="lib/")
    with tarfile.open(fileobj=io.BytesIO(body)) as tar:
        assert [m.name for m in tar.getmembers()] == [MANIFEST, "image/upload/lib/a.bin"]
        assert tar.extractfile("image/upload/lib/a.bin").read() == b"old a"  # type: ignore[union-attr]

    url = urlsplit(done["download_url"])
    query = dict(parse_qsl(url.query))
    ranged = await api.client.get(f"{url.path}?{url.query}", headers={"Range": "bytes=0-511"})
    assert ranged.status == 206 and await ranged.read() == body[:512]
    assert ranged.headers["Content-Range"] == f"bytes 0-511/{len(body)}"
    # The link opens this archive only: another id under its signature, or its signature on
    # download_backup, or a download_backup signature on it, are all refused.
    forged = await api.client.get(url.path, params={**query, "archive_id": "0" * 32})
    assert forged.status == 401
    lifted = await api.client.get(f"/v1_1/{CLOUD}/download_backup", params={**query, "asset_id": "0" * 32, "version_id": "0" * 32})
    assert lifted.status == 400 and "archive_id" in (await lifted.json())["error"]["message"]
    backup_link = sign({"asset_id": "0" * 32, "version_id": "0" * 32})
    other = await api.client.get(url.path, params={**backup_link, "archive_id": query["archive_id"]})
    assert other.status == 400
    unsigned = await api.client.get(url.path, params={"archive_id": query["archive_id"]})
    assert unsigned.status == 401
    foreign = await api.client.get(url.path, params={**query, "api_key": "Ú\u00b9"})  # non-ASCII: was a 500
    assert foreign.status == 401
    # And a signed archive link is no upload signature either.
    upload = await api.client.post(f"/v1_1/{CLOUD}/image/upload", data={**query, "file": "data:,x"})
    assert upload.status == 400


@pytest.mark.parametrize("damage", ["byte", "truncated", "extra", "missing", "manifest", "hostile_id", "not_a_tar", "empty"])
async def test_a_damaged_archive_is_refused_and_nothing_is_imported(api, client, damage):
    await library(api)
    _, body = await export(api, at=time.time())
    names = [m.name for m in members(body)]
    victim = names[2]
    if damage == "byte":
        start = body.index(b"hostile 0")
        damaged = body[:start] + b"H" + body[start + 1:]
    elif damage == "truncated":
        damaged = body[: len(body) // 2]
    elif damage == "extra":
        damaged = rebuild(body, lambda n, d: [(n, d), *([("image/upload/smuggled", b"evil")] if n == victim else [])])
    elif damage == "missing":
        damaged = rebuild(body, lambda n, d: [] if n == victim else [(n, d)])
    elif damage in ("manifest", "hostile_id"):
        def lie(name: str, data: bytes) -> list[tuple[str, bytes]]:
            if name != MANIFEST:
                return [(name, data)]
            lines = data.decode().splitlines()
            entry = json.loads(lines[1])
            entry.update({"blake3": "0" * 64} if damage == "manifest" else {"public_id": "../../escape"})
            return [(name, "\n".join([lines[0], json.dumps(entry), *lines[2:]]).encode() + b"\n")]
        damaged = rebuild(body, lie)
    elif damage == "not_a_tar":
        damaged = b"this is not a tar" * 100
    else:
        damaged = b""
    await other_env(client)
    refused = await post_import(api, damaged, expect=400)
    assert refused["error"]["message"].startswith("Archive refused:"), refused
    meta = client.app[META]
    assert await meta.open_jobs(OTHER) == [] and await meta.list_jobs(OTHER, "archive_import", 10) == []
    assert await meta.get_asset(OTHER, "image", "upload", "lib/plain") is None
    records = await api.client.get(f"/v1_1/{OTHER}/versionstore/audit", headers=OTHER_HEADERS, params={"action": "archive_import_start"})
    assert [r["outcome"] for r in (await records.json())["records"]] == ["refused"]


async def test_a_finished_export_is_announced_with_its_download_link(api, aiohttp_server):
    received: list[dict[str, Any]] = []

    async def receiver(request: web.Request) -> web.Response:
        received.append(json.loads(await request.text()))
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/hook", receiver)
    server = await aiohttp_server(app)
    await api.upload(b"announce me", public_id="hook/a")
    job = await api.admin("POST", "versionstore/archives", json={"at": time.time(), "notification_url": str(server.make_url("/hook"))})
    for _ in range(400):
        if received:
            break
        await asyncio.sleep(0.05)
    assert len(received) == 1 and received[0]["archive_id"] == job["archive_id"] and received[0]["status"] == "completed"
    response = await api.client.get(received[0]["download_url"])
    assert response.status == 200 and blake3.blake3(await response.read()).hexdigest() == received[0]["digest"]


async def test_export_selection_errors_and_unknown_archives(api):
    await api.admin("POST", "versionstore/archives", expect=400, json={})
    await api.admin("POST", "versionstore/archives", expect=404, json={"snapshot_id": "f" * 32})
    await api.admin("POST", "versionstore/archives", expect=400, json={"at": time.time(), "notification_url": "ftp://x"})
    await api.admin("GET", f"versionstore/archives/{'a' * 32}", expect=404)


def test_member_names_stay_inside_the_archive_and_are_distinct():
    names = {member_name("image", "upload", p, "png") for p in [*AWKWARD, *HOSTILE, ".", "..", "", "%2E%2E", "a/%00"]}
    assert len(names) == len(AWKWARD) + len(HOSTILE) + 5
    for name in names:
        assert is_safe(name) and name.startswith("image/upload/"), name
    assert member_name("raw", "upload", "notes.txt", "txt") == "raw/upload/notes.txt"


async def test_an_import_failing_mid_batch_leaves_no_version_no_blob_and_no_staged_file(api, client, tmp_path):
    """The batched import: entries are staged, then written and committed together. A failure
    while a batch is staged (here: reading the archive fails after its third entry) leaves
    nothing of that batch: no version, no blob in either store, no spool file; the import
    can then be run again and completes."""
    from versionstore import archives
    from versionstore.http.keys import SERVICE

    path, other = await exported_for_other(api, client, tmp_path, "batch", 6, 20000)
    service, meta = client.app[SERVICE], client.app[META]
    spool_before = set(service.spool_dir.iterdir())
    read = 0

    def failing(size: int) -> None:
        nonlocal read
        read += size
        if read > 2 * 20000 * len(b"batch 0 "):
            raise OSError("the disk holding the archive failed")

    manifest = await archives.verify_file(path)
    with pytest.raises(OSError):
        await archives.apply_archive(service, other, path, progress=failing, verified=manifest)
    for number in range(6):
        assert await meta.get_asset(OTHER, "image", "upload", f"batch/{number}") is None
    for store in ("primary", "backup"):
        assert not (service.spool_dir.parent / store / OTHER).exists() or not any(
            p.is_file() for p in (service.spool_dir.parent / store / OTHER).rglob("*")), store
    assert set(service.spool_dir.iterdir()) == spool_before

    counts = await archives.apply_archive(service, other, path, verified=manifest)
    assert counts == {"imported": 6, "unchanged": 0}
    again = await archives.apply_archive(service, other, path, verified=manifest)
    assert again == {"imported": 0, "unchanged": 6}


class CountingMd5:
    """hashlib.md5 that counts the bytes it hashes (`hashed`): the seam that pins how many MD5
    passes an import makes, whatever the timing."""

    hashed = 0
    real = staticmethod(hashlib.md5)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._md5 = CountingMd5.real(*args, **kwargs)

    def update(self, data: Any) -> None:
        CountingMd5.hashed += len(memoryview(data).cast("B"))
        self._md5.update(data)

    def hexdigest(self) -> str:
        return self._md5.hexdigest()


def without_md5(body: bytes, public_id: str) -> bytes:
    """The archive with one entry as a version older than MD5s wrote it: `md5` null."""
    def change(name: str, data: bytes) -> list[tuple[str, bytes]]:
        if name != MANIFEST:
            return [(name, data)]
        lines = [json.loads(line) for line in data.decode().splitlines()]
        for line in lines[1:]:
            if line["public_id"] == public_id:
                line["md5"] = None
        return [(name, "".join(json.dumps(line) + "\n" for line in lines).encode())]
    return rebuild(body, change)


async def md5_library(api: Any) -> tuple[bytes, int]:
    """An exported archive of three originals, one of them without an MD5; their total size."""
    sizes = 0
    for number in range(3):
        data = f"md5 once {number} ".encode() * 4000
        sizes += len(data)
        await api.upload(data, public_id=f"once/{number}")
    _, body = await export(api, at=time.time())
    return without_md5(body, "once/1"), sizes


async def test_an_http_import_passes_each_members_bytes_through_md5_once(api, client, monkeypatch):
    """The upload of the tar, its verification and the import job together hash every member
    with MD5 once: no MD5 of the whole tar (nothing reads it), none again while staging (the
    manifest's was verified), and an entry without one gets its MD5 from staging alone."""
    body, sizes = await md5_library(api)
    await other_env(client)
    monkeypatch.setattr(hashlib, "md5", CountingMd5)
    CountingMd5.hashed = 0
    job = await post_import(api, body)
    finished = await wait_for(api, f"versionstore/archives/{job['archive_id']}", OTHER_HEADERS)
    assert finished["status"] == "completed" and finished["progress"]["imported"] == 3, finished
    assert CountingMd5.hashed == sizes
    monkeypatch.undo()
    imported = await client.app[META].get_asset(OTHER, "image", "upload", "once/1")
    assert imported is not None
    version = (await client.app[META].versions(imported.pk or 0))[-1]
    assert version.md5 == hashlib.md5(b"md5 once 1 " * 4000).hexdigest()  # computed for the entry without one


async def test_a_cli_import_passes_each_members_bytes_through_md5_once(api, client, monkeypatch, tmp_path):
    """`archive import` (archives.import_file): verification and staging share one MD5 pass."""
    from versionstore import archives
    from versionstore.http.keys import SERVICE

    body, sizes = await md5_library(api)
    path = tmp_path / "archive.tar"
    path.write_bytes(body)
    await other_env(client)
    other = await client.app[META].get_cloud(OTHER)
    assert other is not None
    monkeypatch.setattr(hashlib, "md5", CountingMd5)
    CountingMd5.hashed = 0
    _, counts = await archives.import_file(client.app[SERVICE], other, path)
    assert counts == {"imported": 3, "unchanged": 0}
    assert CountingMd5.hashed == sizes
    monkeypatch.undo()
    imported = await client.app[META].get_asset(OTHER, "image", "upload", "once/1")
    assert imported is not None
    version = (await client.app[META].versions(imported.pk or 0))[-1]
    assert version.md5 == hashlib.md5(b"md5 once 1 " * 4000).hexdigest()


async def test_batches_commit_in_order_while_the_next_one_stages_and_the_cursor_follows_commits(api, client, tmp_path, monkeypatch):
    """Small batches (two entries): each full batch commits in the background while the next
    is staged. Commits still happen in archive order, and whenever the cursor moves to entry N,
    every entry up to N is committed; a name seen again waits for the batch that writes it."""
    from versionstore import archives
    from versionstore.http.keys import SERVICE

    monkeypatch.setattr(archives, "BATCH_ENTRIES", 2)
    path, other = await exported_for_other(api, client, tmp_path, "order", 5, 3000)
    service, meta = client.app[SERVICE], client.app[META]
    manifest = await archives.verify_file(path)
    names = [e["public_id"] for e in manifest.entries]
    cursor: list[int] = []

    async def after_entry(index: int, counts: dict[str, int]) -> None:
        for public_id in names[:index]:
            assert await meta.get_asset(OTHER, "image", "upload", public_id) is not None, (index, public_id)
        cursor.append(index)

    counts = await archives.apply_archive(service, other, path, after_entry=after_entry, verified=manifest)
    assert counts == {"imported": 5, "unchanged": 0} and cursor == [2, 4, 5]
    assert not list(service.spool_dir.glob("*.part"))  # every staged file became a blob
