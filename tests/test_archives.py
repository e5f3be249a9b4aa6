"""Archives over HTTP on both metadata backends: export a snapshot or a point in time as a tar,
download it through the signed link (with Range), import it into another environment
byte-identical; a tampered, truncated, padded or inconsistent archive is refused whole."""

import asyncio
import base64
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

    for number in range(6):
        await api.upload(f"batched {number} ".encode() * 20000, public_id=f"batch/{number}")
    _, body = await export(api, at=time.time())
    path = tmp_path / "archive.tar"
    path.write_bytes(body)
    await other_env(client)
    service, meta = client.app[SERVICE], client.app[META]
    other = await meta.get_cloud(OTHER)
    spool_before = set(service.spool_dir.iterdir())
    read = 0

    def failing(size: int) -> None:
        nonlocal read
        read += size
        if read > 2 * 20000 * len(b"batched 0 "):
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
