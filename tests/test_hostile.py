"""Hostile input on the non-upload paths (issue 8 items 7, 11, 15): every malformed request is a
4xx Cloudinary-style error, never a 500 or an ERROR log line; parsing is linear in bounded input;
no request holds the event loop long enough to stall other clients."""

import asyncio
import base64
import contextlib
import json
import logging
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
from aiohttp.test_utils import TestClient

from tests.conftest import BASIC_HEADERS, CLOUD, Api, sign
from versionstore import queries
from versionstore.errors import BadRequest


def cursor(payload: str) -> str:
    return base64.urlsafe_b64encode(payload.encode()).decode().rstrip("=")


def search_json(expression: str) -> dict[str, Any]:
    return {"json": {"expression": expression}}


JSON = {"Content-Type": "application/json"}

# (name, method, path, request kwargs). Paths are under /v1_1/<cloud>/; Basic auth is added.
MALFORMED: list[tuple[str, str, str, dict[str, Any]]] = [
    (
        "bad gzip body",
        "POST",
        "resources/search",
        {"data": b"\x1f\x8b\x08\x00garbage-not-gzip", "headers": {"Content-Encoding": "gzip", "Content-Type": "application/json"}},
    ),
    (
        "bad deflate body",
        "POST",
        "resources/search",
        {"data": b"not deflate at all", "headers": {"Content-Encoding": "deflate", "Content-Type": "application/json"}},
    ),
    ("deeply nested JSON", "POST", "resources/search", {"data": "[" * 200_000 + "]" * 200_000, "headers": JSON}),
    ("deeply nested JSON object", "POST", "resources/search", {"data": '{"a":' * 10_000 + "1" + "}" * 10_000, "headers": JSON}),
    ("bytes>abc", "POST", "resources/search", search_json("bytes>abc")),
    ("bytes=[1 TO abc]", "POST", "resources/search", search_json("bytes=[1 TO abc]")),
    ("bytes=nan", "POST", "resources/search", search_json("bytes=nan")),
    ("bytes>1e400", "POST", "resources/search", search_json("bytes>1e400")),
    ("created_at huge number", "POST", "resources/search", search_json("created_at>" + "9" * 400)),
    ("1000 AND terms", "POST", "resources/search", search_json(" AND ".join(["status=active"] * 1000))),
    ("pathological range", "POST", "resources/search", search_json("bytes=[" + " TO" * 15000)),
    ("expression not a string", "POST", "resources/search", {"json": {"expression": {"a": [1]}}}),
    ("search cursor 1e400", "POST", "resources/search", {"json": {"next_cursor": cursor('{"o":1e400}')}}),
    ("search cursor 2**63", "POST", "resources/search", {"json": {"next_cursor": cursor(f'{{"o":{2**63}}}')}}),
    ("search cursor float", "POST", "resources/search", {"json": {"next_cursor": cursor('{"o":1.5}')}}),
    ("search cursor bool", "POST", "resources/search", {"json": {"next_cursor": cursor('{"o":true}')}}),
    ("search cursor list", "POST", "resources/search", {"json": {"next_cursor": cursor("[1]")}}),
    ("search cursor not UTF-8", "POST", "resources/search", {"json": {"next_cursor": base64.urlsafe_b64encode(b"\xff\xfe").decode()}}),
    ("search cursor nested", "POST", "resources/search", {"json": {"next_cursor": cursor("[" * 100_000)}}),
    ("listing cursor 1e400", "GET", "resources/image/upload", {"params": {"next_cursor": cursor('{"o":1e400}')}}),
    ("listing cursor 2**63", "GET", "resources/image/upload", {"params": {"next_cursor": cursor(f'{{"o":{2**63}}}')}}),
    ("listing cursor -2**70", "GET", "resources/image", {"params": {"next_cursor": cursor(f'{{"o":-{2**70}}}')}}),
    ("jobs cursor 2**63", "GET", "operations/initial_backup", {"params": {"next_cursor": cursor(f'{{"o":{2**63}}}')}}),
]


@pytest.mark.parametrize(("name", "method", "path", "kwargs"), MALFORMED, ids=[case[0] for case in MALFORMED])
async def test_malformed_input_is_a_clean_4xx(
    client: TestClient, caplog: pytest.LogCaptureFixture, name: str, method: str, path: str, kwargs: dict[str, Any]
) -> None:
    caplog.set_level(logging.INFO)
    headers = {**BASIC_HEADERS, **kwargs.get("headers", {})}
    rest = {k: v for k, v in kwargs.items() if k != "headers"}
    response = await client.request(method, f"/v1_1/{CLOUD}/{path}", headers=headers, **rest)
    body = await response.json()
    assert 400 <= response.status < 500, (name, response.status, body)
    assert isinstance(body["error"]["message"], str) and body["error"]["message"], body
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]
    # the service is still fine afterwards
    assert (await client.get("/healthz")).status == 200


async def test_truncated_gzip_body_is_a_clean_4xx(client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    data = zlib.compress(json.dumps({"expression": "status=active"}).encode())[:-6]
    response = await client.post(
        f"/v1_1/{CLOUD}/resources/search",
        data=data,
        headers={**BASIC_HEADERS, "Content-Encoding": "deflate", "Content-Type": "application/json"},
    )
    # aiohttp's own parser answers this one (text/plain) before any handler sees the request
    assert 400 <= response.status < 500
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


# --- the search expression parser: linear, bounded --------------------------------------------


PATHOLOGICAL: list[Callable[[int], str]] = [
    lambda n: "bytes=[" + " TO" * n,
    lambda n: "bytes=[" + " " * n + "TO",
    lambda n: "tags=" + "a" * n + " " * n,
    lambda n: "status=active" + " AND" * n,
    lambda n: "bytes=[1" + "\t" * n + "TO" + " " * n,
    lambda n: '"' * n,
    lambda n: "a" * n + "=" * n,
]


@pytest.mark.parametrize("make", PATHOLOGICAL)
def test_parser_is_fast_on_pathological_input(make: Callable[[int], str]) -> None:
    """Within the length cap every input parses (or is refused) in well under the loop budget;
    beyond the cap it is refused before any parsing."""
    for n in (10, 100, 1000, queries.MAX_EXPRESSION_CHARS // 4):
        text = make(n)
        elapsed = []
        for _ in range(3):  # the best of three: a shared CI machine may preempt one run
            started = time.perf_counter()
            with contextlib.suppress(BadRequest):
                queries.parse_expression(text)
            elapsed.append(time.perf_counter() - started)
        assert min(elapsed) < 0.01, (n, elapsed)
    started = time.perf_counter()
    with pytest.raises(BadRequest, match="too long"):
        queries.parse_expression(make(20_000))
    assert time.perf_counter() - started < 0.01


def test_parser_keeps_the_supported_grammar() -> None:
    found = queries.parse_expression(
        "status=deleted AND tags=cat and public_id:docs/* AND bytes>=10 AND bytes=[1 TO 20]"
        ' AND created_at:["2024-01-01" TO 2024-12-31] AND format="jpg"'
    )
    F = queries.Filter
    assert found[:6] == [
        F("status", "=", "deleted"), F("tag", "=", "cat"), F("public_id", "prefix", "docs/"),
        F("bytes", ">=", 10), F("bytes", ">=", 1), F("bytes", "<=", 20),
    ]
    assert [(f.field, f.op) for f in found[6:8]] == [("created_at", ">="), ("created_at", "<=")]
    assert found[-1] == F("format", "=", "jpg")
    # a quoted value may hold spaces and the word AND
    assert queries.parse_expression('tags="a AND b"') == [queries.Filter("tag", "=", "a AND b")]
    bad_ones = (
        "tags=", "tags=a AND", "AND tags=a", "tags=a tags=b", "bytes=[1 TO]",
        "bytes=[1 TO 2", 'tags="open', "Tags=a", "tags=a AND AND tags=b",
    )
    for bad in bad_ones:
        with pytest.raises(BadRequest):
            queries.parse_expression(bad)


def test_parser_refuses_too_many_terms() -> None:
    text = " AND ".join(["status=active"] * (queries.MAX_TERMS + 1))
    with pytest.raises(BadRequest, match="terms"):
        queries.parse_expression(text)
    queries.parse_expression(" AND ".join(["tags=a"] * queries.MAX_TERMS))


def test_cursor_round_trip_and_bounds() -> None:
    assert queries.decode_cursor(queries.encode_cursor(12345)) == 12345
    assert queries.decode_cursor(None) == 0
    with pytest.raises(BadRequest):
        queries.decode_cursor(queries.encode_cursor(queries.MAX_OFFSET + 1))
    with pytest.raises(BadRequest):
        queries.decode_cursor("x" * 10_000)


# --- id lists are bounded ------------------------------------------------------------------------


@pytest.mark.parametrize("endpoint", ["tags", "context", "metadata"])
async def test_bulk_field_updates_refuse_more_ids_than_the_limit(api: Api, endpoint: str) -> None:
    from versionstore.http.upload_views import MAX_BULK_IDS

    await api.upload(b"x", public_id="one")
    if endpoint == "metadata":  # a value must name a defined field (docs/api.md)
        await api.admin("POST", "metadata_fields", json={"type": "string", "external_id": "a", "label": "A"})
    extra = {"tags": {"tag": "t", "command": "add"}, "context": {"context": "a=b"}, "metadata": {"metadata": "a=b"}}[endpoint]
    body = await api.signed(f"image/{endpoint}", expect=400, public_ids=[f"id{i}" for i in range(MAX_BULK_IDS + 1)], **extra)
    assert "public_ids" in body["error"]["message"]
    # the SDKs send one `public_ids[]` field per id: the largest accepted list fits in a form
    ids = ["one"] + [f"id{i}" for i in range(MAX_BULK_IDS - 1)]
    fields = [(k, v) for k, v in sign({**extra, "public_ids": ids}).items() if k != "public_ids"]
    fields += [("public_ids[]", pid) for pid in ids]
    response = await api.client.post(f"/v1_1/{CLOUD}/image/{endpoint}", data=urlencode(fields).encode(),
                                     headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert (response.status, await response.json()) == (200, {"public_ids": ["one"]})


async def test_version_id_lists_are_bounded(api: Api) -> None:
    from versionstore.http.admin_views import MAX_VERSION_IDS

    asset = await api.upload(b"v", public_id="versions/one")
    ids = ["0" * 32] * (MAX_VERSION_IDS + 1)
    body = await api.admin("DELETE", f"resources/backup/{asset['asset_id']}", expect=400, json={"version_ids": ids})
    assert "version_ids" in body["error"]["message"]


# --- the event loop stays responsive -----------------------------------------------------------


#: The worst stall of the event loop a hostile request may cause. The service aims at ~50 ms;
#: aiohttp's own decoding of a 4 MB form body holds the loop 0.2-0.3 s (docs/operations.md,
#: Limits). Time the loop's thread waited for a CPU is not counted (LoopLag): on a loaded
#: machine the wall-clock stall of the same request reached 2-3 s.
LAG_BUDGET = 0.5
_SCHEDSTAT = Path("/proc/thread-self/schedstat")


def _waited_for_cpu() -> float:
    """Seconds this thread has spent runnable but not running (preempted, or woken and queued):
    the second field of Linux's schedstat. 0 where the kernel does not report it."""
    try:
        return int(_SCHEDSTAT.read_text().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


class LoopLag:
    """The longest time the event loop was held, sampled every few milliseconds: each sample's
    lateness minus the time the loop's thread waited for a CPU meanwhile. A handler that
    computes or blocks on the loop still counts in full (its thread runs, or sleeps in a
    syscall); other processes taking the CPU, which a shared machine does, do not."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.worst = 0.0
        self.worst_wall = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            before, waited = loop.time(), _waited_for_cpu()
            await asyncio.sleep(self.interval)
            late = loop.time() - before - self.interval
            self.worst_wall = max(self.worst_wall, late)
            self.worst = max(self.worst, late - (_waited_for_cpu() - waited))

    async def __aenter__(self) -> "LoopLag":
        self._task = asyncio.create_task(self._run())
        await asyncio.sleep(0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        await asyncio.sleep(self.interval * 4)  # let the sampler see a stall that just ended
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        print(f"worst event-loop stall: {self.worst * 1000:.1f} ms ({self.worst_wall * 1000:.1f} ms of wall clock)")


def _signed_form(params: dict[str, Any]) -> bytes:
    return urlencode(sign(params)).encode()


HALF_MILLION = ",".join(f"p{i}" for i in range(500_000))


def form(fields: dict[str, str]) -> dict[str, Any]:
    return {"data": urlencode(fields).encode(), "headers": {"Content-Type": "application/x-www-form-urlencoded"}}


HOSTILE_REQUESTS: list[tuple[str, str, str, dict[str, Any]]] = [
    ("45 KB range expression", "POST", "resources/search", search_json("bytes=[" + " TO" * 15000)),
    ("1000 AND terms", "POST", "resources/search", search_json(" AND ".join(["status=active"] * 1000))),
    ("500k public_ids listing", "GET", "resources/image/upload", {"params": {"public_ids": ",".join(f"p{i}" for i in range(50_000))}}),
    ("500k asset_ids", "GET", "resources/by_asset_ids", {"params": {"asset_ids": ",".join("0" * 32 for _ in range(1_000))}}),
    ("500k ids in one JSON string", "POST", "resources/search", {"json": {"public_ids": HALF_MILLION}}),
    ("500k ids to delete_resources", "DELETE", "resources/image/upload", form({"public_ids": HALF_MILLION})),
    ("500k versions to restore", "POST", "resources/image/upload/restore", form({"public_ids": "a", "versions": HALF_MILLION})),
    ("500k asset ids to restore", "POST", "resources/restore", form({"asset_ids": HALF_MILLION})),
]


@pytest.mark.parametrize(("name", "method", "path", "kwargs"), HOSTILE_REQUESTS, ids=[case[0] for case in HOSTILE_REQUESTS])
async def test_hostile_admin_request_does_not_hold_the_loop(
    client: TestClient, name: str, method: str, path: str, kwargs: dict[str, Any]
) -> None:
    headers = {**BASIC_HEADERS, **kwargs.get("headers", {})}
    rest = {k: v for k, v in kwargs.items() if k != "headers"}
    async with LoopLag() as lag:
        response = await client.request(method, f"/v1_1/{CLOUD}/{path}", headers=headers, **rest)
        assert 400 <= response.status < 500, (name, await response.text())
    assert lag.worst < LAG_BUDGET, (name, lag.worst)


async def test_huge_tag_list_on_update_does_not_hold_the_loop(api: Api) -> None:
    await api.upload(b"x", public_id="tagged/x")
    request = form({"tags": HALF_MILLION})
    async with LoopLag() as lag:
        body = await api.admin("POST", "resources/image/upload/tagged/x", expect=400, **request)
    assert "tags" in body["error"]["message"]
    assert lag.worst < LAG_BUDGET, lag.worst


@pytest.mark.parametrize("count", [500_000])
async def test_huge_signed_tags_call_does_not_hold_the_loop(client: TestClient, config: Any, count: int) -> None:
    ids = ",".join(f"p{i}" for i in range(count))
    body = _signed_form({"tag": "t", "command": "add", "public_ids": ids})
    assert len(body) < config.max_body_bytes
    async with LoopLag() as lag:
        response = await client.post(
            f"/v1_1/{CLOUD}/image/tags", data=body, headers={"Content-Type": "application/x-www-form-urlencoded"}
        )
        assert response.status == 400, await response.text()
    assert "public_ids" in (await response.json())["error"]["message"]
    assert lag.worst < LAG_BUDGET, lag.worst


# --- public ids: no invisible, bidi, separator or control characters, no blank ids -------------


BAD_PUBLIC_IDS = [
    "evil\u202etxt.exe",  # right-to-left override (bidi control)
    "a\u202ab",  # left-to-right embedding
    "a\u2066b",  # left-to-right isolate
    "\ufeffdoc",  # zero-width no-break space / BOM
    "a\u200bb",  # zero-width space
    "a\u200db",  # zero-width joiner
    "a\u00adb",  # soft hyphen (Cf)
    "line\u2028break",  # line separator (Zl)
    "para\u2029graph",  # paragraph separator (Zp)
    "a\u0085b",  # next line (C1 control)
    "a\x9bb",  # C1 control
    "a\x00b",
    "a\nb",
    " ",
    "   ",
    "\u3000",  # ideographic space only
    "\u00a0",  # no-break space only
    "docs/ /x",  # a blank path segment
    " leading",
    "trailing ",
    "a\ud800b",  # lone surrogate
    "a\U000e0001b",  # language tag (Cf)
    "a\ufff9b",  # interlinear annotation anchor (Cf)
]


@pytest.mark.parametrize("public_id", BAD_PUBLIC_IDS, ids=[repr(p) for p in BAD_PUBLIC_IDS])
async def test_public_id_refuses_invisible_and_blank(api: Api, public_id: str) -> None:
    from versionstore import ids

    with pytest.raises(BadRequest):
        ids.check_public_id(public_id)
    if "\ud800" in public_id:
        return  # not encodable on the wire
    body = await api.upload(b"data", expect=400, public_id=public_id)
    assert "public_id" in body["error"]["message"]


@pytest.mark.parametrize("public_id", ["docs/sample", "café/ünïcödé", "日本語/写真", "emoji 😀 x", "a b", "a-b_c.d~e"])
def test_public_id_keeps_ordinary_unicode(public_id: str) -> None:
    from versionstore import ids

    assert ids.check_public_id(public_id) == public_id


def _many_pairs_form(count: int) -> bytes:
    return "&".join(f"public_ids[]=p{i}" for i in range(count)).encode()


BIG_BODIES: list[tuple[str, str, bytes, str]] = [
    ("form of 400k public_ids[] to tags", "image/tags", _many_pairs_form(400_000), "application/x-www-form-urlencoded"),
    ("JSON of 800k ids", "resources/search", json.dumps({"public_ids": [str(i) for i in range(800_000)]}).encode(), "application/json"),
]


@pytest.mark.parametrize(("name", "path", "data", "ctype"), BIG_BODIES, ids=[case[0] for case in BIG_BODIES])
async def test_big_bodies_do_not_hold_the_loop(client: TestClient, config: Any, name: str, path: str, data: bytes, ctype: str) -> None:
    assert len(data) < config.max_body_bytes
    async with LoopLag() as lag:
        response = await client.post(f"/v1_1/{CLOUD}/{path}", data=data, headers={**BASIC_HEADERS, "Content-Type": ctype})
        assert 400 <= response.status < 500, await response.text()
    assert lag.worst < LAG_BUDGET, (name, lag.worst)


@pytest.mark.parametrize("path", ["resources/search", "image/tags", "image/upload"])
async def test_client_going_away_mid_body_is_not_a_server_error(client: TestClient, caplog: pytest.LogCaptureFixture, path: str) -> None:
    caplog.set_level(logging.INFO)
    reader, writer = await asyncio.open_connection("127.0.0.1", client.server.port)
    auth = BASIC_HEADERS["Authorization"]
    writer.write(
        f"POST /v1_1/{CLOUD}/{path} HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\n"
        "Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n{\"expression\": \"".encode()
    )
    await writer.drain()
    await asyncio.sleep(0.2)
    writer.close()
    await asyncio.sleep(0.5)  # the server notices the lost connection
    assert (await client.get("/healthz")).status == 200
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]
