"""`versionstore staff ...` and `versionstore audit verify|export` as a user runs them."""

import json
import re
import sqlite3
import subprocess
import sys
from pathlib import Path


def run(*args: str, data_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "versionstore", *args, "--data-dir", str(data_dir)],
                          capture_output=True, text=True, timeout=120)


def test_staff_commands_and_a_tampered_audit_record_named_by_verify(tmp_path: Path) -> None:
    data = tmp_path / "data"
    assert run("cloud", "create", "demo", data_dir=data).returncode == 0
    added = run("staff", "add", "Sue@Example.com", "--role", "restorer", "--cloud", "demo", "--generate", data_dir=data)
    assert added.returncode == 0, added.stderr
    assert re.search(r"password \(shown once\): \S{20,}", added.stdout)
    assert "sue@example.com\trole=restorer\tclouds=demo" in added.stdout
    again = run("staff", "add", "sue@example.com", "--role", "admin", "--generate", data_dir=data)
    assert again.returncode == 2 and "already exists" in again.stderr
    bad_cloud = run("staff", "add", "tom@example.com", "--role", "viewer", "--cloud", "nope", "--generate", data_dir=data)
    assert bad_cloud.returncode == 2 and "no product environment named 'nope'" in bad_cloud.stderr
    assert "password" not in bad_cloud.stdout  # refused before a password was generated
    assert run("staff", "disable", "sue@example.com", data_dir=data).returncode == 0
    assert "\tdisabled" in run("staff", "list", data_dir=data).stdout
    assert run("staff", "reset-password", "sue@example.com", "--generate", data_dir=data).returncode == 0

    assert run("cloud", "set", "demo", "--auto-backup", "off", data_dir=data).returncode == 0

    verified = run("audit", "verify", data_dir=data)
    assert verified.returncode == 0 and json.loads(verified.stdout)["records"] == 4
    exported = [json.loads(line) for line in run("audit", "export", data_dir=data).stdout.splitlines()]
    assert [r["action"] for r in exported] == ["staff_add", "staff_disable", "staff_reset_password", "settings"]
    assert exported[-1]["detail"]["auto_backup"] == "off" and exported[-1]["actor"] == "cli"

    with sqlite3.connect(data / "metadata.sqlite3") as db:
        # argon2-cffi's RFC 9106 low-memory profile (tests/test_console.py runs a cheaper one)
        (stored,) = db.execute("SELECT password_hash FROM staff WHERE email = 'sue@example.com'").fetchone()
        assert stored.startswith("$argon2id$v=19$m=65536,t=3,p=4$"), stored
        db.execute("UPDATE audit_log SET detail = '{\"role\": \"admin\"}' WHERE seq = 1")
    tampered = run("audit", "verify", data_dir=data)
    assert tampered.returncode == 1
    assert "record 1: contents do not match its hash (edited)" in tampered.stderr
