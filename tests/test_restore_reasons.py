"""A restore that fails says why, per item, in Cloudinary's shape (issue 9, item 12).

`error` keeps Cloudinary's per-item code (`no_backup`, `failed`; `backup_pending` is ours), a
plain string so the SDKs never raise; `reason` is a stable code and `message` a sentence.
"""

from typing import Any

from tests.conftest import CLOUD, Api
from versionstore import layout
from versionstore.http.keys import META

RESTORE = "resources/image/upload/restore"


async def restore(api: Api, public_id: str, version_id: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"public_ids": [public_id]}
    if version_id:
        body["versions"] = [version_id]
    return (await api.admin("POST", RESTORE, json=body))[public_id]


def assert_failure(item: dict[str, Any], error: str, reason: str, *words: str) -> None:
    assert set(item) == {"error", "reason", "message"}, item
    assert (item["error"], item["reason"]) == (error, reason), item
    for word in words:
        assert word in item["message"], item


async def revision_path(client: Any, config: Any, public_id: str) -> Any:
    asset = await client.app[META].get_asset(CLOUD, "image", "upload", public_id)
    return config.data_dir / "backup" / layout.revision_key(CLOUD, asset.digest)


async def test_unknown_asset(api: Api):
    assert_failure(await restore(api, "rr/never"), "no_backup", "asset_not_found", "rr/never")
    body = await api.admin("POST", "resources/restore", json={"asset_ids": ["nothex", "0" * 32]})
    assert_failure(body["nothex"], "no_backup", "asset_not_found", "nothex")
    assert_failure(body["0" * 32], "no_backup", "asset_not_found")


async def test_unknown_and_deleted_versions(api: Api):
    first = await api.upload(b"one", public_id="rr/v")
    await api.upload(b"two", public_id="rr/v")
    other = await api.upload(b"other", public_id="rr/other")
    assert_failure(await restore(api, "rr/v", "f" * 32), "failed", "version_not_found", "f" * 32, "rr/v")
    # A version of another asset is not a version of this one.
    assert_failure(await restore(api, "rr/v", other["version_id"]), "failed", "version_not_found")
    await api.admin("DELETE", f"resources/backup/{first['asset_id']}", json={"version_ids": [first["version_id"]]})
    assert_failure(await restore(api, "rr/v", first["version_id"]), "failed", "version_not_found", "deleted")


async def test_version_not_backed_up_and_nothing_backed_up(api: Api):
    unbacked = await api.upload(b"one", public_id="rr/nb", backup="0")
    await api.upload(b"two", public_id="rr/nb")
    assert_failure(await restore(api, "rr/nb", unbacked["version_id"]), "no_backup", "not_backed_up", unbacked["version_id"])
    await api.upload(b"three", public_id="rr/none", backup="0")
    await api.admin("DELETE", "resources/image/upload", json={"public_ids": ["rr/none"]})
    # Not backed up and deleted: the asset is gone entirely.
    assert_failure(await restore(api, "rr/none"), "no_backup", "asset_not_found")


async def test_revision_missing(api: Api, client: Any, config: Any):
    await api.upload(b"one", public_id="rr/missing")
    path = await revision_path(client, config, "rr/missing")
    await api.admin("DELETE", "resources/image/upload", json={"public_ids": ["rr/missing"]})
    path.unlink()
    assert_failure(await restore(api, "rr/missing"), "failed", "revision_missing", "missing")
    placeholder = await api.admin("GET", "resources/image/upload/rr/missing")
    assert placeholder["placeholder"] is True  # nothing changed


async def test_revision_corrupt(api: Api, client: Any, config: Any):
    await api.upload(b"one", public_id="rr/corrupt")
    path = await revision_path(client, config, "rr/corrupt")
    await api.admin("DELETE", "resources/image/upload", json={"public_ids": ["rr/corrupt"]})
    path.unlink()
    path.write_bytes(b"not one")
    assert_failure(await restore(api, "rr/corrupt"), "failed", "revision_corrupt", "corrupt")
    placeholder = await api.admin("GET", "resources/image/upload/rr/corrupt")
    assert placeholder["placeholder"] is True


async def test_mixed_results_in_one_call(api: Api):
    good = await api.upload(b"good", public_id="rr/good")
    await api.admin("DELETE", "resources/image/upload", json={"public_ids": ["rr/good"]})
    body = await api.admin("POST", RESTORE, json={"public_ids": ["rr/good", "rr/absent"]})
    assert body["rr/good"]["version_id"] != good["version_id"] and body["rr/good"]["bytes"] == 4
    assert_failure(body["rr/absent"], "no_backup", "asset_not_found")
