"""The CLI import (`archives.import_file`) links each verified member's blob into the stores
while the rest of the archive is still read, and commits versions only once all of it
verified: on both metadata backends, a refused archive (a tampered or truncated last member,
a wrong MD5, a smuggled member) leaves no version and, once refused, no blob file that was not
there before and no journal row; a process killed between the links and the commit leaves no
version, and orphan collection removes its blobs through the write journal."""

import asyncio
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import blake3
import pytest

from tests.test_archives import MANIFEST, OTHER, exported_for_other, members, rebuild
from versionstore import archive_format, archives, layout, staging
from versionstore.archive_records import IMPORT_STAGING
from versionstore.http.keys import META, SERVICE
from versionstore.service import UploadRequest

PREFIX, COUNT, REPEAT = "early", 6, 20000


def store_files(service: Any, cloud: str) -> set[Path]:
    """Every blob file of `cloud` in the primary and the default backup store."""
    roots = [service.spool_dir.parent / store / cloud for store in ("primary", "backup")]
    return {p for root in roots if root.exists() for p in root.rglob("*") if p.is_file()}


def linked(service: Any, cloud: str, digest: str) -> bool:
    """The digest's original and revision are both in the stores."""
    return all(Path(path).exists() for path in (
        service.primary.local_path(layout.original_key(cloud, digest)),
        service.targets.default.local_path(layout.revision_key(cloud, digest)),
    ))


async def journal_rows(meta: Any, cloud: str) -> list[Any]:
    return list(await meta._all("SELECT id, digest, role FROM inflight_writes WHERE cloud = ?", (cloud,)))


class WaitForLinks:
    """A progress callback (the reading thread): once the bytes of every member but the last two
    were read, it waits until their blobs are in both stores, and checks that no version of
    them exists yet. So the links are seen to happen while the archive is still being read,
    before it verified."""

    def __init__(self, service: Any, loop: asyncio.AbstractEventLoop, entries: list[dict[str, Any]]) -> None:
        self.service, self.loop, self.entries = service, loop, entries
        self.threshold = sum(e["bytes"] for e in entries[:-1])
        self.read = 0
        self.seen_linked = False

    def __call__(self, size: int) -> None:
        self.read += size
        if self.seen_linked or self.read < self.threshold:
            return
        early = self.entries[:-2]
        deadline = time.monotonic() + 10
        while not all(linked(self.service, OTHER, e["blake3"]) for e in early):
            assert time.monotonic() < deadline, "no member's blob was linked while the archive was read"
            time.sleep(0.01)
        for entry in early:
            found = asyncio.run_coroutine_threadsafe(
                self.service.meta.get_asset(OTHER, entry["resource_type"], entry["type"], entry["public_id"]), self.loop
            ).result(10)
            assert found is None, entry["public_id"]  # a blob, not a version
        self.seen_linked = True


def in_tar_order(body: bytes, manifest: archive_format.Manifest) -> list[dict[str, Any]]:
    by_path = {e["path"]: e for e in manifest.entries}
    return [by_path[m.name] for m in members(body) if m.name != MANIFEST]


def damaged(body: bytes, damage: str, last: dict[str, Any]) -> bytes:
    """The archive with its last member (`last`) or what follows it damaged."""
    content = (last["public_id"].replace("/", " ") + " ").encode()  # as exported_for_other wrote it
    if damage == "last_member_byte":
        start = body.index(content)
        return body[:start] + b"X" + body[start + 1:]
    if damage == "last_member_truncated":
        return body[: body.index(content) + last["bytes"] // 2]
    if damage == "last_member_md5":
        def wrong_md5(name: str, data: bytes) -> list[tuple[str, bytes]]:
            if name != MANIFEST:
                return [(name, data)]
            lines = [json.loads(line) for line in data.decode().splitlines()]
            for line in lines[1:]:
                if line["path"] == last["path"]:
                    line["md5"] = "0" * 32
            return [(name, "".join(json.dumps(line) + "\n" for line in lines).encode())]
        return rebuild(body, wrong_md5)
    assert damage == "smuggled_after_the_last"
    return rebuild(body, lambda n, d: [(n, d), *([("image/upload/smuggled", b"evil")] if n == last["path"] else [])])


@pytest.mark.parametrize("damage", ["last_member_byte", "last_member_truncated", "last_member_md5", "smuggled_after_the_last"])
async def test_a_refused_archive_leaves_no_version_no_new_blob_and_no_journal_row(api, client, tmp_path, damage):
    """Members before the damage are linked while the archive is read (WaitForLinks sees them);
    the refusal then removes every blob it wrote at once, and keeps one that was there before
    (the environment already held the first member's bytes as a live asset)."""
    path, other = await exported_for_other(api, client, tmp_path, PREFIX, COUNT, REPEAT)
    service, meta = client.app[SERVICE], client.app[META]
    body = path.read_bytes()
    entries = in_tar_order(body, await archives.verify_file(path))
    # OTHER already holds the first member's bytes, as another asset: its blobs must stay.
    there = await service.upload(
        UploadRequest(cloud=other, resource_type="image", public_id="already/here", backup=True),
        await service.spool_bytes(f"{PREFIX} 0 ".encode() * REPEAT),
    )
    assert there.version.digest == entries[0]["blake3"]
    before = store_files(service, OTHER)
    assert linked(service, OTHER, entries[0]["blake3"])
    path.write_bytes(damaged(body, damage, entries[-1]))
    watcher = WaitForLinks(service, asyncio.get_running_loop(), entries)
    with pytest.raises(archive_format.ArchiveInvalid):
        await archives.import_file(service, other, path, watcher)
    assert watcher.seen_linked
    for entry in entries:
        assert await meta.get_asset(OTHER, entry["resource_type"], entry["type"], entry["public_id"]) is None
    assert store_files(service, OTHER) == before
    assert (await meta.get_asset(OTHER, "image", "upload", "already/here")).digest == entries[0]["blake3"]
    assert await journal_rows(meta, OTHER) == []
    assert not list(service.spool_dir.glob(f"{IMPORT_STAGING}*"))
    # The intact archive then imports whole.
    path.write_bytes(body)
    _, counts = await archives.import_file(service, other, path)
    assert counts == {"imported": COUNT, "unchanged": 0}
    assert await journal_rows(meta, OTHER) == []


async def test_a_cli_import_killed_between_its_links_and_its_commit_leaves_its_blobs_to_orphan_collection(
    api, client, tmp_path, config
):
    """`versionstore archive import` as a process, SIGKILLed once its first blobs are in the
    stores (the archive still being read, nothing committed): no version exists, and a server
    on the same data (this app) removes every blob it wrote through the write journal (the
    dead owner's rows expired, then collected), and its staging directory."""
    path, _other = await exported_for_other(api, client, tmp_path, "killed", 24, 400_000)  # ~24 x 3 MiB
    service, meta = client.app[SERVICE], client.app[META]
    entries = (await archives.verify_file(path)).entries
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    if config.metadata_url:
        env["VERSIONSTORE_METADATA_URL"] = config.metadata_url
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "versionstore", "archive", "import", "--cloud", OTHER, str(path), "--no-progress",
        "--data-dir", str(config.data_dir), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while not store_files(service, OTHER):
            assert process.returncode is None, "the import ended before it linked anything"
            assert time.monotonic() < deadline, "the import linked nothing"
            await asyncio.sleep(0.002)
        process.send_signal(signal.SIGKILL)
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()
    assert await journal_rows(meta, OTHER)  # the dead process's writes, journaled before their links
    for entry in entries:
        assert await meta.get_asset(OTHER, entry["resource_type"], entry["type"], entry["public_id"]) is None
    assert await service.claims.expire_dead_owners()
    await service.collect_expired_writes()
    assert store_files(service, OTHER) == set() and await journal_rows(meta, OTHER) == []
    assert await asyncio.to_thread(staging.remove_stale, service.spool_dir, IMPORT_STAGING) == 1


def archive_of(header: dict[str, Any], entries: list[tuple[dict[str, Any], bytes]]) -> bytes:
    """A tar in the archive format: the manifest, then each entry's member."""
    out = io.BytesIO()
    lines = json.dumps({**header, "count": len(entries)}) + "\n" + "".join(json.dumps(e) + "\n" for e, _ in entries)
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in [(MANIFEST, lines.encode()), *((e["path"], d) for e, d in entries)]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


async def test_a_name_twice_and_bytes_under_two_names_commit_in_order_and_keep_every_blob(api, client, tmp_path):
    """An archive writing dup/a with X, then dup/a with Y, then dup/b with X: each blob is
    linked once while the archive is read, the first batch's commit takes X's journal rows,
    and the batch naming X again writes it again under its own rows, so the release of dup/a's
    superseded original X (its asset now has Y) keeps it for dup/b. Every version points at
    bytes that are there, and no journal row is left."""
    path, other = await exported_for_other(api, client, tmp_path, "dup", 2, 5000)
    service, meta = client.app[SERVICE], client.app[META]
    manifest = await archives.verify_file(path)
    data = {m.name: body for m, body in tar_members(path.read_bytes())}
    x, y = manifest.entries
    entries = [
        ({**x, "public_id": "dup/a", "path": "image/upload/dup/a"}, data[x["path"]]),
        ({**y, "public_id": "dup/a", "path": "image/upload/dup/a~2"}, data[y["path"]]),
        ({**x, "public_id": "dup/b", "path": "image/upload/dup/b"}, data[x["path"]]),
    ]
    path.write_bytes(archive_of(manifest.header, entries))
    _, counts = await archives.import_file(service, other, path)
    assert counts == {"imported": 3, "unchanged": 0}
    a = await meta.get_asset(OTHER, "image", "upload", "dup/a")
    b = await meta.get_asset(OTHER, "image", "upload", "dup/b")
    assert (a.digest, b.digest) == (y["blake3"], x["blake3"])
    assert [v.digest for v in await meta.versions(a.pk)] == [x["blake3"], y["blake3"]]
    for digest in (x["blake3"], y["blake3"]):
        assert linked(service, OTHER, digest)
    assert await journal_rows(meta, OTHER) == []
    for asset in (a, b):  # each live asset's original is in the primary store, whole
        original = Path(service.primary.local_path(layout.original_key(OTHER, asset.digest)))
        assert blake3.blake3(original.read_bytes()).hexdigest() == asset.digest, asset.public_id


def tar_members(body: bytes) -> list[tuple[tarfile.TarInfo, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(body)) as tar:
        return [(m, tar.extractfile(m).read()) for m in tar.getmembers()]  # type: ignore[union-attr]
