"""The CLI on either metadata backend: `--metadata URL` / VERSIONSTORE_METADATA_URL, `migrate`."""

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from versionstore.gateway import migrations


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "versionstore", *args], capture_output=True, text=True, timeout=60,
        env={**os.environ, **(env or {})},
    )


def test_migrate_then_cloud_commands_on_postgresql(tmp_path: Path, postgres: Any) -> None:
    database = postgres.new_database(migrated=False)
    url = postgres.url(database)
    data = str(tmp_path / "data")
    first = run("migrate", "--metadata", url, "--data-dir", data)
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == f"applied migrations {', '.join(str(n) for n in range(1, len(migrations()) + 1))}"
    assert run("migrate", "--metadata", url, "--data-dir", data).stdout.strip() == "schema is current: nothing to apply"
    created = run("cloud", "create", "pgdemo", "--api-key", "k1", "--api-secret", "s1", "--data-dir", data,
                  env={"VERSIONSTORE_METADATA_URL": url})
    assert created.returncode == 0, created.stderr
    listed = run("cloud", "list", "--metadata", url, "--data-dir", data)
    assert listed.stdout.startswith("pgdemo\tapi_key=k1\t"), listed.stderr
    assert not (tmp_path / "data" / "metadata.sqlite3").exists()  # nothing went to the embedded default
    postgres.drop_database(database)


def test_migrate_on_sqlite_and_refusals(tmp_path: Path) -> None:
    data = tmp_path / "data"
    url = f"sqlite://{tmp_path / 'elsewhere.sqlite3'}"
    assert run("migrate", "--metadata", url, "--data-dir", str(data)).stdout.startswith("applied migrations 1, 2")
    assert (tmp_path / "elsewhere.sqlite3").is_file()
    missing = run("cloud", "list", "--metadata", f"sqlite://{tmp_path / 'nope.sqlite3'}", "--data-dir", str(data))
    assert missing.returncode == 2 and "no versionstore data in" in missing.stderr and "Traceback" not in missing.stderr
    for bad in ("mysql://x/y", "sqlite://relative.db"):
        refused = run("cloud", "list", "--metadata", bad, "--data-dir", str(data))
        assert refused.returncode == 2 and refused.stderr.startswith("error: metadata: "), refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1


def test_an_unreachable_database_is_one_line_without_the_password(tmp_path: Path) -> None:
    from tests.servers import free_port

    url = f"postgresql://vs:hunter2@127.0.0.1:{free_port()}/nowhere"
    for command in (("cloud", "list"), ("migrate",)):
        result = run(*command, "--metadata", url, "--data-dir", str(tmp_path / "data"))
        assert result.returncode == 1, result.stderr
        assert result.stderr.startswith("error: cannot open the metadata database postgresql://vs:***@127.0.0.1:")
        assert len(result.stderr.strip().splitlines()) == 1 and "hunter2" not in result.stderr
