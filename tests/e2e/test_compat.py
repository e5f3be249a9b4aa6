"""Cloudinary behaviour the official SDKs' own tests expect (issue 9), through cloudinary 1.46.3.

etag is the MD5 of the original bytes, listings are newest first, tags are sorted and absent
when empty, Search results carry flat context and refuse what we do not support, an aborted
upload is one log line, and the calls media apps make beside uploads (listing by tag and
context, tags, fields, resource_types, usage, config, rate-limit headers, metadata fields).
"""

import hashlib
import io
import secrets
import socket
import time
from pathlib import Path
from typing import Any

import blake3
import cloudinary
import cloudinary.api
import cloudinary.exceptions
import cloudinary.uploader
import pytest

from tests.e2e.conftest import ServerProcess, running_server
from tests.e2e.test_sdk import png, uid


def ids_in(listing: dict[str, Any], wanted: list[str]) -> list[str]:
    return [r["public_id"] for r in listing["resources"] if r["public_id"] in wanted]


# --- 15: etag is the MD5 of the original bytes ------------------------------------------------


def test_etag_is_the_md5_of_the_bytes_and_blake3_is_exposed(sdk: ServerProcess) -> None:
    data = png(6, 5, salt=secrets.token_bytes(8))
    public_id = uid("etag")
    result = cloudinary.uploader.upload(data, public_id=public_id)
    assert result["etag"] == hashlib.md5(data).hexdigest()
    assert result["blake3"] == blake3.blake3(data).hexdigest()
    resource = cloudinary.api.resource(public_id)
    assert resource["etag"] == hashlib.md5(data).hexdigest()
    assert resource["blake3"] == blake3.blake3(data).hexdigest()
    listed = cloudinary.api.resources(prefix=public_id)["resources"]
    assert [r["etag"] for r in listed] == [hashlib.md5(data).hexdigest()]


def test_etag_of_a_chunked_upload_and_of_a_restored_version(sdk: ServerProcess, tmp_path: Path) -> None:
    first = secrets.token_bytes(6 * 1024 * 1024 + 123)
    path = tmp_path / "big.bin"
    path.write_bytes(first)
    public_id = uid("etag-large")
    result = cloudinary.uploader.upload_large(str(path), public_id=public_id, resource_type="raw", chunk_size=5 * 1024 * 1024)
    assert result["etag"] == hashlib.md5(first).hexdigest()
    second = b"second version"
    cloudinary.uploader.upload(io.BytesIO(second), public_id=public_id, resource_type="raw")
    assert cloudinary.api.resource(public_id, resource_type="raw")["etag"] == hashlib.md5(second).hexdigest()
    restored = cloudinary.api.restore([public_id], resource_type="raw", versions=[result["version_id"]])
    assert restored[public_id]["public_id"] == public_id
    assert cloudinary.api.resource(public_id, resource_type="raw")["etag"] == hashlib.md5(first).hexdigest()


# --- 14: listing order --------------------------------------------------------------------------


def test_resources_list_newest_first_by_default_and_by_public_id_with_a_prefix(sdk: ServerProcess) -> None:
    folder = uid("order")
    # Created in the order a, c, b: newest first is b, c, a; by public_id it is a, b, c.
    names = [f"{folder}/{n}" for n in ("a", "c", "b")]
    for name in names:
        cloudinary.uploader.upload(io.BytesIO(name.encode()), public_id=name, resource_type="raw")
        time.sleep(0.01)
    a, c, b = names
    everything = cloudinary.api.resources(resource_type="raw", max_results=500)
    assert ids_in(everything, names) == [b, c, a]
    assert ids_in(cloudinary.api.resources(resource_type="raw", max_results=500, direction="desc"), names) == [b, c, a]
    assert ids_in(cloudinary.api.resources(resource_type="raw", max_results=500, direction="asc"), names) == [a, c, b]
    assert ids_in(cloudinary.api.resources(resource_type="raw", max_results=500, direction=1), names) == [a, c, b]
    assert ids_in(cloudinary.api.resources(resource_type="raw", max_results=500, direction=-1), names) == [b, c, a]
    assert ids_in(cloudinary.api.resources(resource_type="raw", prefix=folder), names) == [a, b, c]
    assert ids_in(cloudinary.api.resources(resource_type="raw", prefix=folder, direction="desc"), names) == [c, b, a]

    # Cursors page through the same order, one item at a time, without repeats or gaps.
    seen: list[str] = []
    cursor = None
    while True:
        page = cloudinary.api.resources(resource_type="raw", type="upload", prefix=folder, max_results=1, next_cursor=cursor)
        seen.extend(r["public_id"] for r in page["resources"])
        cursor = page.get("next_cursor")
        if not cursor:
            break
    assert seen == [a, b, c]


def test_an_invalid_direction_is_a_400(sdk: ServerProcess) -> None:
    with pytest.raises(cloudinary.exceptions.BadRequest, match="direction"):
        cloudinary.api.resources(direction="sideways")


# --- 19 and 20: tags and context ------------------------------------------------------------------


def test_tags_come_back_sorted_and_are_absent_when_there_are_none(sdk: ServerProcess) -> None:
    tagged, bare = uid("tags"), uid("tags")
    result = cloudinary.uploader.upload(png(salt=b"t"), public_id=tagged, tags=["zebra", "apple", "mango"])
    assert result["tags"] == ["apple", "mango", "zebra"]
    assert cloudinary.api.resource(tagged)["tags"] == ["apple", "mango", "zebra"]
    cloudinary.uploader.upload(png(salt=b"u"), public_id=bare)
    assert "tags" not in cloudinary.api.resource(bare)
    listed = {r["public_id"]: r for r in cloudinary.api.resources(prefix=tagged.split("/")[0], max_results=500)["resources"]}
    assert listed[tagged]["tags"] == ["apple", "mango", "zebra"]
    assert "tags" not in listed[bare]


def test_search_results_carry_flat_context_and_the_admin_resource_keeps_custom(sdk: ServerProcess) -> None:
    public_id = uid("ctx")
    cloudinary.uploader.upload(png(salt=b"ctx"), public_id=public_id, context={"alt": "hello", "caption": "x"})
    assert cloudinary.api.resource(public_id)["context"] == {"custom": {"alt": "hello", "caption": "x"}}
    found = cloudinary.Search().expression(f"public_id={public_id}").with_field("context").execute()
    assert found["resources"][0]["context"] == {"alt": "hello", "caption": "x"}


# --- 11: Search API features we do not support are a clear 400 ----------------------------------


@pytest.mark.parametrize(
    ("build", "word"),
    [
        (lambda s: s.aggregate("format"), "aggregate"),
        (lambda s: s.with_field("image_analysis"), "with_field"),
        (lambda s: s.with_field("nonsense"), "with_field"),
        (lambda s: s.fields("nonsense"), "fields"),
        (lambda s: s.sort_by("width", "desc"), "sort_by"),
        (lambda s: s.sort_by("created_at", "sideways"), "sort_by"),
        (lambda s: s.next_cursor("not-a-cursor!"), "next_cursor"),
    ],
)
def test_unsupported_search_features_are_a_400(sdk: ServerProcess, build: Any, word: str) -> None:
    with pytest.raises(cloudinary.exceptions.BadRequest, match=word):
        build(cloudinary.Search().expression("resource_type=image")).execute()


def test_supported_search_fields_still_work(sdk: ServerProcess) -> None:
    public_id = uid("searchok")
    cloudinary.uploader.upload(png(salt=b"ok"), public_id=public_id, tags=["k"])
    found = (
        cloudinary.Search().expression(f"public_id={public_id}").with_field("tags").with_field("context")
        .with_field("metadata").sort_by("public_id", "asc").max_results(5).execute()
    )
    assert [r["public_id"] for r in found["resources"]] == [public_id]
    assert "aggregations" not in found


# --- 21: an aborted upload is one info line ----------------------------------------------------


def test_an_aborted_upload_is_one_info_line_not_a_traceback(fresh_server: ServerProcess) -> None:
    boundary = "xxBOUNDARYxx"
    head = (
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.bin\"\r\n"
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    request = (
        f"POST /v1_1/demo/raw/upload HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {10_000_000}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", fresh_server.port)) as conn:
        conn.sendall(request + head + b"x" * 300_000)
        time.sleep(0.3)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not any(w in fresh_server.log_tail() for w in ("went away", "Traceback")):
        time.sleep(0.05)
    time.sleep(0.2)
    log = fresh_server.log_tail(20000)
    assert "Traceback" not in log and "unhandled error" not in log, log
    lines = [line for line in log.splitlines() if "went away" in line]
    assert len(lines) == 1 and " INFO " in lines[0] and "POST /v1_1/demo/raw/upload" in lines[0], log


# --- what media apps also call ---------------------------------------------------------------


def test_resources_by_tag_and_by_context_and_the_tags_list(sdk: ServerProcess) -> None:
    tag = f"lib_{secrets.token_hex(4)}"
    one, two, other = uid("lib"), uid("lib"), uid("lib")
    cloudinary.uploader.upload(png(salt=b"1"), public_id=one, tags=[tag, "common"], context={"shoot": "spring"})
    cloudinary.uploader.upload(png(salt=b"2"), public_id=two, tags=[tag], context={"shoot": "autumn"})
    cloudinary.uploader.upload(png(salt=b"3"), public_id=other, tags=["unrelated"])
    by_tag = cloudinary.api.resources_by_tag(tag)
    assert [r["public_id"] for r in by_tag["resources"]] == [two, one]  # newest first
    assert [r["public_id"] for r in cloudinary.api.resources_by_tag(tag, direction="asc")["resources"]] == [one, two]
    first = cloudinary.api.resources_by_tag(tag, max_results=1)
    assert len(first["resources"]) == 1 and first["next_cursor"]
    rest = cloudinary.api.resources_by_tag(tag, max_results=1, next_cursor=first["next_cursor"])
    assert [r["public_id"] for r in first["resources"] + rest["resources"]] == [two, one]
    assert cloudinary.api.resources_by_tag(f"none_{tag}")["resources"] == []

    shot = cloudinary.api.resources_by_context("shoot")
    assert {one, two} <= {r["public_id"] for r in shot["resources"]}
    spring = cloudinary.api.resources_by_context("shoot", "spring")
    assert [r["public_id"] for r in spring["resources"]] == [one]

    tags = cloudinary.api.tags(max_results=500)["tags"]
    assert tag in tags and "common" in tags and tags == sorted(tags)
    assert cloudinary.api.tags(prefix=tag[:6])["tags"] == [t for t in tags if t.startswith(tag[:6])]


def test_fields_selects_the_response_keys(sdk: ServerProcess) -> None:
    public_id = uid("fields")
    cloudinary.uploader.upload(png(salt=b"f"), public_id=public_id, tags=["ft"])
    listed = cloudinary.api.resources(prefix=public_id, fields=["tags", "bytes"])["resources"][0]
    assert set(listed) == {"public_id", "asset_id", "asset_folder", "created_at", "display_name", "format",
                           "resource_type", "type", "tags", "bytes"}
    found = cloudinary.Search().expression(f"public_id={public_id}").fields(["tags"]).execute()["resources"][0]
    assert found["tags"] == ["ft"] and "bytes" not in found and found["public_id"] == public_id
    by_tag = cloudinary.api.resources_by_tag("ft", fields="etag")["resources"]
    assert "etag" in by_tag[0] and "bytes" not in by_tag[0]


def test_resource_types_config_and_usage(sdk: ServerProcess) -> None:
    assert set(cloudinary.api.resource_types()["resource_types"]) == {"image", "raw", "video"}
    config = cloudinary.api.config()
    assert config["cloud_name"] == "demo"
    assert "folder_mode" in cloudinary.api.config(settings=True)["settings"]
    before = cloudinary.api.usage()
    data = secrets.token_bytes(10_000)
    public_id = uid("usage")
    cloudinary.uploader.upload(io.BytesIO(data), public_id=public_id, resource_type="raw", backup=True)
    cloudinary.uploader.upload(io.BytesIO(data[::-1]), public_id=public_id, resource_type="raw", backup=True)
    after = cloudinary.api.usage()
    assert after["resources"] == before["resources"] + 1
    # The current original counts once, and backup storage counts every revision (both).
    assert after["storage"]["usage"] - before["storage"]["usage"] == 3 * len(data)
    assert after["storage"]["backup_usage"] - before["storage"]["backup_usage"] == 2 * len(data)
    assert after["storage"]["original_usage"] - before["storage"]["original_usage"] == len(data)
    assert after["storage"]["credits_usage"] >= 0 and "last_updated" in after
    assert isinstance(after["requests"], int)


def test_admin_responses_carry_rate_limit_headers_and_420_when_exceeded(tmp_path: Path) -> None:
    with running_server(tmp_path, env={"VERSIONSTORE_ADMIN_RATE_LIMIT": "3"}) as server:
        from tests.e2e.conftest import configure_sdk

        configure_sdk(server.base_url)
        first = cloudinary.api.resources()
        assert first.rate_limit_allowed == 3 and first.rate_limit_remaining == 2
        assert first.rate_limit_reset_at is not None
        cloudinary.api.resources()
        third = cloudinary.api.resources()
        assert third.rate_limit_remaining == 0
        with pytest.raises(cloudinary.exceptions.RateLimited):
            cloudinary.api.resources()
        # Uploads are not Admin API calls: they are not counted.
        cloudinary.uploader.upload(png(), public_id="rl/one")
        cloudinary.reset_config()


def test_metadata_field_definitions_and_validated_uploads(sdk: ServerProcess) -> None:
    suffix = secrets.token_hex(3)
    color = f"color_{suffix}"
    count = f"count_{suffix}"
    created = cloudinary.api.add_metadata_field({
        "type": "enum", "external_id": color, "label": "Color",
        "datasource": {"values": [{"external_id": "red", "value": "Red"}, {"external_id": "blue", "value": "Blue"}]},
    })
    assert created["external_id"] == color and created["type"] == "enum"
    assert [v["external_id"] for v in created["datasource"]["values"]] == ["red", "blue"]
    cloudinary.api.add_metadata_field({"type": "integer", "external_id": count, "label": "Count",
                                       "validation": {"type": "greater_than", "value": 0}})
    with pytest.raises(cloudinary.exceptions.BadRequest):
        cloudinary.api.add_metadata_field({"type": "string", "external_id": color, "label": "again"})
    listed = cloudinary.api.list_metadata_fields()["metadata_fields"]
    assert {color, count} <= {f["external_id"] for f in listed}
    assert cloudinary.api.metadata_field_by_field_id(color)["label"] == "Color"
    assert cloudinary.api.update_metadata_field(color, {"label": "Colour"})["label"] == "Colour"

    ok = cloudinary.uploader.upload(png(salt=b"m"), public_id=uid("meta"), metadata={color: "red", count: 3})
    assert ok["metadata"] == {color: "red", count: "3"} or ok["metadata"] == {color: "red", count: 3}
    for bad in ({f"unknown_{suffix}": "x"}, {color: "green"}, {count: "many"}, {count: -1}):
        with pytest.raises(cloudinary.exceptions.BadRequest):
            cloudinary.uploader.upload(png(salt=b"n"), public_id=uid("meta"), metadata=bad)

    updated = cloudinary.api.update_metadata_field_datasource(color, [{"external_id": "green", "value": "Green"}])
    assert "green" in [v["external_id"] for v in updated["values"]]
    cloudinary.uploader.upload(png(salt=b"g"), public_id=uid("meta"), metadata={color: "green"})
    after_delete = cloudinary.api.delete_datasource_entries(color, ["red"])
    assert "red" not in [v["external_id"] for v in after_delete["values"] if v.get("state", "active") == "active"]
    with pytest.raises(cloudinary.exceptions.BadRequest):
        cloudinary.uploader.upload(png(salt=b"r"), public_id=uid("meta"), metadata={color: "red"})
    restored = cloudinary.api.restore_metadata_field_datasource(color, ["red"])
    assert "red" in [v["external_id"] for v in restored["values"] if v.get("state", "active") == "active"]

    assert cloudinary.api.delete_metadata_field(count) == {"message": "ok"}
    with pytest.raises(cloudinary.exceptions.NotFound):
        cloudinary.api.metadata_field_by_field_id(count)
