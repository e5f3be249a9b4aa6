"""The batch client's HTTP (versionstore/backup_http.py, through backup_io.Api) against small real
servers that misbehave: a 503 and a dropped connection are retried, a kept-alive connection is
reused, a connection the server closes is not, and a cancelled exchange ends at once."""

import asyncio
import time
from typing import Any

import pytest
from aiohttp import web

from versionstore.backup_io import TRANSIENT, Api, RequestFailed, Target


async def _serving(aiohttp_server: Any, handler: Any) -> tuple[Api, Any]:
    app = web.Application()
    app.router.add_route("*", "/v1_1/demo/{tail:.*}", handler)
    server = await aiohttp_server(app)
    return Api(Target("demo", "key", "secret", str(server.make_url("")).rstrip("/")), retries=3, on_retry=lambda: None, workers=2), server


async def test_a_503_and_a_dropped_connection_are_retried(aiohttp_server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("versionstore.backup_io.BACKOFF_BASE", 0.01)
    answers = ["503", "drop", "ok"]
    seen: list[str] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        seen.append(request.headers["Authorization"])
        answer = answers.pop(0)
        if answer == "503":
            return web.json_response({"error": {"message": "busy"}}, status=503, headers={"Retry-After": "0"})
        if answer == "drop":
            assert request.transport is not None
            request.transport.close()  # no answer at all
            return web.Response()
        return web.json_response({"pong": True})

    api, _ = await _serving(aiohttp_server, handler)
    try:
        assert await api.retrying("ping", api.ping) == {"pong": True}
    finally:
        api.close()
    assert answers == [] and len(seen) == 3 and seen[0].startswith("Basic ")


async def test_errors_carry_the_servers_message_and_only_5xx_and_429_are_transient(aiohttp_server: Any) -> None:
    statuses = [404, 429]

    async def handler(request: web.Request) -> web.StreamResponse:
        return web.json_response({"error": {"message": "nope"}}, status=statuses.pop(0))

    api, _ = await _serving(aiohttp_server, handler)
    try:
        with pytest.raises(RequestFailed) as failed:
            await api.call("GET", ["resources", "image", "upload", "x"])
        assert failed.value.status == 404 and failed.value.message == "nope"
        with pytest.raises(TRANSIENT):
            await api.call("GET", ["resources", "image", "upload", "x"])
    finally:
        api.close()


async def test_connections_are_kept_alive_unless_the_server_closes_them(aiohttp_server: Any) -> None:
    peers: list[Any] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        assert request.transport is not None
        peers.append(request.transport.get_extra_info("peername"))
        response = web.json_response({"n": len(peers)})
        if request.query.get("close"):
            response.force_close()
        return response

    api, _ = await _serving(aiohttp_server, handler)
    try:
        for query in ({}, {}, {"close": "1"}, {}):
            await api.call("GET", ["ping"], params=query)
    finally:
        api.close()
    assert peers[0] == peers[1] == peers[2] != peers[3]  # one connection, until the server closed it


async def test_a_cancelled_exchange_is_aborted_at_once(aiohttp_server: Any) -> None:
    started = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        started.set()
        await asyncio.sleep(60)  # never answers in time
        return web.json_response({})

    api, _ = await _serving(aiohttp_server, handler)
    try:
        call = asyncio.create_task(api.call("GET", ["ping"]))
        await asyncio.wait_for(started.wait(), 10)
        began = time.monotonic()
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        assert time.monotonic() - began < 5  # the thread was not left waiting for the answer
    finally:
        api.close()
