"""Malformed upload bodies answer 400 with a clear message, never a 500 (issue 8 item 11, body parts)."""

import pytest
from aiohttp.test_utils import TestClient

from tests.conftest import BASIC_HEADERS, CLOUD, sign

BOUNDARY = "vsBOUNDARYvs"


def multipart(parts: list[tuple[str, bytes]]) -> bytes:
    """`parts` are (headers, value); headers without the trailing blank line."""
    out = b""
    for headers, value in parts:
        out += f"--{BOUNDARY}\r\n{headers}\r\n\r\n".encode() + value + b"\r\n"
    return out + f"--{BOUNDARY}--\r\n".encode()


def field(name: str, value: bytes, extra: str = "") -> tuple[str, bytes]:
    return f'Content-Disposition: form-data; name="{name}"' + (f"\r\n{extra}" if extra else ""), value


def signed_fields(**params: str) -> list[tuple[str, bytes]]:
    return [field(key, str(value).encode()) for key, value in sign(params).items()]


BAD_PARTS = {
    "unknown charset": (field("public_id", b"docs/x", "Content-Type: text/plain; charset=x-no-such-charset"), "Unknown charset"),
    "invalid utf-8": (field("tags", b"ok\xff\xfe"), "Invalid utf-8 text"),
    "bad streamed base64": (field("file", b"data:application/octet-stream;base64," + b"!!!!" * 5000), "Invalid data URI: bad base64"),
    "bad base64 tail": (field("file", b"data:application/octet-stream;base64,QUJDQ!"), "Invalid data URI: bad base64"),
    "non-utf-8 url": (field("file", b"http://example.com/\xff\xfe.png"), "Invalid utf-8 text"),
}


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
@pytest.mark.parametrize("case", sorted(BAD_PARTS))
async def test_malformed_parts_are_400(client: TestClient, case: str, signed: bool) -> None:
    part, message = BAD_PARTS[case]
    parts = [*signed_fields(public_id="docs/bad"), part] if signed else [part]
    response = await client.post(
        f"/v1_1/{CLOUD}/image/upload", data=multipart(parts), headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
    )
    body = await response.json()
    assert response.status == 400, body
    assert message in body["error"]["message"], body
    listing = await client.get(f"/v1_1/{CLOUD}/resources/image", headers=BASIC_HEADERS)
    assert (await listing.json())["resources"] == []

