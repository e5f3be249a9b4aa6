"""A large file part received straight into a few reused buffers (`recv_into`), not through aiohttp.

aiohttp's HTTP parser turns every socket read into a new bytes object and copies the body into
another one per read; for an upload that is most of the event loop's CPU (docs/performance.md,
"Upload path"). For the rest of a body with a Content-Length (no chunked transfer coding, no
content coding), `BodyTap` takes the connection over as an `asyncio.BufferedProtocol`: the
kernel copies the bytes into one of at most `IN_FLIGHT + 1` blocks, the spool hashes and writes
the others on its worker threads while one fills, and the delimiter is searched in place. The
blocks come from a pool reused across uploads (`POOL`, versionstore/block_pool.py): a fresh
set was 20 MiB zero-filled and page-faulted on the event loop per upload. At the delimiter
the rest of the body (the parts after the file, the closing boundary) goes to aiohttp's request
stream as it arrives, where the multipart reader reads it as before.

aiohttp's parser never sees the bytes the tap read, so it cannot find the start of a next
request on the connection: a tapped request's response says `Connection: close` (`close_tapped`)
and the connection is closed after it. A failure while tapped (a bad body, a full disk, a too
large file) passes the rest of the body to aiohttp's stream too, so aiohttp's lingering close
drains it after the error response as it does for any unread body.
"""

import asyncio
import functools
import mmap
import warnings

from aiohttp import StreamReader, hdrs, web
from aiohttp.web_protocol import RequestHandler

from versionstore.block_pool import BlockPool
from versionstore.errors import BadRequest
from versionstore.spool import IN_FLIGHT, PAGE, SpoolFile

#: One block; at most IN_FLIGHT + 1 are in use per tapped upload (one filling, the others with the
#: spool's workers), only as many as the body fills.
BLOCK = 4 << 20
#: Bodies with less left than this after the part headers take aiohttp's path (no new connection
#: per upload). Since the spool writes the tap's blocks past the page cache, tapping from 2 MiB
#: (not 16) costs the server less CPU per byte than aiohttp's path (docs/performance.md, "Direct
#: writes"); below it the cost per upload dominates, and a kept connection is worth more.
TAP_MIN = 2 << 20
#: Free blocks kept for the next uploads (block_pool.py): two full uploads' worth. Blocks in use
#: are bounded per upload (IN_FLIGHT + 1), not by the pool.
POOL = BlockPool(2 * (IN_FLIGHT + 1) * BLOCK)
_PASS = 64 * 1024  # bytes per read once the file part has ended (only the end of the body is left)
TAPPED: web.RequestKey[bool] = web.RequestKey("body_tapped", bool)


def close_tapped(request: web.Request, response: web.StreamResponse) -> None:
    """The connection of a tapped request is not reused (module doc). Called by the request
    middleware (app.py) with every answer, also one a handler streamed itself: aiohttp reads
    `keep_alive` from the response after it was sent, so the connection still closes then,
    only without the header. A middleware call, not an `on_response_prepare` hook: a hook
    costs every response of the read path a signal and two coroutines."""
    if request.get(TAPPED):
        response.force_close()  # aiohttp closes the connection after the response ...
        if not response.prepared:
            response.headers[hdrs.CONNECTION] = "close"  # ... and says so


def _tappable(request: web.Request) -> RequestHandler | None:
    headers = request.headers
    if hdrs.TRANSFER_ENCODING in headers or hdrs.CONTENT_ENCODING in headers or request.content_length is None:
        return None
    handler, transport = request.protocol, request.transport
    if not isinstance(handler, RequestHandler) or transport is None or not hasattr(transport, "set_protocol"):
        return None
    if transport.get_protocol() is not handler or transport.is_closing():
        return None
    return handler


def _drain(content: StreamReader) -> list[bytes]:
    """What aiohttp holds of the body: its stream's buffer, and the bytes its paused parser kept
    (reading the stream empty resumes the parser, which hands them on)."""
    chunks = []
    while data := content.read_nowait(-1):
        chunks.append(data)
    return chunks


def _unread(content: StreamReader, data: bytes) -> None:
    with warnings.catch_warnings():  # deprecated, but what aiohttp's own part reader does
        warnings.simplefilter("ignore", DeprecationWarning)
        content.unread_data(data)


def delimiter_prefix(chunk: bytes | bytearray | mmap.mmap, delimiter: bytes, end: int | None = None) -> int:
    """Length of the end of `chunk[:end]` that is a proper prefix of `delimiter` (0 if none). The
    delimiter holds its only CR at the start, so only the last CR can begin one: one look,
    however many CRs a hostile body puts there."""
    end = len(chunk) if end is None else end
    at = chunk.rfind(b"\r", max(0, end - len(delimiter) + 1), end)
    return end - at if at >= 0 and delimiter.startswith(chunk[at:end]) else 0


async def spool_tapped(request: web.Request, delimiter: bytes, spool: SpoolFile) -> bool:
    """Spool the body of the file part being read (nothing of it read yet) up to `delimiter`,
    through a `BodyTap` when enough of the body is left; False (nothing read) when it is not."""
    handler, length, content = _tappable(request), request.content_length, request.content
    if handler is None or length is None or length - content.total_bytes < TAP_MIN:
        return False
    held = b"".join(_drain(content))
    left = length - content.total_bytes
    if getattr(handler, "_reading_paused", True) or left < TAP_MIN:  # then its parser may still hold bytes
        _unread(content, held)
        return False
    end = held.find(delimiter)
    if end >= 0:  # the whole file part had been received already
        _unread(content, held[end:])
        await spool.write(held[:end])
        return True
    request[TAPPED] = True
    tap = BodyTap(handler, left)  # before any await: from here on every byte of the body reaches the tap
    try:
        if len(held) > BLOCK // 2:  # rare (the parser holds far less): the first block needs room
            keep = delimiter_prefix(held, delimiter)
            await spool.write(held[: len(held) - keep])
            held = held[len(held) - keep :]
        await tap.spool(content, delimiter, spool, held)  # the file's first byte starts the first block
    except BaseException:
        tap.abandon(content)
        raise
    return True


class BodyTap(asyncio.BufferedProtocol):
    """The connection's protocol while the last `remaining` bytes of a request body are read."""

    def __init__(self, handler: RequestHandler, remaining: int) -> None:
        self.handler = handler
        transport = handler.transport
        assert transport is not None
        self.transport = transport
        self.remaining = remaining
        # Where the bytes go: into `_block` while a block fills, to aiohttp's stream once the file
        # part has ended; with neither (a read nobody asked for), to `_spilled` until the next block.
        self._block: memoryview | None = None
        self._filled = 0
        self._stream: StreamReader | None = None
        self._spare = bytearray(_PASS)
        self._spilled: list[bytes] = []
        self._into_block = False  # whether the buffer get_buffer gave out last is the block's
        self._waiter: asyncio.Future[None] | None = None
        self._error: BaseException | None = None
        self._done = False
        transport.set_protocol(self)

    # -- the spool's side --

    async def spool(self, content: StreamReader, delimiter: bytes, spool: SpoolFile, held: bytes) -> None:
        """Blocks in turn: while the spool's workers hash and write the last ones, the next fills.
        A block is filled again only once the workers are done with it (`SpoolFile.write_block`)."""
        size = max(BLOCK, 4 * len(delimiter))  # a block always has room beyond a delimiter prefix carried over
        # Taken from the pool as the body needs them (a body that fits one block takes one), and
        # given back once no worker can read them any more, whatever happens to the upload.
        blocks = [POOL.take(size)]
        try:
            turn, start = 0, len(held)
            blocks[0][:start] = held
            while True:
                block = blocks[turn]
                filled = await self._fill(block, start)
                end = block.find(delimiter, 0, filled)
                if end >= 0:
                    await spool.write_block(memoryview(block)[:end])
                    self._pass_on(content, block[end:filled])
                    return
                if not self.remaining:
                    raise BadRequest("Malformed multipart body: the body ended inside the file part")
                keep = delimiter_prefix(block, delimiter, filled)
                # Whole pages where the block allows it, so that every block's bytes start on a
                # page boundary of the file as of memory and the spool writes them past the page
                # cache (spool.py, `_write_direct`); the rest (under a page, plus a possible
                # delimiter prefix) starts the next block.
                cut = (filled - keep) - (filled - keep) % PAGE or filled - keep
                await spool.write_block(memoryview(block)[:cut])  # the next block is free after this
                turn = (turn + 1) % (IN_FLIGHT + 1)
                if turn == len(blocks):
                    blocks.append(POOL.take(size))
                blocks[turn][: filled - cut] = block[cut:filled]
                start = filled - cut
        finally:
            spool.when_workers_done(functools.partial(POOL.give, blocks))

    async def _fill(self, block: mmap.mmap, start: int) -> int:
        """Receive into `block[start:]` until it is full or the body has ended."""
        while self._spilled and start + len(self._spilled[0]) <= len(block):
            data = self._spilled.pop(0)
            block[start : start + len(data)] = data
            start += len(data)
        if start < len(block) and self.remaining and not self._spilled:
            self._block, self._filled = memoryview(block), start
            self._waiter = asyncio.get_running_loop().create_future()
            self._resume()
            try:
                await self._waiter
            finally:
                self._waiter = None
                start, self._block = self._filled, None
        if self._error is not None:
            raise self._error
        return start

    def _pass_on(self, content: StreamReader, data: bytes) -> None:
        """From now on the body goes to aiohttp's stream (it pauses us when it holds too much)."""
        self._block, self._stream = None, content
        for piece in (data, *self._spilled):
            if piece:
                content.feed_data(piece)
        self._spilled.clear()
        if not self.remaining:
            self._finish()
        else:
            self._resume()

    def abandon(self, content: StreamReader) -> None:
        """After a failure: the rest of the body goes to aiohttp's stream, whose lingering close
        reads and drops it after the error response."""
        if not self._done and self._error is None and self._stream is None:
            self._pass_on(content, b"")

    def _finish(self) -> None:
        """The body is read: hand the connection back, closed once the response is sent."""
        self._done = True
        assert self._stream is not None
        self._stream.feed_eof()
        self.transport.set_protocol(self.handler)
        self.handler.close()  # its parser is mid-body: it must not parse what follows
        self._resume()

    def _resume(self) -> None:
        if not self.transport.is_closing() and not self.transport.is_reading():
            self.transport.resume_reading()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    # -- the transport's side (asyncio.BufferedProtocol) --

    def get_buffer(self, sizehint: int) -> memoryview:
        self._into_block = self._block is not None and self._filled < len(self._block)
        if self._into_block:
            assert self._block is not None
            return self._block[self._filled : self._filled + self.remaining]
        return memoryview(self._spare)[: self.remaining]

    def buffer_updated(self, nbytes: int) -> None:
        self.remaining -= nbytes
        if self._into_block:
            assert self._block is not None
            self._filled += nbytes
            if self._filled == len(self._block) or not self.remaining:
                self.transport.pause_reading()
                self._wake()
        elif self._stream is not None:
            self._stream.feed_data(bytes(self._spare[:nbytes]))
            if not self.remaining:
                self._finish()
        else:  # no block waits for them (reading had been resumed by someone else): kept for the next
            self._spilled.append(bytes(self._spare[:nbytes]))
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        self._error = BadRequest("Malformed multipart body: the body ended inside the file part")
        self._wake()
        return False

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._error is None:
            self._error = ConnectionResetError("Connection lost")
        self._wake()
        self.handler.connection_lost(exc)

    def pause_writing(self) -> None:
        self.handler.pause_writing()

    def resume_writing(self) -> None:
        self.handler.resume_writing()

    def __repr__(self) -> str:
        return f"<BodyTap remaining={self.remaining}>"

