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
from versionstore.http.app import META, SERVICE
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
    other = await MetadataStore.open(config.data_dir / "metadata.sqlite3")
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
