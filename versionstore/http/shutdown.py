"""Stopping `versionstore serve` on SIGTERM/SIGINT: promptly, and never hanging.

A supervisor (systemd, Kubernetes) waits a while after SIGTERM and then SIGKILLs, which drops
whatever was in flight. So the stop is bounded and ordered:

1. stop accepting: the listening socket closes, new connections are refused at once;
2. connections without a request in flight close now (idle keep-alive, half-sent headers,
   bodies aiohttp still reads after an early answer), busy ones right after their answer;
3. the requests in flight (their handler still runs: an upload mid-body, a download being
   sent) get `grace` seconds to finish;
4. whatever still runs is cancelled (an upload cut there leaves what a crash leaves: its spool
   file goes, and no revision points at bytes that are not stored, docs/design.md), and every
   remaining connection is closed;
5. the app's resources close (background loops, jobs, the database, the stores).

aiohttp's own shutdown waited for the "lingering" reads of bodies it had already answered (up
to 10 s), and for requests whose bodies it had stopped reading, up to twice its 60 s timeout;
a thread stuck in a blocking call keeps the interpreter from exiting at all. The `Watchdog` is
the last word: armed by the stop signal, it ends the process `STOP_MARGIN` seconds after the
grace whatever is still running (exit status 1, the threads' stacks in the log).
"""

import asyncio
import faulthandler
import logging
import os
import sys
import threading
import time
from typing import Any, Protocol

from aiohttp import web

log = logging.getLogger("versionstore")

#: Seconds the requests cut after the grace get to run their cancellation (spool files removed,
#: claims released) before their connections are closed under them.
CANCEL_WAIT = 2.0
#: Seconds after the grace by which the process has exited, cleanly or by the watchdog.
STOP_MARGIN = 5.0


class Connection(Protocol):
    """What a stop needs of aiohttp's per-connection handler (`request.protocol`)."""

    def force_close(self) -> None: ...


class InFlight:
    """The requests whose handler runs, with their connections (the error middleware adds
    them; each leaves once its answer is written). Once `stopping`, a connection is closed as
    soon as its request is answered: no keep-alive, no next request."""

    def __init__(self) -> None:
        self.requests: dict[asyncio.Task[Any], Connection] = {}
        self.stopping = False
        self._idle: asyncio.Event | None = None

    def add(self, task: "asyncio.Task[Any]", connection: Connection) -> None:
        self.requests[task] = connection
        task.add_done_callback(self._answered)

    def _answered(self, task: "asyncio.Task[Any]") -> None:
        connection = self.requests.pop(task, None)
        if self.stopping and connection is not None:
            connection.force_close()  # after the answer's last byte: the transport sends what it holds, then closes
        if not self.requests and self._idle is not None:
            self._idle.set()

    def stop(self) -> set[Connection]:
        """From now on answered connections close; the connections busy now."""
        self.stopping = True
        return set(self.requests.values())

    async def wait_idle(self, timeout: float) -> bool:
        """True once no request is in flight, False if some still are after `timeout` seconds."""
        if not self.requests:
            return True
        self._idle = asyncio.Event()
        try:
            async with asyncio.timeout(timeout):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True

    async def cancel(self, timeout: float) -> None:
        """Cancel every request still in flight; wait up to `timeout` s for them to unwind."""
        tasks = list(self.requests)
        for task in tasks:
            task.cancel()
        await asyncio.wait(tasks, timeout=timeout)


async def stop_serving(runner: web.AppRunner, in_flight: InFlight, grace: float) -> None:
    """Steps 1-5 of the module's docstring; also right for a runner that never started.

    Not aiohttp's `pre_shutdown()`: it marks every connection closing, and a closing connection
    drops the bytes that arrive (aiohttp's `data_received`), so an upload in flight could never
    finish; it would wait out the whole timeout and be cut."""
    server = runner.server
    for site in list(runner.sites):
        await site.stop()
    if server is not None:
        for _ in range(2):  # a request read just before: its handler task is made, then runs its first step
            await asyncio.sleep(0)
        busy = in_flight.stop()
        for connection in server.connections:
            if connection not in busy:  # idle keep-alive, half-sent headers, lingering reads
                connection.force_close()
        if not await in_flight.wait_idle(grace):
            log.warning("stopping: %d request(s) still running after the %g s grace; cancelling them", len(in_flight.requests), grace)
            await in_flight.cancel(CANCEL_WAIT)
        for connection in server.connections:
            connection.force_close()
    await runner.cleanup()


class Watchdog:
    """Ends the process `grace + STOP_MARGIN` seconds after `arm()` if it is still running:
    a blocked thread or a hook awaiting what never comes must not keep a stopped service up."""

    def __init__(self, grace: float) -> None:
        self.limit = grace + STOP_MARGIN
        self._armed = threading.Event()

    def arm(self) -> None:
        if self._armed.is_set():
            return
        self._armed.set()
        threading.Thread(target=self._expire, name="stop watchdog", daemon=True).start()

    def _expire(self) -> None:
        time.sleep(self.limit)
        log.error("stopping: still running %g s after the stop signal; exiting now (threads below)", self.limit)
        for handler in logging.getLogger().handlers:
            handler.flush()
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        os._exit(1)
