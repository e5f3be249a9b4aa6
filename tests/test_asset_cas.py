"""Every write of an asset row is conditional on what it read (issue 8, item 8).

A tags update or a rename that read the row before an upload committed must not write the
old version back: the old original is already released, so the asset would point at missing
bytes. The interleavings are driven deterministically by calling the domain in a chosen order.
"""

import asyncio
from typing import Any

import pytest

from tests.conftest import CLOUD, Api
from versionstore import layout
from versionstore.http.keys import META, SERVICE
from versionstore.metadata import AssetChanged, MetadataStore


async def primary_has(client: Any, digest: str) -> bool:
    return await client.app[SERVICE].primary.stat(layout.original_key(CLOUD, digest)) is not None


async def current(client: Any, public_id: str) -> Any:
    asset = await client.app[META].get_asset(CLOUD, "image", "upload", public_id)
    assert asset is not None
    return asset


async def test_a_tags_update_read_before_an_upload_keeps_the_new_version(api: Api, client: Any):
    await api.upload(b"first", public_id="cas/tags")
    stale = await current(client, "cas/tags")
    second = await api.upload(b"second!", public_id="cas/tags")
    updated = await client.app[SERVICE].update_fields(stale, tags=["t"])
    asset = await current(client, "cas/tags")
    assert asset.version_id == second["version_id"] == updated.version_id
    assert asset.tags == ["t"] and asset.bytes == 7
    assert await primary_has(client, asset.digest)


async def test_a_rename_read_before_an_upload_keeps_the_new_version(api: Api, client: Any):
    await api.upload(b"first", public_id="cas/from")
    stale = await current(client, "cas/from")
    second = await api.upload(b"second!", public_id="cas/from")
    renamed = await client.app[SERVICE].rename(stale, "upload", "cas/to", False)
    asset = await current(client, "cas/to")
    assert asset.version_id == second["version_id"] == renamed.version_id
    assert await primary_has(client, asset.digest)
    await api.admin("GET", "resources/image/upload/cas/from", expect=404)


async def test_a_rename_read_before_a_delete_does_not_revive_the_asset(api: Api, client: Any):
    await api.upload(b"first", public_id="cas/gone", backup="0")
    stale = await current(client, "cas/gone")
    await api.admin("DELETE", "resources/image/upload", json={"public_ids": ["cas/gone"]})
    with pytest.raises(Exception, match="not found"):
        await client.app[SERVICE].rename(stale, "upload", "cas/revived", False)
    await api.admin("GET", "resources/image/upload/cas/revived", expect=404)


async def test_the_database_refuses_a_write_from_a_stale_read(api: Api, client: Any, config: Any):
    """The condition lives in the row, so a second process on the same database is held to it
    too: here a second MetadataStore on the same file stands in for that process."""
    await api.upload(b"first", public_id="cas/db")
    other = await MetadataStore.open(config.metadata_location)
    try:
        stale = await other.get_asset(CLOUD, "image", "upload", "cas/db")
        assert stale is not None
        await api.upload(b"second!", public_id="cas/db")
        with pytest.raises(AssetChanged):
            await other.update_fields(stale, tags=["x"])
        with pytest.raises(AssetChanged):
            await other.rename_asset(stale, "upload", "cas/db2")
        with pytest.raises(AssetChanged):
            await other.delete_asset(stale, 0.0)
        fresh = await other.get_asset(CLOUD, "image", "upload", "cas/db")
        assert fresh is not None and fresh.generation > stale.generation
        updated = await other.update_fields(fresh, tags=["x"])
        assert updated.generation == fresh.generation + 1
    finally:
        await other.close()
    asset = await current(client, "cas/db")
    assert asset.tags == ["x"] and asset.bytes == 7


async def test_tag_updates_and_uploads_racing_over_http_keep_the_newest_version(api: Api, client: Any):
    await api.upload(b"v0", public_id="cas/stress", tags="base")
    uploads: list[dict[str, Any]] = []

    async def upload(i: int) -> None:
        uploads.append(await api.upload(f"version {i}".encode() * (i + 1), public_id="cas/stress"))

    async def tag(i: int) -> None:
        await api.signed("image/tags", tag=f"t{i}", public_ids=["cas/stress"], command="add")

    async def update(i: int) -> None:
        await api.admin("POST", "resources/image/upload/cas/stress", json={"context": f"k{i}=v"})

    jobs = [f(i) for i in range(12) for f in (upload, tag, update)]
    await asyncio.gather(*jobs)
    body = await api.admin("GET", "resources/image/upload/cas/stress", params={"versions": "true"})
    newest = max(uploads, key=lambda u: u["version"])
    assert body["version_id"] == newest["version_id"] == body["versions"][-1]["version_id"]
    assert body["bytes"] == newest["bytes"]
    assert set(body["tags"]) == {"base", *(f"t{i}" for i in range(12))}  # no tag update was lost
    asset = await current(client, "cas/stress")
    assert await primary_has(client, asset.digest)
    assert all(v["restorable"] for v in body["versions"])


async def test_migration_4_records_per_version_attributes_of_existing_histories(tmp_path: Any):
    """A database from before migration 4: the current version of each asset takes the asset's
    attributes, older versions keep NULL dimensions and the asset's original_filename."""
    import sqlite3

    from versionstore.metadata import _migrations

    path = tmp_path / "old.sqlite3"
    db = sqlite3.connect(path)
    for block in _migrations()[:3]:
        db.executescript(block)
    db.execute("PRAGMA user_version = 3")
    db.execute("INSERT INTO clouds (name, api_key, api_secret, created_at) VALUES ('demo', 'k', 's', 0)")
    db.execute(
        "INSERT INTO assets (pk, cloud, asset_id, resource_type, type, public_id, status, digest, format, bytes, width, height, "
        "version, version_id, original_filename, created_at, uploaded_at) "
        "VALUES (1, 'demo', 'a1', 'image', 'upload', 'old/a', 'live', 'd2', 'png', 9, 50, 70, 2, 'v2', 'second', 0, 0)"
    )
    for pk, version_id, digest in ((1, "v1", "d1"), (2, "v2", "d2")):
        db.execute(
            "INSERT INTO versions (pk, cloud, asset_pk, version_id, version, digest, bytes, format, backed_up, created_at) "
            "VALUES (?, 'demo', 1, ?, ?, ?, 9, 'png', 1, 0)",
            (pk, version_id, pk, digest),
        )
    db.commit()
    db.close()
    meta = await MetadataStore.open(path)
    try:
        asset = await meta.get_asset(CLOUD, "image", "upload", "old/a")
        assert asset is not None and asset.generation == 0 and not asset.detached
        old, current = await meta.versions(1)
        assert (current.width, current.height, current.original_filename) == (50, 70, "second")
        assert (old.width, old.height, old.original_filename) == (None, None, "second")
    finally:
        await meta.close()


async def test_restoring_a_version_without_recorded_dimensions_reads_them_from_its_bytes(api: Api, client: Any):
    from tests.test_semantics import png

    first = await api.upload(png(3, 2), public_id="cas/legacy", filename="one.png")
    await api.upload(png(50, 70, b"two"), public_id="cas/legacy", filename="two.png")
    async with client.app[META].transaction() as db:  # as migration 4 leaves an older version
        await db.execute("UPDATE versions SET width = NULL, height = NULL WHERE version_id = ?", (first["version_id"],))
    body = await api.admin("POST", "resources/image/upload/restore", json={"public_ids": ["cas/legacy"], "versions": [first["version_id"]]})
    assert (body["cas/legacy"]["width"], body["cas/legacy"]["height"]) == (3, 2)


async def test_two_services_on_one_database_keep_the_newest_version_and_every_tag(
    api: Api, client: Any, config: Any, aiohttp_client: Any
):
    """Two apps on one data directory stand in for two processes: neither sees the other's
    locks, so only the database's compare-and-set keeps their writes apart."""
    from versionstore.http.app import create_app

    other = Api(await aiohttp_client(create_app(config)))
    await api.upload(b"v0", public_id="cas/two", tags="base")
    uploads: list[dict[str, Any]] = []

    async def upload(i: int) -> None:
        uploads.append(await api.upload(f"version {i}".encode() * (i + 1), public_id="cas/two"))

    async def tag(i: int) -> None:
        await other.signed("image/tags", tag=f"t{i}", public_ids=["cas/two"], command="add")

    await asyncio.gather(*(f(i) for i in range(8) for f in (upload, tag)))
    body = await other.admin("GET", "resources/image/upload/cas/two", params={"versions": "true"})
    newest = max(uploads, key=lambda u: u["version"])
    assert body["version_id"] == newest["version_id"] == body["versions"][-1]["version_id"]
    assert set(body["tags"]) == {"base", *(f"t{i}" for i in range(8))}
    assert await primary_has(client, (await current(client, "cas/two")).digest)
