"""Outgoing HTTP on a client's behalf: remote `file` URLs (streamed into a spool file, size- and
time-limited) and the client session `notification_url` callbacks share.

Server-side request forgery is closed at connect time: the session's resolver drops every
resolved address the egress policy refuses (so a name that later rebinds to 127.0.0.1 gets
nowhere), literal IP hosts are checked before each request, and redirects are followed here,
hop by hop, each hop checked again. Errors tell the caller only that the URL could not be
fetched; the status or connection error (a port-scan oracle) goes to the log at info.
"""

import asyncio
import logging
import socket
from typing import Any

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from yarl import URL

from versionstore.egress import EgressPolicy, parse_ip
from versionstore.errors import BadRequest
from versionstore.spool import Spooled, SpoolFile

log = logging.getLogger(__name__)

MAX_REDIRECTS = 5
_REDIRECTS = frozenset({301, 302, 303, 307, 308})


class RefusedAddress(OSError):
    """A connection the egress policy refuses (aiohttp wraps it in a ClientConnectorError)."""


class GuardedResolver(AbstractResolver):
    """Resolves like aiohttp's default resolver, then keeps only the addresses the policy allows."""

    def __init__(self, policy: EgressPolicy) -> None:
        self.policy = policy
        self.inner = DefaultResolver()

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        results = await self.inner.resolve(host, port, family)
        if self.policy.host_allowed(host):
            return results
        allowed = [r for r in results if self.policy.address_allowed(r["host"])]
        if not allowed:
            raise RefusedAddress(f"{host} resolves only to addresses outside the egress policy")
        return allowed

    async def close(self) -> None:
        await self.inner.close()


def guarded_session(policy: EgressPolicy, **kwargs: Any) -> aiohttp.ClientSession:
    """A client session whose every connection goes through the policy (see module doc)."""
    connector = aiohttp.TCPConnector(resolver=GuardedResolver(policy))
    return aiohttp.ClientSession(connector=connector, **kwargs)


def check_url(url: URL, policy: EgressPolicy) -> None:
    """Scheme and literal-IP host checks, made before every request and redirect hop (aiohttp
    does not pass a literal IP through the resolver)."""
    if url.scheme not in ("http", "https") or not url.host:
        raise RefusedAddress(f"not an http(s) URL: {url.scheme}")
    ip = parse_ip(url.host)
    if ip is not None and not policy.host_allowed(url.host) and not policy.address_allowed(ip):
        raise RefusedAddress(f"address {ip} is outside the egress policy")


class FetchFailed(Exception):
    pass


def _shown(url: str) -> str:
    return url if len(url) <= 200 else url[:200] + "..."


async def fetch_to_spool(
    session: aiohttp.ClientSession, url: str, spool: SpoolFile, timeout: float, policy: EgressPolicy
) -> Spooled:
    if not url.lower().startswith(("http://", "https://")):
        spool.discard()  # created by the caller; nothing else removes it
        raise BadRequest(f"Invalid file URL - {_shown(url)}")
    try:
        async with asyncio.timeout(timeout):
            await _fetch(session, url, spool, policy)
    except (TimeoutError, aiohttp.ClientError, FetchFailed, RefusedAddress, ValueError) as exc:
        spool.discard()
        log.info("fetch of %s failed: %s: %s", _shown(url), type(exc).__name__, exc)
        raise BadRequest(f"Error in loading {_shown(url)} - could not fetch") from None
    except BaseException:
        spool.discard()
        raise
    return await spool.finish()


async def _fetch(session: aiohttp.ClientSession, url: str, spool: SpoolFile, policy: EgressPolicy) -> None:
    current = URL(url)
    for _hop in range(MAX_REDIRECTS + 1):
        check_url(current, policy)
        async with session.get(current, allow_redirects=False) as response:
            location = response.headers.get("Location")
            if response.status in _REDIRECTS and location:
                current = response.url.join(URL(location))
                continue
            if response.status != 200:
                raise FetchFailed(f"HTTP {response.status}")
            async for data in response.content.iter_chunked(256 * 1024):
                await spool.write(data)
            return
    raise FetchFailed(f"more than {MAX_REDIRECTS} redirects")
