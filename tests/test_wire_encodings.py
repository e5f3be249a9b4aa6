"""Transport rules (spec section 2), reproduced byte for byte from the captures in
/work/shared/spec/captures/: every request here is built by hand (request line, headers and
body) and written to a real socket, with a fresh timestamp and a signature computed here.
"""

import asyncio
import hashlib
import json
import secrets
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode

import aiohttp
import pytest
from aiohttp.test_utils import TestClient
from multidict import CIMultiDict

from tests.conftest import API_KEY, API_SECRET, CLOUD, sign

BASIC = "Basic a2V5MTIzOnNlY3JldDQ1Ng=="  # key123:secret456, exactly as captured
PY141_UA = "CloudinaryPython/1.41.0 (Linux-6.18.44-fc-v657-x86_64-with-glibc2.36; Python 3.11.7)"
PY146_UA = "CloudinaryPython/1.46.3 (Linux-6.18.44-fc-v657-x86_64-with-glibc2.36; Python 3.11.7)"
NODE_UA = "CloudinaryNodeJS/2.11.0 (Node 20.20.2)"
PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000b4944415478da6360000200000500017a5eab3f0000000049454e44ae426082"
)


# --- signing, independent of versionstore/signing.py ----------------------------------------


def string_to_sign(params: dict[str, Any], version: int = 2, skip: Sequence[str] = ()) -> str:
    pairs = []
    for key, value in params.items():
        if key in ("file", "api_key", "resource_type", "cloud_name", "signature", *skip) or value in (None, "", []):
            continue
        text = f"{key}={','.join(value) if isinstance(value, list) else value}"
        pairs.append(text.replace("&", "%26") if version >= 2 else text)
    return "&".join(sorted(pairs))


def signature_of(params: dict[str, Any], version: int = 2, algorithm: str = "sha1", skip: Sequence[str] = ()) -> str:
    return hashlib.new(algorithm, (string_to_sign(params, version, skip) + API_SECRET).encode()).hexdigest()


def signed_fields(params: dict[str, Any], version: int = 2, algorithm: str = "sha1", skip: Sequence[str] = ()) -> list[tuple[str, str]]:
    """The SDKs' field order: params (with a fresh timestamp), signature, api_key; lists as `k[]`."""
    params = {**params}
    params.setdefault("timestamp", str(int(time.time())))
    fields: list[tuple[str, str]] = []
    for key, value in params.items():
        if isinstance(value, list):
            fields.extend((f"{key}[]", item) for item in value)
        else:
            fields.append((key, str(value)))
    fields.append(("signature", signature_of(params, version, algorithm, skip)))
    fields.append(("api_key", API_KEY))
    return fields


def download_query(asset_id: str, version_id: str, timestamp: int | None = None) -> str:
    params = {"timestamp": str(timestamp or int(time.time())), "asset_id": asset_id, "version_id": version_id}
    return urlencode({**params, "signature": signature_of(params), "api_key": API_KEY})


# --- hand-built bodies and a raw HTTP/1.1 client --------------------------------------------


@dataclass
class FilePart:
    filename: str
    data: bytes
    content_type: str = "application/octet-stream"


def multipart(parts: Sequence[tuple[str, str | FilePart]], boundary: str) -> bytes:
    out = bytearray()
    for name, value in parts:
        out += f"--{boundary}\r\n".encode()
        if isinstance(value, FilePart):
            out += f'Content-Disposition: form-data; name="{name}"; filename="{value.filename}"\r\n'.encode()
            out += f"Content-Type: {value.content_type}\r\n\r\n".encode() + value.data + b"\r\n"
        else:
            out += f'Content-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
    out += f"--{boundary}--\r\n".encode()
    return bytes(out)


@dataclass
class Reply:
    status: int
    headers: CIMultiDict[str]
    raw: bytes

    @property
    def body(self) -> Any:
        assert self.headers["Content-Type"].startswith("application/json"), self.headers
        return json.loads(self.raw)


async def wire(
    client: TestClient,
    method: str,
    target: str,
    headers: Sequence[tuple[str, str]] = (),
    body: bytes | Sequence[bytes] | None = None,
) -> Reply:
    """Write one request exactly as given. `body` as a list of pieces is sent chunked
    (the caller's headers must then say `Transfer-Encoding: chunked`); bytes get a
    Content-Length unless the caller set one."""
    host, port = client.server.host, client.server.port
    reader, writer = await asyncio.open_connection(host, port)
    try:
        names = {name.lower() for name, _ in headers}
        lines = [f"{method} {target} HTTP/1.1"]
        if "host" not in names:
            lines.append(f"Host: {host}:{port}")
        lines += [f"{name}: {value}" for name, value in headers]
        payload = b""
        if isinstance(body, (bytes, bytearray)):
            if "content-length" not in names:
                lines.append(f"Content-Length: {len(body)}")
            payload = bytes(body)
        elif body is not None:
            assert "transfer-encoding" in names
            payload = b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for piece in body if piece) + b"0\r\n\r\n"
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + payload)
        await writer.drain()
        status_line = await reader.readline()
        status = int(status_line.split()[1])
        response_headers: CIMultiDict[str] = CIMultiDict()
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            response_headers.add(name.strip(), value.strip())
        if "Content-Length" in response_headers:
            raw = await reader.readexactly(int(response_headers["Content-Length"]))
        else:
            assert response_headers.get("Transfer-Encoding", "").lower() == "chunked", response_headers
            raw = b""
            while size := int((await reader.readline()).strip(), 16):
                raw += await reader.readexactly(size)
                await reader.readline()
            await reader.readline()
        return Reply(status, response_headers, raw)
    finally:
        writer.close()


def py141_headers(boundary: str | None = None, admin: bool = False) -> list[tuple[str, str]]:
    headers = [("Accept-Encoding", "identity")]
    if admin:
        headers += [("user-agent", PY141_UA), ("authorization", BASIC)]
    else:
        headers += [("User-Agent", PY141_UA)]
    if boundary:
        headers.append(("Content-Type", f"multipart/form-data; boundary={boundary}"))
    return headers


def py146_json_headers() -> list[tuple[str, str]]:
    return [("Accept-Encoding", "identity"), ("user-agent", PY146_UA), ("authorization", BASIC), ("Content-Type", "application/json")]


def node_admin_headers(content_type: str = "application/x-www-form-urlencoded") -> list[tuple[str, str]]:
    return [("Content-Type", content_type), ("User-Agent", NODE_UA), ("Authorization", BASIC), ("Connection", "keep-alive")]


def node_upload_headers(boundary: str, extra: Sequence[tuple[str, str]] = ()) -> list[tuple[str, str]]:
    return [
        ("Content-Type", f"multipart/form-data; boundary={boundary}"),
        ("User-Agent", NODE_UA),
        *extra,
        ("Connection", "keep-alive"),
        ("Transfer-Encoding", "chunked"),
    ]


def pieces(data: bytes, size: int = 37) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


async def py_upload(client: TestClient, public_id: str, data: bytes, rt: str = "image", **params: Any) -> dict[str, Any]:
    """A Python 1.41 SDK upload (multipart with Content-Length)."""
    boundary = secrets.token_hex(16)
    fields = signed_fields({"public_id": public_id, **params})
    body = multipart([*fields, ("file", FilePart("logo.png", data, "image/png"))], boundary)
    reply = await wire(client, "POST", f"/v1_1/{CLOUD}/{rt}/upload", py141_headers(boundary), body)
    assert reply.status == 200, reply.raw
    return reply.body


async def admin_get(client: TestClient, path: str, expect: int = 200) -> Any:
    reply = await wire(client, "GET", f"/v1_1/{CLOUD}/{path}", py141_headers(admin=True))
    assert reply.status == expect, reply.raw
    return reply.body


async def versions_of(client: TestClient, public_id: str, rt: str = "image") -> list[dict[str, Any]]:
    body = await admin_get(client, f"resources/{rt}/upload/{public_id}?versions=true")
    return body["versions"]


# --- the signing helper itself (spec section 3 worked examples) -----------------------------


def test_signing_helper_matches_spec_worked_examples() -> None:
    params = {"public_id": "docs/sample", "backup": "1", "overwrite": "1", "tags": "t1,t2", "type": "upload", "timestamp": "1700000000"}
    assert string_to_sign(params) == "backup=1&overwrite=1&public_id=docs/sample&tags=t1,t2&timestamp=1700000000&type=upload"
    assert signature_of(params) == "36415327b519d8bc9633ff916357d70018c48c65"
    assert signature_of(params, algorithm="sha256") == "b41a2ff89dbaa17cbceb3eb9d6ab5306bfe7125dc4f8ff2b20d3ef7c7f91cd5c"
    amp = {"public_id": "a&b", "context": "alt=x&y", "timestamp": "1700000000"}
    assert string_to_sign(amp, 2) == "context=alt=x%26y&public_id=a%26b&timestamp=1700000000"
    assert string_to_sign(amp, 1) == "context=alt=x&y&public_id=a&b&timestamp=1700000000"
    listed = {"public_ids": ["a", "b"], "tag": "t", "command": "add", "timestamp": "1700000000"}
    assert string_to_sign(listed) == "command=add&public_ids=a,b&tag=t&timestamp=1700000000"


# --- Upload API: Python multipart with Content-Length ---------------------------------------


async def test_python_141_upload_multipart(client: TestClient) -> None:
    body = await py_upload(client, "docs/sample", PNG, type="upload", backup="1", overwrite="1", tags="t1,t2")
    assert body["public_id"] == "docs/sample"
    assert body["bytes"] == len(PNG)
    assert body["tags"] == ["t1", "t2"]
    assert body["backup"] is True
    assert body["format"] == "png" and (body["width"], body["height"]) == (1, 1)
    expected = hashlib.sha1(f"public_id=docs/sample&version={body['version']}{API_SECRET}".encode()).hexdigest()
    assert body["signature"] == expected
    versions = await versions_of(client, "docs/sample")
    assert [v["size"] for v in versions] == [len(PNG)]


async def test_upload_with_basic_auth_instead_of_signature(client: TestClient) -> None:
    """The OpenAPI lists Basic auth for the upload endpoints too."""
    boundary = secrets.token_hex(16)
    body = multipart([("public_id", "docs/basic"), ("file", FilePart("a.bin", b"basic-auth"))], boundary)
    reply = await wire(client, "POST", f"/v1_1/{CLOUD}/raw/upload", py141_headers(boundary, admin=True), body)
    assert reply.status == 200, reply.raw
    assert reply.body["public_id"] == "docs/basic" and reply.body["bytes"] == 10


# --- Upload API: Node multipart with Transfer-Encoding: chunked ----------------------------


async def test_node_chunked_upload_via_async_generator(client: TestClient) -> None:
    """aiohttp sends an async generator body chunked, with no Content-Length, like Node."""
    boundary = "l0wd8vvex6y"
    fields = signed_fields({"backup": "1", "overwrite": "1", "public_id": "docs/sample", "type": "upload", "tags": "t1,t2"})
    payload = multipart([*fields, ("file", FilePart("logo.png", PNG))], boundary)
    sent: list[bytes] = []

    async def body() -> AsyncIterator[bytes]:
        for piece in pieces(payload, 50):
            sent.append(piece)
            await asyncio.sleep(0)
            yield piece

    response = await client.post(
        f"/v1_1/{CLOUD}/image/upload",
        data=body(),
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}", "User-Agent": NODE_UA, "Connection": "keep-alive"},
    )
    result = await response.json()
    assert response.status == 200, result
    assert response.request_info.headers.get("Transfer-Encoding") == "chunked"
    assert "Content-Length" not in response.request_info.headers
    assert b"".join(sent) == payload
    assert result["public_id"] == "docs/sample" and result["bytes"] == len(PNG) and result["tags"] == ["t1", "t2"]
    assert result["backup"] is True


async def test_node_chunked_upload_raw_socket(client: TestClient) -> None:
    boundary = "jw0ky3npwhx"
    fields = signed_fields({"public_id": "docs/stream"})
    payload = multipart([*fields, ("file", FilePart("file", b"hello world"))], boundary)
    reply = await wire(client, "POST", f"/v1_1/{CLOUD}/raw/upload", node_upload_headers(boundary), pieces(payload, 7))
    assert reply.status == 200, reply.raw
    assert reply.body["public_id"] == "docs/stream" and reply.body["bytes"] == 11
    assert reply.body["resource_type"] == "raw"
    download = await wire(
        client, "GET", f"/v1_1/{CLOUD}/download_backup?{download_query(reply.body['asset_id'], reply.body['version_id'])}"
    )
    assert download.status == 200 and download.raw == b"hello world"


async def test_node_destroy_and_rename_chunked_with_true_false(client: TestClient) -> None:
    await py_upload(client, "docs/a", b"aaa", rt="raw")
    await py_upload(client, "docs/exists", b"eee", rt="raw")
    boundary = "y4hqexj"
    fields = signed_fields({"from_public_id": "docs/a", "to_public_id": "docs/b", "overwrite": "false"})
    reply = await wire(client, "POST", f"/v1_1/{CLOUD}/raw/rename", node_upload_headers(boundary), pieces(multipart(fields, boundary)))
    assert reply.status == 200, reply.raw
    assert reply.body["public_id"] == "docs/b"

    boundary = "0fd99gu"
    fields = signed_fields({"from_public_id": "docs/b", "to_public_id": "docs/exists"})
    reply = await wire(client, "POST", f"/v1_1/{CLOUD}/raw/rename", node_upload_headers(boundary), pieces(multipart(fields, boundary)))
    assert reply.status == 400
    assert reply.body == {"error": {"message": "to_public_id (docs/exists) already exists"}}

    boundary = "tyb0"
    fields = signed_fields({"invalidate": "true", "public_id": "docs/b"})
    reply = await wire(client, "POST", f"/v1_1/{CLOUD}/raw/destroy", node_upload_headers(boundary), pieces(multipart(fields, boundary)))
    assert reply.status == 200 and reply.body == {"result": "ok"}
    placeholder = await admin_get(client, "resources/raw/upload/docs/b")
    assert placeholder["placeholder"] is True and placeholder["bytes"] == 0
    assert (await admin_get(client, "resources/raw/upload/docs/exists"))["bytes"] == 3


async def test_python_destroy_and_rename_with_1_0(client: TestClient) -> None:
    await py_upload(client, "docs/a", b"aaa", rt="raw")
    boundary = secrets.token_hex(16)
    fields = signed_fields({"overwrite": "0", "from_public_id": "docs/a", "to_public_id": "docs/b"})
    reply = await wire(client, "POST", f"/v1_1/{CLOUD}/raw/rename", py141_headers(boundary), multipart(fields, boundary))
    assert reply.status == 200 and reply.body["public_id"] == "docs/b"
    fields = signed_fields({"invalidate": "1", "public_id": "docs/b"})
    reply = await wire(client, "POST", f"/v1_1/{CLOUD}/raw/destroy", py141_headers(boundary), multipart(fields, boundary))
    assert reply.status == 200 and reply.body == {"result": "ok"}


# --- upload_large ---------------------------------------------------------------------------

PART = 5 << 20  # every chunk but the last is at least 5 MiB


async def test_node_upload_large_unknown_total_until_last_chunk(client: TestClient) -> None:
    """The captured shape (captures/upload_large_requests.txt) scaled to real chunk sizes: every
    chunk but the last is at least 5 MiB."""
    total = 2 * PART + 5000
    data = secrets.token_bytes(total)
    upload_id = "6ymels1vkw"
    ranges = [(0, PART - 1, "-1"), (PART, 2 * PART - 1, "-1"), (2 * PART, total - 1, str(total))]
    replies = []
    for index, (start, end, declared) in enumerate(ranges):
        boundary = secrets.token_hex(5)
        fields = signed_fields({"public_id": "docs/bignode"})
        payload = multipart([*fields, ("file", FilePart("big", data[start : end + 1]))], boundary)
        extra = [("Content-Range", f"bytes {start}-{end}/{declared}"), ("X-Unique-Upload-Id", upload_id)]
        reply = await wire(client, "POST", f"/v1_1/{CLOUD}/raw/upload", node_upload_headers(boundary, extra), pieces(payload, 1 << 16))
        assert reply.status == 200, (index, reply.raw)
        replies.append(reply.body)
    assert replies[0] == {"done": False, "bytes": PART, "public_id": "docs/bignode", "resource_type": "raw", "kind": "upload"}
    assert replies[1]["done"] is False and replies[1]["bytes"] == 2 * PART and replies[1]["public_id"] == "docs/bignode"
    final = replies[2]
    assert "done" not in final or final["done"] is True
    assert final["public_id"] == "docs/bignode" and final["bytes"] == total and final["resource_type"] == "raw"
    download = await wire(client, "GET", f"/v1_1/{CLOUD}/download_backup?{download_query(final['asset_id'], final['version_id'])}")
    assert download.status == 200 and download.raw == data
    assert [v["size"] for v in await versions_of(client, "docs/bignode", "raw")] == [total]


async def _python_chunk(client: TestClient, upload_id: str, data: bytes, start: int, total: int, public_id: str | None) -> dict[str, Any]:
    boundary = secrets.token_hex(16)
    params = {"public_id": public_id} if public_id else {}
    payload = multipart([*signed_fields(params), ("file", FilePart("big.bin", data))], boundary)
    headers = [
        *py141_headers(boundary),
        ("Content-Range", f"bytes {start}-{start + len(data) - 1}/{total}"),
        ("X-Unique-Upload-Id", upload_id),
    ]
    reply = await wire(client, "POST", f"/v1_1/{CLOUD}/raw/upload", headers, payload)
    assert reply.status == 200, reply.raw
    return reply.body


async def test_python_upload_large_reuses_the_public_id_echoed_by_the_first_chunk(client: TestClient) -> None:
    """Python sends the real total on every chunk and takes later chunks' public_id from the
    previous response (uploader.upload_large)."""
    total = 2 * PART + 5000
    data = secrets.token_bytes(total)
    upload_id = "5ok6bprwu4m9l4r8"
    first = await _python_chunk(client, upload_id, data[:PART], 0, total, None)
    assert first["done"] is False and first["bytes"] == PART
    public_id = first["public_id"]
    assert public_id
    second = await _python_chunk(client, upload_id, data[PART : 2 * PART], PART, total, public_id)
    assert second["done"] is False and second["public_id"] == public_id
    final = await _python_chunk(client, upload_id, data[2 * PART :], 2 * PART, total, second["public_id"])
    assert final["public_id"] == public_id and final["bytes"] == total
    download = await wire(client, "GET", f"/v1_1/{CLOUD}/download_backup?{download_query(final['asset_id'], final['version_id'])}")
    assert download.raw == data


async def test_python_upload_large_later_chunks_without_public_id(client: TestClient) -> None:
    """If later chunks carry no public_id at all, the upload still lands on the id the first
    response echoed (assembled by X-Unique-Upload-Id)."""
    total = 2 * PART + 1000
    data = secrets.token_bytes(total)
    upload_id = "noid" + secrets.token_hex(6)
    first = await _python_chunk(client, upload_id, data[:PART], 0, total, None)
    second = await _python_chunk(client, upload_id, data[PART : 2 * PART], PART, total, None)
    final = await _python_chunk(client, upload_id, data[2 * PART :], 2 * PART, total, None)
    assert first["public_id"] == second["public_id"] == final["public_id"]
    assert final["bytes"] == total
    download = await wire(client, "GET", f"/v1_1/{CLOUD}/download_backup?{download_query(final['asset_id'], final['version_id'])}")
    assert download.raw == data


async def test_python_upload_large_with_given_public_id(client: TestClient) -> None:
    total = 2 * PART + 5000
    data = secrets.token_bytes(total)
    upload_id = secrets.token_hex(8)
    for start in (0, PART, 2 * PART):
        result = await _python_chunk(client, upload_id, data[start : start + PART], start, total, "docs/big")
    assert result["public_id"] == "docs/big" and result["bytes"] == total


# --- booleans -------------------------------------------------------------------------------


@pytest.mark.parametrize(("true", "false"), [("1", "0"), ("true", "false")])
async def test_upload_booleans(client: TestClient, true: str, false: str) -> None:
    first = await py_upload(client, "docs/flags", b"first", rt="raw", backup=false)
    assert first["backup"] is False
    same = await py_upload(client, "docs/flags", b"second", rt="raw", overwrite=false)
    assert same.get("existing") is True and same["version_id"] == first["version_id"] and same["bytes"] == 5
    replaced = await py_upload(client, "docs/flags", b"second", rt="raw", overwrite=true, backup=true)
    assert replaced["backup"] is True and replaced["overwritten"] is True and replaced["bytes"] == 6
    versions = await versions_of(client, "docs/flags", "raw")
    assert [(v["size"], v["restorable"]) for v in versions] == [(5, False), (6, True)]


@pytest.mark.parametrize(("flag", "shown"), [("true", True), ("1", True), ("false", False), ("0", False)])
async def test_admin_get_boolean_query(client: TestClient, flag: str, shown: bool) -> None:
    await py_upload(client, "docs/q", b"q", rt="raw")
    body = await admin_get(client, f"resources/raw/upload/docs/q?versions={flag}")
    assert ("versions" in body) is shown


async def test_json_booleans_on_delete(client: TestClient) -> None:
    await py_upload(client, "docs/raw1", b"raw", rt="raw")
    body = json.dumps({"transformations": None, "invalidate": True, "public_ids": ["docs/raw1"]}).encode()
    reply = await wire(client, "DELETE", f"/v1_1/{CLOUD}/resources/raw/upload", py146_json_headers(), body)
    assert reply.status == 200, reply.raw
    assert reply.body["deleted"] == {"docs/raw1": "deleted"}


# --- signature version 1 vs 2, SHA-1 vs SHA-256 ---------------------------------------------


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("algorithm", ["sha1", "sha256"])
async def test_signature_versions_with_ampersand(client: TestClient, version: int, algorithm: str) -> None:
    boundary = secrets.token_hex(16)
    fields = signed_fields({"public_id": "a&b", "context": "alt=x&y"}, version=version, algorithm=algorithm)
    assert len(dict(fields)["signature"]) == (40 if algorithm == "sha1" else 64)
    body = multipart([*fields, ("file", FilePart("f.txt", b"amp"))], boundary)
    reply = await wire(client, "POST", f"/v1_1/{CLOUD}/raw/upload", py141_headers(boundary), body)
    assert reply.status == 200, reply.raw
    assert reply.body["public_id"] == "a&b"
    assert reply.body["context"] == {"custom": {"alt": "x&y"}}


async def test_signature_covers_values_with_ampersand(client: TestClient) -> None:
    """The part after `&` is signed too: changing it breaks both the v1 and v2 signature."""
    boundary = secrets.token_hex(16)
    fields = dict(signed_fields({"public_id": "a&b"}))
    fields["public_id"] = "a&c"
    body = multipart([*fields.items(), ("file", FilePart("f.txt", b"amp"))], boundary)
    reply = await wire(client, "POST", f"/v1_1/{CLOUD}/raw/upload", py141_headers(boundary), body)
    assert reply.status == 401
    message = reply.body["error"]["message"]
    assert message.startswith(f"Invalid Signature {fields['signature']}. String to sign - ")
    assert "public_id=a%26c" in message


async def test_sha256_upload_like_captured(client: TestClient) -> None:
    boundary = "k92cbjwgc9w"
    fields = signed_fields({"public_id": "docs/sha"}, algorithm="sha256")
    payload = multipart([*fields, ("file", FilePart("logo.png", PNG))], boundary)
    reply = await wire(client, "POST", f"/v1_1/{CLOUD}/image/upload", node_upload_headers(boundary), pieces(payload))
    assert reply.status == 200, reply.raw
    assert reply.body["public_id"] == "docs/sha"
    # the response signature is always SHA-1 over the v1 string
    assert reply.body["signature"] == hashlib.sha1(f"public_id=docs/sha&version={reply.body['version']}{API_SECRET}".encode()).hexdigest()


# --- tags / context / metadata / explicit (Upload API, public_ids[]) -------------------------


async def define_string_field(client: TestClient, external_id: str = "f1") -> None:
    """Metadata values must name a defined field, as on Cloudinary (metadata_fields)."""
    body = {"type": "string", "external_id": external_id, "label": external_id}
    response = await client.post(f"/v1_1/{CLOUD}/metadata_fields", json=body, headers={"Authorization": BASIC})
    assert response.status == 200, await response.text()


async def test_tags_endpoint_public_ids_array(client: TestClient) -> None:
    await py_upload(client, "docs/a", b"a", tags="old")
    await py_upload(client, "docs/b", b"b")
    before = [len(await versions_of(client, p)) for p in ("docs/a", "docs/b")]
    boundary = secrets.token_hex(16)
    fields = signed_fields({"tag": "newtag", "public_ids": ["docs/a", "docs/b", "docs/missing"], "command": "add"})
    assert ("public_ids[]", "docs/a") in fields
    reply = await wire(client, "POST", f"/v1_1/{CLOUD}/image/tags", py141_headers(boundary), multipart(fields, boundary))
    assert reply.status == 200, reply.raw
    assert reply.body == {"public_ids": ["docs/a", "docs/b"]}
    assert (await admin_get(client, "resources/image/upload/docs/a"))["tags"] == ["newtag", "old"]  # sorted
    assert (await admin_get(client, "resources/image/upload/docs/b"))["tags"] == ["newtag"]
    assert [len(await versions_of(client, p)) for p in ("docs/a", "docs/b")] == before  # no new version

    fields = signed_fields({"tag": "old", "public_ids": ["docs/a"], "command": "remove"})
    reply = await wire(client, "POST", f"/v1_1/{CLOUD}/image/tags", node_upload_headers(boundary), pieces(multipart(fields, boundary)))
    assert reply.status == 200 and reply.body == {"public_ids": ["docs/a"]}
    assert (await admin_get(client, "resources/image/upload/docs/a"))["tags"] == ["newtag"]


async def test_tags_context_metadata_accept_unsigned_notification_url(client: TestClient) -> None:
    """Python >= 1.46 leaves notification_url/batch_id out of the signature on these endpoints."""
    await define_string_field(client)
    await py_upload(client, "docs/a", b"a")
    boundary = secrets.token_hex(16)
    for endpoint, params in [
        ("tags", {"tag": "t9", "public_ids": ["docs/a"], "command": "add"}),
        ("context", {"context": "alt=hi|caption=x\\=y", "public_ids": ["docs/a"], "command": "add"}),
        ("metadata", {"metadata": "f1=v", "public_ids": ["docs/a"]}),
    ]:
        params = {**params, "notification_url": "https://example.com/hook", "batch_id": "b1"}
        fields = signed_fields(params, skip=("notification_url", "batch_id"))
        reply = await wire(client, "POST", f"/v1_1/{CLOUD}/image/{endpoint}", py141_headers(boundary), multipart(fields, boundary))
        assert reply.status == 200, (endpoint, reply.raw)
        assert reply.body == {"public_ids": ["docs/a"]}
    body = await admin_get(client, "resources/image/upload/docs/a")
    assert body["tags"] == ["t9"]
    assert body["context"] == {"custom": {"alt": "hi", "caption": "x=y"}}
    assert body["metadata"] == {"f1": "v"}


async def test_explicit_multipart_tags(client: TestClient) -> None:
    await py_upload(client, "docs/sample", PNG)
    boundary = "9117b8wyne"
    fields = signed_fields({"public_id": "docs/sample", "type": "upload", "tags": "z"})
    reply = await wire(client, "POST", f"/v1_1/{CLOUD}/image/explicit", node_upload_headers(boundary), pieces(multipart(fields, boundary)))
    assert reply.status == 200, reply.raw
    assert reply.body["tags"] == ["z"] and reply.body["public_id"] == "docs/sample"
    assert len(await versions_of(client, "docs/sample")) == 1


# --- Admin POST: multipart (Python <= 1.42.1), form (Node), JSON (Python >= 1.42.2), query ---


async def test_python_141_update_as_multipart(client: TestClient) -> None:
    await define_string_field(client)
    await py_upload(client, "docs/sample", PNG)
    boundary = "118142575bb8f9ce665fa4aa75b3143a"
    body = multipart([("tags", "x,y"), ("context", "alt=hi"), ("metadata", "f1=v")], boundary)
    reply = await wire(client, "POST", f"/v1_1/{CLOUD}/resources/image/upload/docs/sample", py141_headers(boundary, admin=True), body)
    assert reply.status == 200, reply.raw
    assert reply.body["tags"] == ["x", "y"]
    assert reply.body["context"] == {"custom": {"alt": "hi"}}
    assert reply.body["metadata"] == {"f1": "v"}
    assert len(await versions_of(client, "docs/sample")) == 1


async def test_node_update_form_urlencoded_with_encoded_slash(client: TestClient) -> None:
    await define_string_field(client)
    await py_upload(client, "docs/sample", PNG)
    raw = b"context=alt%3Dhi&metadata=f1%3Dv&tags=x%2Cy"
    reply = await wire(client, "POST", f"/v1_1/{CLOUD}/resources/image/upload/docs%2Fsample", node_admin_headers(), raw)
    assert reply.status == 200, reply.raw
    assert reply.body["public_id"] == "docs/sample"
    assert reply.body["tags"] == ["x", "y"] and reply.body["context"] == {"custom": {"alt": "hi"}}
    assert reply.body["metadata"] == {"f1": "v"}


async def test_python_146_update_as_json(client: TestClient) -> None:
    await define_string_field(client)
    await py_upload(client, "docs/sample", PNG)
    body = json.dumps({"tags": "x,y", "context": "alt=hi", "metadata": "f1=v"}).encode()
    reply = await wire(client, "POST", f"/v1_1/{CLOUD}/resources/image/upload/docs/sample", py146_json_headers(), body)
    assert reply.status == 200, reply.raw
    assert reply.body["tags"] == ["x", "y"] and reply.body["metadata"] == {"f1": "v"}


async def test_query_string_params_on_admin_post(client: TestClient) -> None:
    await py_upload(client, "docs/sample", PNG)
    body = json.dumps({"context": "alt=hi", "tags": None}).encode()  # null = absent
    reply = await wire(client, "POST", f"/v1_1/{CLOUD}/resources/image/upload/docs/sample?tags=q1%2Cq2", py146_json_headers(), body)
    assert reply.status == 200, reply.raw
    assert reply.body["tags"] == ["q1", "q2"] and reply.body["context"] == {"custom": {"alt": "hi"}}

    # restore: ids in the query string, versions in the JSON body
    first = await py_upload(client, "docs/q", b"one", rt="raw")
    await py_upload(client, "docs/q", b"two!", rt="raw")
    body = json.dumps({"versions": [first["version_id"]]}).encode()
    reply = await wire(client, "POST", f"/v1_1/{CLOUD}/resources/raw/upload/restore?public_ids%5B%5D=docs%2Fq", py146_json_headers(), body)
    assert reply.status == 200, reply.raw
    assert reply.body["docs/q"]["bytes"] == 3

    # and a body-less PUT with everything in the query string
    reply = await wire(
        client, "PUT", f"/v1_1/{CLOUD}/resources/image/upload/docs/sample?tags%5B%5D=p1&tags%5B%5D=p2", py141_headers(admin=True)
    )
    assert reply.status == 200, reply.raw
    assert reply.body["tags"] == ["p1", "p2"]


# --- GET with an encoded slash; search as one encoded segment -------------------------------


async def test_node_get_resource_with_encoded_slash(client: TestClient) -> None:
    await py_upload(client, "docs/sample", PNG)
    await py_upload(client, "docs/sample", PNG + b"\x00")
    reply = await wire(client, "GET", f"/v1_1/{CLOUD}/resources/image/upload/docs%2Fsample?versions=true", node_admin_headers())
    assert reply.status == 200, reply.raw
    body = reply.body
    assert body["public_id"] == "docs/sample"
    assert [v["size"] for v in body["versions"]] == [len(PNG), len(PNG) + 1]
    assert all(isinstance(v["version"], str) for v in body["versions"])
    assert [v["restorable"] for v in body["versions"]] == [True, True]
    by_id = await wire(client, "GET", f"/v1_1/{CLOUD}/resources/{body['asset_id']}?versions=true", node_admin_headers())
    assert by_id.status == 200 and by_id.body["public_id"] == "docs/sample" and len(by_id.body["versions"]) == 2
    # Python 1.46.3 GET: Content-Type application/json, no body
    py = await wire(client, "GET", f"/v1_1/{CLOUD}/resources/image/upload/docs/sample?versions=true", py146_json_headers())
    assert py.status == 200 and py.body["versions"] == body["versions"]


async def test_search_node_encoded_segment_and_python_path(client: TestClient) -> None:
    await py_upload(client, "docs/gone", b"gone", rt="image", tags="t")
    await py_upload(client, "docs/live", b"live", rt="image")
    reply = await wire(client, "DELETE", f"/v1_1/{CLOUD}/resources/image/upload?public_ids%5B0%5D=docs%2Fgone", py141_headers(admin=True))
    assert reply.status == 200
    node_body = json.dumps(
        {"sort_by": [{"created_at": "desc"}], "with_field": ["tags"], "expression": "status=deleted", "max_results": 10}
    ).encode()
    node = await wire(client, "POST", f"/v1_1/{CLOUD}/resources%2Fsearch", node_admin_headers("application/json"), node_body)
    assert node.status == 200, node.raw
    assert node.body["total_count"] == 1
    assert [(r["public_id"], r["status"]) for r in node.body["resources"]] == [("docs/gone", "deleted")]
    assert isinstance(node.body["time"], int)
    py_body = json.dumps(
        {"expression": "status=deleted", "max_results": 10, "with_field": ["tags"], "sort_by": [{"created_at": "desc"}]}
    ).encode()
    py = await wire(client, "POST", f"/v1_1/{CLOUD}/resources/search", py146_json_headers(), py_body)
    assert py.status == 200 and py.body["resources"] == node.body["resources"]


async def test_list_resources_query_arrays(client: TestClient) -> None:
    await py_upload(client, "docs/a", b"a")
    await py_upload(client, "docs/b", b"b")
    await py_upload(client, "other/c", b"c")
    for query in (
        "public_ids%5B0%5D=docs%2Fa&public_ids%5B1%5D=docs%2Fb",
        "public_ids%5B%5D=docs%2Fa&public_ids%5B%5D=docs%2Fb",
        "max_results=10&prefix=docs%2F&tags=true",
    ):
        reply = await wire(client, "GET", f"/v1_1/{CLOUD}/resources/image/upload?{query}", node_admin_headers())
        assert reply.status == 200, reply.raw
        assert sorted(r["public_id"] for r in reply.body["resources"]) == ["docs/a", "docs/b"], query


# --- DELETE: query arrays (Python <= 1.42.1), form body (Node), JSON body (Python >= 1.42.2) --


async def _three_assets(client: TestClient) -> dict[str, dict[str, Any]]:
    return {pid: await py_upload(client, pid, pid.encode()) for pid in ("docs/a", "docs/b", "docs/c")}


async def _live_ids(client: TestClient) -> list[str]:
    reply = await admin_get(client, "resources/image/upload?max_results=100")
    return sorted(r["public_id"] for r in reply["resources"])


async def test_python_141_delete_query_arrays_no_body(client: TestClient) -> None:
    await _three_assets(client)
    reply = await wire(
        client,
        "DELETE",
        f"/v1_1/{CLOUD}/resources/image/upload?public_ids%5B0%5D=docs%2Fa&public_ids%5B1%5D=docs%2Fb",
        py141_headers(admin=True),
    )
    assert reply.status == 200, reply.raw
    assert reply.body["deleted"] == {"docs/a": "deleted", "docs/b": "deleted"}
    assert reply.body["partial"] is False
    assert await _live_ids(client) == ["docs/c"]
    placeholder = await admin_get(client, "resources/image/upload/docs/a")
    assert placeholder["placeholder"] is True and placeholder["bytes"] == 0


async def test_node_delete_form_body(client: TestClient) -> None:
    await _three_assets(client)
    raw = b"public_ids%5B%5D=docs%2Fa&public_ids%5B%5D=docs%2Fb&public_ids%5B%5D=docs%2Fnope"
    reply = await wire(client, "DELETE", f"/v1_1/{CLOUD}/resources/image/upload", node_admin_headers(), raw)
    assert reply.status == 200, reply.raw
    assert reply.body["deleted"] == {"docs/a": "deleted", "docs/b": "deleted", "docs/nope": "not_found"}
    assert await _live_ids(client) == ["docs/c"]
    # invalidate=true appended, as Node does for raw
    await py_upload(client, "docs/raw1", b"r", rt="raw")
    reply = await wire(
        client, "DELETE", f"/v1_1/{CLOUD}/resources/raw/upload", node_admin_headers(), b"public_ids%5B%5D=docs%2Fraw1&invalidate=true"
    )
    assert reply.status == 200 and reply.body["deleted"] == {"docs/raw1": "deleted"}


async def test_python_146_delete_json_body_with_null_transformations(client: TestClient) -> None:
    await _three_assets(client)
    body = json.dumps({"transformations": None, "public_ids": ["docs/a", "docs/b"]}).encode()
    reply = await wire(client, "DELETE", f"/v1_1/{CLOUD}/resources/image/upload", py146_json_headers(), body)
    assert reply.status == 200, reply.raw
    assert reply.body["deleted"] == {"docs/a": "deleted", "docs/b": "deleted"}
    assert reply.body["deleted_counts"]["docs/a"] == {"original": 1, "derived": 0}
    assert await _live_ids(client) == ["docs/c"]


@pytest.mark.parametrize("encoding", ["json", "form"])
async def test_delete_by_asset_ids(client: TestClient, encoding: str) -> None:
    assets = await _three_assets(client)
    asset_id = assets["docs/b"]["asset_id"]
    if encoding == "json":
        headers, body = py146_json_headers(), json.dumps({"transformations": None, "asset_ids": [asset_id]}).encode()
    else:
        headers, body = node_admin_headers(), f"asset_ids%5B%5D={asset_id}".encode()
    reply = await wire(client, "DELETE", f"/v1_1/{CLOUD}/resources", headers, body)
    assert reply.status == 200, reply.raw
    assert reply.body["deleted"] == {asset_id: "deleted"}
    assert await _live_ids(client) == ["docs/a", "docs/c"]


@pytest.mark.parametrize("encoding", ["json", "form"])
async def test_delete_backed_up_versions(client: TestClient, encoding: str) -> None:
    first = await py_upload(client, "docs/v", b"one")
    second = await py_upload(client, "docs/v", b"two2")
    third = await py_upload(client, "docs/v", b"three")
    ids = [first["version_id"], second["version_id"]]
    if encoding == "json":
        headers, body = py146_json_headers(), json.dumps({"version_ids": ids}).encode()
    else:
        headers, body = node_admin_headers(), "&".join(f"version_ids%5B%5D={v}" for v in ids).encode()
    path = f"/v1_1/{CLOUD}/resources/backup/{first['asset_id']}"
    reply = await wire(client, "DELETE", path, headers, body)
    assert reply.status == 200, reply.raw
    assert reply.body["asset_id"] == first["asset_id"]
    assert sorted(reply.body["deleted_version_ids"]) == sorted(ids)
    assert "failures" not in reply.body
    assert [v["version_id"] for v in await versions_of(client, "docs/v")] == [third["version_id"]]
    gone = await wire(client, "GET", f"/v1_1/{CLOUD}/download_backup?{download_query(first['asset_id'], first['version_id'])}")
    assert gone.status == 404
    # deleting the live version is a per-item failure reported with 200 (Node rejects 207)
    reply = await wire(client, "DELETE", path, py146_json_headers(), json.dumps({"version_ids": [third["version_id"]]}).encode())
    assert reply.status == 200
    assert reply.body["deleted_version_ids"] == []
    assert [f["version_id"] for f in reply.body["failures"]] == [third["version_id"]]


# --- restore: JSON in every SDK version ----------------------------------------------------


async def test_restore_versions_aligned_with_ids(client: TestClient) -> None:
    s1 = await py_upload(client, "docs/sample", b"1")
    s2 = await py_upload(client, "docs/sample", b"22")
    t1 = await py_upload(client, "docs/sample2", b"333")
    t2 = await py_upload(client, "docs/sample2", b"4444")
    reply = await wire(
        client,
        "DELETE",
        f"/v1_1/{CLOUD}/resources/image/upload?public_ids%5B0%5D=docs%2Fsample&public_ids%5B1%5D=docs%2Fsample2",
        py141_headers(admin=True),
    )
    assert reply.status == 200
    body = json.dumps({"public_ids": ["docs/sample", "docs/sample2"], "versions": [s1["version_id"], t2["version_id"]]}).encode()
    headers = [("Accept-Encoding", "identity"), ("user-agent", PY141_UA), ("authorization", BASIC), ("Content-Type", "application/json")]
    reply = await wire(client, "POST", f"/v1_1/{CLOUD}/resources/image/upload/restore", headers, body)
    assert reply.status == 200, reply.raw
    assert set(reply.body) == {"docs/sample", "docs/sample2"}
    assert reply.body["docs/sample"]["bytes"] == 1 and reply.body["docs/sample"]["placeholder"] is False
    assert reply.body["docs/sample2"]["bytes"] == 4
    assert reply.body["docs/sample"]["asset_id"] == s1["asset_id"]
    assert (await admin_get(client, "resources/image/upload/docs/sample"))["bytes"] == 1
    versions = await versions_of(client, "docs/sample2")
    assert versions[-1]["size"] == 4 and versions[-1]["restored_from"] == t2["version_id"]
    assert t1["version_id"] in [v["version_id"] for v in versions]
    assert s2["version_id"] in [v["version_id"] for v in await versions_of(client, "docs/sample")]

    # Node: without versions → latest backup; key omitted
    await wire(client, "DELETE", f"/v1_1/{CLOUD}/resources/image/upload?public_ids%5B0%5D=docs%2Fsample", py141_headers(admin=True))
    reply = await wire(
        client,
        "POST",
        f"/v1_1/{CLOUD}/resources/image/upload/restore",
        node_admin_headers("application/json"),
        b'{"public_ids": ["docs/sample"]}',
    )
    assert reply.status == 200 and reply.body["docs/sample"]["bytes"] == 1


async def test_restore_by_asset_ids_json(client: TestClient) -> None:
    first = await py_upload(client, "docs/x", b"first!")
    await py_upload(client, "docs/x", b"second")
    body = json.dumps({"asset_ids": [first["asset_id"]], "versions": [first["version_id"]]}).encode()
    reply = await wire(client, "POST", f"/v1_1/{CLOUD}/resources/restore", py146_json_headers(), body)
    assert reply.status == 200, reply.raw
    restored = reply.body[first["asset_id"]]
    assert restored["public_id"] == "docs/x" and restored["bytes"] == 6
    download = await wire(client, "GET", f"/v1_1/{CLOUD}/download_backup?{download_query(first['asset_id'], restored['version_id'])}")
    assert download.status == 200 and download.raw == b"first!"


async def test_restore_versions_count_must_match(client: TestClient) -> None:
    first = await py_upload(client, "docs/sample", b"1")
    await py_upload(client, "docs/sample2", b"2")
    before = await versions_of(client, "docs/sample")
    body = json.dumps({"public_ids": ["docs/sample", "docs/sample2"], "versions": [first["version_id"]]}).encode()
    reply = await wire(client, "POST", f"/v1_1/{CLOUD}/resources/image/upload/restore", py146_json_headers(), body)
    assert reply.status == 400
    assert reply.body == {"error": {"message": "versions count must match ids count"}}
    assert await versions_of(client, "docs/sample") == before


# --- download_backup: the SDK-built signed URL ----------------------------------------------


async def test_download_backup_signed_url(client: TestClient) -> None:
    first = await py_upload(client, "docs/dl", PNG)
    reply = await wire(client, "GET", f"/v1_1/{CLOUD}/download_backup?{download_query(first['asset_id'], first['version_id'])}")
    assert reply.status == 200
    assert reply.raw == PNG
    assert reply.headers["Content-Type"] == "image/png"
    assert 'filename="dl.png"' in reply.headers["Content-Disposition"]
    # SHA-256 signed URL (signature_algorithm="sha256") and Node's key order both work
    params = {"timestamp": str(int(time.time())), "asset_id": first["asset_id"], "version_id": first["version_id"]}
    query = urlencode({**params, "signature": signature_of(params, algorithm="sha256"), "api_key": API_KEY})
    reply = await wire(client, "GET", f"/v1_1/{CLOUD}/download_backup?{query}")
    assert reply.status == 200 and reply.raw == PNG


async def test_keep_alive_connection_serves_several_requests(client: TestClient) -> None:
    """Node keeps the connection open; two requests on one socket both get answers."""
    await py_upload(client, "docs/k", b"k", rt="raw")
    host, port = client.server.host, client.server.port
    reader, writer = await asyncio.open_connection(host, port)
    try:
        request = (
            f"GET /v1_1/{CLOUD}/resources/raw/upload/docs%2Fk HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Authorization: {BASIC}\r\nConnection: keep-alive\r\n\r\n"
        ).encode()
        for _ in range(2):
            writer.write(request)
            await writer.drain()
            assert (await reader.readline()).startswith(b"HTTP/1.1 200")
            length = 0
            while (line := await reader.readline()) != b"\r\n":
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            assert json.loads(await reader.readexactly(length))["public_id"] == "docs/k"
    finally:
        writer.close()


def test_quote_helper_matches_node_encoding() -> None:
    """Node's encodeURIComponent on a path segment → what the tests above send."""
    assert quote("docs/sample", safe="") == "docs%2Fsample"
    assert quote("resources/search", safe="") == "resources%2Fsearch"


@pytest.mark.parametrize("order", [("0", "1"), ("1", "0")])
async def test_indexed_keys_in_separate_multipart_parts_collect_into_one_list(client: TestClient, order: tuple[str, str]) -> None:
    """`tags[0]` and `tags[1]` sent as separate parts (in any order) are one list, as in a form."""
    signed = sign({"public_id": "enc/indexed", "tags": ["first", "second"]})
    form = aiohttp.FormData()
    for key, value in signed.items():
        if key == "tags":
            for index in order:
                form.add_field(f"tags[{index}]", value[int(index)])
        else:
            form.add_field(key, str(value))
    form.add_field("file", b"indexed", filename="i.bin", content_type="application/octet-stream")
    response = await client.post(f"/v1_1/{CLOUD}/raw/upload", data=form)
    body = await response.json()
    assert response.status == 200, body
    assert body["tags"] == ["first", "second"]
