"""scripts/batch_floor.py, the batch client's floor, on a tiny library: every file (an empty one
too) arrives whole under its BLAKE3 name with the right MD5 etag, and the command line prints
its one JSON line. The floor is only worth comparing against if it really stores the bytes."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import blake3
import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
sys.path.insert(0, str(SCRIPTS))
import batch_floor  # noqa: E402

KiB = 1 << 10


def make_library(root: Path) -> dict[str, bytes]:
    files = {"photos/a.jpg": os.urandom(300 * KiB), "photos/sub/b.png": os.urandom(500 * KiB + 7),
             "c.mp4": os.urandom(200 * KiB + 1), "empty.bin": b""}
    for relative, data in files.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_bytes(data)
    return files


def test_every_file_arrives_with_its_hashes(tmp_path: Path) -> None:
    files = make_library(tmp_path / "lib")
    data = tmp_path / "data"
    floor = batch_floor.run(tmp_path / "lib", concurrency=2, data_dir=data)
    assert floor.failures == []
    assert (floor.files, floor.bytes, floor.concurrency) == (4, sum(len(b) for b in files.values()), 2)
    assert set(floor.answers) == set(files)
    for relative, content in files.items():
        digest = blake3.blake3(content).hexdigest()
        assert floor.answers[relative] == {"bytes": len(content), "etag": hashlib.md5(content).hexdigest(), "blake3": digest}
        assert (data / digest).read_bytes() == content
    assert sorted(p.name for p in data.iterdir()) == sorted(blake3.blake3(b).hexdigest() for b in files.values())  # no temp files left
    assert floor.wall_s > 0 and floor.client_cpu_s >= 0 and floor.server_cpu_s >= 0
    assert floor.client_cpu_total_s >= floor.client_cpu_s and floor.server_cpu_total_s >= floor.server_cpu_s


def test_the_command_prints_one_json_line(tmp_path: Path) -> None:
    files = make_library(tmp_path / "lib")
    out = subprocess.run([sys.executable, str(SCRIPTS / "batch_floor.py"), "--source", str(tmp_path / "lib")],
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1
    summary = json.loads(lines[0])
    assert set(summary) == {"files", "bytes", "concurrency", "wall_s", "client_cpu_s", "server_cpu_s", "client_cpu_total_s",
                            "server_cpu_total_s", "server_loop_cpu_s", "failures"}
    assert summary["files"] == 4 and summary["bytes"] == sum(len(b) for b in files.values()) and summary["failures"] == 0
    from versionstore.backup_client import CONCURRENCY

    assert summary["concurrency"] == CONCURRENCY  # the batch client's default


def test_a_missing_source_is_a_usage_error(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, str(SCRIPTS / "batch_floor.py"), "--source", str(tmp_path / "nowhere")],
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 2 and "--source" in out.stderr


def test_a_wrong_byte_count_fails_the_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    make_library(tmp_path / "lib")
    listed = batch_floor.library(tmp_path / "lib")
    # the client expects one byte more of c.mp4 than the server receives: that answer must fail the run
    monkeypatch.setattr(batch_floor, "library", lambda source: [(r, p, s + (r == "c.mp4")) for r, p, s in listed])
    assert batch_floor.main(["--source", str(tmp_path / "lib"), "--concurrency", "2"]) == 1
    out, err = capsys.readouterr()
    assert "failed: c.mp4: RuntimeError: the server stored 204801 bytes of 204802" in err
    assert json.loads(out)["failures"] == 1
