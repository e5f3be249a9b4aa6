"""The README quick start as a newcomer meets it (issue 9), run from a copy of the tree.

The copy holds what `git` would check out (tracked and new, non-ignored files), so a file the
quick start needs but nobody committed, or a path that only works from the developer's tree,
fails here. Its `.venv` stands for the one `scripts/test.sh` builds on a fresh machine before
the suite runs: a real venv (no pip) that sees this interpreter's packages, stamped the way
test.sh stamps it. `scripts/serve.sh` must find it and not reinstall (it could not: no pip).
"""

import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterator
from pathlib import Path

import cloudinary
import cloudinary.api
import cloudinary.uploader
import pytest

from tests.e2e.conftest import API_KEY, API_SECRET, CLOUD, cli, free_port, running_server
from tests.servers import wait_http_ready

ROOT = Path(__file__).resolve().parents[2]
PNG = ROOT / "fixtures" / "rgb-3x2.png"
START_TIMEOUT = 60.0


def _tree_files() -> list[str]:
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT, capture_output=True, check=True,
    ).stdout.decode()
    return [name for name in listed.split("\0") if name and (ROOT / name).is_file()]


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh checkout of this tree, with a ready `.venv` as scripts/test.sh leaves it."""
    copy = tmp_path_factory.mktemp("quickstart") / "versionstore"
    for name in _tree_files():
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, copy / name)
    base_python = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base_python, "-m", "venv", "--without-pip", str(copy / ".venv")], check=True, timeout=60)
    site_packages = Path(sysconfig.get_path("purelib", vars={"base": str(copy / ".venv")}))
    shared = sysconfig.get_path("purelib")
    (site_packages / "shared-venv.pth").write_text(f"import site; site.addsitedir({shared!r})\n")
    subprocess.run(["bash", "-c", "source scripts/venv.sh && file_hash pyproject.toml > .venv/.installed-test"],
                   cwd=copy, check=True, timeout=30)
    return copy


def _first_command() -> str:
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Quick start", 1)[1].split("```sh\n", 1)[1]
    return block.splitlines()[0].split("#", 1)[0].strip()


class Printed:
    """A process whose output goes to a file (never an undrained pipe), read as it grows."""

    def __init__(self, argv: list[str], cwd: Path, log: Path, env: dict[str, str]) -> None:
        self.log = log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(argv, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True, env=env)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout: float = START_TIMEOUT) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(pattern, self.text())
            if found:
                return found
            assert self.proc.poll() is None, f"exited {self.proc.returncode}:\n{self.text()}"
            time.sleep(0.05)
        raise AssertionError(f"no {pattern!r} within {timeout}s:\n{self.text()}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            return self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
            raise AssertionError(f"did not stop on SIGTERM:\n{self.text()}") from None


@pytest.fixture
def sdk_from_url() -> Iterator[None]:
    yield
    os.environ.pop("CLOUDINARY_URL", None)
    cloudinary.reset_config()


def test_readme_first_command_serves_and_the_sdk_call_works(tree: Path, tmp_path: Path, sdk_from_url: None) -> None:
    command = _first_command()
    assert command == "scripts/serve.sh", command  # what this test runs; update both together
    port = free_port()
    # The newcomer's shell: no PYTHONPATH (serve.sh finds this checkout's code itself), no data-dir variable.
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VERSIONSTORE_DATA_DIR", "VIRTUAL_ENV")}
    served = Printed([command, "--port", str(port)], tree, tmp_path / "serve.log", env)
    try:
        url = served.wait_for(r"export CLOUDINARY_URL='([^']+)'")[1]
        printed = served.text()
        assert "installing" not in printed, printed  # test.sh built .venv: nothing to install
        assert f"listening on http://127.0.0.1:{port} (data in {tree / 'data'})" in printed
        assert "demo: automatic backup is on" in printed
        assert printed.index("listening on") < printed.index("CLOUDINARY_URL")
        assert (tree / "data" / "metadata.sqlite3").is_file()  # the relative ./data of the checkout
        os.environ["CLOUDINARY_URL"] = url
        cloudinary.reset_config()
        uploaded = cloudinary.uploader.upload(str(PNG), public_id="docs/logo", backup=True)
        assert uploaded["public_id"] == "docs/logo" and uploaded["backup"] is True
        versions = cloudinary.api.resource("docs/logo", versions=True)["versions"]
        assert [v["version_id"] for v in versions] == [uploaded["version_id"]]
        assert versions[0]["restorable"] is True
    finally:
        code = served.stop()
    assert code == 0, served.text()
    assert "Traceback" not in served.text()


def test_serve_sh_installs_only_when_pyproject_changed(tmp_path: Path) -> None:
    """scripts/venv.sh's decision alone, with a `.venv/bin/python` that records pip calls."""
    shutil.copytree(ROOT / "scripts", tmp_path / "scripts")
    shutil.copy2(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    fake = tmp_path / ".venv" / "bin" / "python"
    fake.write_text(f'#!/bin/sh\nif [ "$1" = -m ] && [ "$2" = pip ]; then echo "$*" >> "{tmp_path}/pip.log"; exit 0; fi\n'
                    f'exec {sys.executable} "$@"\n')
    fake.chmod(0o755)

    def ensure(extra: str) -> list[str]:
        subprocess.run(["bash", "-c", f"source scripts/venv.sh && ensure_venv {extra}"], cwd=tmp_path, check=True, timeout=30)
        log = tmp_path / "pip.log"
        calls = log.read_text().splitlines() if log.exists() else []
        log.unlink(missing_ok=True)
        return calls

    assert ensure("base") == ["-m pip install -q --disable-pip-version-check -e ."]  # first run
    assert ensure("base") == []  # second start: nothing to do
    assert ensure("test") == ["-m pip install -q --disable-pip-version-check -e .[test]"]
    assert ensure("test") == [] and ensure("base") == []  # a test install covers serve's needs
    with open(tmp_path / "pyproject.toml", "a") as changed:
        changed.write("\n# a new dependency\n")
    assert ensure("base") == ["-m pip install -q --disable-pip-version-check -e ."]
    assert ensure("base") == []


SCRIPT = Path(sys.executable).with_name("versionstore")


def _env(**extra: str) -> dict[str, str]:
    """This environment with this checkout's code first on the path, and only the given VERSIONSTORE_DATA_DIR."""
    env = {key: value for key, value in os.environ.items() if key != "VERSIONSTORE_DATA_DIR"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**env, **extra}


def _versionstore(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """The installed console script, as a user types it."""
    return subprocess.run([str(SCRIPT), *args], cwd=cwd, env=_env(**env), capture_output=True, text=True, timeout=60)


def test_every_command_works_from_another_directory(tmp_path: Path) -> None:
    """Relative paths are taken from where the command runs; nothing needs the repository root."""
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    for command in ([], ["initial-backup"]):  # every subcommand's --help: tests/test_cli.py, in-process
        shown = _versionstore(*command, "--help", cwd=cwd)
        assert shown.returncode == 0 and "usage:" in shown.stdout, shown
    created = _versionstore("cloud", "create", "acme", "--api-key", "k1", "--api-secret", "s1", "--data-dir", "rel", cwd=cwd)
    assert created.returncode == 0, created.stderr
    assert created.stdout == "cloudinary://k1:s1@acme?upload_prefix=http://127.0.0.1:8765\n"
    assert "acme: automatic backup is on" in created.stderr
    assert (cwd / "rel" / "metadata.sqlite3").is_file()
    listed = _versionstore("cloud", "list", "--data-dir", "./rel", cwd=cwd)
    assert listed.stdout.startswith("acme\tapi_key=k1\tauto_backup=on"), listed
    changed = _versionstore("cloud", "set", "acme", "--auto-backup", "off", cwd=cwd, VERSIONSTORE_DATA_DIR="rel")
    assert changed.stdout.strip() == "acme\tauto_backup=off\tbackup_target=default\tpurge_delay_days=0", changed
    status = _versionstore("cloud", "status", "acme", cwd=cwd, VERSIONSTORE_DATA_DIR="rel")
    assert status.returncode == 0 and '"target": "default"' in status.stdout, status
    port = free_port()
    served = Printed([str(SCRIPT), "serve", "--port", str(port)], cwd, tmp_path / "serve.log", _env(VERSIONSTORE_DATA_DIR="rel"))
    try:
        assert wait_http_ready(served.proc, f"http://127.0.0.1:{port}/healthz", START_TIMEOUT), served.text()
        served.wait_for("acme: automatic backup is off")
        assert f"(data in {cwd / 'rel'})" in served.text()
    finally:
        assert served.stop() == 0, served.text()


def test_initial_backup_script_runs_from_any_directory_without_the_venv_active(tree: Path, tmp_path: Path) -> None:
    """docs/initial-backup.md runs `scripts/initial_backup.py` directly: a bare Python finds the checkout's .venv."""
    base_python = getattr(sys, "_base_executable", sys.executable)
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
    shown = subprocess.run([base_python, "-S", str(tree / "scripts" / "initial_backup.py"), "--help"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert "--source DIR" in shown.stdout and not shown.stderr
    missing = subprocess.run([base_python, "-S", str(tree / "scripts" / "initial_backup.py"), "--source", "nowhere"],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and missing.stderr.startswith("error: --source nowhere"), missing.stderr


def test_initial_backup_on_an_environment_with_backup_off_names_the_command_that_turns_it_on(tmp_path: Path) -> None:
    with running_server(tmp_path) as server:
        cli("cloud", "set", CLOUD, "--auto-backup", "off", data_dir=server.data_dir)
        url = f"cloudinary://{API_KEY}:{API_SECRET}@{CLOUD}?upload_prefix={server.base_url}"
        result = subprocess.run([sys.executable, "-m", "versionstore", "initial-backup", "--server"], cwd=tmp_path,
                                env={**os.environ, "CLOUDINARY_URL": url}, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "Backup for new uploads isn't enabled" in result.stderr
    assert f"`versionstore cloud set {CLOUD} --auto-backup on`" in result.stderr
    assert f"PUT {server.base_url}/v1_1/{CLOUD}/versionstore/settings with auto_backup=true" in result.stderr
