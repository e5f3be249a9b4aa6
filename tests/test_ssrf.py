"""Server-side request forgery (issue 8 item 14): remote `file` URLs and `notification_url`
callbacks never reach loopback, private, link-local, CGNAT, multicast, reserved or unspecified
addresses (nor their IPv6 forms), not by name, not by a literal, not through a redirect, unless
the operator allows them (`VERSIONSTORE_FETCH_ALLOW`); errors never tell a status or a
connection error apart (no port-scan oracle)."""

import asyncio
import ipaddress
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from tests.conftest import API_KEY, API_SECRET, CLOUD, Api, sign
from versionstore.config import Config
from versionstore.egress import EgressPolicy, is_public
from versionstore.http.app import create_app
from versionstore.http.fetch import GuardedResolver, RefusedAddress
from versionstore.http.keys import META


class Target:
    """A local HTTP server that counts every request it receives."""

    def __init__(self, server: TestServer) -> None:
        self.server = server
        self.hits: list[str] = []

    def url(self, path: str) -> str:
        return str(self.server.make_url(path))


@pytest.fixture
async def target(aiohttp_server: Any) -> Target:
    holder: list[Target] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        holder[0].hits.append(request.path_qs)
        if request.path.startswith("/redirect"):
            raise web.HTTPFound(request.query["to"])
        if request.path == "/missing":
            return web.Response(status=404, text="nope")
        return web.Response(body=b"secret internal bytes")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    holder.append(Target(await aiohttp_server(app)))
    return holder[0]


async def make_client(aiohttp_client: Any, tmp_path: Path, allow: tuple[str, ...] = ()) -> TestClient:
    app = create_app(Config(data_dir=tmp_path / "data", fetch_allow=allow, fetch_timeout=30, poll_interval=0.05))
    client: TestClient = await aiohttp_client(app)
    await app[META].create_cloud(CLOUD, API_KEY, API_SECRET, auto_backup=True)
    return client


@pytest.fixture
async def denied(aiohttp_client: Any, tmp_path: Path) -> AsyncIterator[TestClient]:
    yield await make_client(aiohttp_client, tmp_path)


async def upload_url(client: TestClient, url: str) -> tuple[int, dict[str, Any]]:
    form = aiohttp.FormData(sign({"public_id": "fetched/x", "file": url}))
    response = await client.post(f"/v1_1/{CLOUD}/image/upload", data=form)
    return response.status, await response.json()


# --- address classification -------------------------------------------------------------------

DENIED_ADDRESSES = [
    "127.0.0.1", "127.255.255.254", "0.0.0.0", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254",
    "100.64.0.1", "224.0.0.1", "239.255.255.250", "255.255.255.255", "240.0.0.1", "192.0.0.1", "198.18.0.1",
    "192.0.2.1", "::1", "::", "fe80::1", "fc00::1", "fd12:3456::1", "ff02::1", "::ffff:127.0.0.1",
    "::ffff:169.254.169.254", "::ffff:10.0.0.1", "2002:7f00:1::", "2002:a9fe:a9fe::", "64:ff9b::7f00:1",
    "64:ff9b::a9fe:a9fe", "2001:db8::1", "100::1",
]
PUBLIC_ADDRESSES = ["1.1.1.1", "8.8.8.8", "93.184.216.34", "2606:4700:4700::1111", "::ffff:8.8.8.8", "64:ff9b::808:808"]


@pytest.mark.parametrize("address", DENIED_ADDRESSES)
def test_internal_addresses_are_denied(address: str) -> None:
    assert not is_public(ipaddress.ip_address(address))
    assert not EgressPolicy().address_allowed(address)


@pytest.mark.parametrize("address", PUBLIC_ADDRESSES)
def test_public_addresses_are_allowed(address: str) -> None:
    assert EgressPolicy().address_allowed(address)


def test_allow_list_of_hosts_and_networks() -> None:
    policy = EgressPolicy(["127.0.0.1", "10.0.0.0/8", "Media.Internal.", "[::1]"])
    assert policy.address_allowed("127.0.0.1") and policy.address_allowed("10.20.30.40") and policy.address_allowed("::1")
    assert not policy.address_allowed("127.0.0.2") and not policy.address_allowed("169.254.169.254")
    assert policy.host_allowed("media.internal") and not policy.host_allowed("other.internal")


def test_config_reads_the_allow_list(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("VERSIONSTORE_FETCH_ALLOW", " 127.0.0.1, 10.0.0.0/8 ,,media.internal")
    assert Config.from_env(tmp_path).fetch_allow == ("127.0.0.1", "10.0.0.0/8", "media.internal")


async def test_resolver_drops_internal_addresses_at_connect_time() -> None:
    """A name is checked on the addresses the connection will use, so a name that resolves (or
    rebinds) to loopback is refused however it resolved before."""
    resolver = GuardedResolver(EgressPolicy())
    try:
        with pytest.raises(RefusedAddress):
            await resolver.resolve("localhost", 80)
    finally:
        await resolver.close()
    allowed = GuardedResolver(EgressPolicy(["localhost"]))
    try:
        assert await allowed.resolve("localhost", 80)
    finally:
        await allowed.close()


# --- remote file URLs ---------------------------------------------------------------------------


def literal_urls(port: int) -> list[str]:
    return [
        f"http://127.0.0.1:{port}/x",
        f"http://localhost:{port}/x",
        f"http://0.0.0.0:{port}/x",
        f"http://[::1]:{port}/x",
        f"http://[::ffff:127.0.0.1]:{port}/x",
        f"http://127.1:{port}/x",
        f"http://2130706433:{port}/x",
        f"http://0x7f000001:{port}/x",
        f"http://017700000001:{port}/x",
        f"http://LOCALHOST.:{port}/x",
        "http://169.254.169.254/latest/meta-data/",
        "http://10.255.255.1/",
        "http://[fe80::1]/",
        "http://100.64.0.1/",
    ]


async def test_remote_file_urls_to_internal_addresses_are_refused(denied: TestClient, target: Target) -> None:
    assert target.server.port is not None
    for url in literal_urls(target.server.port):
        started = time.monotonic()
        status, body = await upload_url(denied, url)
        assert status == 400, (url, body)
        message = body["error"]["message"]
        assert message.startswith("Error in loading") or message.startswith("Invalid file URL"), (url, message)
        assert time.monotonic() - started < 5, url  # refused, not attempted until the timeout
    assert target.hits == []


async def test_redirect_to_an_internal_address_is_refused(aiohttp_client: Any, tmp_path: Path, target: Target) -> None:
    """The first hop is allowed (by host name); the redirect to a literal loopback address is not."""
    client = await make_client(aiohttp_client, tmp_path, allow=("localhost",))
    port = target.server.port
    status, body = await upload_url(client, f"http://localhost:{port}/redirect?to=http://127.0.0.1:{port}/inner")
    assert status == 400, body
    assert target.hits == [f"/redirect?to=http://127.0.0.1:{port}/inner"]


async def test_redirect_hops_are_limited(aiohttp_client: Any, tmp_path: Path, target: Target) -> None:
    client = await make_client(aiohttp_client, tmp_path, allow=("127.0.0.1",))
    url = target.url("/final")
    for _ in range(8):
        url = target.url("/redirect") + "?" + aiohttp.helpers.quote("to", safe="") + "=" + aiohttp.helpers.quote(url, safe="")
    status, body = await upload_url(client, url)
    assert status == 400, body
    assert len(target.hits) == 6  # the first request and 5 redirects, then refused


async def test_errors_do_not_reveal_status_or_connection_errors(aiohttp_client: Any, tmp_path: Path, target: Target) -> None:
    client = await make_client(aiohttp_client, tmp_path, allow=("127.0.0.1",))
    missing = await upload_url(client, target.url("/missing"))
    closed = await upload_url(client, "http://127.0.0.1:1/closed")
    assert missing[0] == closed[0] == 400
    strip = [body["error"]["message"].split(" - ", 1)[1] for _, body in (missing, closed)]
    assert strip == ["could not fetch", "could not fetch"]
    # The whole message: a status ("404") or an errno in it would tell a prober what is there.
    # (Not `"404" not in message`: the target's random port can contain "404".)
    assert missing[1]["error"]["message"] == f"Error in loading {target.url('/missing')} - could not fetch"


async def test_allow_list_lets_the_operator_fetch_from_internal_hosts(aiohttp_client: Any, tmp_path: Path, target: Target) -> None:
    for allow in (("127.0.0.1",), ("127.0.0.0/8",)):
        client = await make_client(aiohttp_client, tmp_path / allow[0].replace("/", "_"), allow=allow)
        status, body = await upload_url(client, target.url("/file.bin"))
        assert status == 200, body
        assert body["bytes"] == len(b"secret internal bytes")
    # a redirect between allowed addresses is followed
    status, body = await upload_url(client, target.url("/redirect") + "?to=" + target.url("/after"))
    assert status == 200, body
    assert target.hits[-1] == "/after"


# --- notification_url -----------------------------------------------------------------------------


async def _initial_backup_with_hook(client: TestClient, hook: str) -> None:
    api = Api(client)
    await api.upload(b"notify", public_id="hook/a")
    started = await api.admin("POST", "operations/initial_backup", json={"notification_url": hook})
    for _ in range(200):
        job = await api.admin("GET", f"operations/initial_backup/{started['id']}")
        if job["status"] in ("completed", "failed"):
            break
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
async def test_notification_to_an_internal_address_is_never_sent(denied: TestClient, target: Target, host: str) -> None:
    await _initial_backup_with_hook(denied, f"http://{host}:{target.server.port}/hook")
    await asyncio.sleep(0.5)  # the notifier runs after the job ends
    assert target.hits == []


async def test_notification_redirect_is_not_followed(aiohttp_client: Any, tmp_path: Path, target: Target) -> None:
    client = await make_client(aiohttp_client, tmp_path, allow=("localhost",))
    port = target.server.port
    await _initial_backup_with_hook(client, f"http://localhost:{port}/redirect?to=http://127.0.0.1:{port}/inner")
    for _ in range(100):
        if target.hits:
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)
    assert target.hits and all(hit.startswith("/redirect") for hit in target.hits)


async def test_notification_reaches_an_allowed_receiver(aiohttp_client: Any, tmp_path: Path, target: Target) -> None:
    client = await make_client(aiohttp_client, tmp_path, allow=("127.0.0.1",))
    await _initial_backup_with_hook(client, target.url("/hook"))
    for _ in range(100):
        if target.hits:
            break
        await asyncio.sleep(0.05)
    assert target.hits == ["/hook"]
