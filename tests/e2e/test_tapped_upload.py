"""A large upload through the Python SDK (a Content-Length body) is received by http/body_tap.py
in the served process: the stored bytes, their etag and
their backup are exact, the server's memory stays bounded, and the SDK's next calls work on a new
connection."""

import hashlib
import os
import urllib.request
from pathlib import Path

import blake3
import cloudinary
import cloudinary.api
import cloudinary.uploader
import cloudinary.utils
import psutil

from tests.e2e.conftest import configure_sdk, running_server

MiB = 1 << 20
SIZE = 40 * MiB + 4321  # above the tap's 16 MiB, not a multiple of its 4 MiB blocks


def test_sdk_upload_of_a_large_file_is_exact(tmp_path: Path) -> None:
    data = os.urandom(SIZE)
    path = tmp_path / "big.bin"
    path.write_bytes(data)
    with running_server(tmp_path / "srv") as server:
        configure_sdk(server.base_url)
        process = psutil.Process(server.pid)
        before = process.memory_info().rss
        result = cloudinary.uploader.upload(str(path), resource_type="raw", public_id="tap/big.bin", backup=True)
        growth = process.memory_info().rss - before
        assert (result["bytes"], result["etag"], result["blake3"]) == (SIZE, hashlib.md5(data).hexdigest(), blake3.blake3(data).hexdigest())
        assert growth < 100 * MiB, growth
        listed = cloudinary.api.resource("tap/big.bin", resource_type="raw", versions=True)
        assert [v["size"] for v in listed["versions"]] == [SIZE]
        url = cloudinary.utils.download_backedup_asset(result["asset_id"], result["version_id"])
        with urllib.request.urlopen(url, timeout=60) as response:
            assert hashlib.md5(response.read()).hexdigest() == result["etag"]
        again = cloudinary.uploader.upload(str(path), resource_type="raw", public_id="tap/big.bin", backup=True)
        assert again["etag"] == result["etag"]
        assert "Traceback" not in server.log_tail(20000)
