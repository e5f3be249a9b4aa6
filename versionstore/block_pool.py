"""Receive buffers reused across uploads, so a busy server allocates none in steady state.

http/body_tap.py receives a large upload into a few 4 MiB blocks that the spool's workers hash
and write without a copy. A fresh block per upload is zero-filled and page-faulted on the event
loop (3-20 ms for a set, more under load), and freed blocks go back to the OS to fault again on
the next upload. The pool keeps returned blocks for the next upload instead, up to `limit` bytes
(the rest is freed, so an idle server holds at most that much).

Blocks are anonymous `mmap`s, which start on a page boundary. Pooled `bytearray`s (whose bytes
start 16 bytes into a page) made the kernel's copy from the socket cost the event loop about
twice the system CPU of fresh blocks, so that pool was slower than none for a large upload;
pooled `mmap`s measured as cheap as fresh blocks, and cheaper on a process's first upload
(docs/performance.md, "The tap's block pool and TAP_MIN").

Who may touch a block is the caller's business: a block is given back only when no spool worker
can still read it (`SpoolFile.when_workers_done`), and a block taken is the taker's alone.
"""

import mmap
import threading
from collections.abc import Iterable


class BlockPool:
    """Free blocks by size (the tap's block size is one value; tests shrink it), at most `limit`
    bytes (counted in whole pages, what a block holds)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._free: dict[int, list[mmap.mmap]] = {}
        self._bytes = 0
        self._lock = threading.Lock()  # a block comes back from whichever loop ran its upload
        self.allocated = 0  # blocks made because none was free (the tests' and the operator's measure of reuse)

    def take(self, size: int) -> mmap.mmap:
        """A block of `size` bytes: a free one (holding an earlier upload's bytes: the caller
        reads only what it received into it), else a new one."""
        with self._lock:
            free = self._free.get(size)
            if free:
                self._bytes -= _pages(size)
                return free.pop()
            self.allocated += 1
        return mmap.mmap(-1, size)

    def give(self, blocks: Iterable[mmap.mmap]) -> None:
        """Blocks nobody uses any more: kept while the pool has room, else left to be freed."""
        with self._lock:
            for block in blocks:
                if self._bytes + _pages(len(block)) <= self.limit:
                    self._free.setdefault(len(block), []).append(block)
                    self._bytes += _pages(len(block))

    @property
    def pooled_bytes(self) -> int:
        return self._bytes

    @property
    def free_blocks(self) -> int:
        with self._lock:
            return sum(len(free) for free in self._free.values())


def _pages(size: int) -> int:
    return -(-size // mmap.PAGESIZE) * mmap.PAGESIZE
