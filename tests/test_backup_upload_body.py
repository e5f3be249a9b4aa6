"""The batch client's upload body (`backup_io.FileBody`) against the real app over HTTP: exact
length instead of chunked encoding, bytes read with O_DIRECT into pooled buffers (or, where a
file system has no O_DIRECT, sent with sendfile) while a thread reads and hashes one block
ahead, and a file that changes under the upload never stores anything."""

import errno
import http.client
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import blake3
import pytest
from aiohttp.test_utils import TestClient

from tests.conftest import API_KEY, API_SECRET, CLOUD
from versionstore import backup_io
from versionstore.backup_client import Report, SourceRun, build_parser
from versionstore.backup_io import BLOCK, TIMELINE_VARIABLE, TRANSIENT, Api, FileBody, Item, StateFile, Target, walk_directory


@pytest.fixture(params=["direct", "sendfile"])
def read_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both ways a file is read: O_DIRECT into pooled buffers (where the file system allows it,
    as the test's temp dir does on Linux), and sendfile, what a file system without O_DIRECT gets."""
    if request.param == "sendfile":
        monkeypatch.setattr(backup_io, "_direct_reads", lambda fd: False)
    return str(request.param)


def _direct_possible(path: Path) -> bool:
    try:
        os.close(os.open(path, os.O_RDONLY | getattr(os, "O_DIRECT", 0)))
    except OSError as exc:
        assert exc.errno == errno.EINVAL, exc
        return False
    return hasattr(os, "O_DIRECT")


@pytest.fixture
def api(client: TestClient) -> Iterator[Api]:
    api = Api(Target(CLOUD, API_KEY, API_SECRET, str(client.make_url("")).rstrip("/")), retries=0, on_retry=lambda: None, workers=4)
    yield api
    api.close()


@pytest.fixture
def requests_sent(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str, dict[str, str]]]:
    """(method, target, headers) of every request the client's `http.client` connections send."""
    sent: list[tuple[str, str, dict[str, str]]] = []
    putrequest, putheader = http.client.HTTPConnection.putrequest, http.client.HTTPConnection.putheader

    def recording_putrequest(self: Any, method: str, url: str, *args: Any, **kwargs: Any) -> None:
        self.recorded = (method, url, {})
        sent.append(self.recorded)
        putrequest(self, method, url, *args, **kwargs)

    def recording_putheader(self: Any, header: str, *values: Any) -> None:
        self.recorded[2][header] = str(values[0])
        putheader(self, header, *values)

    monkeypatch.setattr(http.client.HTTPConnection, "putrequest", recording_putrequest)
    monkeypatch.setattr(http.client.HTTPConnection, "putheader", recording_putheader)
    return sent


@pytest.mark.parametrize("size", [1, 4095, 4097, BLOCK, 2 * BLOCK + 12345])
async def test_upload_states_its_length_and_the_server_hashes_the_same_bytes(
    api: Api, requests_sent: list[tuple[str, str, dict[str, str]]], tmp_path: Path, size: int, read_path: str
) -> None:
    data = os.urandom(size)
    path = tmp_path / 'the "odd" näme.bin'
    path.write_bytes(data)
    sent: list[int] = []
    hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
    result = await api.upload(Item("dossier/été 1", "raw", "upload", str(path)), str(path), path.name, sent.append, hasher)
    assert result["blake3"] == hasher.hexdigest() == blake3.blake3(data).hexdigest()
    assert result["bytes"] == size and result["public_id"] == "dossier/été 1" and result["backup"] is True
    assert sum(sent) == size and max(sent) <= BLOCK
    assert result["original_filename"] == 'the "odd" näme'
    method, target, headers = requests_sent[-1]
    assert (method, target) == ("POST", f"/v1_1/{CLOUD}/raw/upload")
    assert "Transfer-Encoding" not in headers and int(headers["Content-Length"]) > size


async def test_a_file_that_shrinks_during_the_upload_stores_nothing(api: Api, tmp_path: Path, read_path: str) -> None:
    path = tmp_path / "shrinks.bin"
    path.write_bytes(os.urandom(3 * BLOCK))
    item = Item("shrinks", "raw", "upload", str(path))

    def cut(n: int) -> None:  # after the first block went out, the file loses its tail
        os.truncate(path, BLOCK + 10)

    with pytest.raises(TRANSIENT):
        await api.upload(item, str(path), path.name, cut, blake3.blake3())
    assert await api.lookup(item) is None



async def test_a_file_rewritten_in_place_during_the_upload_stores_nothing(api: Api, tmp_path: Path, read_path: str) -> None:
    """Same size, other bytes: the upload would carry a torn file (old first block, new rest).
    The request is abandoned before its closing boundary, with or without a client-side hash."""
    path = tmp_path / "rewritten.bin"
    item = Item("rewritten", "raw", "upload", str(path))

    def rewrite(n: int) -> None:  # after the first block went out, the rest of the file gets new bytes
        with open(path, "r+b") as handle:
            handle.seek(BLOCK)
            handle.write(os.urandom(2 * BLOCK))

    for hasher in (None, blake3.blake3()):
        path.write_bytes(os.urandom(3 * BLOCK))
        os.utime(path, ns=(10**18, 10**18))  # an old mtime: the rewrite must not land in the same clock tick
        with pytest.raises(TRANSIENT):
            await api.upload(item, str(path), path.name, rewrite, hasher)
        assert await api.lookup(item) is None


async def test_a_new_file_is_sent_without_a_client_hash_and_recorded_with_the_servers_digest(
    api: Api, tmp_path: Path, read_path: str
) -> None:
    """No client-side hash of a new file. Read with O_DIRECT into the pool's buffers, which the
    next uploads reuse; else its pages are faulted in for sendfile, never read into a buffer.
    The state file records the digest the server computed of what it received."""
    data = os.urandom(2 * BLOCK + 4321)
    path = tmp_path / "new.bin"
    path.write_bytes(data)
    allocated = backup_io._BLOCKS.allocated
    for _ in range(3):  # one after the other: the same two buffers each time
        body = FileBody((("public_id", "new.bin"), ("backup", "true")), str(path), path.name, lambda n: None)
        with body:
            assert (await api.call("POST", ["raw", "upload"], body=body))["blake3"] == blake3.blake3(data).hexdigest()
    direct = read_path == "direct" and _direct_possible(path)
    assert body.direct is direct
    assert backup_io._BLOCKS.allocated - allocated <= (2 if direct else 0)
    if sys.platform == "linux" and not direct:
        assert body._buffer is None  # paged in (MADV_POPULATE_READ), not read
    src = tmp_path / "src"
    src.mkdir()
    (src / "fresh.bin").write_bytes(data)
    args = build_parser().parse_args(["--source", str(src), "--no-progress"])
    report = Report("source", api.target.base)
    state = StateFile(tmp_path / "state.jsonl", api.target.base)
    await SourceRun(args, api, state, report).run(lambda: walk_directory(src))
    assert report.counts["uploaded"] == 1 and report.counts["failed"] == 0, report.failures
    (remembered,) = state.load().values()
    assert remembered.digest == blake3.blake3(data).hexdigest() and remembered.outcome == "uploaded"



async def test_a_first_run_lists_new_assets_and_looks_up_only_those_the_server_has(
    api: Api, requests_sent: list[tuple[str, str, dict[str, str]]], tmp_path: Path
) -> None:
    src = tmp_path / "src"
    for name in ("a.png", "b/c.txt", "b/d.mp4", "e.jpg"):
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(os.urandom(1000))
    existing = Item("e", "image", "upload", str(src / "e.jpg"))  # on the server already, with other bytes
    other = tmp_path / "other.bin"
    other.write_bytes(b"other bytes")
    await api.upload(existing, str(other), "other.bin", lambda n: None)
    requests_sent.clear()
    args = build_parser().parse_args(["--source", str(src), "--no-progress"])
    report = Report("source", api.target.base)
    await SourceRun(args, api, StateFile(tmp_path / "state.jsonl", api.target.base), report).run(lambda: walk_directory(src))
    assert report.counts["uploaded"] == 4 and report.counts["failed"] == 0, report.failures
    base = f"/v1_1/{CLOUD}/resources/"
    requests = [(method, target.partition("?")[0]) for method, target, _ in requests_sent]
    lookups = [path for method, path in requests if method == "GET" and path.startswith(base) and path.count("/") > 5]
    listings = [path for method, path in requests if method == "GET" and path.startswith(base) and path.count("/") == 5]
    assert lookups == [f"{base}image/upload/e"]  # only the asset the listing returned
    assert sorted(listings) == [f"{base}image/upload", f"{base}raw/upload", f"{base}video/upload"]


async def test_the_timeline_has_a_line_per_upload_when_asked_for(client: TestClient, tmp_path: Path, monkeypatch: Any) -> None:
    timeline = tmp_path / "timeline.jsonl"
    monkeypatch.setenv(TIMELINE_VARIABLE, str(timeline))
    path = tmp_path / "one.bin"
    path.write_bytes(os.urandom(BLOCK + 1))
    api = Api(Target(CLOUD, API_KEY, API_SECRET, str(client.make_url("")).rstrip("/")), retries=0, on_retry=lambda: None, workers=1)
    try:
        await api.upload(Item("one", "raw", "upload", str(path)), str(path), path.name, lambda n: None)
    finally:
        api.close()
    (line,) = timeline.read_text().splitlines()
    entry = json.loads(line)
    assert entry["bytes"] == BLOCK + 1 and 0 <= entry["start"] <= entry["sent"] <= entry["end"], entry


@pytest.mark.parametrize("name", ["my photo.bin", 'a "quoted" name.bin', "semi;colon.bin", "ünï cødé.bin", "new\nline.bin"])
async def test_the_file_name_arrives_as_the_assets_original_filename(api: Api, tmp_path: Path, name: str) -> None:
    """The name goes as a quoted string in UTF-8, which the server reads back as it was (a line
    break excepted: it is percent-encoded, as browsers do, so it cannot end the header line)."""
    path = tmp_path / "file.bin"
    path.write_bytes(b"named")
    result = await api.upload(Item("named", "raw", "upload", str(path)), str(path), name, lambda n: None)
    assert result["original_filename"] == name.removesuffix(".bin").replace("\n", "%0A")
