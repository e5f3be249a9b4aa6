"""Wait until the in-process test server has read a request body up to a point and blocks for
more: what a body sent in pieces needs so that the server reads the pieces apart (the split the
test is about), without guessing how long that takes with a fixed sleep.

The client and the app share one event loop (`aiohttp_client`), so the state is read off the
server's own objects: the request's body stream (`request.content`) counts the body bytes it
was fed and holds a waiter while its reader waits for more. aiohttp names these attributes
privately; if they move, `until_server_read` raises AttributeError rather than wait in silence.
"""

import asyncio
import time

from aiohttp.test_utils import TestClient
from aiohttp.web_protocol import RequestHandler

#: Long enough for an app under load; only a request the server answers before it has read the
#: whole piece (not one of the split tests) ever waits this long.
DEADLINE = 5.0


def _handlers(client: TestClient) -> list[RequestHandler]:
    runner = client.server.runner
    assert runner is not None and runner.server is not None, "the test server is not running"
    return runner.server.connections


def _blocked_after(handler: RequestHandler, sent: int) -> bool:
    request = handler._current_request
    if request is None:
        return False
    content = request.content
    return content.total_bytes >= sent and content._waiter is not None


async def until_server_read(client: TestClient, sent: int) -> bool:
    """Until a request of `client`'s server has been fed `sent` body bytes and its reader waits
    for more (True), or DEADLINE has passed (False: the server answered before reading on)."""
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        if any(_blocked_after(handler, sent) for handler in _handlers(client)):
            return True
        await asyncio.sleep(0.001)
    return False
