"""The decisions of docs/design.md ("Semantics we decided"), one test each, over HTTP."""

from pathlib import Path

import pytest

from tests.conftest import CLOUD


def blob_files(config, store: str) -> list[Path]:
    return sorted(p for p in (config.data_dir / store).rglob("*") if p.is_file())


async def versions(api, public_id: str, rt: str = "image") -> list[dict]:
    body = await api.admin("GET", f"resources/{rt}/upload/{public_id}", params={"versions": "true"})
    return body["versions"]


async def test_restore_appends_a_version_that_points_at_the_old_bytes(api, client):
    first = await api.upload(b"first", public_id="r/a")
    await api.upload(b"second", public_id="r/a")
    body = await api.admin("POST", "resources/image/upload/restore", json={"public_ids": ["r/a"], "versions": [first["version_id"]]})
    restored = body["r/a"]
    assert restored["bytes"] == 5 and restored["asset_id"] == first["asset_id"]
    history = await versions(api, "r/a")
    assert [v["size"] for v in history] == [5, 6, 5]
    assert history[-1]["restored_from"] == first["version_id"]
    assert history[-1]["version_id"] == restored["version_id"] != first["version_id"]
    assert [int(v["version"]) for v in history] == sorted({int(v["version"]) for v in history})


async def test_restorable_means_bytes_are_in_backup_storage(api):
    await api.upload(b"kept", public_id="r/b", backup="1")
    await api.upload(b"not kept", public_id="r/b", backup="0")
    assert [v["restorable"] for v in await versions(api, "r/b")] == [True, False]


async def test_identical_bytes_append_a_version_but_store_one_blob(api, config):
    await api.upload(b"same bytes", public_id="r/c")
    await api.upload(b"same bytes", public_id="r/c")
    await api.upload(b"same bytes", public_id="r/other")
    assert len(await versions(api, "r/c")) == 2
    assert len(blob_files(config, "backup")) == 1
    assert len(blob_files(config, "primary")) == 1


async def test_overwrite_false_returns_the_existing_asset(api):
    first = await api.upload(b"one", public_id="r/d")
    again = await api.upload(b"two", public_id="r/d", overwrite="0")
    assert again["existing"] is True
    assert again["version_id"] == first["version_id"] and again["bytes"] == 3
    assert len(await versions(api, "r/d")) == 1


async def test_deleting_an_asset_without_backup_frees_its_public_id(api, config):
    first = await api.upload(b"one", public_id="r/e", backup="0")
    await api.admin("DELETE", "resources/image/upload", json={"public_ids": ["r/e"]})
    await api.admin("GET", "resources/image/upload/r/e", expect=404)
    assert blob_files(config, "primary") == []
    second = await api.upload(b"two", public_id="r/e", backup="0")
    assert second["asset_id"] != first["asset_id"]


async def test_deleted_backed_up_asset_is_reserved_and_a_new_upload_continues_its_history(api, config):
    first = await api.upload(b"one", public_id="r/f")
    deleted = await api.admin("DELETE", "resources/image/upload", json={"public_ids": ["r/f", "r/missing"]})
    assert deleted["deleted"] == {"r/f": "deleted", "r/missing": "not_found"}
    placeholder = await api.admin("GET", "resources/image/upload/r/f")
    assert placeholder["placeholder"] is True and placeholder["bytes"] == 0 and placeholder["status"] == "deleted"
    assert blob_files(config, "primary") == [] and len(blob_files(config, "backup")) == 1
    listing = await api.admin("GET", "resources/image/upload")
    assert listing["resources"] == []
    found = await api.admin("POST", "resources/search", json={"expression": "status=deleted"})
    assert [r["public_id"] for r in found["resources"]] == ["r/f"]
    second = await api.upload(b"two!", public_id="r/f")
    assert second["asset_id"] == first["asset_id"]
    history = await versions(api, "r/f")
    assert [v["version_id"] for v in history] == [first["version_id"], second["version_id"]]


async def test_version_deletion_is_irreversible_and_frees_bytes_when_unreferenced(api, config):
    a1 = await api.upload(b"shared", public_id="r/g")
    await api.upload(b"newer", public_id="r/g")
    b1 = await api.upload(b"shared", public_id="r/h")
    await api.upload(b"newest", public_id="r/h")
    assert len(blob_files(config, "backup")) == 3
    body = await api.admin("DELETE", f"resources/backup/{a1['asset_id']}", json={"version_ids": [a1["version_id"]]})
    assert body == {"asset_id": a1["asset_id"], "deleted_version_ids": [a1["version_id"]]}
    assert len(blob_files(config, "backup")) == 3  # r/h still references "shared"
    await api.admin("DELETE", f"resources/backup/{b1['asset_id']}", json={"version_ids": [b1["version_id"]]})
    assert len(blob_files(config, "backup")) == 2
    assert [v["size"] for v in await versions(api, "r/g")] == [5]
    again = await api.admin("DELETE", f"resources/backup/{a1['asset_id']}", json={"version_ids": [a1["version_id"]]})
    assert again["deleted_version_ids"] == [] and again["failures"][0]["version_id"] == a1["version_id"]


async def test_the_current_version_of_a_live_asset_cannot_be_deleted(api):
    current = await api.upload(b"live", public_id="r/i")
    body = await api.admin("DELETE", f"resources/backup/{current['asset_id']}", json={"version_ids": [current["version_id"]]})
    assert body["deleted_version_ids"] == []
    assert "current version" in body["failures"][0]["error"]


async def test_deleting_every_version_of_a_deleted_asset_frees_its_public_id(api):
    first = await api.upload(b"one", public_id="r/j")
    await api.admin("DELETE", "resources", json={"asset_ids": [first["asset_id"]]})
    await api.admin("DELETE", f"resources/backup/{first['asset_id']}", json={"version_ids": [first["version_id"]]})
    await api.admin("GET", "resources/image/upload/r/j", expect=404)


async def test_rename_rules(api):
    await api.upload(b"a", public_id="n/a")
    await api.upload(b"b", public_id="n/b", backup="0")
    await api.upload(b"c", public_id="n/reserved")
    await api.admin("DELETE", "resources/image/upload", json={"public_ids": ["n/reserved"]})
    refused = await api.signed("image/rename", expect=400, from_public_id="n/a", to_public_id="n/b")
    assert refused["error"]["message"] == "to_public_id (n/b) already exists"
    reserved = await api.signed("image/rename", expect=400, from_public_id="n/a", to_public_id="n/reserved")
    assert "overwrite" in reserved["error"]["message"]
    renamed = await api.signed("image/rename", from_public_id="n/a", to_public_id="n/b", overwrite="1")
    assert renamed["public_id"] == "n/b"
    await api.admin("GET", "resources/image/upload/n/a", expect=404)
    await api.signed("image/rename", expect=404, from_public_id="n/nothing", to_public_id="n/x")


async def test_metadata_changes_never_create_a_version(api):
    await api.upload(b"x", public_id="m/a")
    await api.admin("POST", "metadata_fields", json={"type": "string", "external_id": "f", "label": "F"})
    await api.signed("image/explicit", public_id="m/a", type="upload", tags="z")
    await api.signed("image/tags", tag="t2", public_ids=["m/a"], command="add")
    await api.signed("image/context", context="alt=hi", public_ids=["m/a"], command="add")
    await api.admin("POST", "resources/image/upload/m/a", json={"tags": "x,y", "metadata": "f=v"})
    body = await api.admin("GET", "resources/image/upload/m/a", params={"versions": "true"})
    assert len(body["versions"]) == 1
    assert body["tags"] == ["x", "y"] and body["context"] == {"custom": {"alt": "hi"}} and body["metadata"] == {"f": "v"}


@pytest.mark.parametrize(
    "auto_backup, override, expected", [(True, None, True), (True, "0", False), (False, None, False), (False, "1", True)]
)
async def test_backup_override_beats_the_environment_setting(api, auto_backup, override, expected):
    await api.admin("PUT", "versionstore/settings", json={"auto_backup": auto_backup})
    params = {"backup": override} if override is not None else {}
    await api.upload(b"bytes", public_id="o/a", **params)
    assert (await versions(api, "o/a"))[0]["restorable"] is expected


async def test_settings_extension(api):
    assert await api.admin("GET", "versionstore/settings") == {
        "cloud_name": CLOUD, "auto_backup": True, "purge_delay_days": 0, "append_only_key": False, "scheduled_purges": 0,
        "archive_keep_days": None, "server_archive_keep_days": 7,
    }
    assert (await api.admin("PUT", "versionstore/settings", data={"auto_backup": "false"}))["auto_backup"] is False


async def test_restore_reports_per_item_errors(api):
    kept = await api.upload(b"kept", public_id="s/a")
    await api.upload(b"gone", public_id="s/b", backup="0")
    await api.admin("DELETE", "resources/image/upload", json={"public_ids": ["s/a", "s/b"]})
    body = await api.admin("POST", "resources/image/upload/restore", json={"public_ids": ["s/a", "s/b", "s/never"]})
    assert body["s/a"]["bytes"] == 4 and body["s/a"]["placeholder"] is False
    assert body["s/b"]["error"] == "no_backup" and body["s/never"]["error"] == "no_backup"
    assert body["s/never"]["reason"] == "asset_not_found" and "s/never" in body["s/never"]["message"]
    by_id = await api.admin("POST", "resources/restore", json={"asset_ids": [kept["asset_id"], "f" * 32]})
    assert by_id[kept["asset_id"]]["asset_id"] == kept["asset_id"] and by_id["f" * 32]["error"] == "no_backup"


async def test_search_subset(api):
    for name in ("p/a", "p/b", "p/c", "q/a"):
        await api.upload(name.encode(), public_id=name)
    await api.upload(b"raw", public_id="p/raw.txt", rt="raw")
    body = await api.admin("POST", "resources/search", json={
        "expression": "public_id=p/* AND resource_type=image", "sort_by": [{"public_id": "asc"}], "max_results": 2})
    assert [r["public_id"] for r in body["resources"]] == ["p/a", "p/b"] and body["total_count"] == 3
    page2 = await api.admin("POST", "resources/search", json={
        "expression": "public_id=p/* AND resource_type=image", "sort_by": [{"public_id": "asc"}], "max_results": 2,
        "next_cursor": body["next_cursor"]})
    assert [r["public_id"] for r in page2["resources"]] == ["p/c"] and "next_cursor" not in page2
    ranged = await api.admin("POST", "resources/search", json={"expression": "created_at>2000-01-01 AND created_at<2999-01-01"})
    assert ranged["total_count"] == 5
    none = await api.admin("POST", "resources/search", json={"expression": "created_at:[1990-01-01 TO 1999-01-01]"})
    assert none["total_count"] == 0
    await api.admin("POST", "resources/search", expect=400, json={"max_results": 501})
    await api.admin("POST", "resources/search", expect=400, json={"expression": "foo=bar"})


async def test_orphan_blobs_from_a_crash_are_collected(api, client, config):
    """A blob written before a crash, whose metadata never committed, is removed."""
    from versionstore import layout
    from versionstore.http.keys import SERVICE

    kept = await api.upload(b"referenced", public_id="g/a")
    service = client.app[SERVICE]
    orphan = config.data_dir / "orphan.bin"
    orphan.write_bytes(b"never committed")
    await service.targets.default.put_file(layout.revision_key("demo", "ab" * 32), orphan)
    await service.primary.put_file(layout.original_key("demo", "ab" * 32), orphan)
    await service.primary.put_file(layout.pending_key("demo", "cd" * 32), orphan)  # no pending row
    assert len(blob_files(config, "backup")) == 2
    cloud = await service.meta.get_cloud("demo")
    assert await service.collect_orphans(cloud) == 3
    assert len(blob_files(config, "backup")) == 1 and len(blob_files(config, "primary")) == 1
    assert (await versions(api, "g/a"))[0]["version_id"] == kept["version_id"]


async def test_concurrent_uploads_to_one_public_id_all_become_versions(api):
    import asyncio

    results = await asyncio.gather(*(api.upload(f"bytes {i}".encode(), public_id="c/a") for i in range(12)))
    assert len({r["asset_id"] for r in results}) == 1
    history = await versions(api, "c/a")
    assert len(history) == 12
    numbers = [int(v["version"]) for v in history]
    assert numbers == sorted(numbers) and len(set(numbers)) == 12


def png(width: int, height: int, salt: bytes = b"") -> bytes:
    """Enough of a PNG for its format and dimensions to be read from the header."""
    import struct

    return b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR" + struct.pack(">II", width, height) + b"\x08\x02\x00\x00\x00" + salt


async def test_restore_takes_every_per_version_attribute_from_the_restored_version(api):
    first = await api.upload(png(3, 2), public_id="r/attrs", filename="first.png")
    second = await api.upload(png(50, 70, b"second"), public_id="r/attrs", filename="second.png")
    assert (second["width"], second["height"], second["original_filename"]) == (50, 70, "second")
    body = await api.admin("POST", "resources/image/upload/restore", json={"public_ids": ["r/attrs"], "versions": [first["version_id"]]})
    restored = body["r/attrs"]
    expected = {"width": 3, "height": 2, "original_filename": "first", "format": "png", "bytes": first["bytes"]}
    assert {k: restored[k] for k in expected} == expected
    resource = await api.admin("GET", "resources/image/upload/r/attrs")
    assert {k: resource[k] for k in expected} == expected and resource["etag"] == first["etag"]
    again = await api.admin("POST", "resources/image/upload/restore", json={"public_ids": ["r/attrs"], "versions": [second["version_id"]]})
    assert (again["r/attrs"]["width"], again["r/attrs"]["original_filename"]) == (50, "second")


async def download_backup(api, asset_id: str, version_id: str) -> bytes:
    from tests.conftest import sign

    response = await api.client.get(f"/v1_1/{CLOUD}/download_backup", params=sign({"asset_id": asset_id, "version_id": version_id}))
    assert response.status == 200, await response.text()
    return await response.read()


async def test_rename_overwrite_onto_a_backed_up_asset_detaches_its_history(api):
    """The public_id goes to the renamed asset; the overwritten one keeps its asset_id and every
    version, reachable by asset_id (resource, restore, download) until its name is free again."""
    source = await api.upload(b"source", public_id="n2/a")
    t1 = await api.upload(b"target one", public_id="n2/t")
    t2 = await api.upload(b"target two", public_id="n2/t")
    renamed = await api.signed("image/rename", from_public_id="n2/a", to_public_id="n2/t", overwrite="1")
    assert renamed["public_id"] == "n2/t" and renamed["asset_id"] == source["asset_id"]
    now = await api.admin("GET", "resources/image/upload/n2/t", params={"versions": "true"})
    assert now["asset_id"] == source["asset_id"] and [v["version_id"] for v in now["versions"]] == [source["version_id"]]
    await api.admin("GET", "resources/image/upload/n2/a", expect=404)
    detached = await api.admin("GET", f"resources/{t1['asset_id']}", params={"versions": "true"})
    assert detached["public_id"] == "n2/t" and detached["placeholder"] is True and detached["status"] == "deleted"
    assert [(v["version_id"], v["restorable"]) for v in detached["versions"]] == [(t1["version_id"], True), (t2["version_id"], True)]
    assert await download_backup(api, t1["asset_id"], t1["version_id"]) == b"target one"
    listing = await api.admin("GET", "resources/image/upload")
    assert [r["asset_id"] for r in listing["resources"]] == [source["asset_id"]]
    found = await api.admin("POST", "resources/search", json={"expression": "status=deleted"})
    assert [(r["asset_id"], r["public_id"]) for r in found["resources"]] == [(t1["asset_id"], "n2/t")]
    for expression in ("public_id=n2/t AND status=deleted", "public_id=n2/* AND status=deleted"):  # found by the name it had
        by_name = await api.admin("POST", "resources/search", json={"expression": expression})
        assert [r["asset_id"] for r in by_name["resources"]] == [t1["asset_id"]], expression
    # Already deleted: deleting it by asset_id finds nothing live (its versions go with delete_backed_up_assets).
    gone = await api.admin("DELETE", "resources", json={"asset_ids": [t1["asset_id"]]})
    assert gone["deleted"] == {t1["asset_id"]: "not_found"}

    # While its public_id belongs to the renamed asset, the detached history cannot take it back.
    refused = await api.admin("POST", "resources/restore", json={"asset_ids": [t1["asset_id"]]})
    assert refused[t1["asset_id"]]["reason"] == "public_id_taken" and source["asset_id"] in refused[t1["asset_id"]]["message"]
    # Restore and delete by public_id act on the asset that owns the name now.
    by_name = await api.admin("POST", "resources/image/upload/restore", json={"public_ids": ["n2/t"]})
    assert by_name["n2/t"]["asset_id"] == source["asset_id"]
    await api.admin("DELETE", "resources/image/upload", json={"public_ids": ["n2/t"]})
    assert (await api.admin("GET", "resources/image/upload/n2/t"))["asset_id"] == source["asset_id"]  # reserved by it
    still = await api.admin("POST", "resources/restore", json={"asset_ids": [t1["asset_id"]]})
    assert still[t1["asset_id"]]["reason"] == "public_id_taken"
    # Once the name is free, the detached history comes back under it.
    await api.admin("DELETE", f"resources/backup/{source['asset_id']}", json={"version_ids": [source["version_id"]]})
    back = await api.admin("POST", "resources/restore", json={"asset_ids": [t1["asset_id"]]})
    assert back[t1["asset_id"]]["public_id"] == "n2/t" and back[t1["asset_id"]]["bytes"] == len(b"target two")
    history = await versions(api, "n2/t")
    assert [v["version_id"] for v in history][:2] == [t1["version_id"], t2["version_id"]]
    assert history[-1]["restored_from"] == t2["version_id"]


async def test_rename_onto_a_reserved_id_needs_overwrite_and_detaches_the_reservation(api):
    await api.upload(b"mover", public_id="n3/a")
    kept = await api.upload(b"kept", public_id="n3/r")
    await api.admin("DELETE", "resources/image/upload", json={"public_ids": ["n3/r"]})
    refused = await api.signed("image/rename", expect=400, from_public_id="n3/a", to_public_id="n3/r")
    assert "reserved" in refused["error"]["message"] and "overwrite" in refused["error"]["message"]
    await api.signed("image/rename", from_public_id="n3/a", to_public_id="n3/r", overwrite="true")
    detached = await api.admin("GET", f"resources/{kept['asset_id']}", params={"versions": "true"})
    assert detached["placeholder"] is True and detached["versions"][0]["restorable"] is True
    assert await download_backup(api, kept["asset_id"], kept["version_id"]) == b"kept"
