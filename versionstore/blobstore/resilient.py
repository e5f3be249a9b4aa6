"""Retries, timeouts and a concurrency limit around any blob store, in one place.

Backends only translate provider errors into TransientStoreError / PermanentStoreError;
this wrapper decides what to do about them, so every backend behaves the same under faults.
"""

import asyncio
import logging
import random
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from versionstore import layout
from versionstore.blobstore import BlobInfo, BlobNotFound, BlobStore, BlobStoreError, TransientStoreError
from versionstore.blobstore.local import LocalBlobStore, publish
from versionstore.telemetry import metrics

log = logging.getLogger(__name__)

T = TypeVar("T")
RETRYABLE = (TransientStoreError, TimeoutError)  # asyncio.TimeoutError is TimeoutError since 3.11


@dataclass(frozen=True)
class ResiliencePolicy:
    attempts: int = 5  # tries in total, not retries
    base_delay: float = 0.2
    max_delay: float = 10.0
    op_timeout: float = 30.0  # stat, delete, a list page, the first byte of a read
    min_rate: float = 1 << 20  # bytes/s a put may not fall below: its timeout grows with the file
    idle_timeout: float = 60.0  # between two chunks of a read
    max_concurrency: int = 32
    rng: random.Random = field(default_factory=random.Random, compare=False, repr=False)  # seed it in tests

    def backoff(self, retry: int) -> float:
        """Full jitter: retries of many clients spread out instead of arriving in waves."""
        return self.rng.uniform(0, min(self.max_delay, self.base_delay * 2**retry))


class _Tries:
    """The failure count of one logical operation; a whole read or listing counts as one."""

    def __init__(self, store: "ResilientStore", op: str, key: str) -> None:
        self.store, self.op, self.key, self.failures = store, op, key, 0

    async def failed(self, exc: BaseException) -> None:
        """Sleep before the next try (holding no slot), or raise when the tries are used up."""
        self.failures += 1
        policy, cause = self.store.policy, _cause(exc)
        final = self.failures >= policy.attempts
        metrics().store_errors.labels(self.store.name, self.op, "true" if final else "false").inc()
        if final:
            message = f"{self.store.name}: {self.op} {self.key!r} failed after {self.failures} attempts; last cause: {cause}"
            raise TransientStoreError(message) from exc
        delay = policy.backoff(self.failures - 1)
        name, op, key, failures = self.store.name, self.op, self.key, self.failures
        log.warning("%s: %s %r failed (attempt %d/%d), retrying in %.2fs: %s", name, op, key, failures, policy.attempts, delay, cause)
        await asyncio.sleep(delay)


class ResilientStore:
    def __init__(self, inner: BlobStore, policy: ResiliencePolicy | None = None) -> None:
        self.inner = inner
        self.policy = policy or ResiliencePolicy()
        self.name = inner.name
        self._slots = asyncio.Semaphore(self.policy.max_concurrency)

    async def _call(self, op: str, key: str, timeout: float, call: Callable[[], Awaitable[T]]) -> T:
        """`call` with retries; counted once per logical operation (metrics: outcome and errors)."""
        try:
            result = await self._retried(op, key, timeout, call)
        except BlobStoreError as exc:
            self._count(op, "error", exc)
            raise
        self._count(op, "ok")
        return result

    async def _retried(self, op: str, key: str, timeout: float, call: Callable[[], Awaitable[T]]) -> T:
        tries = _Tries(self, op, key)
        while True:
            try:
                # Slot first, then the clock: waiting for a slot is our load, not the store's slowness.
                async with self._slots, asyncio.timeout(timeout):
                    return await call()
            except RETRYABLE as exc:
                await tries.failed(exc)

    def _count(self, op: str, outcome: str, exc: BaseException | None = None) -> None:
        counters = metrics()
        if isinstance(exc, BlobNotFound):
            outcome = "not_found"
        elif exc is not None and not isinstance(exc, TransientStoreError):
            counters.store_errors.labels(self.name, op, "true").inc()  # permanent: no retry was counted
        counters.store_operations.labels(self.name, op, outcome).inc()

    async def _next(self, stream: AsyncIterator[T], timeout: float) -> T | None:
        """One item of a stream, holding a slot only while the store is working on it."""
        async with self._slots, asyncio.timeout(timeout):
            try:
                return await anext(stream)
            except StopAsyncIteration:
                return None

    async def put_file(self, key: str, source: Path) -> bool:
        # Safe to retry: puts are create-only and keys name their content. If a write landed but
        # its response was lost, the retry sees "already exists" and returns False, which callers
        # treat as success, like any other put of bytes the store already holds.
        timeout = self.policy.op_timeout + source.stat().st_size / self.policy.min_rate
        try:
            written = await self._retried("put", key, timeout, lambda: self.inner.put_file(key, source))
        except BlobStoreError as exc:
            self._count("put", "error", exc)
            raise
        self.count_put(key, written)
        return written

    def count_put(self, key: str, written: bool) -> None:
        """The metrics of one put that succeeded (`publish_locally`'s puts count here too)."""
        self._count("put", "written" if written else "existing")
        if layout.is_revision_key(key):
            counters = metrics()
            (counters.revisions_written if written else counters.dedup_hits).labels(self.name).inc()

    async def put_files(self, items: Sequence[tuple[str, Path]]) -> list[bool]:
        """Retried whole, like `put_file` (create-only: what landed before a retry is "already there")."""
        if not items:
            return []
        timeout = self.policy.op_timeout + sum(source.stat().st_size for _, source in items) / self.policy.min_rate
        try:
            written = await self._retried("put", items[0][0], timeout, lambda: self.inner.put_files(items))
        except BlobStoreError as exc:
            self._count("put", "error", exc)
            raise
        counters = metrics()
        for (key, _), done in zip(items, written, strict=True):
            self._count("put", "written" if done else "existing")
            if layout.is_revision_key(key):
                (counters.revisions_written if done else counters.dedup_hits).labels(self.name).inc()
        return written

    async def stat(self, key: str) -> BlobInfo | None:
        return await self._call("stat", key, self.policy.op_timeout, lambda: self.inner.stat(key))

    async def delete(self, key: str) -> None:
        await self._call("delete", key, self.policy.op_timeout, lambda: self.inner.delete(key))

    async def read(self, key: str, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        """Resume a broken stream at the first byte not yet delivered, so the consumer sees one clean stream."""
        tries, offset = _Tries(self, "read", key), start
        while end is None or offset < end:
            stream, timeout = self.inner.read(key, offset, end), self.policy.op_timeout
            try:
                while (chunk := await self._next(stream, timeout)) is not None:
                    timeout = self.policy.idle_timeout
                    offset += len(chunk)
                    yield chunk
                return
            except RETRYABLE as exc:
                failure = exc
            finally:
                await _close(stream)
            await tries.failed(failure)

    async def list(self, prefix: str) -> AsyncIterator[str]:
        """Restart a broken listing and skip what was already yielded (listings are sorted by key)."""
        tries, last = _Tries(self, "list", prefix), None
        while True:
            stream = self.inner.list(prefix)
            try:
                while (key := await self._next(stream, self.policy.op_timeout)) is not None:
                    if last is None or key > last:
                        last = key
                        yield key
                return
            except RETRYABLE as exc:
                failure = exc
            finally:
                await _close(stream)
            await tries.failed(failure)

    def local_path(self, key: str) -> str | None:
        return self.inner.local_path(key)

    async def close(self) -> None:
        await self.inner.close()


def local_of(store: BlobStore) -> "ResilientStore | None":
    """The store when it is a local disk behind the retry wrapper (`publish_locally` can link
    into it from one worker thread), else None."""
    return store if isinstance(store, ResilientStore) and isinstance(store.inner, LocalBlobStore) else None


async def publish_locally(source: Path, sync: bool, puts: Sequence[tuple["ResilientStore", str]]) -> list[bool]:
    """`put_file` of one source into local stores (`local_of`) in one worker-thread call,
    after its fsync when `sync` (blobstore/local.py's `publish`). Not retried: a local link
    fails for good or not at all, and a timeout could not stop the thread anyway. Counted in
    the metrics as each store's `put_file` counts."""
    links = [(store.inner, key) for store, key in puts if isinstance(store.inner, LocalBlobStore)]
    assert len(links) == len(puts), "publish_locally takes local stores only"
    try:
        written = await asyncio.to_thread(publish, source, sync, links)
    except BlobStoreError as exc:  # counted as `put_file` counts it
        for store, _ in puts:
            store._count("put", "error", exc)
        raise
    for (store, key), done in zip(puts, written, strict=True):
        store.count_put(key, done)
    return written


def resilient(store: BlobStore, policy: ResiliencePolicy | None = None) -> BlobStore:
    """Wrap a store once: wrapping a wrapper would multiply the attempts and the timeouts."""
    if isinstance(store, ResilientStore):
        return store if policy is None else ResilientStore(store.inner, policy)
    return ResilientStore(store, policy)


async def _close(stream: AsyncIterator[object]) -> None:
    if isinstance(stream, AsyncGenerator):  # release the connection of an abandoned stream now, not at GC
        await stream.aclose()


def _cause(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError) and not str(exc):
        return "timed out"
    return f"{type(exc).__name__}: {exc}"
