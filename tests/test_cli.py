"""The CLI is a stable interface operators script against: check its outputs and exit codes."""

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import cloudinary
import cloudinary.api
import pytest

from versionstore.cli import main


def test_cloud_create_list_set(tmp_path, capsys):
    data = str(tmp_path / "d")
    assert main(["cloud", "create", "acme", "--api-key", "k1", "--api-secret", "s1", "--data-dir", data]) == 0
    assert capsys.readouterr().out.strip() == "cloudinary://k1:s1@acme?upload_prefix=http://127.0.0.1:8765"
    assert main(["cloud", "create", "gen", "--auto-backup", "off", "--url", "http://h:1", "--data-dir", data]) == 0
    assert re.fullmatch(r"cloudinary://\d{15}:[\w-]+@gen\?upload_prefix=http://h:1\n", capsys.readouterr().out)
    assert main(["cloud", "list", "--data-dir", data]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "acme\tapi_key=k1\tauto_backup=on\tbackup_target=default",
        f"gen\tapi_key={_key(data, 'gen')}\tauto_backup=off\tbackup_target=default",
    ]
    assert main(["cloud", "set", "acme", "--auto-backup", "off", "--data-dir", data]) == 0
    assert capsys.readouterr().out.strip() == "acme\tauto_backup=off\tbackup_target=default"


def test_cloud_set_backup_bucket_checks_the_marker_then_queues_the_migration(tmp_path, capsys, moto_server, monkeypatch):
    import json

    from tests.test_buckets import Bucket

    for name, value in moto_server.client_env().items():
        monkeypatch.setenv(name, value)
    data = str(tmp_path / "d")
    assert main(["cloud", "create", "acme", "--data-dir", data]) == 0
    bucket = Bucket("s3", moto_server.url)
    url = f"s3://{bucket.name}/vs"
    capsys.readouterr()
    assert main(["cloud", "set", "acme", "--backup-bucket", url, "--data-dir", data]) == 2
    assert f"s3://{bucket.name}/.wellknown/cloudinary/acme" in capsys.readouterr().err
    bucket.mark("acme")
    assert main(["cloud", "set", "acme", "--backup-bucket", url, "--data-dir", data]) == 0
    out = capsys.readouterr().out
    assert "backup migration" in out and f"default -> {url}" in out
    assert main(["cloud", "status", "acme", "--data-dir", data]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["target"] == "default" and status["state"] == "healthy"  # switched by the server, when done
    assert status["migration"]["status"] == "pending" and status["migration"]["params"]["to"] == url
    assert main(["cloud", "set", "acme", "--backup-bucket", "default", "--data-dir", data]) == 0
    assert "cancelled" in capsys.readouterr().out


def _key(data_dir: str, name: str) -> str:
    from versionstore.config import Config
    from versionstore.metadata import MetadataStore

    async def run() -> str:
        meta = await MetadataStore.open(Config(data_dir=Path(data_dir)).db_path)
        try:
            cloud = await meta.get_cloud(name)
            assert cloud is not None
            return cloud.api_key
        finally:
            await meta.close()

    return asyncio.run(run())


@pytest.mark.parametrize(
    "argv, message",
    [
        (["cloud", "create", "Bad Name"], "Invalid cloud name"),
        (["cloud", "set", "missing", "--auto-backup", "on"], "no product environment named 'missing'"),
    ],
)
def test_cli_errors_exit_2_with_a_message(tmp_path, capsys, argv, message):
    assert main([*argv, "--data-dir", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err


def test_duplicate_environment_is_refused(tmp_path, capsys):
    args = ["cloud", "create", "dup", "--data-dir", str(tmp_path)]
    assert main(args) == 0
    assert main(args) == 2
    assert "already exists" in capsys.readouterr().err


def test_serve_demo_prints_a_working_cloudinary_url(tmp_path):
    """The quick start: `serve --demo` prints a CLOUDINARY_URL the SDK can use as is."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = open(tmp_path / "serve.log", "w+")
    process = subprocess.Popen(
        [sys.executable, "-m", "versionstore", "serve", "--data-dir", str(tmp_path / "d"), "--port", str(port), "--demo"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1).read()
                break
            except OSError:
                assert process.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
                time.sleep(0.05)
        printed = (tmp_path / "serve.log").read_text()
        url = re.search(r"CLOUDINARY_URL='([^']+)'", printed)
        assert url, printed
        assert url[1].endswith(f"@demo?upload_prefix=http://127.0.0.1:{port}")
        os.environ["CLOUDINARY_URL"] = url[1]
        try:
            cloudinary.reset_config()
            assert cloudinary.api.ping()["status"] == "ok"
        finally:
            del os.environ["CLOUDINARY_URL"]
            cloudinary.reset_config()
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=10)
        log.close()
