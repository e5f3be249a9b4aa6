"""Per-key asyncio locks that disappear when nobody holds or waits for them."""

import asyncio
import contextlib
from collections.abc import AsyncIterator, Hashable
from contextlib import asynccontextmanager


class KeyedLocks:
    def __init__(self) -> None:
        self._locks: dict[Hashable, tuple[asyncio.Lock, int]] = {}

    @asynccontextmanager
    async def hold(self, key: Hashable) -> AsyncIterator[None]:
        lock, users = self._locks.get(key, (asyncio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)


class KeyedSharedLocks:
    """Per-key shared/exclusive locks: many holders share a key, or one holds it alone.

    Uploads and the pending drainer write revisions under the shared side; a bucket
    migration takes the exclusive side for its last catch-up and the switch, so no revision
    can be written to the old target after the final copy pass.
    """

    def __init__(self) -> None:
        self._state: dict[Hashable, list[int]] = {}  # key -> [shared holders, exclusive held]
        self._changed = asyncio.Condition()

    @asynccontextmanager
    async def shared(self, key: Hashable) -> AsyncIterator[None]:
        async with self._changed:
            await self._changed.wait_for(lambda: not self._state.get(key, [0, 0])[1])
            self._state.setdefault(key, [0, 0])[0] += 1
        try:
            yield
        finally:
            await asyncio.shield(self._release(key, 0))  # a cancelled holder still releases

    @asynccontextmanager
    async def exclusive(self, key: Hashable) -> AsyncIterator[None]:
        async with self._changed:
            # Claim first so new shared holders queue behind us, then wait for the others.
            await self._changed.wait_for(lambda: not self._state.get(key, [0, 0])[1])
            self._state.setdefault(key, [0, 0])[1] = 1
            await self._changed.wait_for(lambda: not self._state[key][0])
        try:
            yield
        finally:
            await asyncio.shield(self._release(key, 1))

    async def _release(self, key: Hashable, side: int) -> None:
        async with self._changed:
            state = self._state[key]
            state[side] = state[side] - 1 if side == 0 else 0
            if state == [0, 0]:
                del self._state[key]
            self._changed.notify_all()


async def wait_for_event(event: asyncio.Event, timeout: float) -> None:
    """Sleep until `event` is set or `timeout` passes, whichever comes first (polling loops)."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), timeout)
