"""Small multipart upload bodies read whole and split in one pass (http/small_body.py).

Two apps side by side: one with the default reader (small bodies whole) and one that streams
every body (`small_body_bytes=0`). SDK-shaped bodies must take the small path and store the
same bytes; bodies the small path does not take on (odd but legal, or malformed) must fall
back to the streaming reader and get exactly its answer. The multipart fuzzer
(test_fuzz_multipart.py) compares both readers on generated input the same way.
"""

import hashlib
import os
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from urllib3 import encode_multipart_formdata

from tests.conftest import API_KEY, API_SECRET, CLOUD, sign
from versionstore import telemetry
from versionstore.config import Config
from versionstore.http import small_body
from versionstore.http.app import create_app
from versionstore.http.keys import CONFIG, META

UPLOAD = f"/v1_1/{CLOUD}/raw/upload"
#: The small-body bound of the first app: above its upload limit (110 KB), so an upload that
#: is too large can take the small path.
SMALL_BOUND = 160_000


@pytest.fixture
async def apps(aiohttp_client: Any, tmp_path: Path) -> tuple[TestClient, TestClient]:
    """(the default reader, the streaming reader), each on a data dir of its own."""
    clients = []
    for name, small_body_bytes in (("small", SMALL_BOUND), ("stream", 0)):
        config = Config(data_dir=tmp_path / name, max_upload_bytes=110_000, small_body_bytes=small_body_bytes)
        app = create_app(config)
        clients.append(await aiohttp_client(app))
        await app[META].create_cloud(CLOUD, API_KEY, API_SECRET, auto_backup=True)
    return clients[0], clients[1]


def readers() -> dict[str, float]:
    counter = telemetry.metrics().upload_bodies
    return {reader: counter.labels(reader)._value.get() for reader in ("small", "stream")}


async def post(client: TestClient, body: bytes, boundary: str = "b0undary", path: str = UPLOAD) -> tuple[int, Any]:
    response = await client.post(path, data=body, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    return response.status, await response.json()


def fields(**params: Any) -> bytes:
    return b"".join(b'--b0undary\r\nContent-Disposition: form-data; name="%s"\r\n\r\n%s\r\n' % (k.encode(), str(v).encode())
                    for k, v in sign(params).items())


def file_part(data: bytes, filename: bytes | None = b"a.bin", extra: bytes = b"") -> bytes:
    name = b'; filename="' + filename + b'"' if filename is not None else b""
    return b'--b0undary\r\nContent-Disposition: form-data; name="file"' + name + b"\r\n" + extra + b"\r\n" + data + b"\r\n"


END = b"--b0undary--\r\n"
SAME = ("bytes", "etag", "format", "resource_type", "type", "public_id", "tags", "original_filename", "existing")


def same_result(answer: Any) -> Any:
    return {k: answer.get(k) for k in SAME} if "error" not in answer else answer


@pytest.mark.parametrize("size", [0, 1, 1024, 100 * 1024])
async def test_sdk_bodies_take_the_small_path_and_store_the_same_bytes(apps: tuple[TestClient, TestClient], size: int) -> None:
    data = os.urandom(size)
    params = {"public_id": f"same/{size}", "backup": "1", "overwrite": "1", "tags": "a,b"}
    python_sdk, ctype = encode_multipart_formdata([*sign(params).items(), ("file", ("photo.bin", data, "application/octet-stream"))])
    before = readers()
    small = await apps[0].post(UPLOAD, data=python_sdk, headers={"Content-Type": ctype})
    after = readers()
    stream = await apps[1].post(UPLOAD, data=python_sdk, headers={"Content-Type": ctype})
    assert after["small"] == before["small"] + 1 and readers()["stream"] == after["stream"] + 1
    small_answer, stream_answer = await small.json(), await stream.json()
    assert small.status == stream.status
    assert same_result(small_answer) == same_result(stream_answer)
    if size:
        assert small_answer["etag"] == hashlib.md5(data).hexdigest() and small_answer["bytes"] == size


CASES = {
    "a preamble": b"preamble\r\n" + fields(public_id="odd/1") + file_part(b"x") + END,
    "an epilogue": fields(public_id="odd/2") + file_part(b"x") + END + b"epilogue\r\n",
    "whitespace after a delimiter": fields(public_id="odd/4").replace(b"--b0undary\r\n", b"--b0undary  \r\n") + file_part(b"x") + END,
    "a part Content-Length": fields(public_id="odd/5") + file_part(b"xyz", extra=b"Content-Length: 3\r\n") + END,
    "a transfer encoding": fields(public_id="odd/6") + file_part(b"eHl6", extra=b"Content-Transfer-Encoding: base64\r\n") + END,
    "LF-only part headers": fields(public_id="odd/7") + file_part(b"x").replace(b'"a.bin"\r\n\r\n', b'"a.bin"\n\n') + END,
    "a _charset_ part": b'--b0undary\r\nContent-Disposition: form-data; name="_charset_"\r\n\r\nlatin-1\r\n'
                        + fields(public_id="odd/8") + file_part(b"x") + END,
    "a nested multipart": fields(public_id="odd/9") + file_part(b"x", extra=b"Content-Type: multipart/mixed; boundary=z\r\n") + END,
    "a delimiter right after the headers": fields(public_id="odd/10") + b'--b0undary\r\nContent-Disposition: form-data; name="file"; '
                                           b'filename="a"\r\n\r\n--b0undary--\r\n',
    "no headers": fields(public_id="odd/11") + b"--b0undary\r\n\r\nvalue\r\n" + file_part(b"x") + END,
    "unclosed": fields(public_id="odd/12") + file_part(b"x"),
    "a bad boundary line": fields(public_id="odd/13") + file_part(b"x") + b"--b0undaryX\r\n",
    "a header without a colon": fields(public_id="odd/14") + file_part(b"x", extra=b"Garbage\r\n") + END,
    "a folded header": fields(public_id="odd/15") + file_part(b"x", extra=b"Content-Type: text/plain;\r\n charset=latin-1\r\n") + END,
    "a duplicate header": fields(public_id="odd/16") + file_part(b"x", extra=b"Content-Type: a/b\r\nContent-Type: c/d\r\n") + END,
}


@pytest.mark.parametrize("case", list(CASES))
async def test_bodies_left_to_the_streaming_reader_get_its_answer(apps: tuple[TestClient, TestClient], case: str) -> None:
    before = readers()
    small = await post(apps[0], CASES[case])
    assert readers()["small"] == before["small"], "the small path took a body it must leave to the streaming reader"
    stream = await post(apps[1], CASES[case])
    assert small[0] == stream[0] and same_result(small[1]) == same_result(stream[1]), (small, stream)


SEMANTIC = {
    "two file parts": fields(public_id="sem/1") + file_part(b"x") + file_part(b"y") + END,
    "a file part before the signature": file_part(b"x") + fields(public_id="sem/2") + END,
    "a bad signature": fields(public_id="sem/3").replace(b'name="public_id"\r\n\r\nsem/3', b'name="public_id"\r\n\r\nsem/X')
                       + file_part(b"x") + END,
    "too large": fields(public_id="sem/4") + file_part(b"z" * 110_001) + END,
    "a data URI": fields(public_id="sem/5") + file_part(b"data:image/png;base64,aGVs\r\nbG8=", filename=None) + END,
    "a bad data URI": fields(public_id="sem/6") + file_part(b"data:image/png;base64,a=bc", filename=None) + END,
    "a plain data URI": fields(public_id="sem/7") + file_part(b"data:,hello", filename=None) + END,
    "a URL": fields(public_id="sem/8") + file_part(b"http://127.0.0.1:1/a.png", filename=None) + END,
    "a field in latin-1": fields(public_id="sem/9") + b'--b0undary\r\nContent-Disposition: form-data; name="tags"\r\n'
                          b"Content-Type: text/plain; charset=latin-1\r\n\r\n\xe9t\xe9\r\n" + file_part(b"x") + END,
    "a field in an unknown charset": fields(public_id="sem/10") + b'--b0undary\r\nContent-Disposition: form-data; name="tags"\r\n'
                                     b"Content-Type: text/plain; charset=x-nope\r\n\r\nabc\r\n" + file_part(b"x") + END,
    "a field too long": fields(public_id="sem/11") + b'--b0undary\r\nContent-Disposition: form-data; name="tags"\r\n\r\n'
                        + b"t" * 70_000 + b"\r\n" + file_part(b"x") + END,
    "an empty field": fields(public_id="sem/12") + b'--b0undary\r\nContent-Disposition: form-data; name="tags"\r\n\r\n\r\n'
                      + file_part(b"x") + END,
    "no file": fields(public_id="sem/13") + END,
    "no CRLF after the close": fields(public_id="sem/14") + file_part(b"x") + END[:-2],
}


@pytest.mark.parametrize("case", list(SEMANTIC))
async def test_the_small_path_answers_as_the_streaming_reader(apps: tuple[TestClient, TestClient], case: str) -> None:
    """Well-formed bodies the small path reads itself: the same status, error and stored result,
    and nothing left in the spool directory."""
    before = readers()
    small = await post(apps[0], SEMANTIC[case])
    assert readers()["small"] == before["small"] + 1
    stream = await post(apps[1], SEMANTIC[case])
    assert small[0] == stream[0] and same_result(small[1]) == same_result(stream[1]), (small, stream)
    for client in apps:
        assert [p for p in client.server.app[CONFIG].spool_dir.rglob("*") if p.is_file()] == []


async def chunked(body: bytes) -> Any:
    for start in range(0, len(body), 7000):  # several HTTP chunks, as the Node SDK sends them
        yield body[start : start + 7000]


@pytest.mark.parametrize(("size", "padding", "reader"), [(3000, 0, "small"), (90_000, 0, "small"), (3000, 3, "stream")])
async def test_chunked_bodies(apps: tuple[TestClient, TestClient], size: int, padding: int, reader: str) -> None:
    """No Content-Length: read up to the bound, and streamed after all when longer (here made
    longer by fields of 60 KB)."""
    data = os.urandom(size)
    pads = {f"pad{i}": "p" * 60_000 for i in range(padding)}
    body = fields(public_id=f"chunked/{size}/{padding}", backup="1", **pads) + file_part(data) + END
    before = readers()
    answers = []
    for target in apps:
        response = await target.post(UPLOAD, data=chunked(body), headers={"Content-Type": "multipart/form-data; boundary=b0undary"})
        answers.append((response.status, same_result(await response.json())))
    assert answers[0] == answers[1] and answers[0][0] == 200 and answers[0][1]["etag"] == hashlib.md5(data).hexdigest()
    assert readers()["small"] == before["small"] + (reader == "small")


def _file_blocks() -> list[bytes]:
    """File part header blocks: every printable ASCII character at the start, middle and end of
    a filename, and hostile or unusual shapes the plain-filename shortcut must not change."""
    prefix = b'Content-Disposition: form-data; name="file"; filename="'
    blocks = []
    for byte in range(0x20, 0x7F):
        c = bytes([byte])
        for filename in (c + b"ab", b"a" + c + b"b", b"ab" + c, c):
            blocks += [prefix + filename + b'"', prefix + filename + b'"\r\nContent-Type: image/png; charset=latin-1']
    blocks += [
        prefix + b"x" * 255 + b'"', prefix + b"x" * 256 + b'"', prefix + b'"', prefix + b"\xc3\xa9.jpg" + b'"',
        prefix + b'a.jpg"; filename*=UTF-8\'\'b.jpg', prefix + b'a.jpg" ', prefix + b'a.jpg";', prefix + b"a.jpg",
        prefix + b'a\\"b.jpg"', prefix + b'/etc/passwd"', prefix + b'..\\..\\x"', prefix + b'a.jpg"\r\nX-Other: 1',
        prefix + b'a.jpg"\r\nContent-Disposition: form-data; name="tags"', prefix + b'a.jpg"\r\nContent-Type: multipart/mixed',
        prefix.lower() + b'a.jpg"', prefix.replace(b'"file"', b'"_charset_"') + b'a.jpg"', prefix + b'a\rb"', prefix + b'a\nb"',
        prefix + b'a.jpg"\r\n', prefix + b'a%22b.jpg"', prefix + b'a%2Fb.jpg"',
    ]
    return blocks


@pytest.mark.filterwarnings("ignore::aiohttp.multipart.BadContentDispositionHeader")
def test_a_file_parts_header_block_reads_as_aiohttps_parser_reads_it() -> None:
    """The per-upload filename is cut out of the file part's block so the rest is a cache hit;
    the answer must be aiohttp's own parse of the whole block (None: left to the streaming reader).
    One test over ~800 blocks (a test each cost the suite seconds of set-up for microseconds of work)."""
    differing = [block for block in _file_blocks() if small_body._part_head(block) != small_body._parsed_head.__wrapped__(block)]
    assert differing == []


def test_file_parts_with_new_filenames_hit_the_header_cache() -> None:
    """Every upload's filename differs: its header block must not be a new parse each time."""
    block = b'Content-Disposition: form-data; name="file"; filename="%s"\r\nContent-Type: application/octet-stream'
    small_body._part_head(block % b"warm.bin")
    misses = small_body._parsed_head.cache_info().misses
    heads = [small_body._part_head(block % f"IMG {n:04d} (copy)+%41.jpg".encode()) for n in range(50)]
    assert small_body._parsed_head.cache_info().misses == misses
    assert [head.filename if head else None for head in heads] == [f"IMG {n:04d} (copy)+%41.jpg" for n in range(50)]
