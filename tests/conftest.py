"""Shared fixtures: a real app on a temporary data dir, driven over real HTTP sockets.

The metadata backend is a parameter of `config`: every test that uses it (the functional
suite: `client`, `api`) runs on SQLite and on a real PostgreSQL (a throwaway cluster started
once per session, a fresh database per test). VERSIONSTORE_TEST_METADATA=sqlite (or
postgresql) runs one backend only, for a quick local loop.
"""

import asyncio
import base64
import hashlib
import os
import shutil
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer

from versionstore.config import Config
from versionstore.http.app import create_app
from versionstore.http.keys import META

CLOUD = "demo"
API_KEY = "key123"
API_SECRET = "secret456"
BASIC_HEADERS = {"Authorization": "Basic " + base64.b64encode(f"{API_KEY}:{API_SECRET}".encode()).decode()}


def sign(params: dict[str, Any], secret: str = API_SECRET, algorithm: str = "sha1") -> dict[str, Any]:
    """Sign like the SDKs do (signature version 2) and add api_key/timestamp."""
    params = {"timestamp": str(int(time.time())), **params}
    pairs = []
    for key, value in params.items():
        if key in ("file", "api_key", "resource_type", "cloud_name") or value in (None, ""):
            continue
        value = ",".join(value) if isinstance(value, list) else str(value)
        pairs.append(f"{key}={value}".replace("&", "%26"))
    to_sign = "&".join(sorted(pairs))
    return {**params, "signature": hashlib.new(algorithm, (to_sign + secret).encode()).hexdigest(), "api_key": API_KEY}


def upload_form(data: bytes, filename: str = "file.bin", **params: Any) -> aiohttp.FormData:
    form = aiohttp.FormData()
    for key, value in sign(params).items():
        form.add_field(key, value if not isinstance(value, list) else ",".join(value))
    form.add_field("file", data, filename=filename, content_type="application/octet-stream")
    return form


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--file-times", nargs="?", const="", default=None, metavar="PATH",
        help="print setup/call/teardown seconds per test file; with PATH also write each test's as JSON (tests/timing.py)",
    )


def pytest_configure(config: pytest.Config) -> None:
    option = config.getoption("file_times")
    if option is not None:
        from tests.timing import FileTimes

        config.pluginmanager.register(FileTimes(option or None), "file-times")


METADATA_BACKENDS = [b for b in ("sqlite", "postgresql") if os.environ.get("VERSIONSTORE_TEST_METADATA", b) == b]
#: Functional modules run on SQLite only: their subject is how a request body is parsed and
#: bounded (encodings, limits, loop lag, where the socket splits a streamed or tapped file part),
#: which happens before and apart from the metadata; doubling them would add about 140 tests
#: and find nothing new (an upload's commit on PostgreSQL is the other modules' subject).
#: Every other module using `config` runs on both backends (test_bad_input too: bad values
#: reach the metadata there).
SQLITE_ONLY_MODULES = {
    "test_hostile", "test_wire_encodings", "test_upload_body_errors", "test_small_body", "test_upload_stream", "test_body_tap",
}
#: Modules whose every test runs once per multipart reader: small bodies read whole
#: (http/small_body.py, the default) and every body streamed part by part.
BOTH_READERS_MODULES = {"test_hostile", "test_wire_encodings", "test_upload_body_errors", "test_bad_input", "test_unauth_budget"}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """`metadata_url` (through `config`) runs a test on each backend, unless the test
    parametrizes it itself or its module is SQLite-only. In BOTH_READERS_MODULES a test runs
    with each multipart reader; the reader does not depend on the metadata backend, so the
    streaming reader runs on the first backend only."""
    module = metafunc.module.__name__.rsplit(".", 1)[-1]
    readers = module in BOTH_READERS_MODULES and "body_reader" in metafunc.fixturenames
    explicit = any(
        "metadata_url" in (names.replace(" ", "").split(",") if isinstance(names, str) else names)
        for names in (mark.args[0] for mark in metafunc.definition.iter_markers("parametrize"))
    )
    if "metadata_url" not in metafunc.fixturenames or explicit:
        if readers:
            metafunc.parametrize("body_reader", ["small", "stream"], indirect=True)
        return
    backends = [b for b in METADATA_BACKENDS if b == "sqlite"] if module in SQLITE_ONLY_MODULES else METADATA_BACKENDS
    backends = backends or ["sqlite"]
    if readers:
        pairs = [("small", backend) for backend in backends] + [("stream", backends[0])]
        metafunc.parametrize(("body_reader", "metadata_url"), pairs, indirect=True, ids=[f"{r}-{b}" for r, b in pairs])
    else:
        metafunc.parametrize("metadata_url", backends, indirect=True)


@pytest.fixture(scope="session")
def postgres() -> Iterator[Any]:
    """One PostgreSQL cluster per test session, with a migrated template database."""
    from tests.servers import PostgresServer
    from versionstore.metadata import MetadataStore

    server = PostgresServer()
    try:
        server.start()

        async def migrate() -> None:
            await (await MetadataStore.open(server.url(server.template))).close()

        asyncio.run(migrate())
        yield server
    finally:
        server.stop()


@pytest.fixture
def postgres_url(postgres: Any) -> Iterator[str]:
    """A fresh, migrated PostgreSQL database for one test (a copy of the template)."""
    name = postgres.new_database()
    yield postgres.url(name)
    postgres.drop_database(name)


@pytest.fixture
def metadata_url(request: pytest.FixtureRequest) -> str | None:
    """None (the embedded SQLite default) or a fresh PostgreSQL database's URL."""
    if getattr(request, "param", "sqlite") == "sqlite":
        return None
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture
def body_reader(request: pytest.FixtureRequest) -> str:
    """How the app reads multipart upload bodies: `small` (the default: small ones whole) or
    `stream` (every body part by part); both in BOTH_READERS_MODULES."""
    return str(getattr(request, "param", "small"))


@pytest.fixture
def config(tmp_path: Path, metadata_url: str | None, body_reader: str) -> Config:
    small_body_bytes = 0 if body_reader == "stream" else Config.small_body_bytes
    return Config(data_dir=tmp_path / "data", max_upload_bytes=64 << 20, metadata_url=metadata_url, small_body_bytes=small_body_bytes)


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated, empty SQLite metadata file, made once per session: `client` copies it into
    its data dir (about a millisecond) instead of applying every migration (0.1-0.25 s) per
    test. Migrating an empty or old database is tested where it is the subject
    (test_metadata_contract, test_cli, the e2e servers)."""
    from versionstore.metadata import MetadataStore

    path = tmp_path_factory.mktemp("sqlite-template") / "metadata.sqlite3"

    async def migrate() -> None:
        await (await MetadataStore.open(path)).close()

    asyncio.run(migrate())
    assert not path.with_name(path.name + "-wal").exists(), "closing the store should have checkpointed its WAL"
    return path


@pytest.fixture
async def client(aiohttp_client: Any, config: Config, sqlite_template: Path) -> AsyncIterator[TestClient]:
    if config.metadata_url is None and not config.db_path.exists():
        config.data_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(sqlite_template, config.db_path)
    app = create_app(config)
    server = TestServer(app)
    # A request still running at teardown is cut after this, not after aiohttp's 60 s (twice).
    await server.start_server(shutdown_timeout=TEARDOWN_REQUEST_WAIT)
    test_client: TestClient = await aiohttp_client(server)
    await app[META].create_cloud(CLOUD, API_KEY, API_SECRET, auto_backup=True)
    yield test_client
    await close_within(test_client, TEARDOWN_LIMIT)


#: Seconds a request left running by a test gets at teardown before it is cancelled.
TEARDOWN_REQUEST_WAIT = 2.0
#: Seconds the app may take to close after a test; past it the test fails naming what waits.
TEARDOWN_LIMIT = 60.0


async def close_within(test_client: TestClient, limit: float) -> None:
    """Close the app (its cleanup: background loops, jobs, the database) or fail loudly with
    the tasks still pending: a teardown awaiting what never completes must not hang the suite."""
    try:
        async with asyncio.timeout(limit):
            await test_client.close()
    except TimeoutError:
        this = asyncio.current_task()
        pending = [task for task in asyncio.all_tasks() if task is not this and not task.done()]
        described = "\n".join(f"  {task.get_name()}: {task.get_coro()!r} at {task.get_stack(limit=1)}" for task in pending)
        raise AssertionError(f"the app did not close within {limit:g} s after the test; pending tasks:\n{described}") from None


class Api:
    """Small helpers over the test client, speaking the wire like the SDKs."""

    def __init__(self, client: TestClient) -> None:
        self.client = client

    async def upload(self, data: bytes, rt: str = "image", expect: int = 200, filename: str = "file.bin", **params: Any) -> dict[str, Any]:
        response = await self.client.post(f"/v1_1/{CLOUD}/{rt}/upload", data=upload_form(data, filename, **params))
        body = await response.json()
        assert response.status == expect, body
        return body

    async def admin(self, method: str, path: str, expect: int = 200, **kwargs: Any) -> dict[str, Any]:
        headers = {**BASIC_HEADERS, **kwargs.pop("headers", {})}
        response = await self.client.request(method, f"/v1_1/{CLOUD}/{path}", headers=headers, **kwargs)
        body = await response.json()
        assert response.status == expect, body
        return body

    async def signed(self, path: str, expect: int = 200, **params: Any) -> dict[str, Any]:
        form = aiohttp.FormData()
        for key, value in sign(params).items():
            form.add_field(key, value if not isinstance(value, list) else ",".join(value))
        response = await self.client.post(f"/v1_1/{CLOUD}/{path}", data=form)
        body = await response.json()
        assert response.status == expect, body
        return body


@pytest.fixture
def api(client: TestClient) -> Api:
    return Api(client)


# --- real bucket servers (one per test session, started on first use) --------------------------


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory: pytest.TempPathFactory):
    from tests.servers import MotoServer

    server = MotoServer(tmp_path_factory.mktemp("moto"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory: pytest.TempPathFactory):
    from tests.servers import FakeGcsServer

    server = FakeGcsServer(tmp_path_factory.mktemp("gcs"))
    server.start()
    yield server
    server.stop()
