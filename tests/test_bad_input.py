"""Bad input gets a Cloudinary-style error (`{"error": {"message": ...}}`, status 400/401/403/404)
and leaves everything stored exactly as it was: asset rows, versions, blob files under
`primary/` and `backup/`, and no leftovers in `spool/`.
"""

import asyncio
import base64
import hashlib
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import asdict
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from tests.conftest import API_KEY, API_SECRET, BASIC_HEADERS, CLOUD, Api
from versionstore import queries
from versionstore.config import Config
from versionstore.http.app import create_app
from versionstore.http.keys import META

OTHER_CLOUD, OTHER_KEY, OTHER_SECRET = "other", "okey789", "osecret000"


# --- helpers --------------------------------------------------------------------------------


def sign_params(params: dict[str, Any], secret: str = API_SECRET, api_key: str = API_KEY, timestamp: int | None = None) -> dict[str, str]:
    params = {"timestamp": str(timestamp if timestamp is not None else int(time.time())), **params}
    pairs = sorted(f"{k}={v}".replace("&", "%26") for k, v in params.items() if v not in (None, "") and k != "file")
    return {**params, "signature": hashlib.sha1(("&".join(pairs) + secret).encode()).hexdigest(), "api_key": api_key}


def multipart(fields: dict[str, str], file: bytes | None = b"data", boundary: str = "b0undary", filename: str = "f.bin") -> bytes:
    out = bytearray()
    for name, value in fields.items():
        out += f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode() + value.encode() + b"\r\n"
    if file is not None:
        out += f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'.encode()
        out += b"Content-Type: application/octet-stream\r\n\r\n" + file + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return bytes(out)


def mp_headers(boundary: str = "b0undary") -> dict[str, str]:
    return {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def basic(key: str, secret: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{key}:{secret}".encode()).decode()}


def download_query(asset_id: str, version_id: str, timestamp: int | None = None, secret: str = API_SECRET, api_key: str = API_KEY) -> str:
    params = sign_params({"asset_id": asset_id, "version_id": version_id}, secret, api_key, timestamp)
    return urlencode(params)


async def expect_error(response: aiohttp.ClientResponse, status: int, message: str | None = None, prefix: str | None = None) -> str:
    assert response.headers["Content-Type"].startswith("application/json"), (response.status, await response.text())
    body = await response.json()
    assert response.status == status, body
    assert set(body) == {"error"} and set(body["error"]) == {"message"}, body
    text = body["error"]["message"]
    assert isinstance(text, str) and text
    if message is not None:
        assert text == message
    if prefix is not None:
        assert text.startswith(prefix), text
    return text


def _files(data_dir: Path, *subdirs: str) -> set[str]:
    found = set()
    for sub in subdirs:
        root = data_dir / sub
        if root.exists():
            found |= {str(p.relative_to(data_dir)) for p in root.rglob("*") if p.is_file()}
    return found


class Snapshot:
    """Everything a bad request must not change."""

    def __init__(self, client: TestClient, data_dir: Path, cloud: str = CLOUD) -> None:
        self.client, self.data_dir, self.cloud = client, data_dir, cloud

    async def take(self) -> dict[str, Any]:
        meta = self.client.app[META]
        state = {}
        for cloud in await meta.list_clouds():
            assets = await meta.find_assets(cloud.name, queries.everything(10_000))
            state[cloud.name] = [(asdict(a), [asdict(v) for v in await meta.versions(a.pk or 0)]) for a in assets]
        spool = _files(self.data_dir, "spool")
        return {"meta": state, "blobs": _files(self.data_dir, "primary", "backup"), "spool": spool}

    async def __aenter__(self) -> "Snapshot":
        self.before = await self.take()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if exc[0] is not None:
            return
        await asyncio.sleep(0)
        after = await self.take()
        assert not list((self.data_dir / "spool").glob("*.part")), after["spool"]
        assert after["spool"] == self.before["spool"], "files left in spool/"
        assert after["blobs"] == self.before["blobs"], "blob files changed"
        assert after["meta"] == self.before["meta"], "stored metadata changed"


@pytest.fixture
async def seeded(api: Api) -> dict[str, Any]:
    """docs/keep with two backed-up versions, and a deleted (placeholder) docs/gone."""
    first = await api.upload(b"keep-1", public_id="docs/keep")
    second = await api.upload(b"keep-22", public_id="docs/keep")
    gone = await api.upload(b"gone", public_id="docs/gone")
    await api.admin("DELETE", "resources/image/upload", json={"public_ids": ["docs/gone"]})
    return {"first": first, "second": second, "gone": gone, "asset_id": first["asset_id"]}


@pytest.fixture
def untouched(client: TestClient, config: Config, seeded: dict[str, Any]) -> Snapshot:
    return Snapshot(client, config.data_dir)


async def post_upload(client: TestClient, body: bytes | Any, headers: dict[str, str], rt: str = "image") -> aiohttp.ClientResponse:
    return await client.post(f"/v1_1/{CLOUD}/{rt}/upload", data=body, headers=headers)


# --- malformed multipart and missing file ---------------------------------------------------


async def test_truncated_multipart_body(client: TestClient, untouched: Snapshot) -> None:
    body = multipart(sign_params({"public_id": "docs/trunc"}), file=secrets.token_bytes(4000))
    async with untouched:
        for cut in (len(body) - 30, len(body) // 2, 40):
            response = await post_upload(client, body[:cut], mp_headers())
            await expect_error(response, 400)


async def test_truncated_multipart_body_chunked(client: TestClient, untouched: Snapshot) -> None:
    """A chunked body that ends (clean terminal chunk) before the closing boundary."""
    body = multipart(sign_params({"public_id": "docs/trunc"}), file=secrets.token_bytes(4000))

    async def gen() -> AsyncIterator[bytes]:
        yield body[:2500]

    async with untouched:
        await expect_error(await post_upload(client, gen(), mp_headers()), 400)


async def test_multipart_with_wrong_boundary(client: TestClient, untouched: Snapshot) -> None:
    body = multipart(sign_params({"public_id": "docs/bb"}), boundary="realboundary")
    async with untouched:
        await expect_error(await post_upload(client, body, mp_headers("otherboundary")), 400)
        await expect_error(await post_upload(client, body, {"Content-Type": "multipart/form-data"}), 400)
        await expect_error(await post_upload(client, b"this is not multipart at all", mp_headers()), 400)
        await expect_error(await post_upload(client, b"", mp_headers()), 400)


async def test_multipart_part_without_headers_separator(client: TestClient, untouched: Snapshot) -> None:
    body = b'--b0undary\r\nContent-Disposition: form-data; name="public_id"docs/x\r\n--b0undary--\r\n'
    async with untouched:
        await expect_error(await post_upload(client, body, mp_headers()), 400)


async def test_malformed_multipart_on_admin_endpoints(client: TestClient, untouched: Snapshot) -> None:
    """Python <= 1.42.1 sends Admin POSTs as multipart: broken ones are 400s as well."""
    path = f"/v1_1/{CLOUD}/resources/image/upload/docs/keep"
    good = multipart({"tags": "x,y"}, file=None)
    async with untouched:
        for body, boundary in [
            (good[: len(good) // 2], "b0undary"),
            (good, "otherboundary"),
            (b'--b0undary\r\nContent-Disposition: form-data; name="tags"x\r\n--b0undary--\r\n', "b0undary"),
        ]:
            response = await client.post(path, data=body, headers={**BASIC_HEADERS, **mp_headers(boundary)})
            await expect_error(response, 400)


async def test_missing_file(client: TestClient, untouched: Snapshot) -> None:
    async with untouched:
        response = await post_upload(client, multipart(sign_params({"public_id": "docs/nofile"}), file=None), mp_headers())
        await expect_error(response, 400, "Missing required parameter - file")
        form = aiohttp.FormData(sign_params({"public_id": "docs/nofile"}))  # urlencoded, no file
        await expect_error(await post_upload(client, form, {}), 400, "Missing required parameter - file")


async def test_two_file_parts(client: TestClient, untouched: Snapshot) -> None:
    one = multipart(sign_params({"public_id": "docs/two"}), file=b"one")
    two = one.replace(
        b"--b0undary--\r\n", b'--b0undary\r\nContent-Disposition: form-data; name="file"; filename="g"\r\n\r\ntwo\r\n--b0undary--\r\n'
    )
    async with untouched:
        await expect_error(await post_upload(client, two, mp_headers()), 400, "More than one file part")


async def test_oversize_field(client: TestClient, untouched: Snapshot) -> None:
    fields = sign_params({"public_id": "docs/f", "context": "k=" + "v" * 70_000})
    async with untouched:
        await expect_error(await post_upload(client, multipart(fields), mp_headers()), 400)


async def test_bad_file_values(client: TestClient, untouched: Snapshot) -> None:
    port = client.server.port
    async with untouched:
        for value, prefix in [
            ("data:text/plain;base64,!!!notbase64!!!", "Invalid data URI"),
            ("data:text/plain,plain", "Invalid data URI"),
            ("/etc/passwd", "Invalid file URL"),
            ("file:///etc/passwd", "Invalid file URL"),
            (f"http://127.0.0.1:{port}/does-not-exist", "Error in loading"),
            ("http://127.0.0.1:1/unreachable", "Error in loading"),
        ]:
            form = aiohttp.FormData(sign_params({"public_id": "docs/bad", "file": value}))
            await expect_error(await post_upload(client, form, {}), 400, prefix=prefix)


# --- signatures, timestamps, credentials ----------------------------------------------------


async def test_bad_signature(client: TestClient, untouched: Snapshot) -> None:
    fields = sign_params({"public_id": "docs/x"})
    fields["signature"] = "0" * 40
    async with untouched:
        text = await expect_error(await post_upload(client, multipart(fields), mp_headers()), 401, prefix="Invalid Signature 0000")
        assert f"String to sign - 'public_id=docs/x&timestamp={fields['timestamp']}'" in text
        # signed with the wrong secret
        wrong = sign_params({"public_id": "docs/x"}, secret="not-the-secret")
        await expect_error(await post_upload(client, multipart(wrong), mp_headers()), 401, prefix="Invalid Signature")
        # a parameter added after signing
        tampered = {**sign_params({"public_id": "docs/x"}), "overwrite": "1"}
        await expect_error(await post_upload(client, multipart(tampered), mp_headers()), 401, prefix="Invalid Signature")
        # the signature of another request replayed on the existing id
        replay = sign_params({"public_id": "docs/other"})
        replay["public_id"] = "docs/keep"
        await expect_error(await post_upload(client, multipart(replay), mp_headers()), 401, prefix="Invalid Signature")


async def test_bad_signature_on_other_upload_api_endpoints(client: TestClient, untouched: Snapshot) -> None:
    async with untouched:
        for endpoint, params in [
            ("destroy", {"public_id": "docs/keep"}),
            ("rename", {"from_public_id": "docs/keep", "to_public_id": "docs/new"}),
            ("explicit", {"public_id": "docs/keep", "tags": "x"}),
            ("tags", {"tag": "x", "public_ids": "docs/keep", "command": "add"}),
            ("context", {"context": "a=b", "public_ids": "docs/keep"}),
            ("metadata", {"metadata": "a=b", "public_ids": "docs/keep"}),
        ]:
            fields = sign_params(params)
            fields["signature"] = fields["signature"][::-1]
            response = await client.post(f"/v1_1/{CLOUD}/image/{endpoint}", data=multipart(fields, file=None), headers=mp_headers())
            await expect_error(response, 401, prefix="Invalid Signature")


async def test_stale_and_future_timestamps(client: TestClient, untouched: Snapshot) -> None:
    old = int(time.time()) - 3700
    async with untouched:
        response = await post_upload(client, multipart(sign_params({"public_id": "docs/x"}, timestamp=old)), mp_headers())
        await expect_error(response, 400, f"Stale request - reported time is {old} which is more than 1 hour ago")
        future = int(time.time()) + 3600
        response = await post_upload(client, multipart(sign_params({"public_id": "docs/x"}, timestamp=future)), mp_headers())
        await expect_error(response, 401, "Request timestamp expired")
        response = await post_upload(client, multipart(sign_params({"public_id": "docs/x"}, timestamp="soon")), mp_headers())  # type: ignore[arg-type]
        await expect_error(response, 400, "Invalid timestamp - soon")
        missing = sign_params({"public_id": "docs/x"})
        del missing["timestamp"]
        await expect_error(await post_upload(client, multipart(missing), mp_headers()), 400, "Missing required parameter - timestamp")
        missing = sign_params({"public_id": "docs/x"})
        del missing["signature"]
        await expect_error(await post_upload(client, multipart(missing), mp_headers()), 400, "Missing required parameter - signature")
        missing = sign_params({"public_id": "docs/x"})
        del missing["api_key"]
        await expect_error(await post_upload(client, multipart(missing), mp_headers()), 401, "Must supply api_key")


async def test_wrong_basic_credentials(client: TestClient, untouched: Snapshot) -> None:
    path = f"/v1_1/{CLOUD}/resources/image/upload/docs/keep"
    async with untouched:
        await expect_error(await client.get(path, headers=basic("key999", API_SECRET)), 401, prefix="Invalid api_key")
        await expect_error(await client.get(path, headers=basic(API_KEY, "wrong")), 401, "api_secret mismatch")
        await expect_error(await client.get(path), 401, "Must supply api_key")
        await expect_error(await client.get(path, headers={"Authorization": "Basic !!!notbase64"}), 401)
        no_colon = base64.b64encode(b"key123secret456").decode()
        await expect_error(await client.get(path, headers={"Authorization": f"Basic {no_colon}"}), 401)
        # mutating calls are refused too, and change nothing
        await expect_error(await client.post(path, json={"tags": "x"}, headers=basic(API_KEY, "wrong")), 401)
        await expect_error(
            await client.delete(
                f"/v1_1/{CLOUD}/resources/image/upload", json={"public_ids": ["docs/keep"]}, headers=basic("key999", API_SECRET)
            ),
            401,
        )
        await expect_error(
            await client.post(
                f"/v1_1/{CLOUD}/resources/image/upload/restore", json={"public_ids": ["docs/gone"]}, headers=basic(API_KEY, "")
            ),
            401,
        )
        # Basic auth on the upload API is checked as strictly
        form = multipart({"public_id": "docs/basic"})
        await expect_error(await post_upload(client, form, {**mp_headers(), **basic(API_KEY, "wrong")}), 401, "api_secret mismatch")


async def test_wrong_api_key_in_signed_params(client: TestClient, untouched: Snapshot) -> None:
    async with untouched:
        fields = sign_params({"public_id": "docs/x"}, api_key="key999")
        await expect_error(await post_upload(client, multipart(fields), mp_headers()), 401, "Invalid api_key key999")


async def test_other_environments_credentials(client: TestClient, untouched: Snapshot) -> None:
    await client.app[META].create_cloud(OTHER_CLOUD, OTHER_KEY, OTHER_SECRET, auto_backup=True)
    other_upload = multipart(sign_params({"public_id": "docs/o"}, OTHER_SECRET, OTHER_KEY))
    ok = await client.post(f"/v1_1/{OTHER_CLOUD}/image/upload", data=other_upload, headers=mp_headers())
    assert ok.status == 200, await ok.text()  # valid where they belong
    untouched.before = await untouched.take()
    async with untouched:
        path = f"/v1_1/{CLOUD}/resources/image/upload/docs/keep"
        await expect_error(await client.get(path, headers=basic(OTHER_KEY, OTHER_SECRET)), 401)
        await expect_error(await client.get(f"/v1_1/{CLOUD}/ping", headers=basic(OTHER_KEY, OTHER_SECRET)), 401)
        fields = sign_params({"public_id": "docs/o"}, OTHER_SECRET, OTHER_KEY)
        await expect_error(await post_upload(client, multipart(fields), mp_headers()), 401)
        # our credentials do not open the other environment either
        await expect_error(await client.get(f"/v1_1/{OTHER_CLOUD}/resources/image/upload/docs/o", headers=BASIC_HEADERS), 401)
        await expect_error(
            await client.post(
                f"/v1_1/{OTHER_CLOUD}/image/upload", data=multipart(sign_params({"public_id": "docs/p"})), headers=mp_headers()
            ),
            401,
        )
        # nor a download URL signed for the other environment
        query = download_query(
            untouched.before["meta"][CLOUD][0][0]["asset_id"],
            untouched.before["meta"][CLOUD][0][1][0]["version_id"],
            secret=OTHER_SECRET,
            api_key=OTHER_KEY,
        )
        await expect_error(await client.get(f"/v1_1/{CLOUD}/download_backup?{query}"), 401)


async def test_unknown_cloud_name(client: TestClient, untouched: Snapshot) -> None:
    async with untouched:
        await expect_error(await client.get("/v1_1/nosuchcloud/ping", headers=BASIC_HEADERS), 401, prefix="Invalid cloud_name")
        response = await client.post(
            "/v1_1/nosuchcloud/image/upload", data=multipart(sign_params({"public_id": "docs/x"})), headers=mp_headers()
        )
        await expect_error(response, 401, prefix="Invalid cloud_name")
        await expect_error(await client.get("/v1_1/nosuchcloud/resources/image/upload/docs/keep", headers=BASIC_HEADERS), 401)


# --- unknown ids ----------------------------------------------------------------------------


async def test_unknown_public_ids(client: TestClient, api: Api, untouched: Snapshot) -> None:
    async with untouched:
        await expect_error(
            await client.get(f"/v1_1/{CLOUD}/resources/image/upload/docs/nope", headers=BASIC_HEADERS),
            404,
            "Resource not found - docs/nope",
        )
        await expect_error(
            await client.get(f"/v1_1/{CLOUD}/resources/video/upload/docs/keep", headers=BASIC_HEADERS),
            404,
            "Resource not found - docs/keep",
        )
        await expect_error(await client.get(f"/v1_1/{CLOUD}/resources/image/private/docs/keep", headers=BASIC_HEADERS), 404)
        await expect_error(
            await client.post(f"/v1_1/{CLOUD}/resources/image/upload/docs/nope", json={"tags": "x"}, headers=BASIC_HEADERS),
            404,
            "Resource not found - docs/nope",
        )
        # a deleted (placeholder) asset cannot be updated or renamed
        await expect_error(
            await client.post(f"/v1_1/{CLOUD}/resources/image/upload/docs/gone", json={"tags": "x"}, headers=BASIC_HEADERS), 404
        )
        for endpoint, params, message in [
            ("rename", {"from_public_id": "docs/nope", "to_public_id": "docs/new"}, "Resource not found - docs/nope"),
            ("rename", {"from_public_id": "docs/gone", "to_public_id": "docs/new"}, "Resource not found - docs/gone"),
            ("explicit", {"public_id": "docs/nope", "type": "upload"}, "Resource not found - docs/nope"),
        ]:
            response = await client.post(
                f"/v1_1/{CLOUD}/image/{endpoint}", data=multipart(sign_params(params), file=None), headers=mp_headers()
            )
            await expect_error(response, 404, message)
        assert await api.signed("image/destroy", public_id="docs/nope") == {"result": "not found"}
        assert await api.signed("image/destroy", public_id="docs/gone") == {"result": "not found"}
        assert await api.signed("video/destroy", public_id="docs/keep") == {"result": "not found"}
        assert await api.signed("image/tags", tag="t", public_ids="docs/nope", command="add") == {"public_ids": []}
        body = await api.admin("DELETE", "resources/image/upload", json={"public_ids": ["docs/nope", "docs/gone"]})
        assert body["deleted"] == {"docs/nope": "not_found", "docs/gone": "not_found"}
        body = await api.admin("POST", "resources/image/upload/restore", json={"public_ids": ["docs/nope"]})
        assert codes(body) == {"docs/nope": ("no_backup", "asset_not_found")}


def codes(restore_body: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """(error, reason) of each failed restore item; each also carries a message."""
    assert all(item["message"] for item in restore_body.values())
    return {key: (item["error"], item["reason"]) for key, item in restore_body.items()}


async def test_unknown_asset_and_version_ids(client: TestClient, api: Api, seeded: dict[str, Any], untouched: Snapshot) -> None:
    unknown = "f" * 32
    asset_id = seeded["asset_id"]
    async with untouched:
        await expect_error(
            await client.get(f"/v1_1/{CLOUD}/resources/{unknown}", headers=BASIC_HEADERS), 404, f"Resource not found - {unknown}"
        )
        await expect_error(
            await client.delete(
                f"/v1_1/{CLOUD}/resources/backup/{unknown}", json={"version_ids": [seeded["first"]["version_id"]]}, headers=BASIC_HEADERS
            ),
            404,
            f"Resource not found - {unknown}",
        )
        await expect_error(
            await client.delete(f"/v1_1/{CLOUD}/resources/backup/{asset_id}", json={}, headers=BASIC_HEADERS),
            400,
            "Missing required parameter - version_ids",
        )
        body = await api.admin("DELETE", f"resources/backup/{asset_id}", json={"version_ids": [unknown]})
        assert body == {
            "asset_id": asset_id,
            "deleted_version_ids": [],
            "failures": [{"version_id": unknown, "error": "Version not found"}],
        }
        body = await api.admin("POST", "resources/restore", json={"asset_ids": [unknown, "not-hex"]})
        assert codes(body) == {unknown: ("no_backup", "asset_not_found"), "not-hex": ("no_backup", "asset_not_found")}
        body = await api.admin("POST", "resources/restore", json={"asset_ids": [asset_id], "versions": [unknown]})
        assert codes(body) == {asset_id: ("failed", "version_not_found")}
        body = await api.admin("POST", "resources/image/upload/restore", json={"public_ids": ["docs/keep"], "versions": [unknown]})
        assert codes(body) == {"docs/keep": ("failed", "version_not_found")}
        body = await api.admin("DELETE", "resources", json={"asset_ids": [unknown]})
        assert body["deleted"] == {unknown: "not_found"}
        body = await api.admin("GET", "resources/by_asset_ids", params={"asset_ids[]": unknown})
        assert body == {"resources": []}


async def test_download_backup_bad_requests(client: TestClient, seeded: dict[str, Any], untouched: Snapshot) -> None:
    asset_id, version_id = seeded["asset_id"], seeded["first"]["version_id"]
    url = f"/v1_1/{CLOUD}/download_backup?"
    async with untouched:
        good = await client.get(url + download_query(asset_id, version_id))
        assert good.status == 200 and await good.read() == b"keep-1"
        bad = dict(sign_params({"asset_id": asset_id, "version_id": version_id}))
        bad["signature"] = "f" * 40
        await expect_error(await client.get(url + urlencode(bad)), 401, prefix="Invalid Signature ffff")
        swapped = dict(sign_params({"asset_id": asset_id, "version_id": version_id}))
        swapped["version_id"] = seeded["second"]["version_id"]
        await expect_error(await client.get(url + urlencode(swapped)), 401, prefix="Invalid Signature")
        old = int(time.time()) - 4000
        await expect_error(
            await client.get(url + download_query(asset_id, version_id, old)),
            400,
            f"Stale request - reported time is {old} which is more than 1 hour ago",
        )
        await expect_error(
            await client.get(url + download_query(asset_id, version_id, int(time.time()) + 7200)), 401, "Request timestamp expired"
        )
        await expect_error(await client.get(url + download_query(asset_id, version_id, secret="wrong")), 401, prefix="Invalid Signature")
        await expect_error(await client.get(url + download_query(asset_id, version_id, api_key="key999")), 401)
        await expect_error(await client.get(url + download_query(asset_id, "0" * 32)), 404, f"Version not found - {'0' * 32}")
        await expect_error(await client.get(url + download_query("0" * 32, version_id)), 404, f"Resource not found - {'0' * 32}")
        await expect_error(await client.get(url + download_query(asset_id, "../../etc/passwd")), 400, "Illegal id")
        only_asset = urlencode(sign_params({"asset_id": asset_id}))
        await expect_error(await client.get(url + only_asset), 400, "Missing required parameter - version_id")
        only_version = urlencode(sign_params({"version_id": version_id}))
        await expect_error(await client.get(url + only_version), 400, "Missing required parameter - asset_id")
        # Basic auth does not replace the signature
        await expect_error(await client.get(url + urlencode({"asset_id": asset_id, "version_id": version_id}), headers=BASIC_HEADERS), 401)


async def test_download_of_version_that_was_not_backed_up(client: TestClient, api: Api, config: Config) -> None:
    plain = await api.upload(b"not backed up", public_id="docs/nobackup", backup="0")
    async with Snapshot(client, config.data_dir):
        response = await client.get(f"/v1_1/{CLOUD}/download_backup?{download_query(plain['asset_id'], plain['version_id'])}")
        await expect_error(response, 404, f"Version not found - {plain['version_id']}")


# --- hostile public ids ---------------------------------------------------------------------

HOSTILE = ["../x", "a/../b", "/abs", "a\\b", "a\x00b", "a\nb", "x" * 300, "a//b", "trailing/", ".", "a/./b", "a\x7fb"]


@pytest.mark.parametrize("public_id", HOSTILE, ids=repr)
async def test_hostile_public_id_on_upload(client: TestClient, untouched: Snapshot, public_id: str) -> None:
    async with untouched:
        response = await post_upload(client, multipart(sign_params({"public_id": public_id})), mp_headers())
        await expect_error(response, 400, prefix="Invalid public_id")


@pytest.mark.parametrize("folder", ["..", "../etc", "a/../.."])
async def test_hostile_folder_on_upload(client: TestClient, untouched: Snapshot, folder: str) -> None:
    async with untouched:
        response = await post_upload(client, multipart(sign_params({"public_id": "x", "folder": folder})), mp_headers())
        await expect_error(response, 400, prefix="Invalid public_id")


@pytest.mark.parametrize("public_id", HOSTILE, ids=repr)
async def test_hostile_public_id_on_rename(client: TestClient, untouched: Snapshot, public_id: str) -> None:
    async with untouched:
        for params, field in [
            ({"from_public_id": "docs/keep", "to_public_id": public_id}, "to_public_id"),
            ({"from_public_id": public_id, "to_public_id": "docs/new"}, "from_public_id"),
        ]:
            response = await client.post(
                f"/v1_1/{CLOUD}/image/rename", data=multipart(sign_params(params), file=None), headers=mp_headers()
            )
            await expect_error(response, 400, prefix=f"Invalid {field}")


async def test_hostile_public_id_on_chunked_upload(client: TestClient, untouched: Snapshot) -> None:
    body = multipart(sign_params({"public_id": "../escape"}), file=b"0123456789")
    headers = {**mp_headers(), "X-Unique-Upload-Id": "hostile1", "Content-Range": "bytes 0-9/10"}
    async with untouched:
        await expect_error(await post_upload(client, body, headers, rt="raw"), 400, prefix="Invalid public_id")


# --- other bad parameters -------------------------------------------------------------------


async def test_bad_parameter_values(client: TestClient, untouched: Snapshot) -> None:
    async with untouched:
        for params, prefix in [
            ({"public_id": "docs/keep", "overwrite": "maybe"}, "Invalid boolean value"),
            ({"public_id": "docs/keep", "backup": "sometimes"}, "Invalid boolean value"),
            ({"public_id": "docs/x", "type": "secret_type"}, "Invalid type - secret_type"),
        ]:
            await expect_error(await post_upload(client, multipart(sign_params(params)), mp_headers()), 400, prefix=prefix)
        rename = sign_params({"from_public_id": "docs/keep", "to_public_id": "docs/new", "to_type": "bogus"})
        await expect_error(
            await client.post(f"/v1_1/{CLOUD}/image/rename", data=multipart(rename, file=None), headers=mp_headers()),
            400,
            "Invalid type - bogus",
        )
        tags = sign_params({"tag": "x", "public_ids": "docs/keep", "command": "explode"})
        await expect_error(
            await client.post(f"/v1_1/{CLOUD}/image/tags", data=multipart(tags, file=None), headers=mp_headers()),
            400,
            "Invalid command - explode",
        )
        tags = sign_params({"tag": "x", "command": "add"})
        await expect_error(
            await client.post(f"/v1_1/{CLOUD}/image/tags", data=multipart(tags, file=None), headers=mp_headers()),
            400,
            "Missing required parameter - public_ids",
        )
        for query, prefix in [
            ("max_results=0", "max_results must be between"),
            ("max_results=501", "max_results must be between"),
            ("max_results=ten", "Invalid max_results"),
            ("next_cursor=%%%", "Invalid next_cursor"),
            ("versions=perhaps", "Invalid boolean value"),
        ]:
            path = "resources/image/upload/docs/keep" if query.startswith("versions") else "resources/image/upload"
            await expect_error(await client.get(f"/v1_1/{CLOUD}/{path}?{query}", headers=BASIC_HEADERS), 400, prefix=prefix)
        for body, prefix in [
            ({"expression": "color=red"}, "Unsupported search field"),
            ({"expression": "status=zombie"}, "Unsupported status"),
            ({"expression": "public_id docs"}, "Unsupported search expression"),
            ({"expression": "", "sort_by": [{"secret_column": "desc"}]}, "Unsupported sort_by"),
            ({"expression": "created_at>yesterday"}, "Invalid date in expression"),
        ]:
            await expect_error(await client.post(f"/v1_1/{CLOUD}/resources/search", json=body, headers=BASIC_HEADERS), 400, prefix=prefix)
        await expect_error(
            await client.delete(f"/v1_1/{CLOUD}/resources/image/upload", json={"prefix": "docs/"}, headers=BASIC_HEADERS),
            400,
            prefix="Missing required parameter - public_ids",
        )
        await expect_error(await client.delete(f"/v1_1/{CLOUD}/resources", json={}, headers=BASIC_HEADERS), 400)
        await expect_error(
            await client.get(f"/v1_1/{CLOUD}/resources/by_asset_ids", headers=BASIC_HEADERS), 400, "Missing required parameter - asset_ids"
        )
        too_many = {"public_ids": [f"p{i}" for i in range(101)]}
        await expect_error(
            await client.delete(f"/v1_1/{CLOUD}/resources/image/upload", json=too_many, headers=BASIC_HEADERS),
            400,
            prefix="Too many public_ids",
        )


async def test_invalid_json_bodies(client: TestClient, untouched: Snapshot) -> None:
    headers = {**BASIC_HEADERS, "Content-Type": "application/json"}
    async with untouched:
        for method, path in [
            ("POST", "resources/image/upload/docs/keep"),
            ("POST", "resources/image/upload/restore"),
            ("POST", "resources/restore"),
            ("DELETE", "resources/image/upload"),
            ("DELETE", "resources"),
            ("POST", "resources/search"),
        ]:
            for raw, message in [
                (b'{"public_ids": ["docs/keep"', "Malformed JSON body"),
                (b"\xff\xfe not json", "Malformed JSON body"),
                (b'["docs/keep"]', "Request body must be a JSON object"),
                (b'"docs/keep"', "Request body must be a JSON object"),
            ]:
                response = await client.request(method, f"/v1_1/{CLOUD}/{path}", data=raw, headers=headers)
                await expect_error(response, 400, message)


async def test_restore_limits(client: TestClient, seeded: dict[str, Any], untouched: Snapshot) -> None:
    async with untouched:
        ids = ["docs/gone"] + [f"docs/n{i}" for i in range(100)]
        response = await client.post(f"/v1_1/{CLOUD}/resources/image/upload/restore", json={"public_ids": ids}, headers=BASIC_HEADERS)
        await expect_error(response, 400, "Too many public_ids (max 100)")
        response = await client.post(
            f"/v1_1/{CLOUD}/resources/restore", json={"asset_ids": [seeded["asset_id"]] * 101}, headers=BASIC_HEADERS
        )
        await expect_error(response, 400, "Too many asset_ids (max 100)")
        v = seeded["gone"]["version_id"]
        for body in [
            {"public_ids": ["docs/gone", "docs/keep"], "versions": [v]},
            {"public_ids": ["docs/gone"], "versions": [v, v]},
        ]:
            response = await client.post(f"/v1_1/{CLOUD}/resources/image/upload/restore", json=body, headers=BASIC_HEADERS)
            await expect_error(response, 400, "versions count must match ids count")
        response = await client.post(
            f"/v1_1/{CLOUD}/resources/restore", json={"asset_ids": [seeded["asset_id"]], "versions": [v, v]}, headers=BASIC_HEADERS
        )
        await expect_error(response, 400, "versions count must match ids count")
        # form-encoded mismatch (Node-style arrays) is caught the same way
        form = "public_ids%5B%5D=docs%2Fgone&versions%5B%5D=" + v + "&versions%5B%5D=" + v
        response = await client.post(
            f"/v1_1/{CLOUD}/resources/image/upload/restore",
            data=form,
            headers={**BASIC_HEADERS, "Content-Type": "application/x-www-form-urlencoded"},
        )
        await expect_error(response, 400, "versions count must match ids count")
        for body in ({}, {"public_ids": []}, {"public_ids": None}):
            response = await client.post(f"/v1_1/{CLOUD}/resources/image/upload/restore", json=body, headers=BASIC_HEADERS)
            await expect_error(response, 400, "public_ids parameter is required")


# --- routing --------------------------------------------------------------------------------


async def test_unknown_routes_are_json_404(client: TestClient, untouched: Snapshot) -> None:
    async with untouched:
        for path in [
            f"/v1_1/{CLOUD}/nonsense",
            f"/v1_1/{CLOUD}/pdf/upload",
            f"/v1_1/{CLOUD}/resources/image/upload/docs/keep/extra/../../x",
            f"/v1_1/{CLOUD}/resources/bogus/upload/docs/keep",
            f"/v1_1/{CLOUD}/resources/backup/not-hex",
            f"/v1_1/{CLOUD}",
            "/v1_1/",
            "/nothing/here",
            "/",
        ]:
            response = await client.get(path, headers=BASIC_HEADERS)
            await expect_error(response, 404)
        await expect_error(await client.post(f"/v1_1/{CLOUD}/nonsense", json={}, headers=BASIC_HEADERS), 404, "Not found - nonsense")


async def test_wrong_method_is_json_error(client: TestClient, untouched: Snapshot) -> None:
    async with untouched:
        for method, path in [
            ("GET", "image/upload"),
            ("PUT", "image/upload"),
            ("DELETE", "ping"),
            ("POST", "ping"),
            ("GET", "image/destroy"),
            ("PATCH", "resources/image/upload/docs/keep"),
            ("POST", "download_backup"),
            ("GET", "resources/image/upload/restore"),  # the restore route is POST only...
        ]:
            response = await client.request(method, f"/v1_1/{CLOUD}/{path}", headers=BASIC_HEADERS)
            if (method, path) == ("GET", "resources/image/upload/restore"):
                # ...but GET falls through to the resource route: an asset called "restore"
                await expect_error(response, 404, "Resource not found - restore")
                continue
            await expect_error(response, 404, "Method not supported for this path")


# --- size limits (a second app with tiny limits) --------------------------------------------


@pytest.fixture
async def small(aiohttp_client: Any, tmp_path: Path, body_reader: str) -> tuple[TestClient, Config]:
    config = Config(data_dir=tmp_path / "small", max_upload_bytes=1024, max_body_bytes=4096,
                    small_body_bytes=0 if body_reader == "stream" else Config.small_body_bytes)
    app = create_app(config)
    test_client: TestClient = await aiohttp_client(app)
    await app[META].create_cloud(CLOUD, API_KEY, API_SECRET, auto_backup=True)
    ok = await test_client.post(
        f"/v1_1/{CLOUD}/image/upload", data=multipart(sign_params({"public_id": "docs/keep"}), file=b"k" * 1024), headers=mp_headers()
    )
    assert ok.status == 200, await ok.text()  # exactly the limit is fine
    return test_client, config


async def test_oversize_upload(small: tuple[TestClient, Config]) -> None:
    client, config = small
    async with Snapshot(client, config.data_dir):
        for size in (1025, 300_000, 3 << 20):
            body = multipart(sign_params({"public_id": "docs/big"}), file=b"x" * size)
            await expect_error(await post_upload(client, body, mp_headers()), 400, prefix="File size too large")
        # replacing an existing asset with an oversize file keeps the old one
        body = multipart(sign_params({"public_id": "docs/keep"}), file=b"y" * 2000)
        await expect_error(await post_upload(client, body, mp_headers()), 400, prefix="File size too large")

        async def gen() -> AsyncIterator[bytes]:
            data = multipart(sign_params({"public_id": "docs/streamed"}), file=b"z" * 5000)
            for i in range(0, len(data), 512):
                yield data[i : i + 512]

        await expect_error(await post_upload(client, gen(), mp_headers()), 400, prefix="File size too large")
        data_uri = "data:application/octet-stream;base64," + base64.b64encode(b"d" * 2000).decode()
        form = multipart({**sign_params({"public_id": "docs/uri"}), "file": data_uri}, file=None)
        await expect_error(await post_upload(client, form, mp_headers()), 400, prefix="File size too large")
        # the same data URI in a form-urlencoded body (no multipart)
        response = await client.post(f"/v1_1/{CLOUD}/image/upload", data={**sign_params({"public_id": "docs/uri"}), "file": data_uri})
        await expect_error(response, 400, prefix="File size too large")


async def test_oversize_chunked_upload(small: tuple[TestClient, Config]) -> None:
    client, config = small
    async with Snapshot(client, config.data_dir):
        for content_range, data in [("bytes 0-511/4096", b"a" * 512), ("bytes 1000-1999/-1", b"b" * 1000)]:
            body = multipart(sign_params({"public_id": "docs/chunked"}), file=data)
            headers = {**mp_headers(), "X-Unique-Upload-Id": secrets.token_hex(6), "Content-Range": content_range}
            await expect_error(await post_upload(client, body, headers, rt="raw"), 400, prefix="File size too large")


async def test_oversize_admin_body(small: tuple[TestClient, Config]) -> None:
    client, config = small
    async with Snapshot(client, config.data_dir):
        big_json = {"tags": ",".join(f"tag{i}" for i in range(2000))}
        response = await client.post(f"/v1_1/{CLOUD}/resources/image/upload/docs/keep", json=big_json, headers=BASIC_HEADERS)
        await expect_error(response, 400, prefix="Request body too large")
        form = "&".join(f"public_ids%5B%5D=docs%2Fkeep{i}" for i in range(500))
        response = await client.delete(
            f"/v1_1/{CLOUD}/resources/image/upload",
            data=form,
            headers={**BASIC_HEADERS, "Content-Type": "application/x-www-form-urlencoded"},
        )
        await expect_error(response, 400, prefix="Request body too large")
        boundary = "admb"
        mp = multipart({"tags": "t" * 5000}, file=None, boundary=boundary)
        response = await client.post(
            f"/v1_1/{CLOUD}/resources/image/upload/docs/keep", data=mp, headers={**BASIC_HEADERS, **mp_headers(boundary)}
        )
        await expect_error(response, 400, prefix="Request body too large")
        # the signed Upload API endpoints without a file are bounded the same way
        fields = sign_params({"public_id": "docs/keep", "tags": "t" * 5000})
        response = await client.post(
            f"/v1_1/{CLOUD}/image/explicit", data=urlencode(fields), headers={"Content-Type": "application/x-www-form-urlencoded"}
        )
        await expect_error(response, 400, prefix="Request body too large")


# --- chunked uploads gone wrong -------------------------------------------------------------


async def test_bad_chunks(client: TestClient, untouched: Snapshot) -> None:
    async with untouched:
        for headers, message in [
            ({"X-Unique-Upload-Id": "u1", "Content-Range": "bytes 0-9"}, "Invalid Content-Range header - bytes 0-9"),
            ({"X-Unique-Upload-Id": "u1", "Content-Range": "bytes 9-0/10"}, "Invalid Content-Range header - bytes 9-0/10"),
            ({"X-Unique-Upload-Id": "u1", "Content-Range": "bytes 0-10/10"}, "Invalid Content-Range header - bytes 0-10/10"),
            ({"X-Unique-Upload-Id": "../../etc", "Content-Range": "bytes 0-9/10"}, "Invalid X-Unique-Upload-Id header"),
        ]:
            body = multipart(sign_params({"public_id": "docs/chunk"}), file=b"0123456789")
            await expect_error(await post_upload(client, body, {**mp_headers(), **headers}, rt="raw"), 400, message)
        # a chunk with a bad signature never touches the shared chunk file
        fields = sign_params({"public_id": "docs/chunk"})
        fields["signature"] = "1" * 40
        headers = {**mp_headers(), "X-Unique-Upload-Id": "u2", "Content-Range": "bytes 0-9/10"}
        await expect_error(
            await post_upload(client, multipart(fields, file=b"0123456789"), headers, rt="raw"), 401, prefix="Invalid Signature"
        )
        # chunked uploads must be multipart
        form = aiohttp.FormData(sign_params({"public_id": "docs/chunk", "file": "data:text/plain;base64,aGk="}))
        await expect_error(await post_upload(client, form, {"X-Unique-Upload-Id": "u3", "Content-Range": "bytes 0-1/2"}, rt="raw"), 400)
        # a chunk part missing the file
        headers = {**mp_headers(), "X-Unique-Upload-Id": "u4", "Content-Range": "bytes 0-9/10"}
        await expect_error(
            await post_upload(client, multipart(sign_params({"public_id": "docs/c"}), file=None), headers, rt="raw"),
            400,
            "Missing required parameter - file",
        )


async def test_chunk_with_wrong_length_is_refused(client: TestClient, config: Config, untouched: Snapshot) -> None:
    """A chunk whose body disagrees with its Content-Range is a 400 and records nothing: its
    bytes went to a private file that is removed, so a retry yields exactly the bytes sent."""
    part = 5 << 20  # every chunk but the last is at least 5 MiB
    total = part + 10
    upload_ids = [secrets.token_hex(6), secrets.token_hex(6)]
    async with untouched:
        for upload_id, data, message in [
            (upload_ids[0], b"0" * (part + 3), "Chunk is larger than its Content-Range"),
            (upload_ids[1], b"0" * (part - 5), f"Chunk has {part - 5} bytes but its Content-Range says {part}"),
        ]:
            headers = {**mp_headers(), "X-Unique-Upload-Id": upload_id, "Content-Range": f"bytes 0-{part - 1}/{total}"}
            body = multipart(sign_params({"public_id": "docs/chunk"}), file=data)
            await expect_error(await post_upload(client, body, headers, rt="raw"), 400, message)
        for upload_id in upload_ids:
            assert await client.app[META].get_upload_session(CLOUD, upload_id) is None
    # retrying the same upload ids with correct chunks works and yields exactly the bytes sent
    for upload_id in upload_ids:
        data = secrets.token_bytes(total)
        for start, end in ((part, total), (0, part)):  # out of order on purpose
            headers = {**mp_headers(), "X-Unique-Upload-Id": upload_id, "Content-Range": f"bytes {start}-{end - 1}/{total}"}
            body = multipart(sign_params({"public_id": f"docs/retry-{upload_id}"}), file=data[start:end])
            response = await post_upload(client, body, headers, rt="raw")
            assert response.status == 200, await response.text()
        result = await response.json()
        assert result["bytes"] == total
        download = await client.get(f"/v1_1/{CLOUD}/download_backup?{download_query(result['asset_id'], result['version_id'])}")
        assert await download.read() == data
    assert not [p for p in (config.data_dir / "spool").rglob("*") if p.is_file()]
