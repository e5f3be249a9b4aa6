"""The file part's body is read straight from the request stream (upload_body.file_part_chunks):
wherever the socket splits the body, the stored bytes are exactly the part's, and the parts after
it still read. Over HTTP, with the body sent in pieces the server receives one by one."""

import asyncio
import hashlib
from collections.abc import AsyncIterator

import pytest
from aiohttp.test_utils import TestClient

from tests.conftest import BASIC_HEADERS, CLOUD
from tests.server_reads import until_server_read
from versionstore.config import Config

BOUNDARY = "vsBOUNDARYvs"
DELIMITER = f"\r\n--{BOUNDARY}".encode()

#: File data that looks like the end of the part but is not: CRLF, `--`, the boundary without
#: the CRLF before it, every proper prefix of the delimiter, and a delimiter prefix at the end.
TRICKY = (
    b"\r\n\r\nline\r\n--\r\n-"
    + f"--{BOUNDARY}".encode()
    + b"\r"
    + b"x".join(DELIMITER[:n] for n in range(1, len(DELIMITER)))
    + b"\r\n--"
    + BOUNDARY[:-1].encode()
)


def body_with_file(data: bytes, filename: str = "t.bin") -> bytes:
    """public_id before the file, tags after it: the reader must find the part after the file."""
    head = f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="public_id"\r\n\r\ndocs/stream\r\n'
    head += f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
    head += "Content-Type: application/octet-stream\r\n\r\n"
    tail = f'\r\n--{BOUNDARY}\r\nContent-Disposition: form-data; name="tags"\r\n\r\nafter\r\n--{BOUNDARY}--\r\n'
    return head.encode() + data + tail.encode()


async def pieces(body: bytes, cuts: list[int], pause: float) -> AsyncIterator[bytes]:
    """`body` split at `cuts`, with a pause after each piece so the server reads them apart."""
    start = 0
    for cut in [*cuts, len(body)]:
        yield body[start:cut]
        start = cut
        await asyncio.sleep(pause)


async def read_apart(client: TestClient, body: bytes, cuts: list[int], apart: list[bool]) -> AsyncIterator[bytes]:
    """`body` split at `cuts`; each piece is sent once the server has read the one before and
    waits for more, so it reads them apart whatever the load (`apart` records that it did)."""
    start = 0
    for cut in [*cuts, len(body)]:
        if 0 < start < len(body):
            apart.append(await until_server_read(client, start))
        yield body[start:cut]
        start = max(start, min(cut, len(body)))


async def upload(client: TestClient, body: bytes, cuts: list[int], pause: float | None = None) -> tuple[int, dict[str, object]]:
    """POST `body` in pieces: read apart by the server (the default), or with `pause` seconds
    after each piece (the server may then read several at once)."""
    headers = {**BASIC_HEADERS, "Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
    apart: list[bool] = []
    data = pieces(body, cuts, pause) if pause is not None else read_apart(client, body, cuts, apart)
    response = await client.post(f"/v1_1/{CLOUD}/raw/upload", data=data, headers=headers)
    status, reply = response.status, await response.json()
    if status == 200:
        assert all(apart), f"the server did not read the pieces apart: {apart}"
    return status, reply


async def test_file_part_split_at_every_byte_keeps_its_bytes(client: TestClient) -> None:
    body = body_with_file(TRICKY)
    start = body.index(TRICKY)
    # every split inside the file data and its delimiter, and a few inside the part after it
    for cut in range(start - 2, start + len(TRICKY) + len(DELIMITER) + 8):
        status, reply = await upload(client, body, [start, cut] if cut > start else [cut])
        assert status == 200, (cut, reply)
        assert (reply["bytes"], reply["etag"], reply["tags"]) == (len(TRICKY), hashlib.md5(TRICKY).hexdigest(), ["after"]), cut


@pytest.mark.parametrize("size", [1, 7, 3])
async def test_file_part_in_tiny_pieces(client: TestClient, size: int) -> None:
    """Pieces smaller than the delimiter: a delimiter prefix spans several reads."""
    body = body_with_file(TRICKY)
    status, reply = await upload(client, body, list(range(size, len(body), size)))
    assert status == 200, reply
    assert (reply["bytes"], reply["etag"], reply["tags"]) == (len(TRICKY), hashlib.md5(TRICKY).hexdigest(), ["after"])


async def test_empty_and_large_file_parts(client: TestClient) -> None:
    big = bytes(range(256)) * 20_000 + DELIMITER[:-1]  # ~5 MiB: more than one hand-off block of the spool
    for data in (b"", big):
        status, reply = await upload(client, body_with_file(data), [100, 70_000, 2_000_000])
        assert status == 200, reply
        assert (reply["bytes"], reply["etag"]) == (len(data), hashlib.md5(data).hexdigest())


async def test_body_ending_inside_the_file_part_is_400_and_stores_nothing(client: TestClient) -> None:
    body = body_with_file(TRICKY)
    truncated = body[: body.index(TRICKY) + len(TRICKY) + 3]  # ends inside the delimiter
    status, reply = await upload(client, truncated, [len(truncated) - 5])
    assert status == 400, reply
    assert "Malformed multipart body" in str(reply), reply
    listing = await client.get(f"/v1_1/{CLOUD}/resources/raw", headers=BASIC_HEADERS)
    assert (await listing.json())["resources"] == []


async def test_file_data_full_of_carriage_returns(client: TestClient) -> None:
    """Every read ends in CRs and delimiter prefixes: only the last CR can begin a delimiter."""
    data = (b"\r" * 3000 + b"\r\n\r\n-\r\n--" + BOUNDARY[:5].encode()) * 20
    body = body_with_file(data)
    status, reply = await upload(client, body, list(range(997, len(body), 997)), pause=0.001)
    assert status == 200, reply
    assert (reply["bytes"], reply["etag"], reply["tags"]) == (len(data), hashlib.md5(data).hexdigest(), ["after"])


async def test_chunked_upload_part_in_tiny_pieces(client: TestClient) -> None:
    """`upload_large` chunks read their file part the same way."""
    body = body_with_file(TRICKY)
    headers = {
        **BASIC_HEADERS,
        "Content-Type": f"multipart/form-data; boundary={BOUNDARY}",
        "X-Unique-Upload-Id": "stream-test-1",
        "Content-Range": f"bytes 0-{len(TRICKY) - 1}/{len(TRICKY)}",
    }
    response = await client.post(f"/v1_1/{CLOUD}/raw/upload", data=pieces(body, list(range(7, len(body), 7)), 0.001), headers=headers)
    reply = await response.json()
    assert response.status == 200, reply
    assert (reply["bytes"], reply["etag"], reply["tags"]) == (len(TRICKY), hashlib.md5(TRICKY).hexdigest(), ["after"])


async def test_too_large_while_a_block_is_being_written_leaves_no_spool_file(client: TestClient, config: Config) -> None:
    """The refusal can come while a worker still writes the block before: the file goes anyway."""
    data = bytes(range(256)) * ((config.max_upload_bytes + (9 << 20)) // 256)
    status, reply = await upload(client, body_with_file(data), [], pause=0)
    assert status == 400 and "File size too large" in str(reply), reply
    for _ in range(100):  # removed by the worker once its block is written (milliseconds)
        if not list((config.data_dir / "spool").glob("*.part")):
            break
        await asyncio.sleep(0.05)
    assert not list((config.data_dir / "spool").glob("*.part"))
