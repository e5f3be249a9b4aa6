"""Snapshots over HTTP: consistent point-in-time lists of (asset, version), what they keep, and
what irreversible deletion does to them (docs/snapshots.md, docs/design.md)."""

import asyncio
import time

import pytest

from tests.conftest import CLOUD
from tests.test_semantics import blob_files
from versionstore.claims import REVISION, Claims
from versionstore.http.keys import SERVICE
from versionstore.snapshots import Snapshots

SNAPS = "versionstore/snapshots"


async def test_a_snapshot_lists_every_live_asset_and_marks_those_without_backup_not_covered(api):
    a = await api.upload(b"a1", public_id="camp/a")
    b = await api.upload(b"b1", public_id="camp/b")
    await api.upload(b"c1", public_id="camp/c", backup="false")
    await api.upload(b"o1", public_id="other/o")
    gone = await api.upload(b"g1", public_id="camp/gone")
    await api.admin("DELETE", "resources/image/upload", params={"public_ids[]": "camp/gone"})
    snap = await api.admin("POST", SNAPS, json={"note": "before the import", "prefix": "camp/"})
    assert snap["status"] == "completed" and snap["type"] == "manual" and snap["created_by"] == "api"
    assert snap["note"] == "before the import" and snap["prefix"] == "camp/"
    assert (snap["asset_count"], snap["uncovered_count"], snap["size_bytes"]) == (3, 1, 6)
    assert snap["expires_at"] is None and snap["pending_deletion"] is False and snap["pinned"] is False
    items = (await api.admin("GET", f"{SNAPS}/{snap['id']}/items"))["items"]
    assert {(i["public_id"], i["version_id"], i["covered"]) for i in items} == {
        ("camp/a", a["version_id"], True), ("camp/b", b["version_id"], True), ("camp/c", items[2]["version_id"], False),
    }
    assert gone["asset_id"] not in {i["asset_id"] for i in items}  # deleted: not in the library at that time
    uncovered = (await api.admin("GET", f"{SNAPS}/{snap['id']}/items", params={"covered": "false"}))["items"]
    assert [i["public_id"] for i in uncovered] == ["camp/c"]


async def test_a_snapshot_keeps_pointing_at_the_versions_of_its_time(api):
    first = await api.upload(b"first", public_id="p/a")
    snap = await api.admin("POST", SNAPS, json={"note": "t0"})
    await api.upload(b"second", public_id="p/a")
    await api.upload(b"new", public_id="p/new")
    again = await api.admin("GET", f"{SNAPS}/{snap['id']}")
    assert again["asset_count"] == 1
    items = (await api.admin("GET", f"{SNAPS}/{snap['id']}/items"))["items"]
    assert [(i["public_id"], i["version_id"]) for i in items] == [("p/a", first["version_id"])]
    # Only this snapshot keeps "first" addressable as a state: its unique bytes.
    assert again["unique_bytes"] == 5


async def test_list_pages_with_a_cursor_newest_first(api):
    made = [(await api.admin("POST", SNAPS, json={"note": f"n{i}"}))["id"] for i in range(5)]
    seen, cursor = [], None
    while True:
        params = {"max_results": "2", **({"next_cursor": cursor} if cursor else {})}
        page = await api.admin("GET", SNAPS, params=params)
        seen += [s["id"] for s in page["snapshots"]]
        cursor = page.get("next_cursor")
        if cursor is None:
            break
    assert seen == made[::-1]
    assert {s["unique_bytes"] for s in (await api.admin("GET", SNAPS))["snapshots"]} == {None}  # a scan each: on request
    assert {s["unique_bytes"] for s in (await api.admin("GET", SNAPS, params={"unique_bytes": "true"}))["snapshots"]} == {0}
    await api.admin("GET", SNAPS, params={"next_cursor": "%%%"}, expect=400)


async def test_delete_manual_only_pin_and_unpin(api, client):
    await api.upload(b"x", public_id="d/x")
    snap = await api.admin("POST", SNAPS, json={})
    pinned = await api.admin("POST", f"{SNAPS}/{snap['id']}/pin")
    assert pinned["pinned"] is True
    refused = await api.admin("DELETE", f"{SNAPS}/{snap['id']}", expect=403)
    assert "pinned" in refused["error"]["message"]
    assert (await api.admin("DELETE", f"{SNAPS}/{snap['id']}/pin"))["pinned"] is False
    assert await api.admin("DELETE", f"{SNAPS}/{snap['id']}") == {"deleted": snap["id"]}
    await api.admin("GET", f"{SNAPS}/{snap['id']}", expect=404)
    scheduled = await client.app[SERVICE].meta.get_snapshot(CLOUD, snap["id"])
    assert scheduled is None
    from versionstore.snapshots import SCHEDULED, Snapshots

    made = await Snapshots(client.app[SERVICE]).create(CLOUD, note=None, type_=SCHEDULED, created_by="schedule:daily 02:00 UTC")
    refused = await api.admin("DELETE", f"{SNAPS}/{made.id}", expect=403)
    assert "retention policy removes it" in refused["error"]["message"]


async def test_bad_input_is_refused_and_changes_nothing(api):
    await api.admin("POST", SNAPS, json={"prefix": "a\x01b"}, expect=400)
    await api.admin("POST", SNAPS, json={"note": "n" * 1001}, expect=400)
    await api.admin("GET", f"{SNAPS}/{'0' * 32}", expect=404)
    await api.admin("DELETE", f"{SNAPS}/{'0' * 32}", expect=404)
    await api.admin("GET", SNAPS, params={"max_results": "0"}, expect=400)
    assert (await api.admin("GET", SNAPS))["snapshots"] == []
    response = await api.client.get(f"/v1_1/{CLOUD}/{SNAPS}")
    assert response.status == 401


async def test_irreversible_version_deletion_removes_the_item_and_marks_the_snapshot_changed(api, config):
    """Cloudinary promises that deleting a backed-up version is final (takedowns): a snapshot
    that listed it loses that item, says so, and the bytes go (docs/design.md)."""
    old = await api.upload(b"takedown", public_id="t/a")
    keep = await api.upload(b"keep", public_id="t/b")
    snap = await api.admin("POST", SNAPS, json={})
    await api.upload(b"replacement", public_id="t/a")
    assert len(blob_files(config, "backup")) == 3
    await api.admin("DELETE", f"resources/backup/{old['asset_id']}", json={"version_ids": [old["version_id"]]})
    assert len(blob_files(config, "backup")) == 2  # final: the snapshot did not keep the bytes
    after = await api.admin("GET", f"{SNAPS}/{snap['id']}")
    assert (after["asset_count"], after["removed_items"], after["changed"]) == (1, 1, True)
    assert after["changed_at"] is not None and after["size_bytes"] == 4
    items = (await api.admin("GET", f"{SNAPS}/{snap['id']}/items"))["items"]
    assert [i["version_id"] for i in items] == [keep["version_id"]]


async def test_a_revision_a_snapshot_references_is_never_collected(api, client, config):
    """Every blob deletion asks digest_referenced, which counts snapshot items: even with no
    version row left (a crash, a future history pruning), orphan collection keeps the bytes."""
    await api.upload(b"held", public_id="h/a")
    await api.upload(b"later", public_id="h/a")
    snap = await api.admin("POST", SNAPS, json={})
    await api.upload(b"held-again-elsewhere", public_id="h/z")
    service = client.app[SERVICE]
    digest = (await api.admin("GET", f"{SNAPS}/{snap['id']}/items"))["items"][0]["blake3"]
    async with service.meta.transaction() as db:  # the version row goes, the snapshot item stays
        await db.execute("DELETE FROM versions WHERE digest = ?", (digest,))
    cloud = await service.meta.get_cloud(CLOUD)
    assert await service.collect_orphans(cloud) == 0
    assert await service.meta.digest_referenced(CLOUD, digest, backup=True)
    assert any(p.name == digest for p in blob_files(config, "backup"))
    # Deleting the snapshot releases it: now nothing references the bytes.
    await api.admin("DELETE", f"{SNAPS}/{snap['id']}")
    assert not any(p.name == digest for p in blob_files(config, "backup"))


async def test_a_snapshot_deletion_stopped_before_its_releases_leaves_them_to_orphan_collection(api, client, config):
    """The revisions a snapshot's deletion frees are journaled in the deletion's own
    transaction: a process that stops between that commit and the release (here cancelled
    while another process's deletion claim holds the digest) leaves them to the write journal's
    orphan collection, instead of in the backup store until a full walk."""
    await api.upload(b"kept by the snapshot only", public_id="j/a")
    snap = await api.admin("POST", SNAPS, json={})
    await api.upload(b"newer", public_id="j/a")
    service = client.app[SERVICE]
    digest = (await api.admin("GET", f"{SNAPS}/{snap['id']}/items"))["items"][0]["blake3"]
    async with service.meta.transaction() as db:  # only the snapshot's item references the revision now
        await db.execute("DELETE FROM versions WHERE digest = ?", (digest,))
    other_process = Claims(service.meta, owner="another-host:1:0")
    async with other_process.deleting(CLOUD, digest, REVISION) as free:
        assert free is False  # the snapshot's item still holds it
        deletion = asyncio.create_task(Snapshots(service).delete(CLOUD, snap["id"]))
        deadline = time.monotonic() + 10
        while await service.meta.get_snapshot(CLOUD, snap["id"]) is not None:  # committed; the release waits
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.1)
        deletion.cancel()
        with pytest.raises(asyncio.CancelledError):
            await deletion
    assert any(p.name == digest for p in blob_files(config, "backup"))
    await service.collect_expired_writes()  # what every process does every few seconds
    assert not any(p.name == digest for p in blob_files(config, "backup"))


async def test_deleting_a_snapshot_deletes_no_revision_a_version_still_uses(api, config):
    await api.upload(b"v1", public_id="k/a")
    snap = await api.admin("POST", SNAPS, json={})
    await api.upload(b"v2", public_id="k/a")
    await api.admin("DELETE", f"{SNAPS}/{snap['id']}")
    assert len(blob_files(config, "backup")) == 2


async def test_a_snapshot_taken_while_uploads_run_is_consistent(api, client):
    """Uploads never wait for a snapshot and a snapshot never sees half an upload: every item
    names a committed version, one per asset, and the counts match the items."""
    import asyncio

    await asyncio.gather(*(api.upload(f"base {i}".encode(), public_id=f"c/{i}") for i in range(20)))
    uploads = [asyncio.ensure_future(api.upload(f"next {i}".encode(), public_id=f"c/{i % 25}")) for i in range(40)]
    snaps = [await api.admin("POST", SNAPS, json={"prefix": "c/"}) for _ in range(5)]
    await asyncio.gather(*uploads)
    meta = client.app[SERVICE].meta
    counts = []
    for snap in snaps:
        items = (await api.admin("GET", f"{SNAPS}/{snap['id']}/items", params={"max_results": "5000"}))["items"]
        assert len(items) == snap["asset_count"] == len({i["asset_id"] for i in items})
        assert snap["size_bytes"] == sum(i["bytes"] for i in items)
        for item in items:
            found = await meta.version_of(CLOUD, item["asset_id"], item["version_id"])
            assert found is not None and found[1].digest == item["blake3"]
        counts.append(len(items))
    assert counts == sorted(counts) and counts[0] >= 20 and counts[-1] <= 25  # assets only ever appear
