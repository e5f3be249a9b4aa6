"""A signature works only for the purpose it was made for; empty values count as absent.

Regression tests for issue 8 items 2, 5 and 15 (download_backup's key check): a download link's
query replayed on the Upload API, empty unsigned values changing behaviour.
"""

import json
from typing import Any

import aiohttp
import cloudinary.utils
import pytest
from aiohttp.test_utils import TestClient

from tests.conftest import CLOUD, Api, sign

PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 64


async def _post_form(client: TestClient, path: str, fields: dict[str, Any], file: bytes | None = None) -> tuple[int, dict[str, Any]]:
    form = aiohttp.FormData()
    for key, value in fields.items():
        form.add_field(key, str(value))
    if file is not None:
        form.add_field("file", file, filename="x.bin", content_type="application/octet-stream")
    response = await client.post(f"/v1_1/{CLOUD}/{path}", data=form)
    return response.status, await response.json()


async def test_download_link_is_not_an_upload_credential(client: TestClient, api: Api) -> None:
    first = await api.upload(b"victim", public_id="docs/victim")
    link = sign({"asset_id": first["asset_id"], "version_id": first["version_id"]})
    status, body = await _post_form(client, "image/upload", link, file=b"attacker")
    assert status == 400, body
    assert "asset_id" in body["error"]["message"]
    for path in ("image/destroy", "image/rename", "image/explicit", "image/tags", "image/context", "image/metadata"):
        status, body = await _post_form(client, path, link)
        assert status == 400, (path, body)
    listing = await api.admin("GET", "resources/image")
    assert [r["public_id"] for r in listing["resources"]] == ["docs/victim"]


async def test_each_signed_endpoint_refuses_another_purposes_parameters(client: TestClient, api: Api) -> None:
    await api.upload(b"one", public_id="docs/one")
    # An upload signature that covers upload-only parameters is no destroy signature.
    status, body = await _post_form(client, "image/destroy", sign({"public_id": "docs/one", "backup": "1"}))
    assert (status, body["error"]["message"]) == (400, "Invalid parameter backup for destroy: it belongs to another request")
    # A rename signature is no upload signature.
    fields = sign({"public_id": "docs/one", "from_public_id": "docs/one", "to_public_id": "docs/two"})
    status, body = await _post_form(client, "image/upload", fields, file=b"x")
    assert status == 400 and "from_public_id" in body["error"]["message"], body
    # A tags signature is no context signature.
    status, body = await _post_form(client, "image/context", sign({"public_ids": "docs/one", "tag": "t", "command": "add"}))
    assert status == 400 and "tag" in body["error"]["message"], body
    assert (await api.admin("GET", "resources/image/upload/docs/one"))["bytes"] == 3


async def test_download_backup_accepts_only_its_own_parameters(client: TestClient, api: Api) -> None:
    first = await api.upload(b"keep", public_id="docs/keep")
    ids = {"asset_id": first["asset_id"], "version_id": first["version_id"]}
    good = await client.get(f"/v1_1/{CLOUD}/download_backup", params=sign(ids))
    assert good.status == 200 and await good.read() == b"keep"
    for extra in ({"public_id": "docs/keep"}, {"folder": "x"}, {"unknown_thing": "1"}):
        response = await client.get(f"/v1_1/{CLOUD}/download_backup", params=sign({**ids, **extra}))
        body = await response.json()
        assert response.status == 400 and next(iter(extra)) in body["error"]["message"], body


async def test_download_backup_checks_the_key_like_every_signed_endpoint(client: TestClient, api: Api) -> None:
    first = await api.upload(b"keep", public_id="docs/k2")
    params = sign({"asset_id": first["asset_id"], "version_id": first["version_id"]})
    for path, method in (("download_backup", "GET"), ("image/destroy", "POST")):
        no_key = {k: v for k, v in params.items() if k != "api_key"}
        response = await client.request(method, f"/v1_1/{CLOUD}/{path}", params=no_key)
        assert (response.status, (await response.json())["error"]["message"]) == (401, "Must supply api_key"), path
    wrong = {**params, "api_key": "key999"}
    response = await client.get(f"/v1_1/{CLOUD}/download_backup", params=wrong)
    assert (response.status, (await response.json())["error"]["message"]) == (401, "Invalid api_key key999")


def test_every_parameter_the_sdks_send_is_accepted_for_its_purpose() -> None:
    from versionstore import purposes

    upload = {name: "1" for name in cloudinary.utils.upload_params}
    assert purposes.foreign_parameter("upload", upload) is None
    assert purposes.foreign_parameter("explicit", {**upload, "public_id": "a"}) is None
    node_upload_extras = {"access_mode", "clear_invalid", "auto_chaptering", "visual_search", "background_removal"}
    assert purposes.foreign_parameter("upload", dict.fromkeys(node_upload_extras, "1")) is None
    sdk_sets = {
        "destroy": {"type", "invalidate", "public_id", "notification_url", "batch_id"},
        "rename": {"type", "overwrite", "invalidate", "from_public_id", "to_public_id", "to_type", "context",
                   "metadata", "notification_url", "batch_id"},
        "tags": {"tag", "public_ids", "command", "type", "notification_url", "batch_id"},
        "context": {"context", "public_ids", "command", "type", "notification_url", "batch_id"},
        "metadata": {"metadata", "public_ids", "type", "clear_invalid", "notification_url", "batch_id"},
        "download_backup": {"asset_id", "version_id"},
    }
    for purpose, names in sdk_sets.items():
        params = {name: "1" for name in names | {"timestamp", "signature", "api_key"}}
        assert purposes.foreign_parameter(purpose, params) is None, purpose


# --- empty values (issue 8 item 5) ------------------------------------------------------------


async def test_empty_unsigned_values_count_as_absent_in_every_encoding(client: TestClient, api: Api) -> None:
    await api.upload(b"v1", public_id="docs/e")
    signed = sign({"public_id": "docs/e"})
    data_uri = "data:application/octet-stream;base64,djI="  # b"v2"
    # multipart: fields after the signed ones
    status, body = await _post_form(client, "image/upload", {**signed, "backup": "", "overwrite": ""}, file=b"v2")
    assert status == 200, body
    assert body["backup"] is True and "existing" not in body, body
    # form-urlencoded, empty list too
    response = await client.post(
        f"/v1_1/{CLOUD}/image/upload",
        data=[*sign({"public_id": "docs/e"}).items(), ("file", data_uri), ("backup", ""), ("overwrite", ""), ("tags[]", "")],
    )
    body = await response.json()
    assert response.status == 200 and body["backup"] is True and "existing" not in body, body
    # JSON: "" and [] both mean absent
    await api.signed("image/explicit", public_id="docs/e", tags="keep")
    v3 = "data:application/octet-stream;base64,djM="
    payload = {**sign({"public_id": "docs/e"}), "file": v3, "backup": "", "overwrite": "", "tags": []}
    response = await client.post(f"/v1_1/{CLOUD}/image/upload", data=json.dumps(payload), headers={"Content-Type": "application/json"})
    body = await response.json()
    assert response.status == 200 and body["backup"] is True and "existing" not in body and body["tags"] == ["keep"], body
    # query string on a signed non-upload endpoint: an empty tags list changes nothing
    fields = sign({"public_id": "docs/e"})
    response = await client.post(f"/v1_1/{CLOUD}/image/explicit", params={"tags": ""}, data=fields)
    body = await response.json()
    assert response.status == 200 and body["tags"] == ["keep"], body


@pytest.mark.parametrize("value", ["", [], [""], None])
def test_blank_values_are_not_signed(value: object) -> None:
    from versionstore import signing
    from versionstore.params import drop_blank

    assert signing.string_to_sign({"a": "1", "b": value}) == "a=1"
    assert drop_blank({"a": "1", "b": value}) == {"a": "1"}
