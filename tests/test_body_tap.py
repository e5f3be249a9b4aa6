"""A large file part is received into the spool's own blocks (http/body_tap.py): wherever the
socket and the blocks split the body, the stored bytes are exactly the part's, the parts after it
still read, a bad or cut body stores nothing and leaves no spool file, and the connection is
closed after the response (aiohttp's parser never saw the tapped bytes).

The requests are written on a raw socket with a Content-Length, in pieces the server reads
apart (aiohttp's client would send an iterator chunked, which is never tapped). Most tests
shrink the tap's thresholds so that small bodies cross many blocks."""

import asyncio
import hashlib
import json
import os
import threading
from collections.abc import Iterator

import pytest
from aiohttp.test_utils import TestClient

from tests.conftest import BASIC_HEADERS, CLOUD
from tests.server_reads import until_server_read
from tests.test_spool_flush import until
from tests.test_upload_stream import BOUNDARY, DELIMITER, TRICKY, body_with_file
from versionstore import spool as spool_module
from versionstore.block_pool import BlockPool
from versionstore.config import Config
from versionstore.http import body_tap
from versionstore.spool import IN_FLIGHT, PAGE, Hashes

#: The thresholds the service runs with (read at import: tests.tap_everywhere patches them per test).
TAP_MIN, BLOCK = body_tap.TAP_MIN, body_tap.BLOCK
SMALL_BLOCK = 97  # prime: over the tests below, blocks end at every offset of the data


@pytest.fixture
def body_reader() -> str:
    """The tap takes the file part over from the streaming reader, and these bodies are small
    (TAP_MIN is lowered): they must stream, not be read whole by http/small_body.py."""
    return "stream"


@pytest.fixture
def tap_all(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every Content-Length body with a byte left at its file part is tapped."""
    monkeypatch.setattr(body_tap, "TAP_MIN", 1)
    yield


@pytest.fixture
def small_blocks(tap_all: None, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(body_tap, "BLOCK", SMALL_BLOCK)
    yield


@pytest.fixture
def pool(monkeypatch: pytest.MonkeyPatch) -> BlockPool:
    """An empty pool of the service's bound, so a test sees every block its uploads take."""
    fresh = BlockPool(body_tap.POOL.limit)
    monkeypatch.setattr(body_tap, "POOL", fresh)
    return fresh


async def raw_post(
    client: TestClient, body: bytes, cuts: list[int], pause: float = 0.01, length: int | None = None, half_close: bool = False
) -> tuple[int, dict[str, str], bytes]:
    """POST `body` to the upload endpoint, split at `cuts`; (status, headers, body) of the answer,
    or (0, {}, b"") when the server closed the connection without one. The second piece goes once
    the server has read the first and waits for more, so that it reaches the file part while the
    rest is still on its way (it gets there once the second piece is in: aiohttp's reader of the
    field before it reads ahead)."""
    assert client.server.host is not None and client.server.port is not None
    reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    head = (
        f"POST /v1_1/{CLOUD}/raw/upload HTTP/1.1\r\nHost: {client.server.host}\r\n"
        f"Authorization: {BASIC_HEADERS['Authorization']}\r\n"
        f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
        f"Content-Length: {len(body) if length is None else length}\r\n\r\n"
    )
    try:
        writer.write(head.encode())
        start = 0
        for cut in [*cuts, len(body)]:
            writer.write(body[start:cut])
            await writer.drain()
            if start == 0 and cut < len(body):
                assert await until_server_read(client, cut), "the server did not wait for the second piece"
            else:
                await asyncio.sleep(pause)
            start = cut
        if half_close:
            writer.write_eof()
    except ConnectionError:
        pass  # the server answered early and closed: the answer is read below
    try:
        status_line = await reader.readline()
        if not status_line:
            return 0, {}, b""
        headers: dict[str, str] = {}
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            headers[name.strip().lower()] = value.strip()
        reply = await reader.readexactly(int(headers["content-length"]))
        return int(status_line.split()[1]), headers, reply
    finally:
        writer.close()


def file_start(body: bytes) -> int:
    return body.index(b"octet-stream\r\n\r\n") + len(b"octet-stream\r\n\r\n")


async def assert_nothing_stored(client: TestClient, config: Config) -> None:
    await assert_stored(client, config, 0)


async def assert_stored(client: TestClient, config: Config, count: int) -> None:
    """`count` resources, and no spool file left (a worker may still finish its block: milliseconds)."""
    listing = await client.get(f"/v1_1/{CLOUD}/resources/raw", headers=BASIC_HEADERS)
    assert len((await listing.json())["resources"]) == count
    await until(lambda: not list((config.data_dir / "spool").glob("*.part")))


async def test_tapped_upload_keeps_its_bytes_wherever_blocks_and_reads_end(client: TestClient, small_blocks: None) -> None:
    """Padding shifts the data against the blocks, so the delimiter and every prefix of it in the
    data straddle a block end somewhere; the parts after the file still read."""
    for pad in range(len(DELIMITER) + 3):
        data = b"p" * pad + TRICKY * 3
        body = body_with_file(data)
        start = file_start(body)
        status, headers, reply = await raw_post(client, body, [start + 5, start + 150, start + 333])
        assert status == 200, (pad, reply)
        assert headers.get("connection") == "close", headers  # it was tapped
        result = json.loads(reply)
        assert (result["bytes"], result["etag"], result["tags"]) == (len(data), hashlib.md5(data).hexdigest(), ["after"]), pad


async def test_tapped_upload_split_at_every_byte_around_the_delimiter(client: TestClient, small_blocks: None) -> None:
    data = os.urandom(3000) + TRICKY
    body = body_with_file(data)
    start = file_start(body)
    end = start + len(data)
    for cut in range(end - 4, end + len(DELIMITER) + 4):
        status, headers, reply = await raw_post(client, body, [start + 1, start + 100, cut])
        assert status == 200 and headers.get("connection") == "close", (cut, reply)
        assert hashlib.md5(data).hexdigest().encode() in reply, cut


async def test_body_ending_inside_the_tapped_part_is_400_and_stores_nothing(client: TestClient, config: Config, small_blocks: None) -> None:
    """The Content-Length is honest but the multipart body stops inside the file part."""
    body = body_with_file(TRICKY)
    truncated = body[: body.index(TRICKY) + len(TRICKY) + 3]
    status, headers, reply = await raw_post(client, truncated, [file_start(truncated) + 2, file_start(truncated) + 60])
    assert status == 400 and b"Malformed multipart body" in reply, reply
    assert headers.get("connection") == "close"
    await assert_nothing_stored(client, config)


async def test_client_stopping_mid_body_stores_nothing(client: TestClient, config: Config, small_blocks: None) -> None:
    """The client promised more than it sends and shuts its side: no version, no spool file, and
    the server goes on serving."""
    body = body_with_file(os.urandom(5000))
    status, _, _ = await raw_post(client, body[:3000], [file_start(body) + 2, file_start(body) + 60], length=len(body), half_close=True)
    assert status in (0, 400)
    await assert_nothing_stored(client, config)
    health = await client.get("/healthz")
    assert health.status == 200


async def test_second_file_part_after_a_tapped_one_is_refused(client: TestClient, config: Config, small_blocks: None) -> None:
    body = body_with_file(os.urandom(2000))
    second = f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="b.bin"\r\n\r\nxx\r\n--{BOUNDARY}--\r\n'
    body = body[: body.rindex(f"--{BOUNDARY}--".encode())] + second.encode()
    status, headers, reply = await raw_post(client, body, [file_start(body) + 2, file_start(body) + 60])
    assert status == 400 and b"More than one file part" in reply, reply
    assert headers.get("connection") == "close"
    await assert_nothing_stored(client, config)


async def test_too_large_while_tapped_drains_the_body_and_answers(client: TestClient, config: Config, tap_all: None) -> None:
    """The refusal comes mid-body: the rest is read and dropped, the client gets its 400."""
    data = bytes(range(256)) * ((config.max_upload_bytes + (1 << 20)) // 256)
    body = body_with_file(data)
    status, headers, reply = await raw_post(client, body, [file_start(body) + 2], pause=0)
    assert status == 400 and b"File size too large" in reply, reply
    assert headers.get("connection") == "close"
    await assert_nothing_stored(client, config)


async def test_large_upload_with_the_default_blocks(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    """Above TAP_MIN with the real block size: the SDKs' field order (the file last)."""
    monkeypatch.setattr(body_tap, "TAP_MIN", TAP_MIN)
    monkeypatch.setattr(body_tap, "BLOCK", BLOCK)
    data = os.urandom(TAP_MIN + BLOCK + 12345)
    body = body_with_file(data)
    status, headers, reply = await raw_post(client, body, [file_start(body) + 100], pause=0)
    assert status == 200, reply
    assert headers.get("connection") == "close"
    assert hashlib.md5(data).hexdigest().encode() in reply
    after = await client.get(f"/v1_1/{CLOUD}/resources/raw", headers=BASIC_HEADERS)  # a new connection
    assert [r["bytes"] for r in (await after.json())["resources"]] == [len(data)]


async def test_small_upload_keeps_the_connection(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    """Below TAP_MIN nothing changes: aiohttp's path, keep-alive."""
    monkeypatch.setattr(body_tap, "TAP_MIN", TAP_MIN)
    body = body_with_file(b"small")
    status, headers, _ = await raw_post(client, body, [])
    assert status == 200 and headers.get("connection") != "close", headers


async def test_the_next_uploads_reuse_the_blocks_of_the_first(client: TestClient, small_blocks: None, pool: BlockPool) -> None:
    data = os.urandom(3000)  # 31 blocks: every block of the rotation is used
    body = body_with_file(data)
    for _ in range(3):
        status, headers, reply = await raw_post(client, body, [file_start(body) + 2, file_start(body) + 60])
        assert status == 200 and headers.get("connection") == "close", reply
        assert hashlib.md5(data).hexdigest().encode() in reply
        await until(lambda: pool.free_blocks == pool.allocated)  # all given back
    assert pool.allocated == IN_FLIGHT + 1


async def test_a_small_tapped_body_takes_only_the_blocks_it_fills(client: TestClient, small_blocks: None, pool: BlockPool) -> None:
    body = body_with_file(os.urandom(150))
    status, _, reply = await raw_post(client, body, [file_start(body) + 2, file_start(body) + 60])
    assert status == 200, reply
    await until(lambda: pool.free_blocks == pool.allocated)
    assert pool.allocated == 2


async def test_blocks_of_a_failed_upload_come_back_only_once_its_worker_lets_go(
    client: TestClient, config: Config, small_blocks: None, pool: BlockPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The write lane holds the first block of an upload that then fails (the client stops
    mid-body): none of its blocks is reused while the worker may read one, a concurrent upload
    gets blocks of its own, and all come back once the worker is done."""
    started, release = threading.Event(), threading.Event()
    real = Hashes.update_blake3

    def held(self: Hashes, data: bytes | memoryview) -> None:
        if not started.is_set():
            started.set()
            release.wait(10)
        real(self, data)

    monkeypatch.setattr(Hashes, "update_blake3", held)
    try:
        body = body_with_file(os.urandom(5000))
        cut = file_start(body) + 250  # under IN_FLIGHT blocks: the tap is receiving when the body stops
        status, _, _ = await raw_post(client, body[:cut], [file_start(body) + 2, file_start(body) + 60], length=len(body), half_close=True)
        assert status in (0, 400) and started.is_set()
        failed = pool.allocated
        await asyncio.sleep(0.2)
        assert pool.free_blocks == 0  # the held worker may still read any block given to its spool
        data = os.urandom(3000)
        other = body_with_file(data)
        status, _, reply = await raw_post(client, other, [file_start(other) + 2, file_start(other) + 60])
        assert status == 200 and hashlib.md5(data).hexdigest().encode() in reply, reply
        await until(lambda: pool.free_blocks == IN_FLIGHT + 1)
        assert pool.allocated == failed + IN_FLIGHT + 1  # none of the failed upload's blocks
    finally:
        release.set()
    await until(lambda: pool.free_blocks == pool.allocated)
    await assert_stored(client, config, 1)



@pytest.mark.parametrize("size", [PAGE - 3, 2 * PAGE + 60, 3 * (2 * PAGE + 97) - 40, 6 * (2 * PAGE + 97) + 5, 50_000])
async def test_blocks_cut_at_page_boundaries_keep_the_bytes(
    client: TestClient, config: Config, tap_all: None, monkeypatch: pytest.MonkeyPatch, size: int
) -> None:
    """Blocks of a few pages (not a whole number of them), direct writes from one page on: every
    block but the last is cut at a page boundary and the rest carried into the next one, with a
    delimiter prefix at any offset; the stored bytes and the etag are the body's."""
    monkeypatch.setattr(body_tap, "BLOCK", 2 * PAGE + 97)
    monkeypatch.setattr(spool_module, "DIRECT_MIN", PAGE)
    real, direct = spool_module.SpoolFile._write_direct, []

    def counting(spool: spool_module.SpoolFile, view: memoryview, offset: int) -> int:
        direct.append(offset)
        return real(spool, view, offset)

    monkeypatch.setattr(spool_module.SpoolFile, "_write_direct", counting)
    data = os.urandom(size)
    body = body_with_file(data)
    status, headers, reply = await raw_post(client, body, [file_start(body) + 1, file_start(body) + 100])
    assert status == 200 and headers.get("connection") == "close", reply  # it was tapped
    assert json.loads(reply)["etag"] == hashlib.md5(data).hexdigest()
    assert json.loads(reply)["bytes"] == size
    stored = [path for path in config.data_dir.rglob("*") if path.is_file() and path.stat().st_size == size and "spool" not in path.parts]
    assert stored and all(path.read_bytes() == data for path in stored)
    assert len(direct) >= size // (2 * PAGE) and all(offset % PAGE == 0 for offset in direct)  # a write per block
