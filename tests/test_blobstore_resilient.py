"""ResilientStore's reaction to faults: retries, resumed streams, timeouts and the concurrency limit.

The one place a test double is right: FaultyStore wraps a real MemoryBlobStore and injects the
failures a real backend would raise, on a script, so each reaction can be asserted exactly.
"""

import asyncio
import contextlib
import dataclasses
import logging
import random
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from versionstore.blobstore import BlobInfo, BlobNotFound, PermanentStoreError, TransientStoreError
from versionstore.blobstore.memory import MemoryBlobStore
from versionstore.blobstore.resilient import ResiliencePolicy, ResilientStore, resilient

# A fault is "transient", "permanent", "hang" (never returns), "lost_response" (the put lands,
# then the connection drops) or a float: answer correctly after that many seconds.
Fault = str | float | None


async def strike(fault: Fault) -> None:
    if fault == "transient":
        raise TransientStoreError("503 Slow Down")
    if fault == "permanent":
        raise PermanentStoreError("403 AccessDenied")
    if fault == "hang":
        await asyncio.Event().wait()
    if isinstance(fault, float):
        await asyncio.sleep(fault)


class FaultyStore:
    """MemoryBlobStore plus scripted faults; reads come in `chunk`-byte pieces so they can break mid-stream."""

    name = "faulty:"

    def __init__(self, chunk: int = 1000) -> None:
        self.inner = MemoryBlobStore()
        self.chunk = chunk
        self.faults: dict[str, list[Fault]] = defaultdict(list)  # per call of put/stat/delete
        self.read_faults: list[tuple[int, Fault]] = []  # per read call: (after this many chunks, fault)
        self.list_faults: list[tuple[int, Fault]] = []  # per list call: (after this many keys, fault)
        self.calls: dict[str, list[tuple[object, ...]]] = defaultdict(list)
        self.active = self.peak = 0
        self.gate: asyncio.Event | None = None  # when set, put/stat/delete wait for it while counted as active
        self.open_reads = 0
        self.closed = False

    @contextlib.asynccontextmanager
    async def _op(self, op: str, *args: object) -> AsyncIterator[None]:
        self.calls[op].append(args)
        fault = self.faults[op].pop(0) if self.faults[op] else None
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            if self.gate is not None:
                await self.gate.wait()
            await strike(None if fault == "lost_response" else fault)
            yield
            if fault == "lost_response":
                raise TransientStoreError("connection reset after the write")
        finally:
            self.active -= 1

    async def put_file(self, key: str, source: Path) -> bool:
        async with self._op("put", key):
            return await self.inner.put_file(key, source)

    async def stat(self, key: str) -> BlobInfo | None:
        async with self._op("stat", key):
            return await self.inner.stat(key)

    async def delete(self, key: str) -> None:
        async with self._op("delete", key):
            await self.inner.delete(key)

    async def read(self, key: str, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        self.calls["read"].append((key, start, end))
        after, fault = self.read_faults.pop(0) if self.read_faults else (-1, None)
        data = b"".join([chunk async for chunk in self.inner.read(key, start, end)])
        chunks = [data[i : i + self.chunk] for i in range(0, len(data), self.chunk)]
        self.open_reads += 1
        try:
            for n, chunk in enumerate([*chunks, None]):
                if n == after:
                    await strike(fault)
                if chunk is not None:
                    yield chunk
        finally:
            self.open_reads -= 1

    async def list(self, prefix: str) -> AsyncIterator[str]:
        self.calls["list"].append((prefix,))
        after, fault = self.list_faults.pop(0) if self.list_faults else (-1, None)
        keys = [key async for key in self.inner.list(prefix)]
        for n, key in enumerate([*keys, None]):
            if n == after:
                await strike(fault)
            if key is not None:
                yield key

    def local_path(self, key: str) -> str | None:
        return f"/blobs/{key}"

    async def close(self) -> None:
        self.closed = True


class RecordingRandom(random.Random):
    """A seeded Random that remembers each backoff drawn: (upper bound, delay)."""

    def __init__(self, seed: int = 7) -> None:
        super().__init__(seed)
        self.draws: list[tuple[float, float]] = []

    def uniform(self, a: float, b: float) -> float:
        value = super().uniform(a, b)
        self.draws.append((b, value))
        return value


class MaxRandom(random.Random):
    """No jitter: every backoff sleeps its full bound."""

    def uniform(self, a: float, b: float) -> float:
        return b


FAST = ResiliencePolicy(attempts=4, base_delay=0.001, max_delay=0.004, op_timeout=0.2, idle_timeout=0.2, max_concurrency=4)
DATA = bytes(range(256)) * 40  # 10240 bytes: 11 chunks of at most 1000


@pytest.fixture
def faulty() -> FaultyStore:
    return FaultyStore()


@pytest.fixture
def source(tmp_path: Path) -> Path:
    path = tmp_path / "source.bin"
    path.write_bytes(DATA)
    return path


@pytest.fixture
async def stored(faulty: FaultyStore, source: Path) -> str:
    await faulty.inner.put_file("k", source)
    return "k"


def wrap(faulty: FaultyStore, **changes: object) -> ResilientStore:
    return ResilientStore(faulty, dataclasses.replace(FAST, **{"rng": random.Random(1), **changes}))


async def until(condition) -> None:
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0.001)
    raise AssertionError("condition not reached within about 1 s")


async def read_all(store: ResilientStore, key: str, start: int = 0, end: int | None = None) -> bytes:
    return b"".join([chunk async for chunk in store.read(key, start, end)])


# --- retry or not ---------------------------------------------------------------------------------


async def test_transient_failures_are_retried_until_success(faulty, stored, source):
    store = wrap(faulty)
    faulty.faults["stat"] = ["transient", "transient"]
    faulty.faults["put"] = ["transient"]
    faulty.faults["delete"] = ["transient", "transient", "transient"]
    assert await store.stat(stored) == BlobInfo("k", len(DATA))
    assert await store.put_file("new", source) is True
    await store.delete("new")
    assert (len(faulty.calls["stat"]), len(faulty.calls["put"]), len(faulty.calls["delete"])) == (3, 2, 4)
    assert await faulty.inner.stat("new") is None


async def test_permanent_errors_pass_through_at_once(faulty, stored, source):
    store = wrap(faulty)
    faulty.faults["stat"] = ["permanent"]
    faulty.faults["put"] = ["permanent"]
    with pytest.raises(PermanentStoreError):
        await store.stat(stored)
    with pytest.raises(PermanentStoreError):
        await store.put_file("new", source)
    assert (len(faulty.calls["stat"]), len(faulty.calls["put"])) == (1, 1)


async def test_not_found_is_not_retried(faulty):
    store = wrap(faulty)
    with pytest.raises(BlobNotFound):
        await read_all(store, "missing")
    assert len(faulty.calls["read"]) == 1


async def test_exhausted_attempts_raise_transient_error_naming_attempts_and_cause(faulty, stored):
    store = wrap(faulty, attempts=3)
    faulty.faults["stat"] = ["transient"] * 5
    with pytest.raises(TransientStoreError, match=r"after 3 attempts.*503 Slow Down") as info:
        await store.stat(stored)
    assert isinstance(info.value.__cause__, TransientStoreError)
    assert len(faulty.calls["stat"]) == 3


async def test_put_retried_after_a_lost_response_reports_already_exists(faulty, source):
    """The write landed but its answer did not: the retry sees the blob and False is success."""
    store = wrap(faulty)
    faulty.faults["put"] = ["lost_response"]
    assert await store.put_file("new", source) is False
    assert len(faulty.calls["put"]) == 2
    assert await read_all(store, "new") == DATA


async def test_each_retry_is_logged_once_at_warning_without_traceback(faulty, stored, caplog):
    store = wrap(faulty)
    faulty.faults["stat"] = ["transient", "hang"]
    with caplog.at_level(logging.WARNING, logger="versionstore.blobstore.resilient"):
        await store.stat(stored)
    messages = [(r.levelno, r.getMessage(), r.exc_info) for r in caplog.records]
    assert len(messages) == 2
    assert all(level == logging.WARNING and exc_info is None and "\n" not in text for level, text, exc_info in messages)
    assert "faulty:" in messages[0][1] and "stat 'k'" in messages[0][1] and "attempt 1/4" in messages[0][1]
    assert "503 Slow Down" in messages[0][1] and "timed out" in messages[1][1] and "attempt 2/4" in messages[1][1]


# --- timeouts -------------------------------------------------------------------------------------


async def test_stat_that_hangs_times_out_and_is_retried(faulty, stored):
    store = wrap(faulty, op_timeout=0.02)
    faulty.faults["stat"] = ["hang"]
    assert await store.stat(stored) == BlobInfo("k", len(DATA))
    faulty.faults["stat"] = ["hang"] * 4
    with pytest.raises(TransientStoreError, match=r"after 4 attempts.*timed out"):
        await store.stat(stored)


async def test_put_timeout_grows_with_the_file_size(faulty, source):
    # 10240 bytes at 20 kB/s may take 0.51 s more than op_timeout: 0.2 s is fine...
    store = wrap(faulty, op_timeout=0.05, min_rate=20_000)
    faulty.faults["put"] = [0.2]
    assert await store.put_file("a", source) is True
    assert len(faulty.calls["put"]) == 1
    # ...but not at 10 MB/s, where the budget is about op_timeout alone.
    store = wrap(faulty, op_timeout=0.05, min_rate=10_000_000, attempts=2)
    faulty.faults["put"] = [0.2, 0.2]
    with pytest.raises(TransientStoreError, match="after 2 attempts"):
        await store.put_file("b", source)


# --- resumed reads and listings -------------------------------------------------------------------


THREE_BREAKS = [(3, "transient"), (1, "transient"), (0, "transient")]


@pytest.mark.parametrize(
    "start, end, breaks, offsets",
    [
        (0, None, THREE_BREAKS, [0, 3000, 4000, 4000]),
        (1500, 9000, THREE_BREAKS, [1500, 4500, 5500, 5500]),
        # broken after the last byte: with a known end there is nothing left to fetch...
        (999, 2001, [(1, "transient"), (1, "transient")], [999, 1999]),
        # ...without one, the resumed read finds the end
        (10000, None, [(1, "transient")], [10000, 10240]),
    ],
)
async def test_read_broken_mid_stream_resumes_without_gaps_or_repeats(faulty, stored, start, end, breaks, offsets):
    store = wrap(faulty)
    faulty.read_faults = list(breaks)
    assert await read_all(store, stored, start, end) == DATA[start:end]
    assert [call[1:] for call in faulty.calls["read"]] == [(offset, end) for offset in offsets]
    assert faulty.open_reads == 0


async def test_read_resumes_after_an_idle_timeout_and_a_slow_first_byte(faulty, stored):
    store = wrap(faulty, op_timeout=0.05, idle_timeout=0.05)
    faulty.read_faults = [(0, "hang"), (5, "hang"), (2, 0.01)]  # first byte, mid-stream, then merely slow
    async with asyncio.timeout(1):
        assert await read_all(store, stored) == DATA
    assert [call[1] for call in faulty.calls["read"]] == [0, 0, 5000]


async def test_failures_are_counted_across_the_whole_stream(faulty, stored):
    store = wrap(faulty, attempts=3)
    faulty.read_faults = [(2, "transient"), (2, "transient"), (2, "transient")]
    received = b""
    with pytest.raises(TransientStoreError, match="read 'k' failed after 3 attempts"):
        async for chunk in store.read(stored):
            received += chunk
    assert received == DATA[:6000]  # everything delivered was correct and in order


async def test_abandoned_read_closes_the_inner_stream(faulty, stored):
    stream = wrap(faulty).read(stored)
    assert await anext(stream) == DATA[:1000]
    assert faulty.open_reads == 1
    await stream.aclose()
    assert faulty.open_reads == 0


async def test_list_broken_mid_way_yields_every_key_once_in_order(faulty, source):
    keys = [f"p/{i:02d}" for i in range(10)]
    for key in keys:
        await faulty.inner.put_file(key, source)
    await faulty.inner.put_file("q/other", source)
    store = wrap(faulty, op_timeout=0.03)
    faulty.list_faults = [(4, "transient"), (7, "hang"), (0, "transient")]
    assert [key async for key in store.list("p/")] == keys
    assert len(faulty.calls["list"]) == 4


# --- concurrency ----------------------------------------------------------------------------------


async def test_concurrency_limit_is_respected(faulty, stored):
    store = wrap(faulty, max_concurrency=3)
    faulty.gate = asyncio.Event()
    tasks = [asyncio.create_task(store.stat(stored)) for _ in range(10)]
    await until(lambda: faulty.active == 3)
    await asyncio.sleep(0.02)
    assert faulty.active == 3 and len(faulty.calls["stat"]) == 3
    faulty.gate.set()
    assert all(info is not None for info in await asyncio.gather(*tasks))
    assert faulty.peak == 3 and len(faulty.calls["stat"]) == 10


async def test_backoff_sleep_does_not_hold_a_slot(faulty, stored):
    store = wrap(faulty, max_concurrency=1, base_delay=0.3, max_delay=0.3, rng=MaxRandom())
    faulty.faults["stat"] = ["transient"]
    backing_off = asyncio.create_task(store.stat(stored))  # fails, then sleeps 0.3 s
    await until(lambda: faulty.calls["stat"])
    await asyncio.sleep(0.01)
    began = time.monotonic()
    assert await asyncio.wait_for(store.stat(stored), 0.1) is not None  # got the only slot
    assert time.monotonic() - began < 0.1 and not backing_off.done()
    assert await backing_off is not None


async def test_a_slow_reader_does_not_hold_a_slot(faulty, stored, source):
    store = wrap(faulty, max_concurrency=1)
    stream = store.read(stored)
    assert await anext(stream) == DATA[:1000]  # the consumer now dawdles with the chunk
    assert await asyncio.wait_for(store.put_file("upload", source), 0.1) is True
    assert await read_all(store, stored, 1000) == DATA[1000:]
    await stream.aclose()


async def test_waiting_for_a_slot_does_not_count_against_the_timeout(faulty, stored):
    store = wrap(faulty, max_concurrency=1, op_timeout=0.1)
    faulty.faults["stat"] = [0.03] * 5
    infos = await asyncio.gather(*(store.stat(stored) for _ in range(5)))  # 0.15 s in all, each well within 0.1 s
    assert all(info is not None for info in infos) and len(faulty.calls["stat"]) == 5


# --- backoff --------------------------------------------------------------------------------------


async def test_backoff_grows_exponentially_with_full_jitter_up_to_the_cap(faulty, stored):
    rng = RecordingRandom()
    store = wrap(faulty, attempts=6, base_delay=0.002, max_delay=0.01, rng=rng)
    faulty.faults["stat"] = ["transient"] * 5
    began = time.monotonic()
    assert await store.stat(stored) is not None
    elapsed = time.monotonic() - began
    bounds = [bound for bound, _ in rng.draws]
    assert bounds == pytest.approx([0.002, 0.004, 0.008, 0.01, 0.01])
    delays = [delay for _, delay in rng.draws]
    assert all(0 <= delay <= bound for bound, delay in rng.draws)
    assert len(set(delays)) == 5 and delays != bounds  # jittered, not the bare bounds
    assert elapsed >= 0.9 * sum(delays)  # they were slept


def test_policy_defaults():
    policy = ResiliencePolicy()
    assert (policy.attempts, policy.base_delay, policy.max_delay) == (5, 0.2, 10.0)
    assert (policy.op_timeout, policy.min_rate, policy.idle_timeout, policy.max_concurrency) == (30.0, 1 << 20, 60.0, 32)
    assert all(0 <= policy.backoff(n) <= min(10.0, 0.2 * 2**n) for n in range(10) for _ in range(20))


# --- delegation -----------------------------------------------------------------------------------


async def test_wrapper_delegates_name_local_path_and_close(faulty):
    store = resilient(faulty)
    assert isinstance(store, ResilientStore) and store.name == "faulty:"
    assert resilient(store) is store  # never wrapped twice
    assert store.local_path("a/b") == "/blobs/a/b"
    await store.close()
    assert faulty.closed
