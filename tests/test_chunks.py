"""Chunked uploads (`upload_large`): signed like any upload, write-once, bounded, crash-safe.

Each test drives the real app over HTTP with hand-built multipart bodies, because the SDKs
never send the hostile shapes (fields after the file part, stalled duplicates) checked here.
"""

import asyncio
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import blake3
import pytest
from aiohttp.test_utils import TestClient

from tests.conftest import CLOUD
from tests.test_bad_input import Snapshot, download_query, expect_error, sign_params
from versionstore.chunks import ASSEMBLY_LEASE
from versionstore.config import Config
from versionstore.http.app import create_app
from versionstore.http.keys import CHUNKS, META

MiB = 1 << 20
MIN = 5 * MiB  # every chunk but the last (docs/api.md)
BOUNDARY = "chunkb0undary"
Part = tuple[str, str | bytes]  # a field, or ("file", bytes) for the file part


def body(parts: list[Part], filename: str = "big.bin") -> bytes:
    out = bytearray()
    for name, value in parts:
        if isinstance(value, bytes):
            out += f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'.encode()
            out += b"Content-Type: application/octet-stream\r\n\r\n" + value + b"\r\n"
        else:
            out += f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
    out += f"--{BOUNDARY}--\r\n".encode()
    return bytes(out)


def chunk_headers(upload_id: str, content_range: str) -> dict[str, str]:
    return {
        "Content-Type": f"multipart/form-data; boundary={BOUNDARY}",
        "X-Unique-Upload-Id": upload_id,
        "Content-Range": content_range,
    }


async def send_chunk(
    client: TestClient, upload_id: str, data: bytes, start: int, total: int | None, rt: str = "raw", **params: str
) -> aiohttp.ClientResponse:
    end = start + len(data) - 1
    parts: list[Part] = [*sign_params(params).items(), ("file", data)]
    headers = chunk_headers(upload_id, f"bytes {start}-{end}/{-1 if total is None else total}")
    return await client.post(f"/v1_1/{CLOUD}/{rt}/upload", data=body(parts), headers=headers)


async def ok(response: aiohttp.ClientResponse) -> dict[str, Any]:
    result: dict[str, Any] = await response.json()
    assert response.status == 200, result
    return result


async def download(client: TestClient, result: dict[str, Any]) -> bytes:
    response = await client.get(f"/v1_1/{CLOUD}/download_backup?{download_query(result['asset_id'], result['version_id'])}")
    assert response.status == 200
    return await response.read()


def blobs(config: Config) -> list[Path]:
    return sorted(p for store in ("primary", "backup") for p in (config.data_dir / store).rglob("*") if p.is_file())


def assert_blobs_match_their_names(config: Config) -> None:
    found = blobs(config)
    assert found
    for path in found:
        assert blake3.blake3(path.read_bytes()).hexdigest() == path.name, path


async def upload_two_chunks(client: TestClient, upload_id: str, data: bytes, **params: str) -> dict[str, Any]:
    first = await ok(await send_chunk(client, upload_id, data[:MIN], 0, len(data), **params))
    assert first["done"] is False
    return await ok(await send_chunk(client, upload_id, data[MIN:], MIN, len(data), **params))


# --- 8.1: every field is signed, wherever it sits in the body -------------------------------


UNSIGNED_AFTER_FILE: list[list[Part]] = [
    [("public_id", "victim/doc")],
    [("backup", "false")],
    [("public_id", "victim/doc"), ("backup", "false")],
]


@pytest.mark.parametrize("after", UNSIGNED_AFTER_FILE)
async def test_fields_after_the_file_part_must_be_signed(client: TestClient, config: Config, after: list[Part]) -> None:
    victim = await ok(await send_chunk(client, secrets.token_hex(8), b"victim bytes", 0, 12, public_id="victim/doc"))
    async with Snapshot(client, config.data_dir):
        signed = sign_params({"public_id": "mallory/doc"})  # a valid signature over these fields only
        parts: list[Part] = [*signed.items(), ("file", b"overwritten!"), *after]
        response = await client.post(f"/v1_1/{CLOUD}/raw/upload", data=body(parts), headers=chunk_headers("attack1", "bytes 0-11/12"))
        await expect_error(response, 401, prefix="Invalid Signature")
    assert await download(client, victim) == b"victim bytes"


async def test_fields_after_the_file_part_count_when_signed(client: TestClient) -> None:
    """The SDKs send the file last, but a signed field after it is as good as one before it."""
    signed = sign_params({"public_id": "late/fields", "backup": "false"})
    fields = list(signed.items())
    parts: list[Part] = [fields[0], ("file", b"0123456789"), *fields[1:]]
    response = await client.post(f"/v1_1/{CLOUD}/raw/upload", data=body(parts), headers=chunk_headers("late1", "bytes 0-9/10"))
    result = await ok(response)
    assert result["public_id"] == "late/fields" and result["backup"] is False


async def test_credentials_before_the_file_are_checked_before_its_bytes(client: TestClient, config: Config) -> None:
    """A bad signature that precedes the file part is refused before the file is read."""
    fields = sign_params({"public_id": "docs/early"})
    fields["signature"] = "0" * 40
    parts: list[Part] = [*fields.items(), ("file", b"x" * MIN)]
    async with Snapshot(client, config.data_dir):
        headers = chunk_headers("early1", f"bytes 0-{MIN - 1}/{2 * MIN}")
        response = await client.post(f"/v1_1/{CLOUD}/raw/upload", data=body(parts), headers=headers)
        await expect_error(response, 401, prefix="Invalid Signature")
    assert await client.app[META].get_upload_session(CLOUD, "early1") is None


# --- 8.3: published bytes are immutable -----------------------------------------------------


async def test_a_stalled_duplicate_chunk_cannot_change_published_bytes(client: TestClient, config: Config) -> None:
    data = secrets.token_bytes(MIN + MiB)
    upload_id = secrets.token_hex(8)
    await ok(await send_chunk(client, upload_id, data[:MIN], 0, len(data), public_id="docs/stalled"))

    # A retry of chunk 0 with other bytes: half its file part is sent, then it stalls.
    fields = sign_params({"public_id": "docs/stalled"})
    payload = body([*fields.items(), ("file", b"X" * MIN)])
    cut = payload.index(b"X" * MiB) + 2 * MiB
    release = asyncio.Event()

    async def stalled_body() -> AsyncIterator[bytes]:
        yield payload[:cut]
        await release.wait()
        yield payload[cut:]

    headers = chunk_headers(upload_id, f"bytes 0-{MIN - 1}/{len(data)}")
    stalled = asyncio.create_task(client.post(f"/v1_1/{CLOUD}/raw/upload", data=stalled_body(), headers=headers))
    await asyncio.sleep(0.3)  # the server is now inside the stalled request's file part

    final = await ok(await send_chunk(client, upload_id, data[MIN:], MIN, len(data), public_id="docs/stalled"))
    assert final["bytes"] == len(data)
    release.set()
    late = await stalled
    assert_blobs_match_their_names(config)
    assert await download(client, final) == data
    await expect_error(late, 400, prefix="Upload")  # the session is finished: refused, nothing written
    # and any further chunk for the finished session is refused too
    await expect_error(await send_chunk(client, upload_id, data[MIN:], MIN, len(data), public_id="docs/stalled"), 400)
    assert await download(client, final) == data


async def test_published_parts_and_blobs_are_never_open_for_writing(client: TestClient, config: Config) -> None:
    """Committed parts are read-only files; assembly writes a new file, never a part."""
    data = secrets.token_bytes(MIN + 10)
    upload_id = secrets.token_hex(8)
    await ok(await send_chunk(client, upload_id, data[:MIN], 0, len(data)))
    parts = list((config.spool_dir / "chunks").glob("*.chunk"))
    assert len(parts) == 1 and parts[0].stat().st_mode & 0o222 == 0
    final = await ok(await send_chunk(client, upload_id, data[MIN:], MIN, len(data)))
    assert not list((config.spool_dir / "chunks").iterdir())  # parts released once published
    blob_inodes = {p.stat().st_ino for p in blobs(config)}
    assert parts[0].exists() is False and all(p.stat().st_mode & 0o222 == 0 for p in blobs(config))
    assert len(blob_inodes) >= 1
    assert await download(client, final) == data


# --- 8.4: a refused chunk never enters the session ------------------------------------------


@pytest.mark.parametrize(
    ("content_range", "sent"),
    [
        (f"bytes 0-{MIN + 199}/-1", MIN + 150),  # too short: not what its Content-Range says
        (f"bytes 0-{MIN - 1}/-1", MIN + 50),  # too long
        ("bytes 0-199/-1", 150),  # and too small to be a non-final chunk at all
    ],
)
async def test_a_refused_chunk_leaves_no_bytes_behind(client: TestClient, config: Config, content_range: str, sent: int) -> None:
    upload_id = secrets.token_hex(8)
    parts: list[Part] = [*sign_params({"public_id": "docs/refused"}).items(), ("file", b"r" * sent)]
    response = await client.post(f"/v1_1/{CLOUD}/raw/upload", data=body(parts), headers=chunk_headers(upload_id, content_range))
    await expect_error(response, 400)
    assert await client.app[META].get_upload_session(CLOUD, upload_id) is None
    assert not [p for p in config.spool_dir.rglob("*") if p.is_file()]
    result = await ok(await send_chunk(client, upload_id, b"a" * 100, 0, 100, public_id="docs/refused"))
    assert result["bytes"] == 100
    assert await download(client, result) == b"a" * 100
    assert_blobs_match_their_names(config)


# --- 9.17: every chunk but the last is at least 5 MiB ---------------------------------------


async def test_small_non_final_chunks_are_refused(client: TestClient, config: Config) -> None:
    message = "All parts except EOF-chunk must be larger than 5mb"
    async with Snapshot(client, config.data_dir):
        for total in (None, 2 * MIN):
            response = await send_chunk(client, secrets.token_hex(8), b"s" * (MIN - 1), 0, total)
            await expect_error(response, 400, message)
    # the last chunk may be small, and an upload of one small chunk is fine
    data = secrets.token_bytes(MIN + 1)
    assert (await upload_two_chunks(client, secrets.token_hex(8), data))["bytes"] == len(data)
    single = await ok(await send_chunk(client, secrets.token_hex(8), b"tiny", 0, 4))
    assert single["bytes"] == 4


# --- 8.12: sessions are bounded and swept while running -------------------------------------


@pytest.fixture
def capped(tmp_path: Path) -> Config:
    return Config(data_dir=tmp_path / "data", max_upload_bytes=64 << 20, chunk_sessions_max=3, chunk_sessions_max_bytes=40 * MiB)


@pytest.fixture
async def capped_client(aiohttp_client: Any, capped: Config) -> TestClient:
    app = create_app(capped)
    test_client: TestClient = await aiohttp_client(app)
    await app[META].create_cloud(CLOUD, "key123", "secret456", auto_backup=True)
    return test_client


async def test_open_sessions_are_capped_per_environment(capped_client: TestClient) -> None:
    client = capped_client
    ids = [secrets.token_hex(8) for _ in range(4)]
    for upload_id in ids[:3]:
        await ok(await send_chunk(client, upload_id, b"o" * MIN, 0, MIN + 10))
    response = await send_chunk(client, ids[3], b"o" * MIN, 0, MIN + 10)
    await expect_error(response, 400, prefix="Too many chunked uploads in progress")
    # chunks of sessions already open still go through, and a finished one frees a place
    final = await ok(await send_chunk(client, ids[0], b"p" * 10, MIN, MIN + 10))
    assert final["bytes"] == MIN + 10
    await ok(await send_chunk(client, ids[3], b"o" * MIN, 0, MIN + 10))


async def test_declared_bytes_of_open_sessions_are_capped(capped_client: TestClient) -> None:
    client = capped_client
    await ok(await send_chunk(client, secrets.token_hex(8), b"d" * MIN, 0, 30 * MiB))
    response = await send_chunk(client, secrets.token_hex(8), b"d" * MIN, 0, 20 * MiB)
    await expect_error(response, 400, prefix="Too many bytes in chunked uploads in progress")
    # an unknown total claims what its furthest chunk implies
    response = await send_chunk(client, secrets.token_hex(8), b"d" * MIN, 20 * MiB, None)
    await expect_error(response, 400, prefix="Too many bytes in chunked uploads in progress")


async def test_abandoned_sessions_at_absurd_offsets_cannot_pile_up(aiohttp_client: Any, tmp_path: Path) -> None:
    """The trial's shape: a last chunk of 64 KiB at offset 20 GiB - 64 KiB, again and again.
    Each claims its declared 20 GiB, so the defaults (100 GiB) admit five; the parts hold only
    the bytes received (no sparse files)."""
    config = Config(data_dir=tmp_path / "data")
    app = create_app(config)
    client: TestClient = await aiohttp_client(app)
    await app[META].create_cloud(CLOUD, "key123", "secret456", auto_backup=True)
    # a chunk beyond the declared total of its upload is refused outright
    upload_id = secrets.token_hex(8)
    await ok(await send_chunk(client, upload_id, b"a" * MIN, 0, MIN + 10))
    await expect_error(await send_chunk(client, upload_id, b"b" * MIN, 2 * MIN, None), 400, prefix="Chunk starts at")
    await ok(await send_chunk(client, upload_id, b"b" * 10, MIN, MIN + 10))
    total, tail = config.max_upload_bytes, 64 << 10
    answers = [await send_chunk(client, secrets.token_hex(8), b"z" * tail, total - tail, total) for _ in range(6)]
    assert [r.status for r in answers] == [200] * 5 + [400]
    await expect_error(answers[-1], 400, prefix="Too many bytes in chunked uploads in progress")
    parts = list((config.spool_dir / "chunks").iterdir())
    assert len(parts) == 5 and all(p.stat().st_size == tail for p in parts)


async def test_chunks_must_agree_with_their_session(client: TestClient) -> None:
    upload_id = secrets.token_hex(8)
    await ok(await send_chunk(client, upload_id, b"a" * MIN, 0, 3 * MIN, public_id="docs/agree"))
    cases = [
        (b"b" * MIN, MIN, 4 * MIN, {"public_id": "docs/agree"}, "rt", "Content-Range total 20971520 differs"),
        (b"b" * MIN, 3 * MIN, None, {"public_id": "docs/agree"}, "raw", "Chunk starts at 15728640, beyond"),
        (b"b" * MIN, MIN, 3 * MIN, {"public_id": "docs/other"}, "raw", "public_id docs/other differs"),
        (b"b" * MIN, MIN, 3 * MIN, {"public_id": "docs/agree"}, "image", "resource_type image differs"),
    ]
    for data, start, total, params, rt, prefix in cases:
        response = await send_chunk(client, upload_id, data, start, total, rt="raw" if rt == "rt" else rt, **params)
        await expect_error(response, 400, prefix=prefix)
    done = await ok(await send_chunk(client, upload_id, b"c" * MIN, MIN, 3 * MIN, public_id="docs/agree"))
    assert done["done"] is False and done["bytes"] == 2 * MIN


async def test_the_sweeper_runs_while_the_service_runs(aiohttp_client: Any, tmp_path: Path) -> None:
    config = Config(data_dir=tmp_path / "data", chunk_session_ttl=0.5, chunk_sweep_interval=0.1)
    app = create_app(config)
    client: TestClient = await aiohttp_client(app)
    await app[META].create_cloud(CLOUD, "key123", "secret456", auto_backup=True)
    upload_id = secrets.token_hex(8)
    await ok(await send_chunk(client, upload_id, b"a" * MIN, 0, 2 * MIN))
    assert await app[META].get_upload_session(CLOUD, upload_id) is not None
    for _ in range(50):
        await asyncio.sleep(0.1)
        if await app[META].get_upload_session(CLOUD, upload_id) is None:
            break
    assert await app[META].get_upload_session(CLOUD, upload_id) is None
    assert not [p for p in config.spool_dir.rglob("*") if p.is_file()]


# --- crash safety and restarts --------------------------------------------------------------


async def test_sessions_survive_a_restart(aiohttp_client: Any, config: Config) -> None:
    data = secrets.token_bytes(MIN + 77)
    upload_id = secrets.token_hex(8)
    app = create_app(config)
    client: TestClient = await aiohttp_client(app)
    await app[META].create_cloud(CLOUD, "key123", "secret456", auto_backup=True)
    first = await ok(await send_chunk(client, upload_id, data[:MIN], 0, len(data), use_filename="true"))
    await client.close()
    again: TestClient = await aiohttp_client(create_app(config))
    final = await ok(await send_chunk(again, upload_id, data[MIN:], MIN, len(data), public_id=first["public_id"], use_filename="true"))
    assert final["public_id"] == first["public_id"] and final["bytes"] == len(data)
    assert await download(again, final) == data


async def test_leftovers_of_a_crash_are_swept(client: TestClient, config: Config) -> None:
    """A kill while receiving leaves a private file; a kill between publishing a part and
    recording it leaves an unrecorded part; a kill while assembling leaves the session
    `assembling`. The sweep removes the files and reopens the session; nothing else changes."""
    import os
    import time

    data = secrets.token_bytes(MIN + 5)
    upload_id = secrets.token_hex(8)
    await ok(await send_chunk(client, upload_id, data[:MIN], 0, len(data)))
    chunk_dir = config.spool_dir / "chunks"
    kept = set(chunk_dir.iterdir())
    receiving = chunk_dir / "deadbeef.recv"
    unrecorded = chunk_dir / "cafebabe.chunk"
    legacy = config.spool_dir / f"{CLOUD}--old.chunks"
    for path in (receiving, unrecorded, legacy):
        path.write_bytes(b"left by a crash")
        os.utime(path, (time.time() - 7200, time.time() - 7200))
    meta = client.app[META]
    assert await meta.claim_upload_session(CLOUD, upload_id, "dead-process")
    await client.app[CHUNKS].sweep(now=time.time() + ASSEMBLY_LEASE / 2)  # a live claim stays
    session = await meta.get_upload_session(CLOUD, upload_id)
    assert session is not None and session.state == "assembling"
    assert await meta.renew_upload_claim(CLOUD, upload_id, "dead-process")
    assert not await meta.renew_upload_claim(CLOUD, upload_id, "someone-else")  # only the owner renews
    await client.app[CHUNKS].sweep(now=time.time() + 2 * 3600)
    assert set(chunk_dir.iterdir()) == kept and not legacy.exists()
    final = await ok(await send_chunk(client, upload_id, data[MIN:], MIN, len(data)))
    assert await download(client, final) == data


async def test_a_failed_publication_reopens_the_session(client: TestClient, config: Config) -> None:
    """If the upload path fails after assembly (here: the primary store cannot make its
    directory), the session is open again and a retry of the last chunk finishes it."""
    data = secrets.token_bytes(MIN + 9)
    digest = blake3.blake3(data).hexdigest()
    upload_id = secrets.token_hex(8)
    await ok(await send_chunk(client, upload_id, data[:MIN], 0, len(data), public_id="docs/retry"))
    blocker = config.data_dir / "primary" / CLOUD / "originals" / digest[:2]
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_bytes(b"not a directory")
    response = await send_chunk(client, upload_id, data[MIN:], MIN, len(data), public_id="docs/retry")
    assert response.status == 500
    blocker.unlink()
    final = await ok(await send_chunk(client, upload_id, data[MIN:], MIN, len(data), public_id="docs/retry"))
    assert await download(client, final) == data
    assert_blobs_match_their_names(config)


async def test_bad_parameters_refuse_the_chunk_before_it_is_recorded(client: TestClient) -> None:
    upload_id = secrets.token_hex(8)
    await ok(await send_chunk(client, upload_id, b"a" * MIN, 0, MIN + 1, public_id="docs/bad"))
    refused = await send_chunk(client, upload_id, b"b", MIN, MIN + 1, public_id="docs/bad", type="bogus")
    await expect_error(refused, 400, prefix="Invalid type")
    final = await ok(await send_chunk(client, upload_id, b"b", MIN, MIN + 1, public_id="docs/bad"))
    assert await download(client, final) == b"a" * MIN + b"b"


async def test_a_chunk_sent_before_its_signature_is_charged_to_the_unauthenticated_budget(client: TestClient, config: Config) -> None:
    """A file part before the signature reaches disk unauthenticated: like a single upload's,
    its bytes count against the budget (at most VERSIONSTORE_MAX_BODY_BYTES), then a 400."""
    data = secrets.token_bytes(config.max_body_bytes + MiB)
    parts: list[Part] = [("file", data), *sign_params({"public_id": "docs/early"}).items()]
    headers = chunk_headers("early-file", f"bytes 0-{len(data) - 1}/{len(data)}")
    response = await client.post(f"/v1_1/{CLOUD}/raw/upload", data=body(parts), headers=headers)
    result = await response.json()
    assert response.status == 400 and "send them before the file" in result["error"]["message"], result
    assert [p for p in config.spool_dir.rglob("*") if p.is_file()] == []
    assert await client.app[META].get_asset(CLOUD, "raw", "upload", "docs/early") is None
