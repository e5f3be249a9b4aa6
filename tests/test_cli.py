"""The CLI is a stable interface operators script against: check its outputs and exit codes."""

import argparse
import asyncio
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import cloudinary
import cloudinary.api
import cloudinary.uploader
import pytest

from versionstore.cli import main, parser
from versionstore.config import Config


def test_cloud_create_list_set(tmp_path, capsys):
    data = str(tmp_path / "d")
    assert main(["cloud", "create", "acme", "--api-key", "k1", "--api-secret", "s1", "--data-dir", data]) == 0
    assert capsys.readouterr().out.strip() == "cloudinary://k1:s1@acme?upload_prefix=http://127.0.0.1:8765"
    assert main(["cloud", "create", "gen", "--auto-backup", "off", "--url", "http://h:1", "--data-dir", data]) == 0
    created = capsys.readouterr()
    assert re.fullmatch(r"cloudinary://\d{15}:[\w-]+@gen\?upload_prefix=http://h:1\n", created.out)  # the URL alone, for scripts
    assert created.err.startswith("gen: automatic backup is off (only uploads with backup=true keep a revision; "
                                  "turn on: versionstore cloud set gen --auto-backup on)")
    assert main(["cloud", "list", "--data-dir", data]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "acme\tapi_key=k1\tauto_backup=on\tbackup_target=default",
        f"gen\tapi_key={_key(data, 'gen')}\tauto_backup=off\tbackup_target=default",
    ]
    assert main(["cloud", "set", "acme", "--auto-backup", "off", "--data-dir", data]) == 0
    assert capsys.readouterr().out.strip() == "acme\tauto_backup=off\tbackup_target=default\tpurge_delay_days=0"


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
    assert main(["cloud", "create", "other", "--data-dir", str(tmp_path)]) == 0
    assert main([*argv, "--data-dir", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err


def test_duplicate_environment_is_refused(tmp_path, capsys):
    args = ["cloud", "create", "dup", "--data-dir", str(tmp_path)]
    assert main(args) == 0
    assert main(args) == 2
    assert "already exists" in capsys.readouterr().err


PNG = Path(__file__).resolve().parents[1] / "fixtures" / "rgb-3x2.png"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.parametrize("data_dir", ["data", "./data"])
def test_serve_demo_prints_a_working_cloudinary_url(tmp_path, data_dir):
    """The quick start: `serve --demo` with a relative data directory prints, once it accepts
    requests (and not before), a CLOUDINARY_URL the SDK can upload with as is."""
    port = _free_port()
    log = open(tmp_path / "serve.log", "w+")
    process = subprocess.Popen(
        [sys.executable, "-m", "versionstore", "serve", "--data-dir", data_dir, "--port", str(port), "--demo"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(PNG.parents[1]), os.environ.get("PYTHONPATH")]))},
    )
    try:
        deadline = time.monotonic() + 30
        while not re.search(r"CLOUDINARY_URL='([^']+)'", printed := (tmp_path / "serve.log").read_text()):
            assert process.poll() is None and time.monotonic() < deadline, printed
            time.sleep(0.05)
        urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5).read()  # printed means serving
        assert f"listening on http://127.0.0.1:{port} (data in {tmp_path / 'data'})" in printed
        assert "demo: automatic backup is on" in printed
        url = re.search(r"CLOUDINARY_URL='([^']+)'", printed)
        assert url and url[1].endswith(f"@demo?upload_prefix=http://127.0.0.1:{port}")
        os.environ["CLOUDINARY_URL"] = url[1]
        try:
            cloudinary.reset_config()
            assert cloudinary.api.ping()["status"] == "ok"
            assert cloudinary.uploader.upload(str(PNG), public_id="docs/logo", backup=True)["backup"] is True
        finally:
            del os.environ["CLOUDINARY_URL"]
            cloudinary.reset_config()
        assert list((tmp_path / "data" / "primary").rglob("*")), "the relative primary store holds the upload"
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        assert process.wait(timeout=10) == 0
        log.close()


def test_relative_paths_are_made_absolute_once_in_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VERSIONSTORE_BACKUP_STORE", "stores/../backup-store")
    config = Config.from_env(Path("./data"))
    assert config.data_dir == tmp_path / "data" and config.db_path == tmp_path / "data" / "metadata.sqlite3"
    assert config.primary_url == str(tmp_path / "data" / "primary")
    assert config.backup_url == str(tmp_path / "backup-store")
    assert Config(data_dir=Path("d"), primary_store="p", backup_store="s3://b/x").primary_url == str(tmp_path / "p")
    assert Config(data_dir=Path("d"), backup_store="s3://b/x").backup_url == "s3://b/x"
    config.check()


def _serve_process(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`serve` that is expected to fail: on time, or the timeout says it hung."""
    return subprocess.run(
        [sys.executable, "-m", "versionstore", "serve", "--data-dir", str(tmp_path / "d"), *args],
        capture_output=True, text=True, timeout=30, cwd=tmp_path, env={**os.environ, **(env or {})},
    )


def _one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in result.stderr, result.stderr
    assert "listening" not in result.stdout and "CLOUDINARY_URL" not in result.stdout, result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.mark.parametrize(
    "env, code, message",
    [
        # fails after the database is open: its threads must be released or the process never exits
        ({"VERSIONSTORE_PRIMARY_STORE": "{tmp}/a-file/primary"}, 1, "cannot start: NotADirectoryError"),
        ({"VERSIONSTORE_PRIMARY_STORE": "ftp://host/x"}, 2, "primary store: Unsupported blob store 'ftp://host/x'"),
        ({"VERSIONSTORE_MAX_UPLOAD_BYTES": "lots"}, 2, "VERSIONSTORE_MAX_UPLOAD_BYTES='lots' is not an integer"),
        ({"VERSIONSTORE_GC_LOG_MS": "often"}, 2, "VERSIONSTORE_GC_LOG_MS='often' is not a number of milliseconds"),
        ({"VERSIONSTORE_STALL_LOG_MS": "0.5"}, 2, "VERSIONSTORE_STALL_LOG_MS='0.5' must be at least 1"),
    ],
)
def test_a_start_up_failure_exits_with_one_line(tmp_path, env, code, message):
    (tmp_path / "a-file").write_text("not a directory")
    result = _serve_process(tmp_path, "--port", str(_free_port()), "--demo",
                            env={k: v.format(tmp=tmp_path) for k, v in env.items()})
    assert result.returncode == code
    assert message in _one_error_line(result)


def test_a_busy_port_is_one_line_and_nothing_is_opened(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = _serve_process(tmp_path, "--port", str(port), "--demo")
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}: the port is already in use" in _one_error_line(result)
    assert not (tmp_path / "d").exists()


def test_every_command_takes_the_data_dir_from_the_environment_and_the_flag_wins(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("VERSIONSTORE_DATA_DIR", raising=False)
    assert main(["cloud", "list"]) == 2
    assert capsys.readouterr().err == "error: no data directory: pass --data-dir DIR or set VERSIONSTORE_DATA_DIR\n"
    monkeypatch.setenv("VERSIONSTORE_DATA_DIR", "from-env")
    assert main(["cloud", "create", "acme", "--api-key", "k", "--api-secret", "s"]) == 0
    assert (tmp_path / "from-env" / "metadata.sqlite3").is_file()
    for argv in (["cloud", "list"], ["cloud", "set", "acme", "--auto-backup", "off"], ["cloud", "status", "acme"]):
        assert main(argv) == 0, capsys.readouterr().err
    assert "acme\tauto_backup=off\tbackup_target=default" in capsys.readouterr().out
    assert main(["cloud", "list", "--data-dir", "elsewhere"]) == 2  # the flag wins, and reads no store there
    assert "no versionstore data in " + str(tmp_path / "elsewhere") in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["cloud", "list"], ["cloud", "set", "acme", "--auto-backup", "on"], ["cloud", "status", "acme"]])
def test_only_serve_and_create_make_a_data_directory(tmp_path, capsys, argv):
    typo = tmp_path / "typo"
    assert main([*argv, "--data-dir", str(typo)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: no versionstore data in {typo} (") and err.count("\n") == 1
    assert not typo.exists()


def _subcommands(command: argparse.ArgumentParser, path: str = "versionstore") -> Iterator[tuple[str, argparse.ArgumentParser]]:
    yield path, command
    for action in command._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                if child.add_help:  # initial-backup parses its own options (backup_client)
                    yield from _subcommands(child, f"{path} {name}")


def test_every_option_of_every_command_is_described_with_its_default():
    from versionstore.backup_client import build_parser

    commands = [*_subcommands(parser()), ("versionstore initial-backup", build_parser())]
    assert {path for path, _ in commands} >= {"versionstore serve", "versionstore cloud create", "versionstore cloud list",
                                             "versionstore cloud set", "versionstore cloud status"}
    for path, command in commands:
        formatter = command._get_formatter()
        for action in command._actions:
            if isinstance(action, argparse._SubParsersAction | argparse._HelpAction):
                continue
            name = action.option_strings[0] if action.option_strings else action.dest
            assert action.help, f"{path} {name} is undescribed"
            if action.option_strings and action.nargs != 0 and action.default is not None:  # flags: off unless given
                assert "default" in formatter._expand_help(action), f"{path} {name} does not show its default"
    serve_help = " ".join(parser()._subparsers._group_actions[0].choices["serve"].format_help().split())  # type: ignore[union-attr]
    assert "(default: 127.0.0.1)" in serve_help and "(default: 8765)" in serve_help
    assert "(default: $VERSIONSTORE_DATA_DIR)" in serve_help


def test_a_failing_schema_migration_exits_with_one_line(tmp_path):
    """The migration's transaction is rolled back and its connection closed: no hung process,
    and the database is left at the last migration that completed."""
    data = tmp_path / "d"
    data.mkdir()
    with sqlite3.connect(data / "metadata.sqlite3") as db:  # as if migration 8's table were already there
        db.execute("PRAGMA user_version = 7")
        db.execute("CREATE TABLE metadata_fields (x)")
    result = _serve_process(tmp_path, "--port", str(_free_port()))
    assert result.returncode == 1
    assert "cannot start" in _one_error_line(result)
    with sqlite3.connect(data / "metadata.sqlite3") as db:
        assert db.execute("PRAGMA user_version").fetchone() == (7,)


def test_gc_settles_the_journal_and_full_walks_the_stores(tmp_path, capsys):
    """`gc` settles crashed writes from the journal; only `gc --full` walks every blob (paced)."""
    from versionstore import layout
    from versionstore.metadata import MetadataStore

    data = tmp_path / "d"
    assert main(["cloud", "create", "acme", "--data-dir", str(data)]) == 0
    crashed, unjournaled = "ab" * 32, "cd" * 32
    for digest in (crashed, unjournaled):
        path = data / "primary" / layout.original_key("acme", digest)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"never committed")

    async def journal_a_dead_write() -> None:
        meta = await MetadataStore.open(Config(data_dir=data).db_path)
        await meta.begin_writes("acme", crashed, [("original", None)], "dead:1:x", time.time() - 1)
        await meta.close()

    asyncio.run(journal_a_dead_write())
    capsys.readouterr()
    assert main(["gc", "--data-dir", str(data)]) == 0
    assert capsys.readouterr().out == "journal: 1 expired blob write(s) settled\n"
    assert not (data / "primary" / layout.original_key("acme", crashed)).exists()
    assert (data / "primary" / layout.original_key("acme", unjournaled)).exists()
    assert main(["gc", "--full", "--rate", "1000", "--data-dir", str(data)]) == 0
    assert capsys.readouterr().out.splitlines() == ["journal: 0 expired blob write(s) settled", "acme: 1 unreferenced blob(s) removed"]
    assert not (data / "primary" / layout.original_key("acme", unjournaled)).exists()
