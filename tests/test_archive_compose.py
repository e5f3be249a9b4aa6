"""Composed (virtual) archives on both metadata backends (docs/snapshots.md, "Export"): the export
copies no bytes, only a small layout is stored; the download composes exactly the tar the former
copying writer produced (checked against a tar built independently with `tarfile`), with Range;
a damaged revision cuts the transfer before its member's end; an irreversible version deletion
withdraws every archive listing it (bytes gone), while a snapshot's deletion cannot take an
archive's revisions; removal deletes the layout and releases what only the archive held."""

import asyncio
import io
import json
import tarfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import blake3
import pytest

from tests.conftest import CLOUD
from tests.test_archives import AWKWARD, export, wait_for
from versionstore import archive_removal, layout, protection
from versionstore.archive_format import MANIFEST
from versionstore.archive_records import EXPORT_FILE, ArchiveFile, MemberGone
from versionstore.config import Config
from versionstore.http.keys import META, SERVICE
from versionstore.ids import new_hex_id

DAY = 86400.0


@pytest.fixture
def config(tmp_path: Path, metadata_url: str | None) -> Config:
    return Config(data_dir=tmp_path / "data", max_upload_bytes=64 << 20, poll_interval=0.05, metadata_url=metadata_url)


def link(done: dict[str, Any]) -> str:
    url = urlsplit(done["download_url"])
    return f"{url.path}?{url.query}"


def revision_path(client: Any, digest: str) -> Path:
    path = client.app[SERVICE].targets.store(None).local_path(layout.revision_key(CLOUD, digest))
    assert path is not None
    return Path(path)


def expected_tar(body: bytes, originals: dict[str, bytes]) -> bytes:
    """The archive as a plain `tarfile` writer makes it from its manifest and the originals'
    bytes (pax, the same member fields as the former writer): the golden layout."""
    with tarfile.open(fileobj=io.BytesIO(body)) as tar:
        manifest = tar.extractfile(MANIFEST).read()  # type: ignore[union-attr]
    header, *entries = [json.loads(line) for line in manifest.splitlines()]
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT, encoding="utf-8", errors="surrogateescape") as tar:
        for name, data, mtime in [(MANIFEST, manifest, header["created_at"])] + [
            (e["path"], originals[e["blake3"]], e["created_at"]) for e in entries
        ]:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode, info.uname, info.gname = len(data), int(mtime), 0o644, "", ""
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


async def composed_library(api: Any) -> dict[str, bytes]:
    """Originals by BLAKE3: awkward names, an empty file, sizes around the block boundaries, one
    large enough to stream in several chunks, and the same bytes under two names."""
    datas = [b"", b"x" * 511, b"y" * 512, b"z" * 513, bytes(range(256)) * 12_000] + [f"awk {n}".encode() * 70 for n in range(len(AWKWARD))]
    names = ["c/empty", "c/511", "c/512", "c/513", "c/big", *AWKWARD]
    for name, data in zip(names, datas, strict=True):
        await api.upload(data, public_id=name)
    await api.upload(b"y" * 512, public_id="c/same-bytes")
    return {blake3.blake3(d).hexdigest(): d for d in datas}


async def test_an_export_stores_only_a_layout_and_its_download_is_the_golden_tar(api, client):
    originals = await composed_library(api)
    done, body = await export(api, at=time.time())
    assert body == expected_tar(body, originals)  # byte for byte, headers, padding and end blocks
    key = done["progress"]["key"]
    assert key == layout.archive_layout_key(CLOUD, done["archive_id"])
    stored = client.app[SERVICE].targets.store(None).local_path(key)
    assert stored is not None and Path(stored).stat().st_size < len(body) // 10  # no copy of the bytes
    archives_dir = Path(stored).parent
    assert [p.name for p in archives_dir.iterdir()] == [Path(stored).name]  # no tar written anywhere


@pytest.mark.parametrize("header", ["bytes=0-99", "mid-header", "mid-member", "padding", "last", "suffix", "open"])
async def test_range_reads_are_the_same_bytes_as_the_whole(api, client, header):
    await composed_library(api)
    done, body = await export(api, at=time.time())
    size = len(body)
    with tarfile.open(fileobj=io.BytesIO(body)) as tar:
        big = next(m for m in tar.getmembers() if "/c/big" in m.name)
        odd = next(m for m in tar.getmembers() if "/c/513" in m.name)
    ranges = {
        "padding": (odd.offset_data + 514, odd.offset_data + 1200),  # from inside a member's padding
        "bytes=0-99": (0, 99), "mid-header": (big.offset + 100, big.offset + 700),
        "mid-member": (big.offset_data + 1000, big.offset_data + 2_500_000), "last": (size - 1, size - 1),
        "suffix": (size - 3000, size - 1), "open": (big.offset_data + 5, size - 1),
    }
    first, last = ranges[header]
    value = f"bytes=-{3000}" if header == "suffix" else f"bytes={first}-" if header == "open" else f"bytes={first}-{last}"
    response = await api.client.get(link(done), headers={"Range": value})
    assert response.status == 206
    assert response.headers["Content-Range"] == f"bytes {first}-{last}/{size}"
    assert await response.read() == body[first:last + 1]


@pytest.mark.parametrize("value", [lambda size: f"bytes={size}-", lambda size: f"bytes={size + 10}-{size + 20}", lambda size: "bytes=-0"])
async def test_unsatisfiable_ranges_are_416(api, client, value):
    await api.upload(b"small", public_id="r/a")
    done, body = await export(api, at=time.time())
    response = await api.client.get(link(done), headers={"Range": value(len(body))})
    assert response.status == 416 and response.headers["Content-Range"] == f"bytes */{len(body)}"


async def test_several_ranges_get_the_whole_archive(api, client):
    await api.upload(b"small", public_id="r/b")
    done, body = await export(api, at=time.time())
    response = await api.client.get(link(done), headers={"Range": "bytes=0-10,20-30"})
    assert response.status == 200 and await response.read() == body


async def test_a_revision_damaged_after_the_export_cuts_the_download_before_its_members_end(api, client):
    originals = await composed_library(api)
    done, body = await export(api, at=time.time())
    big = next(d for d, data in originals.items() if len(data) > 1_000_000)
    path = revision_path(client, big)
    damaged = bytearray(path.read_bytes())
    damaged[-1] ^= 1  # the last byte: only a whole read can tell
    path.chmod(0o644)  # the bad block of the story; the service never opens blobs for writing
    path.write_bytes(bytes(damaged))
    with tarfile.open(fileobj=io.BytesIO(body)) as tar:
        member = next(m for m in tar.getmembers() if "/c/big" in m.name)
    end = member.offset_data + member.size

    response = await api.client.get(link(done))
    assert response.status == 200
    got = b""
    with pytest.raises(Exception):  # the connection closes early  # noqa: B017, PT011
        async for chunk in response.content.iter_chunked(1 << 16):
            got += chunk
    assert len(got) < end and got == body[: len(got)]  # no damaged byte served

    # The member alone, whole, by Range: cut as well.
    response = await api.client.get(link(done), headers={"Range": f"bytes={member.offset_data}-{end - 1}"})
    got = b""
    with pytest.raises(Exception):  # noqa: B017, PT011
        async for chunk in response.content.iter_chunked(1 << 16):
            got += chunk
    assert len(got) < member.size


async def test_an_irreversible_deletion_withdraws_every_archive_listing_the_version(api, client):
    old = await api.upload(b"taken down " * 100, public_id="t/a")
    at = time.time()
    await asyncio.sleep(0.05)
    await api.upload(b"newer bytes", public_id="t/a")
    await api.upload(b"kept " * 100, public_id="t/b")
    listing, _ = await export(api, at=at)
    ignoring, _ = await export(api, at=time.time(), prefix="t/b")
    assert "download_url" in await api.admin("GET", f"versionstore/archives/{listing['archive_id']}")
    revision = revision_path(client, blake3.blake3(b"taken down " * 100).hexdigest())
    assert revision.exists()

    await api.admin("DELETE", f"resources/backup/{old['asset_id']}", json={"version_ids": [old["version_id"]]})
    assert not revision.exists()  # the archive does not hold a version deleted irreversibly
    withdrawn = await api.admin("GET", f"versionstore/archives/{listing['archive_id']}")
    assert withdrawn["removed_reason"] == "content_deleted" and "download_url" not in withdrawn
    gone = await api.client.get(link(listing))
    assert gone.status == 404 and "removed" in (await gone.json())["error"]["message"]
    # The removal pass deletes its layout; the other archive is untouched.
    service = client.app[SERVICE]
    assert await archive_removal.remove_due(service, time.time()) == 1
    assert not Path(str(service.targets.store(None).local_path(listing["progress"]["key"]))).exists()
    response = await api.client.get(link(ignoring))
    assert response.status == 200 and b"kept " * 100 in await response.read()


async def test_a_snapshots_deletion_leaves_an_archive_of_it_downloadable(api, client):
    await api.upload(b"in the snapshot " * 50, public_id="s/a")
    snapshot = await api.admin("POST", "versionstore/snapshots", json={"note": "s"})
    done, body = await export(api, snapshot_id=snapshot["id"])
    await api.upload(b"s/a moves on", public_id="s/a")
    await api.admin("DELETE", f"versionstore/snapshots/{snapshot['id']}")
    assert revision_path(client, blake3.blake3(b"in the snapshot " * 50).hexdigest()).exists()
    response = await api.client.get(link(done))
    assert response.status == 200 and await response.read() == body


async def test_removal_releases_what_only_the_archive_held(api, client):
    old = await api.upload(b"held by the archive alone " * 40, public_id="h/a")
    snapshot = await api.admin("POST", "versionstore/snapshots", json={"note": "h"})
    done, _ = await export(api, snapshot_id=snapshot["id"])
    await api.upload(b"h/a moves on", public_id="h/a")
    meta = client.app[META]
    digest = blake3.blake3(b"held by the archive alone " * 40).hexdigest()
    # The snapshot and the version row go (the version row by the metadata only, as an
    # expired version would: no irreversible deletion, so the archive is not withdrawn).
    await api.admin("DELETE", f"versionstore/snapshots/{snapshot['id']}")
    assert await meta.digest_referenced(CLOUD, digest, backup=True)  # the version row, and the archive
    async with meta.transaction() as db:
        await db.execute("DELETE FROM versions WHERE version_id = ?", (old["version_id"],))
    assert await meta.digest_referenced(CLOUD, digest, backup=True)  # the archive alone
    assert revision_path(client, digest).exists()
    await api.admin("DELETE", f"versionstore/archives/{done['archive_id']}")
    assert not await meta.digest_referenced(CLOUD, digest, backup=True)
    assert not revision_path(client, digest).exists()


async def test_a_download_link_opens_its_archive_only(api, client):
    await api.upload(b"a", public_id="l/a")
    first, _ = await export(api, at=time.time())
    second, _ = await export(api, at=time.time())
    url = urlsplit(first["download_url"])
    forged = url.query.replace(first["archive_id"], second["archive_id"])
    response = await api.client.get(f"{url.path}?{forged}")
    assert response.status in (400, 401, 403) and "error" in await response.json()
    # the archive link's signature opens no version download either
    response = await api.client.get(f"/v1_1/{CLOUD}/download_backup?{url.query}")
    assert response.status in (400, 401, 403)
    done = await wait_for(api, f"versionstore/archives/{first['archive_id']}")
    assert done["status"] == "completed"


async def test_a_delayed_deletion_withdraws_the_archive_when_its_purge_is_final(api, client):
    meta, service = client.app[META], client.app[SERVICE]
    await meta.set_protection(CLOUD, purge_delay_days=1)
    old = await api.upload(b"purged later " * 100, public_id="p/a")
    at = time.time()
    await asyncio.sleep(0.05)
    await api.upload(b"p/a now", public_id="p/a")
    done, _ = await export(api, at=at)
    await api.admin("DELETE", f"resources/backup/{old['asset_id']}", json={"version_ids": [old["version_id"]]})
    assert "download_url" in await api.admin("GET", f"versionstore/archives/{done['archive_id']}")  # undoable still
    assert await protection.run_due(service, time.time() + 2 * DAY) == 1
    withdrawn = await api.admin("GET", f"versionstore/archives/{done['archive_id']}")
    assert withdrawn["removed_reason"] == "content_deleted" and "download_url" not in withdrawn
    assert not revision_path(client, blake3.blake3(b"purged later " * 100).hexdigest()).exists()


async def test_an_archive_listing_a_version_deleted_meanwhile_is_not_recorded(client):
    meta = client.app[META]
    record = ArchiveFile(new_hex_id(), CLOUD, EXPORT_FILE, "k", time.time(), time.time() + DAY)
    with pytest.raises(MemberGone):
        await meta.register_archive_layout(record, [(new_hex_id(), "ab" * 32)])
    assert await meta.get_archive_file(CLOUD, record.job_id) is None
