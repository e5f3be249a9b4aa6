"""The official Python SDK (cloudinary 1.46.3) against a real `versionstore serve` process.

Every call goes through the SDK; only the backup download URL (which the SDK builds but does
not fetch) and the versionstore settings extension are fetched with urllib.
"""

import base64
import hashlib
import io
import json
import os
import secrets
import struct
import urllib.error
import urllib.request
import zlib
from pathlib import Path
from typing import Any

import cloudinary
import cloudinary.api
import cloudinary.exceptions
import cloudinary.uploader
import cloudinary.utils
import pytest

from tests.e2e.conftest import API_KEY, API_SECRET, CLOUD, ServerProcess, bodies_read, cli, configure_sdk

HEX32 = 32


def png(width: int = 3, height: int = 2, salt: bytes = b"") -> bytes:
    """A small valid PNG; `salt` (a tEXt chunk) makes distinct contents of the same size."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    raw = b"".join(b"\x00" + b"\x7f" * (width * 3) for _ in range(height))
    body = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    if salt:
        body += chunk(b"tEXt", b"salt\x00" + salt)
    body += chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


def uid(prefix: str = "e2e") -> str:
    return f"{prefix}/{secrets.token_hex(5)}"


def is_hex32(value: Any) -> bool:
    return isinstance(value, str) and len(value) == HEX32 and all(c in "0123456789abcdef" for c in value)


def fetch(
    url: str, headers: dict[str, str] | None = None, method: str = "GET", data: bytes | None = None
) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, headers=headers or {}, method=method, data=data)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def download(asset_id: str, version_id: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    url = cloudinary.utils.download_backedup_asset(asset_id, version_id)
    return fetch(url, headers)


def versions(public_id: str, **options: Any) -> list[dict[str, Any]]:
    return list(cloudinary.api.resource(public_id, versions=True, **options)["versions"])


def basic_header(key: str = API_KEY, secret: str = API_SECRET) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{key}:{secret}".encode()).decode()}


def set_auto_backup_via_cli(server: ServerProcess, on: bool) -> None:
    result = cli("cloud", "set", CLOUD, "--auto-backup", "on" if on else "off", data_dir=server.data_dir)
    assert f"auto_backup={'on' if on else 'off'}" in result.stdout


@pytest.fixture
def auto_backup_restored(sdk: ServerProcess) -> Any:
    """Tests that flip the environment setting put it back on afterwards."""
    yield sdk
    set_auto_backup_via_cli(sdk, True)


# --- basics ---------------------------------------------------------------------------------


def test_ping(sdk: ServerProcess) -> None:
    assert cloudinary.api.ping() == {"status": "ok"}


def test_upload_image_fields_and_signature(sdk: ServerProcess) -> None:
    data = png(5, 4)
    public_id = uid()
    result = cloudinary.uploader.upload(
        data, public_id=public_id, tags=["t1", "t2"], context={"alt": "hello", "caption": "a&b"}
    )
    assert result["public_id"] == public_id
    assert result["resource_type"] == "image"
    assert result["type"] == "upload"
    assert result["format"] == "png"
    assert (result["width"], result["height"]) == (5, 4)
    assert result["bytes"] == len(data)
    assert result["tags"] == ["t1", "t2"]
    assert result["context"] == {"custom": {"alt": "hello", "caption": "a&b"}}
    assert is_hex32(result["asset_id"]) and is_hex32(result["version_id"])
    assert isinstance(result["version"], int)
    assert result["api_key"] == API_KEY
    assert result["backup"] is True  # environment default is on
    assert "existing" not in result
    assert cloudinary.utils.verify_api_response_signature(result["public_id"], result["version"], result["signature"])

    resource = cloudinary.api.resource(public_id)
    assert resource["asset_id"] == result["asset_id"]
    assert resource["bytes"] == len(data)
    assert resource["placeholder"] is False
    assert resource["tags"] == ["t1", "t2"]
    assert resource["context"] == {"custom": {"alt": "hello", "caption": "a&b"}}
    status, _, body = download(result["asset_id"], result["version_id"])
    assert status == 200 and body == data


def test_upload_raw_auto_and_type(sdk: ServerProcess, tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_bytes(b"plain text payload\n")
    raw = cloudinary.uploader.upload(str(text), resource_type="raw", public_id=uid() + ".txt")
    assert raw["resource_type"] == "raw"
    assert raw["bytes"] == text.stat().st_size
    assert cloudinary.api.resource(raw["public_id"], resource_type="raw")["asset_id"] == raw["asset_id"]
    with pytest.raises(cloudinary.exceptions.NotFound):
        cloudinary.api.resource(raw["public_id"])  # image is the default resource type

    auto_image = cloudinary.uploader.upload(png(), resource_type="auto", public_id=uid())
    assert auto_image["resource_type"] == "image" and auto_image["format"] == "png"
    auto_raw = cloudinary.uploader.upload(str(text), resource_type="auto")
    assert auto_raw["resource_type"] == "raw"
    assert auto_raw["public_id"]  # generated

    private = cloudinary.uploader.upload(png(salt=b"p"), public_id=uid(), type="private")
    assert private["type"] == "private"
    assert cloudinary.api.resource(private["public_id"], type="private")["asset_id"] == private["asset_id"]
    with pytest.raises(cloudinary.exceptions.NotFound):
        cloudinary.api.resource(private["public_id"])  # not under type=upload


def test_overwrite_false_returns_existing_without_new_version(sdk: ServerProcess) -> None:
    public_id = uid()
    first = cloudinary.uploader.upload(png(salt=b"1"), public_id=public_id)
    again = cloudinary.uploader.upload(png(salt=b"2-longer"), public_id=public_id, overwrite=False)
    assert again.get("existing") is True
    assert again["asset_id"] == first["asset_id"]
    assert again["version_id"] == first["version_id"]
    assert again["bytes"] == first["bytes"]
    assert [v["version_id"] for v in versions(public_id)] == [first["version_id"]]

    replaced = cloudinary.uploader.upload(png(salt=b"3"), public_id=public_id, overwrite=True)
    assert "existing" not in replaced
    assert replaced["asset_id"] == first["asset_id"]
    assert replaced["version_id"] != first["version_id"]
    assert replaced["version"] > first["version"]
    assert [v["version_id"] for v in versions(public_id)] == [first["version_id"], replaced["version_id"]]


def test_backup_param_overrides_environment(auto_backup_restored: ServerProcess) -> None:
    server = auto_backup_restored
    public_id = uid()
    # environment on: backup=False overrides it
    no = cloudinary.uploader.upload(png(salt=b"no"), public_id=public_id, backup=False)
    assert no["backup"] is False
    default = cloudinary.uploader.upload(png(salt=b"default"), public_id=public_id)
    assert default["backup"] is True
    listed = versions(public_id)
    assert [v["restorable"] for v in listed] == [False, True]
    assert download(no["asset_id"], no["version_id"])[0] == 404
    assert download(default["asset_id"], default["version_id"])[0] == 200

    # environment off (CLI on the live data dir, no restart): backup=True overrides it
    set_auto_backup_via_cli(server, False)
    yes = cloudinary.uploader.upload(png(salt=b"yes"), public_id=public_id, backup=True)
    assert yes["backup"] is True
    off = cloudinary.uploader.upload(png(salt=b"off"), public_id=public_id)
    assert off["backup"] is False
    assert [v["restorable"] for v in versions(public_id)] == [False, True, True, False]
    restored = cloudinary.api.restore([public_id], versions=[no["version_id"]])
    assert (restored[public_id]["error"], restored[public_id]["reason"]) == ("no_backup", "not_backed_up")


def test_cli_auto_backup_off_applies_without_restart(auto_backup_restored: ServerProcess) -> None:
    server = auto_backup_restored
    pid_before = server.pid
    set_auto_backup_via_cli(server, False)
    public_id = uid()
    result = cloudinary.uploader.upload(png(salt=b"cli-off"), public_id=public_id)
    assert result["backup"] is False
    assert [v["restorable"] for v in versions(public_id)] == [False]
    assert download(result["asset_id"], result["version_id"])[0] == 404
    # No backed-up version: deleting it leaves nothing to restore.
    assert cloudinary.api.delete_resources([public_id])["deleted"] == {public_id: "deleted"}
    failed = cloudinary.api.restore([public_id])[public_id]
    assert (failed["error"], failed["reason"]) == ("no_backup", "asset_not_found")
    with pytest.raises(cloudinary.exceptions.NotFound):
        cloudinary.api.resource(public_id)

    set_auto_backup_via_cli(server, True)
    back_on = cloudinary.uploader.upload(png(salt=b"cli-on"), public_id=uid())
    assert back_on["backup"] is True
    assert server.pid == pid_before  # same process all along


def test_settings_extension_endpoint(auto_backup_restored: ServerProcess) -> None:
    url = f"{auto_backup_restored.base_url}/v1_1/{CLOUD}/versionstore/settings"
    status, _, body = fetch(url, basic_header())
    assert status == 200 and json.loads(body)["auto_backup"] is True

    headers = {**basic_header(), "Content-Type": "application/json"}
    status, _, body = fetch(url, headers, method="PUT", data=json.dumps({"auto_backup": False}).encode())
    assert status == 200 and json.loads(body)["auto_backup"] is False
    assert json.loads(fetch(url, basic_header())[2])["auto_backup"] is False
    assert "auto_backup=off" in cli("cloud", "list", data_dir=auto_backup_restored.data_dir).stdout

    public_id = uid()
    result = cloudinary.uploader.upload(png(salt=b"settings-off"), public_id=public_id)
    assert result["backup"] is False
    assert [v["restorable"] for v in versions(public_id)] == [False]

    status, _, body = fetch(url, headers, method="PUT", data=json.dumps({"auto_backup": True}).encode())
    assert status == 200 and json.loads(body)["auto_backup"] is True
    assert cloudinary.uploader.upload(png(salt=b"settings-on"), public_id=uid())["backup"] is True

    # Basic auth is required, and the wrong secret is refused.
    assert fetch(url)[0] == 401
    assert fetch(url, basic_header(API_KEY, "wrong"))[0] == 401


# --- other inputs ---------------------------------------------------------------------------


def test_data_uri_upload(sdk: ServerProcess) -> None:
    data = png(7, 3, salt=b"data-uri")
    uri = "data:image/png;base64," + base64.b64encode(data).decode()
    result = cloudinary.uploader.upload(uri, public_id=uid())
    assert result["format"] == "png" and result["bytes"] == len(data)
    assert (result["width"], result["height"]) == (7, 3)
    assert download(result["asset_id"], result["version_id"])[2] == data


def test_sdk_encodings_take_the_small_body_path(sdk: ServerProcess, file_server: Any) -> None:
    """A file (with tags and context), a data URI and a remote URL from the SDK: every body is
    read whole and split in one pass (http/small_body.py), and stores the same bytes."""
    data = png(5, 4, salt=b"small-path") + os.urandom(2000)
    url = file_server.add(f"small/{secrets.token_hex(4)}/photo.png", data)
    before = bodies_read(sdk)
    by_file = cloudinary.uploader.upload(io.BytesIO(data), public_id=uid(), tags=["a", "b"], context={"k": "v"},
                                         backup=True, overwrite=True)
    by_uri = cloudinary.uploader.upload("data:image/png;base64," + base64.b64encode(data).decode(), public_id=uid())
    by_url = cloudinary.uploader.upload(url, public_id=uid(), resource_type="auto")
    after = bodies_read(sdk)
    assert after.get("small", 0) - before.get("small", 0) == 3 and after.get("stream", 0) == before.get("stream", 0)
    for result in (by_file, by_uri, by_url):
        assert result["bytes"] == len(data) and result["etag"] == hashlib.md5(data).hexdigest()
        assert download(result["asset_id"], result["version_id"])[2] == data
    assert by_file["tags"] == ["a", "b"]


def test_remote_url_upload(sdk: ServerProcess, file_server: Any) -> None:
    data = png(2, 2, salt=b"remote") + os.urandom(1000)
    url = file_server.add(f"remote/{secrets.token_hex(4)}/photo.png", data)
    result = cloudinary.uploader.upload(url, public_id=uid())
    assert result["bytes"] == len(data) and result["format"] == "png"
    assert download(result["asset_id"], result["version_id"])[2] == data

    with pytest.raises(cloudinary.exceptions.BadRequest):
        cloudinary.uploader.upload(f"{file_server.base_url}/missing.png", public_id=uid())


def test_upload_large_chunks(sdk: ServerProcess, tmp_path: Path) -> None:
    size = 12 * 1000 * 1000 + 12345  # three chunks of 5 MiB (the smallest allowed), the last one short
    path = tmp_path / "large.bin"
    digest = hashlib.sha256()
    with open(path, "wb") as handle:
        remaining = size
        while remaining:
            block = os.urandom(min(1 << 20, remaining))
            digest.update(block)
            handle.write(block)
            remaining -= len(block)
    public_id = uid() + ".bin"
    result = cloudinary.uploader.upload_large(str(path), public_id=public_id, chunk_size=5 * 1024 * 1024)
    assert result["public_id"] == public_id
    assert result["resource_type"] == "raw"
    assert result["bytes"] == size
    listed = versions(public_id, resource_type="raw")
    assert len(listed) == 1 and listed[0]["size"] == size and listed[0]["restorable"] is True

    status, _, body = download(result["asset_id"], result["version_id"])
    assert status == 200 and len(body) == size
    assert hashlib.sha256(body).hexdigest() == digest.hexdigest()

    # Without a public_id every chunk must land in one asset.
    payload = os.urandom(2 * 5 * 1024 * 1024 + 7)
    generated = cloudinary.uploader.upload_large(io.BytesIO(payload), chunk_size=5 * 1024 * 1024, filename="stream.bin")
    assert generated["bytes"] == len(payload)
    assert generated["public_id"].endswith(".bin")
    assert len(versions(generated["public_id"], resource_type="raw")) == 1
    assert download(generated["asset_id"], generated["version_id"])[2] == payload


# --- reads ----------------------------------------------------------------------------------


def test_resource_versions_and_by_asset_id(sdk: ServerProcess) -> None:
    public_id = uid()
    contents = [png(salt=b"a"), png(salt=b"bb"), png(salt=b"ccc")]
    uploads = [cloudinary.uploader.upload(c, public_id=public_id) for c in contents]
    assert len({u["asset_id"] for u in uploads}) == 1

    by_id = cloudinary.api.resource(public_id, versions=True)
    listed = by_id["versions"]
    assert [v["version_id"] for v in listed] == [u["version_id"] for u in uploads]
    assert [v["size"] for v in listed] == [len(c) for c in contents]
    assert [v["version"] for v in listed] == [str(u["version"]) for u in uploads]
    assert all(v["format"] == "png" and v["restorable"] is True for v in listed)
    assert by_id["version_id"] == uploads[-1]["version_id"]
    assert by_id["bytes"] == len(contents[-1])
    assert by_id["backup"] is True and by_id["backup_bytes"] == sum(len(c) for c in contents)
    assert "versions" not in cloudinary.api.resource(public_id, versions=False)

    by_asset = cloudinary.api.resource_by_asset_id(uploads[0]["asset_id"], versions=True)
    assert by_asset["public_id"] == public_id
    assert by_asset["versions"] == listed
    for upload, content in zip(uploads, contents, strict=True):
        assert download(upload["asset_id"], upload["version_id"])[2] == content

    with pytest.raises(cloudinary.exceptions.NotFound):
        cloudinary.api.resource(uid())
    with pytest.raises(cloudinary.exceptions.NotFound):
        cloudinary.api.resource_by_asset_id(secrets.token_hex(16))


def test_resources_listing(sdk: ServerProcess) -> None:
    prefix = f"list{secrets.token_hex(4)}/"
    ids = [f"{prefix}{name}" for name in ("a", "b", "c")]
    uploads = {pid: cloudinary.uploader.upload(png(salt=pid.encode()), public_id=pid) for pid in ids}
    cloudinary.uploader.upload(png(), public_id=f"other{prefix}x")

    listed = cloudinary.api.resources(type="upload", prefix=prefix, max_results=10)
    assert [r["public_id"] for r in listed["resources"]] == ids
    page = cloudinary.api.resources(type="upload", prefix=prefix, max_results=2)
    assert len(page["resources"]) == 2 and page.get("next_cursor")
    rest = cloudinary.api.resources(type="upload", prefix=prefix, max_results=2, next_cursor=page["next_cursor"])
    assert [r["public_id"] for r in rest["resources"]] == ids[2:]

    newest_first = cloudinary.api.resources(type="upload", prefix=prefix, direction="desc")
    assert [r["public_id"] for r in newest_first["resources"]] == ids[::-1]
    any_type = cloudinary.api.resources(prefix=prefix)  # GET resources/image, no type segment
    assert [r["public_id"] for r in any_type["resources"]] == ids
    assert cloudinary.api.resources(resource_type="raw", prefix=prefix)["resources"] == []

    # public_ids (api.resources_by_ids sends public_ids[] to the same listing endpoint)
    by_ids = cloudinary.api.resources_by_ids([ids[0], ids[2], f"{prefix}nope"])
    assert sorted(r["public_id"] for r in by_ids["resources"]) == [ids[0], ids[2]]

    by_assets = cloudinary.api.resources_by_asset_ids([uploads[ids[1]]["asset_id"], uploads[ids[2]]["asset_id"]])
    assert sorted(r["public_id"] for r in by_assets["resources"]) == ids[1:]

    # Deleted (even backed-up) assets are not listed.
    cloudinary.api.delete_resources([ids[0]])
    assert [r["public_id"] for r in cloudinary.api.resources(type="upload", prefix=prefix)["resources"]] == ids[1:]
    assert cloudinary.api.resources_by_ids([ids[0]])["resources"] == []
    assert cloudinary.api.resources_by_asset_ids([uploads[ids[0]]["asset_id"]])["resources"] == []


# --- delete, placeholders, restore ----------------------------------------------------------


def test_delete_placeholder_search_and_reupload(sdk: ServerProcess) -> None:
    public_id = uid("deleted")
    first = cloudinary.uploader.upload(png(salt=b"first"), public_id=public_id, tags=["keep"])
    result = cloudinary.api.delete_resources([public_id, f"{public_id}-missing"])
    assert result["deleted"] == {public_id: "deleted", f"{public_id}-missing": "not_found"}
    assert result["partial"] is False

    placeholder = cloudinary.api.resource(public_id, versions=True)
    assert placeholder["bytes"] == 0 and placeholder["placeholder"] is True
    assert placeholder["asset_id"] == first["asset_id"]
    assert placeholder["versions"][-1]["restorable"] is True

    found = (
        cloudinary.Search().expression("status=deleted").max_results(500)
        .sort_by("created_at", "desc").with_field("tags").execute()
    )
    hit = [r for r in found["resources"] if r["public_id"] == public_id]
    assert len(hit) == 1 and hit[0]["status"] == "deleted"
    assert found["total_count"] >= 1
    live = cloudinary.Search().expression("status=active").max_results(500).execute()
    assert public_id not in {r["public_id"] for r in live["resources"]}

    # A new upload onto the reserved id revives the same asset; its history continues.
    second = cloudinary.uploader.upload(png(salt=b"second!"), public_id=public_id)
    assert second["asset_id"] == first["asset_id"]
    listed = versions(public_id)
    assert [v["version_id"] for v in listed] == [first["version_id"], second["version_id"]]
    current = cloudinary.api.resource(public_id)
    assert current["placeholder"] is False and current["bytes"] == second["bytes"]
    assert current["version_id"] == second["version_id"]


def test_delete_by_asset_ids(sdk: ServerProcess) -> None:
    a = cloudinary.uploader.upload(png(salt=b"del-a"), public_id=uid())
    b = cloudinary.uploader.upload(png(salt=b"del-b"), public_id=uid(), backup=False)
    bogus = secrets.token_hex(16)
    result = cloudinary.api.delete_resources_by_asset_ids([a["asset_id"], b["asset_id"], bogus])
    assert result["deleted"] == {a["asset_id"]: "deleted", b["asset_id"]: "deleted", bogus: "not_found"}
    assert cloudinary.api.resource(a["public_id"])["placeholder"] is True  # backed up: reserved
    with pytest.raises(cloudinary.exceptions.NotFound):
        cloudinary.api.resource(b["public_id"])  # never backed up: gone


def test_restore_deleted_and_versions(sdk: ServerProcess) -> None:
    public_id = uid("restore")
    one, two = png(salt=b"one"), png(salt=b"two-two")
    first = cloudinary.uploader.upload(one, public_id=public_id)
    second = cloudinary.uploader.upload(two, public_id=public_id)
    cloudinary.uploader.destroy(public_id)
    assert cloudinary.api.resource(public_id)["bytes"] == 0

    # Without versions: the latest backed-up version comes back.
    restored = cloudinary.api.restore([public_id])
    assert restored[public_id]["bytes"] == len(two)
    assert restored[public_id]["placeholder"] is False
    assert restored[public_id]["asset_id"] == first["asset_id"]
    assert cloudinary.api.resource(public_id)["bytes"] == len(two)

    # With versions on a live asset: revert to the first content as a new version.
    reverted = cloudinary.api.restore([public_id], versions=[first["version_id"]])[public_id]
    assert reverted["bytes"] == len(one)
    assert reverted["version_id"] not in (first["version_id"], second["version_id"])
    listed = versions(public_id)
    assert listed[-1]["version_id"] == reverted["version_id"]
    assert listed[-1].get("restored_from") == first["version_id"]
    assert download(first["asset_id"], reverted["version_id"])[2] == one

    # Deleted again, restore a specific older version.
    cloudinary.api.delete_resources([public_id])
    again = cloudinary.api.restore([public_id], versions=[second["version_id"]])[public_id]
    assert again["bytes"] == len(two)
    assert cloudinary.api.resource(public_id)["version_id"] == again["version_id"]

    # Per-item errors, in one call, without raising.
    unbacked = uid("restore")
    cloudinary.uploader.upload(png(salt=b"unbacked"), public_id=unbacked, backup=False)
    cloudinary.api.delete_resources([unbacked])
    never = uid("restore")
    mixed = cloudinary.api.restore([public_id, unbacked, never])
    assert mixed[unbacked]["error"] == "no_backup" and mixed[unbacked]["reason"] == "asset_not_found"
    assert mixed[never]["error"] == "no_backup" and never in mixed[never]["message"]
    assert mixed[public_id]["bytes"] == len(two)  # live: no-op

    with pytest.raises(cloudinary.exceptions.BadRequest):
        cloudinary.api.restore([public_id, unbacked], versions=[first["version_id"]])


def test_restore_by_asset_ids(sdk: ServerProcess) -> None:
    one, two = png(salt=b"rb-one"), png(salt=b"rb-two-")
    first = cloudinary.uploader.upload(one, public_id=uid())
    second = cloudinary.uploader.upload(two, public_id=first["public_id"])
    asset_id = first["asset_id"]
    cloudinary.api.delete_resources_by_asset_ids([asset_id])

    restored = cloudinary.api.restore_by_asset_ids([asset_id])
    assert restored[asset_id]["bytes"] == len(two) and restored[asset_id]["public_id"] == first["public_id"]
    cloudinary.api.delete_resources_by_asset_ids([asset_id])
    picked = cloudinary.api.restore_by_asset_ids([asset_id], versions=[first["version_id"]])
    assert picked[asset_id]["bytes"] == len(one)
    assert second["version_id"] in {v["version_id"] for v in versions(first["public_id"])}

    bogus = secrets.token_hex(16)
    failed = cloudinary.api.restore_by_asset_ids([bogus])[bogus]
    assert (failed["error"], failed["reason"]) == ("no_backup", "asset_not_found") and bogus in failed["message"]


def test_delete_backed_up_assets_is_irreversible(sdk: ServerProcess) -> None:
    public_id = uid("purge")
    one, two = png(salt=b"purge-1"), png(salt=b"purge-22")
    first = cloudinary.uploader.upload(one, public_id=public_id)
    second = cloudinary.uploader.upload(two, public_id=public_id)
    asset_id = first["asset_id"]
    url_first = cloudinary.utils.download_backedup_asset(asset_id, first["version_id"])
    assert fetch(url_first)[2] == one

    result = cloudinary.api.delete_backed_up_assets(asset_id, [first["version_id"]])
    assert result["asset_id"] == asset_id
    assert result["deleted_version_ids"] == [first["version_id"]]
    assert not result.get("failures")
    assert [v["version_id"] for v in versions(public_id)] == [second["version_id"]]
    assert fetch(url_first)[0] == 404  # a URL signed before the deletion no longer works
    assert download(asset_id, second["version_id"])[2] == two
    restore = cloudinary.api.restore([public_id], versions=[first["version_id"]])
    assert restore[public_id]["error"] == "failed" and restore[public_id]["reason"] == "version_not_found"

    # The current version of a live asset is refused (reported, not raised); unknown ids too.
    bogus = secrets.token_hex(16)
    refused = cloudinary.api.delete_backed_up_assets(asset_id, [second["version_id"], bogus])
    assert refused["deleted_version_ids"] == []
    assert {f["version_id"] for f in refused["failures"]} == {second["version_id"], bogus}
    assert download(asset_id, second["version_id"])[2] == two


def test_download_backedup_asset_url_and_range(sdk: ServerProcess) -> None:
    data = png(salt=b"range") + bytes(range(256)) * 40
    result = cloudinary.uploader.upload(data, public_id=uid("dl") + "name")
    url = cloudinary.utils.download_backedup_asset(result["asset_id"], result["version_id"])
    assert url.startswith(f"{sdk.base_url}/v1_1/{CLOUD}/download_backup?")

    status, headers, body = fetch(url)
    assert status == 200 and body == data
    assert headers["Content-Type"] == "image/png"
    assert "attachment" in headers["Content-Disposition"]

    status, headers, body = fetch(url, {"Range": "bytes=100-1099"})
    assert status == 206 and body == data[100:1100]
    assert headers["Content-Range"] == f"bytes 100-1099/{len(data)}"
    status, _, body = fetch(url, {"Range": "bytes=-50"})
    assert status == 206 and body == data[-50:]

    # Tampered or stale URLs are refused.
    assert fetch(url.replace("signature=", "signature=0"))[0] == 401
    stale = cloudinary.utils.download_backedup_asset(result["asset_id"], result["version_id"], timestamp=1700000000)
    assert fetch(stale)[0] == 400
    assert download(result["asset_id"], secrets.token_hex(16))[0] == 404


# --- destroy, rename, metadata-only changes -------------------------------------------------


def test_destroy(sdk: ServerProcess) -> None:
    public_id = uid()
    cloudinary.uploader.upload(png(salt=b"destroy"), public_id=public_id)
    assert cloudinary.uploader.destroy(public_id)["result"] == "ok"
    assert cloudinary.uploader.destroy(public_id)["result"] == "not found"
    assert cloudinary.uploader.destroy(uid())["result"] == "not found"
    raw = cloudinary.uploader.upload(b"raw bytes", resource_type="raw", public_id=uid())
    assert cloudinary.uploader.destroy(raw["public_id"])["result"] == "not found"  # wrong resource_type
    assert cloudinary.uploader.destroy(raw["public_id"], resource_type="raw")["result"] == "ok"


def test_rename(sdk: ServerProcess) -> None:
    source, target = uid("rename"), uid("rename")
    up = cloudinary.uploader.upload(png(salt=b"rename"), public_id=source)
    renamed = cloudinary.uploader.rename(source, target)
    assert renamed["public_id"] == target and renamed["asset_id"] == up["asset_id"]
    assert [v["version_id"] for v in versions(target)] == [up["version_id"]]  # no new version
    with pytest.raises(cloudinary.exceptions.NotFound):
        cloudinary.api.resource(source)

    # Onto a live id without overwrite: refused.
    live = uid("rename")
    cloudinary.uploader.upload(png(salt=b"live"), public_id=live)
    with pytest.raises(cloudinary.exceptions.BadRequest):
        cloudinary.uploader.rename(target, live)
    with pytest.raises(cloudinary.exceptions.BadRequest):
        cloudinary.uploader.rename(target, live, overwrite=False)
    assert cloudinary.api.resource(target)["asset_id"] == up["asset_id"]

    # Onto a live id whose history has no backup: allowed with overwrite.
    unbacked = uid("rename")
    cloudinary.uploader.upload(png(salt=b"unbacked"), public_id=unbacked, backup=False)
    moved = cloudinary.uploader.rename(target, unbacked, overwrite=True)
    assert moved["asset_id"] == up["asset_id"]
    assert cloudinary.api.resource(unbacked)["asset_id"] == up["asset_id"]

    # Onto a live id with backed-up versions: allowed with overwrite; its history is detached
    # from the name and stays reachable by its asset_id (docs/design.md).
    backed = uid("rename")
    kept = cloudinary.uploader.upload(png(salt=b"backed"), public_id=backed)
    moved = cloudinary.uploader.rename(unbacked, backed, overwrite=True)
    assert moved["asset_id"] == up["asset_id"]
    assert cloudinary.api.resource(backed)["asset_id"] == up["asset_id"]
    detached = cloudinary.api.resource_by_asset_id(kept["asset_id"], versions=True)
    assert detached["placeholder"] is True and detached["versions"][0]["restorable"] is True
    assert download(kept["asset_id"], kept["version_id"])[2] == png(salt=b"backed")

    # Onto a reserved (deleted, backed-up) id: refused without overwrite, allowed with it.
    reserved = uid("rename")
    cloudinary.uploader.upload(png(salt=b"reserved"), public_id=reserved)
    cloudinary.uploader.destroy(reserved)
    with pytest.raises(cloudinary.exceptions.BadRequest):
        cloudinary.uploader.rename(backed, reserved)
    assert cloudinary.api.resource(reserved)["placeholder"] is True
    assert cloudinary.uploader.rename(backed, reserved, overwrite=True)["asset_id"] == up["asset_id"]
    assert cloudinary.api.resource(reserved)["asset_id"] == up["asset_id"]

    with pytest.raises(cloudinary.exceptions.NotFound):
        cloudinary.uploader.rename(uid("rename"), uid("rename"))


def test_metadata_only_calls_never_create_versions(sdk: ServerProcess) -> None:
    public_id = uid("meta")
    up = cloudinary.uploader.upload(png(salt=b"meta"), public_id=public_id, tags=["a"])
    before = versions(public_id)

    explicit = cloudinary.uploader.explicit(public_id, type="upload", tags=["z"], context={"k": "v"})
    assert explicit["tags"] == ["z"]
    assert cloudinary.uploader.add_tag("added", [public_id])["public_ids"] == [public_id]
    updated = cloudinary.api.update(public_id, tags=["x", "y"], context={"alt": "hi"})
    assert updated["tags"] == ["x", "y"]
    cloudinary.uploader.add_context({"caption": "c"}, [public_id])
    cloudinary.uploader.remove_tag("x", [public_id])

    after = cloudinary.api.resource(public_id, versions=True)
    assert after["versions"] == before
    assert after["version_id"] == up["version_id"] and after["version"] == up["version"]
    assert after["tags"] == ["y"]
    assert after["context"] == {"custom": {"alt": "hi", "caption": "c"}}

    with pytest.raises(cloudinary.exceptions.NotFound):
        cloudinary.uploader.explicit(uid("meta"), type="upload", tags=["z"])


# --- authentication -------------------------------------------------------------------------


def test_other_environment_credentials_are_refused(sdk: ServerProcess) -> None:
    other_key, other_secret = "otherkey789", "othersecret012"
    if "other\t" not in cli("cloud", "list", data_dir=sdk.data_dir).stdout:
        cli("cloud", "create", "other", "--api-key", other_key, "--api-secret", other_secret, data_dir=sdk.data_dir)

    # The other environment works with its own credentials.
    configure_sdk(sdk.base_url, "other", other_key, other_secret)
    assert cloudinary.api.ping() == {"status": "ok"}
    mine = cloudinary.uploader.upload(png(salt=b"other-env"), public_id=uid())

    # ...but its credentials do not open "demo", for the Admin API, uploads or downloads.
    configure_sdk(sdk.base_url, CLOUD, other_key, other_secret)
    with pytest.raises(cloudinary.exceptions.AuthorizationRequired):
        cloudinary.api.ping()
    with pytest.raises(cloudinary.exceptions.AuthorizationRequired):
        cloudinary.api.resources()
    with pytest.raises(cloudinary.exceptions.AuthorizationRequired):
        cloudinary.uploader.upload(png(), public_id=uid())
    assert fetch(cloudinary.utils.download_backedup_asset(mine["asset_id"], mine["version_id"]))[0] == 401

    # demo's credentials do not open "other", and a wrong secret is refused too.
    configure_sdk(sdk.base_url, "other", API_KEY, API_SECRET)
    with pytest.raises(cloudinary.exceptions.AuthorizationRequired):
        cloudinary.api.resource(mine["public_id"])
    configure_sdk(sdk.base_url, CLOUD, API_KEY, "not-the-secret")
    with pytest.raises(cloudinary.exceptions.AuthorizationRequired):
        cloudinary.uploader.upload(png(), public_id=uid())
    with pytest.raises(cloudinary.exceptions.AuthorizationRequired):
        cloudinary.api.ping()


# --- restart ----------------------------------------------------------------------------------


def test_graceful_restart_keeps_history(sdk: ServerProcess) -> None:
    public_id = uid("restart")
    one, two = png(salt=b"before-restart"), png(salt=b"before-restart-2")
    first = cloudinary.uploader.upload(one, public_id=public_id)
    second = cloudinary.uploader.upload(two, public_id=public_id)
    cloudinary.uploader.destroy(public_id)
    old_pid = sdk.pid

    sdk.restart()  # SIGTERM, then a new process on the same data dir (and a new port)
    assert sdk.pid != old_pid
    assert sdk.last_returncode == 0, f"SIGTERM should shut down cleanly; log:\n{sdk.log_tail()}"
    assert cloudinary.api.ping() == {"status": "ok"}
    placeholder = cloudinary.api.resource(public_id, versions=True)
    assert placeholder["placeholder"] is True
    assert [v["version_id"] for v in placeholder["versions"]] == [first["version_id"], second["version_id"]]
    assert download(first["asset_id"], first["version_id"])[2] == one
    assert cloudinary.api.restore([public_id])[public_id]["bytes"] == len(two)
