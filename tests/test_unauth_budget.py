"""Before a request is authenticated it holds little, from a budget all such requests share.

Regression tests for issue 8 item 6: a body of many 60 KB fields without credentials was held
whole in memory before the 401; a file part sent before the signature was spooled to disk in
full before the 401.
"""

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from tests.conftest import BASIC_HEADERS, CLOUD
from tests.test_upload_body_errors import BOUNDARY, field, multipart, signed_fields
from versionstore.config import Config
from versionstore.http.keys import UNAUTH_BUDGET

MiB = 1 << 20
FIELD = b"x" * 60_000
MULTIPART = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}


@pytest.fixture
def config(tmp_path: Path, body_reader: str) -> Config:
    return Config(data_dir=tmp_path / "data", max_upload_bytes=64 * MiB, max_body_bytes=1 * MiB, unauth_budget_bytes=3 * MiB,
                  small_body_bytes=0 if body_reader == "stream" else Config.small_body_bytes)


def many_fields(total: int) -> list[tuple[str, bytes]]:
    return [field(f"f{i}", FIELD) for i in range(total // len(FIELD) + 1)]


def file_part(data: bytes) -> tuple[str, bytes]:
    return 'Content-Disposition: form-data; name="file"; filename="a.bin"\r\nContent-Type: application/octet-stream', data


async def post(client: TestClient, path: str, data: Any, headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    response = await client.post(f"/v1_1/{CLOUD}/{path}", data=data, headers=headers)
    return response.status, await response.json()


def budget_used(client: TestClient) -> int:
    return client.app[UNAUTH_BUDGET].used  # type: ignore[index]


async def test_fields_without_credentials_are_refused_at_the_per_request_cap(client: TestClient) -> None:
    status, body = await post(client, "image/upload", multipart(many_fields(2 * MiB)), MULTIPART)
    assert status == 400 and "too large" in body["error"]["message"], body
    assert budget_used(client) == 0


@pytest.mark.parametrize("kind", ["file", "data-uri"])
async def test_a_file_before_the_signature_is_not_spooled_past_the_cap(client: TestClient, config: Config, kind: str) -> None:
    data = b"z" * (8 * MiB)
    first = file_part(data) if kind == "file" else field("file", b"data:application/octet-stream;base64," + base64.b64encode(data))
    parts = [first, *signed_fields(public_id="docs/late")]
    status, body = await post(client, "image/upload", multipart(parts), MULTIPART)
    assert status == 400 and "send them before the file" in body["error"]["message"], body
    assert [p for p in config.spool_dir.rglob("*") if p.is_file()] == [] and budget_used(client) == 0


async def test_small_file_before_the_signature_still_works(client: TestClient) -> None:
    status, body = await post(client, "image/upload", multipart([file_part(b"early"), *signed_fields(public_id="docs/early")]), MULTIPART)
    assert status == 200 and body["bytes"] == 5, body
    assert budget_used(client) == 0


async def test_authenticated_uploads_are_not_limited_by_the_budget(client: TestClient) -> None:
    big = b"y" * (8 * MiB)
    status, body = await post(client, "image/upload", multipart([*signed_fields(public_id="docs/big"), file_part(big)]), MULTIPART)
    assert status == 200 and body["bytes"] == len(big), body
    form = aiohttp.FormData()
    form.add_field("public_id", "docs/basic")
    form.add_field("file", big, filename="b.bin")
    response = await client.post(f"/v1_1/{CLOUD}/image/upload", data=form, headers=BASIC_HEADERS)
    assert response.status == 200, await response.text()


async def test_too_many_fields_are_refused(client: TestClient) -> None:
    parts = [*signed_fields(public_id="docs/many"), *(field(f"x{i}", b"1") for i in range(2100)), file_part(b"a")]
    status, body = await post(client, "image/upload", multipart(parts), MULTIPART)
    assert status == 400 and "Too many fields" in body["error"]["message"], body
    status, body = await post(client, "image/destroy", "&".join(f"x{i}=1" for i in range(2100)),
                              {"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 400 and "Too many fields" in body["error"]["message"], body


@pytest.mark.parametrize("encoding", ["form", "json", "multipart", "data-uri"])
async def test_non_multipart_and_signed_endpoint_bodies_are_bounded(client: TestClient, encoding: str) -> None:
    blob = "a" * (2 * MiB)
    path = "image/upload" if encoding == "data-uri" else "image/destroy"
    if encoding == "json":
        data, headers = json.dumps({"public_id": blob}), {"Content-Type": "application/json"}
    elif encoding == "multipart":
        data, headers = multipart(many_fields(2 * MiB)), MULTIPART
    elif encoding == "data-uri":
        data, headers = f"file=data:application/octet-stream;base64,{blob}", {"Content-Type": "application/x-www-form-urlencoded"}
    else:
        data, headers = f"public_id={blob}", {"Content-Type": "application/x-www-form-urlencoded"}
    status, body = await post(client, path, data, headers)
    assert status == 400 and "too large" in body["error"]["message"], body
    assert budget_used(client) == 0


async def test_the_budget_is_shared_by_concurrent_unauthenticated_requests(client: TestClient) -> None:
    release = asyncio.Event()
    head = multipart(many_fields(800_000))[: -len(f"--{BOUNDARY}--\r\n")]

    async def stalled() -> AsyncIterator[bytes]:
        yield head
        await release.wait()
        yield f"--{BOUNDARY}--\r\n".encode()

    async def send() -> int:
        response = await client.post(f"/v1_1/{CLOUD}/image/upload", data=stalled(), headers=MULTIPART)
        return response.status

    holders = [asyncio.create_task(send()) for _ in range(3)]
    for _ in range(500):  # up to 10 s on a loaded machine
        if budget_used(client) >= 3 * 750_000:
            break
        await asyncio.sleep(0.02)
    assert budget_used(client) >= 3 * 750_000
    status, body = await post(client, "image/upload", multipart(many_fields(800_000)), MULTIPART)
    assert status == 429 and "try again later" in body["error"]["message"], body
    release.set()
    assert await asyncio.gather(*holders) == [401, 401, 401]
    assert budget_used(client) == 0
    status, body = await post(client, "image/upload", multipart([*signed_fields(public_id="docs/after"), file_part(b"ok")]), MULTIPART)
    assert status == 200, body
