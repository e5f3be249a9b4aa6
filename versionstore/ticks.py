"""The loop of the server's background duties (schedules, purges, removals): one step at
start, then one every `interval` seconds, until cancelled.

A failing step is logged and the loop goes on: one bad tick (a database blip, a store that
does not answer) must not end a duty that nothing would start again.
"""

import asyncio
import logging
from collections.abc import Awaitable, Callable


async def every(interval: float, step: Callable[[], Awaitable[object]], log: logging.Logger, what: str) -> None:
    """Run `step()` now and every `interval` seconds; `what` names it in the failure's log line."""
    while True:
        try:
            await step()
        except Exception:
            log.exception("%s failed; trying again at the next tick", what)
        await asyncio.sleep(interval)
