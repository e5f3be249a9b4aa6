"""`uploader.upload_large` of the official Python SDK against a real `versionstore serve`.

The SDK sends every chunk as a signed multipart POST with `X-Unique-Upload-Id` and
`Content-Range`, and puts the public_id of each response into the next chunk's parameters.
"""

import contextlib
import os
import re
import threading
import time
from pathlib import Path

import cloudinary
import cloudinary.api
import cloudinary.exceptions
import cloudinary.uploader
import cloudinary.utils
import pytest

from tests.e2e.conftest import ServerProcess, configure_sdk
from tests.e2e.test_sdk import download, uid, versions

PART = 5 << 20  # the smallest chunk_size Cloudinary accepts


def big_file(tmp_path: Path, name: str, size: int = PART + 1234) -> tuple[Path, bytes]:
    data = os.urandom(size)
    path = tmp_path / name
    path.write_bytes(data)
    return path, data


def check_one_asset(result: dict[str, object], data: bytes) -> None:
    public_id = str(result["public_id"])
    assert result["bytes"] == len(data)
    assert len(versions(public_id, resource_type="raw")) == 1  # every chunk landed in one asset
    assert download(str(result["asset_id"]), str(result["version_id"]))[2] == data


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"use_filename": True, "unique_filename": False}, r"report"),
        ({"use_filename": True}, r"report_[0-9a-f]{6}"),
        ({"use_filename": True, "unique_filename": False, "filename_override": "renamed.bin"}, r"renamed"),
        ({"use_filename": True, "unique_filename": False, "folder": "{folder}"}, r"{folder}/report"),
    ],
)
def test_upload_large_names_the_asset_from_its_file(sdk: ServerProcess, tmp_path: Path, options: dict[str, object], expected: str) -> None:
    """use_filename, unique_filename, filename_override and folder apply, and the public_id
    the first chunk answered stays the upload's (the SDK sends it back on later chunks)."""
    folder = uid("large").replace("/", "-")
    options = {k: v.replace("{folder}", folder) if isinstance(v, str) else v for k, v in options.items()}
    path, data = big_file(tmp_path, "report.bin", 2 * PART + 99)
    result = cloudinary.uploader.upload_large(str(path), chunk_size=PART, **options)
    assert re.fullmatch(expected.replace("{folder}", folder), str(result["public_id"])), result["public_id"]
    check_one_asset(result, data)
    if "filename_override" in options:
        assert result["original_filename"] == "renamed"


def test_upload_large_applies_the_last_chunks_signed_options(sdk: ServerProcess, tmp_path: Path) -> None:
    path, data = big_file(tmp_path, "tagged.bin")
    public_id = uid("large")
    result = cloudinary.uploader.upload_large(str(path), public_id=public_id, chunk_size=PART, tags=["a", "b"], backup=False)
    assert result["public_id"] == public_id and result["backup"] is False
    assert sorted(cloudinary.api.resource(public_id, resource_type="raw")["tags"]) == ["a", "b"]


def test_upload_large_refuses_small_chunks(sdk: ServerProcess, tmp_path: Path) -> None:
    path, _ = big_file(tmp_path, "small-chunks.bin", 3 << 20)
    with pytest.raises(cloudinary.exceptions.BadRequest, match="All parts except EOF-chunk must be larger than 5mb"):
        cloudinary.uploader.upload_large(str(path), public_id=uid("large"), chunk_size=1 << 20)


def test_an_upload_large_session_survives_a_crash(fresh_server: ServerProcess, tmp_path: Path) -> None:
    """Chunk 1, SIGKILL, restart, chunk 2: the upload completes with exactly the bytes sent."""
    configure_sdk(fresh_server.base_url)
    data = os.urandom(PART + 4321)
    public_id = uid("crash")
    headers = {"X-Unique-Upload-Id": "crash" + os.urandom(6).hex()}

    def chunk(start: int, end: int) -> dict[str, object]:
        part_headers = {**headers, "Content-Range": f"bytes {start}-{end - 1}/{len(data)}"}
        return dict(cloudinary.uploader.upload_large_part(("big.bin", data[start:end]), http_headers=part_headers, public_id=public_id))

    first = chunk(0, PART)
    assert first["done"] is False and first["public_id"] == public_id
    fresh_server.restart(crash=True)
    final = chunk(PART, len(data))
    assert final["public_id"] == public_id
    check_one_asset(final, data)
    assert not [p for p in (fresh_server.data_dir / "spool").rglob("*") if p.is_file()]


@pytest.mark.parametrize("delay", [0.0, 0.15, 0.4])
def test_a_kill_while_the_last_chunk_is_handled_leaves_no_wrong_version(fresh_server: ServerProcess, delay: float) -> None:
    """SIGKILL while the completing chunk is received, assembled or published: after the
    restart the asset either does not exist or its version downloads exactly the bytes sent."""
    configure_sdk(fresh_server.base_url)
    data = os.urandom(PART + (24 << 20))
    public_id = uid("kill")
    headers = {"X-Unique-Upload-Id": "kill" + os.urandom(6).hex()}

    def chunk(start: int, end: int) -> dict[str, object]:
        part_headers = {**headers, "Content-Range": f"bytes {start}-{end - 1}/{len(data)}"}
        return dict(cloudinary.uploader.upload_large_part(("big.bin", data[start:end]), http_headers=part_headers, public_id=public_id))

    chunk(0, PART)
    answered: list[dict[str, object]] = []

    def send_last() -> None:
        with contextlib.suppress(Exception):  # the kill cuts the connection
            answered.append(chunk(PART, len(data)))

    last = threading.Thread(target=send_last, daemon=True)
    last.start()
    time.sleep(delay)
    fresh_server.restart(crash=True)
    last.join(timeout=30)
    try:
        listed = versions(public_id, resource_type="raw")
    except cloudinary.exceptions.NotFound:
        listed = []
    assert len(listed) >= len(answered)  # an acknowledged upload is never lost
    for version in listed:
        resource = cloudinary.api.resource(public_id, resource_type="raw")
        status, _, body = download(str(resource["asset_id"]), str(version["version_id"]))
        assert status == 200 and body == data
