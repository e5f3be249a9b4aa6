#!/usr/bin/env python3
"""The batch client's floor: a plain Cloudinary-compatible backup pipeline to measure against.

Issue 10 wants `versionstore initial-backup --source LIB` to beat restic by 2x; where it does
not, the report must say where the time goes. This script runs, in the same run, a plain
pipeline that does per file only what the wire protocol and durability demand, so the batch
client's time can be set beside it. It is not a lower bound: it reads bodies through aiohttp's
multipart reader and writes through the page cache, where versionstore's server taps large
bodies and writes them with O_DIRECT (docs/performance.md, "The floor" and "Direct writes").

- Server (a separate process, started here; 127.0.0.1, a free port): a bare aiohttp app with one
  POST route. It streams the multipart body with aiohttp's `MultipartReader` (4 MiB reads) and
  hands each chunk of the file part to one worker thread per upload (a queue, no thread hop per
  chunk), which MD5-hashes it (Cloudinary's etag), BLAKE3-hashes it (the content address) and
  writes it to a new temp file in the data dir; at the end it `fdatasync`s the file, renames it
  to its BLAKE3 name, fsyncs the directory and answers `{"bytes", "etag", "blake3"}`. No
  metadata, no second store, no journal: those are versionstore's own costs.
- Client (this process): every regular file of LIB as `multipart/form-data` (field `file`), the
  file's bytes sent with `sendfile` (aiohttp's own payload for an open file reads 64 KiB blocks
  through a thread instead), as many uploads in flight as the batch client's default; each
  answer's byte count is checked.

Printed: one JSON line, `wall_s` from the listing of LIB to the last answer (interpreter and
server start-up excluded), `client_cpu_s` and `server_cpu_s` (user + system) over the same
window, of the latter the server's event-loop thread (`server_loop_cpu_s`; the rest is the upload
workers), and the CPU with start-up (`*_cpu_total_s`). Exit status 1 when any upload failed.

    .venv/bin/python scripts/batch_floor.py --source LIB [--concurrency N] [--data-dir D]

Without --data-dir the files go to a temp dir that is removed at the end; pass a directory on
the library's disk (and the server's) to measure the same disk as the real comparison.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import hashlib
import json
import os
import queue
import resource
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import aiohttp.abc
import aiohttp.payload
import blake3
from aiohttp import web
from aiohttp.helpers import content_disposition_header

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this tree's versionstore, whatever the cwd
from versionstore.backup_client import CONCURRENCY  # noqa: E402  (the batch client's default uploads in flight)

MiB = 1 << 20
CHUNK = 4 * MiB  # the server's multipart reads
AHEAD = 4  # chunks of one upload queued for its worker before the event loop waits for it
END, ABORT = object(), object()  # the worker's queue: the part ended / the request failed


# --- server -----------------------------------------------------------------------------------


def _store(chunks: queue.SimpleQueue[Any], room: threading.Semaphore, directory: Path, dir_fd: int,
           done: concurrent.futures.Future[dict[str, Any]]) -> None:
    """One upload's worker thread: hash and write each chunk as it comes, then make the file
    durable under its BLAKE3 name. Both hashes and the write release the GIL on large chunks."""
    done.set_running_or_notify_cancel()  # a cancelled request can no longer cancel this result
    temp = directory / f".part-{uuid.uuid4().hex}"
    try:
        md5, b3, size = hashlib.md5(), blake3.blake3(), 0
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            while (chunk := chunks.get()) is not END:
                if chunk is ABORT:
                    raise ConnectionAbortedError("the request ended before its file part")
                md5.update(chunk)
                b3.update(chunk)
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view):]
                size += len(chunk)
                room.release()
            os.fdatasync(fd)
        finally:
            os.close(fd)
        name = b3.hexdigest()
        os.rename(temp, directory / name)
        os.fsync(dir_fd)
        done.set_result({"bytes": size, "etag": md5.hexdigest(), "blake3": name})
    except BaseException as exc:
        temp.unlink(missing_ok=True)
        done.set_exception(exc)
        room.release(AHEAD)  # a reader waiting for room wakes, sees `done` and stops


async def _receive(part: aiohttp.BodyPartReader, directory: Path, dir_fd: int) -> dict[str, Any]:
    chunks: queue.SimpleQueue[Any] = queue.SimpleQueue()
    room = threading.Semaphore(AHEAD)
    done: concurrent.futures.Future[dict[str, Any]] = concurrent.futures.Future()
    threading.Thread(target=_store, args=(chunks, room, directory, dir_fd, done), name="floor-upload", daemon=True).start()
    try:
        while (chunk := await part.read_chunk(CHUNK)) and not done.done():
            if not room.acquire(blocking=False):  # the worker is AHEAD chunks behind: wait off the loop
                await asyncio.to_thread(room.acquire)
            chunks.put(chunk)
    except BaseException:
        chunks.put(ABORT)
        raise
    chunks.put(END)
    return await asyncio.wrap_future(done)


def make_app(data_dir: Path) -> web.Application:
    """The floor's server: POST / with a `file` part answers what the worker stored."""
    dir_fd = os.open(data_dir, os.O_RDONLY | os.O_DIRECTORY)

    async def upload(request: web.Request) -> web.Response:
        reader = await request.multipart()
        answer: dict[str, Any] | None = None
        while (part := await reader.next()) is not None:
            if isinstance(part, aiohttp.BodyPartReader) and part.name == "file" and answer is None:
                answer = await _receive(part, data_dir, dir_fd)
            else:
                await part.release()
        if answer is None:
            raise web.HTTPBadRequest(text="no file part")
        return web.json_response(answer)

    async def close_dir(app: web.Application) -> None:
        os.close(dir_fd)

    app = web.Application()
    app.router.add_post("/", upload)
    app.on_cleanup.append(close_dir)
    return app


async def serve(data_dir: Path) -> None:
    """Serve until SIGTERM or SIGINT; the port goes to stdout as one JSON line when listening."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    # read_bufsize: the request's buffer may hold a whole read (aiohttp's default pauses the socket at 128 KiB).
    runner = web.AppRunner(make_app(data_dir), access_log=None, read_bufsize=CHUNK)
    await runner.setup()
    await web.SockSite(runner, sock, backlog=128).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print(json.dumps({"port": sock.getsockname()[1]}), flush=True)
    await stop.wait()
    await runner.cleanup()


# --- client -----------------------------------------------------------------------------------


class FilePart(aiohttp.payload.Payload):
    """A `multipart/form-data` body of one `file` part with its exact length (no chunked
    encoding); the file's bytes go to the socket with `sendfile`, from the page cache the
    kernel's read-ahead fills (`WILLNEED` on open), so no byte passes through Python."""

    def __init__(self, path: Path) -> None:
        boundary = uuid.uuid4().hex
        self.handle = open(path, "rb")
        self.length = os.fstat(self.handle.fileno()).st_size
        if self.length:
            os.posix_fadvise(self.handle.fileno(), 0, 0, os.POSIX_FADV_WILLNEED)
        disposition = content_disposition_header("form-data", name="file", filename=path.name)
        self.head = (f"--{boundary}\r\nContent-Disposition: {disposition}\r\n"
                     "Content-Type: application/octet-stream\r\n\r\n").encode()
        self.tail = f"\r\n--{boundary}--\r\n".encode()
        super().__init__(None, content_type=f"multipart/form-data; boundary={boundary}")
        self._size = len(self.head) + self.length + len(self.tail)

    async def write(self, writer: aiohttp.abc.AbstractStreamWriter) -> None:
        await writer.write(self.head)
        await writer.drain()  # sendfile goes around aiohttp's writer: what it holds goes first
        if self.length:
            assert writer.transport is not None
            sent = await asyncio.get_running_loop().sendfile(writer.transport, self.handle, 0, self.length)
            if sent != self.length:
                raise OSError(f"sent {sent} of {self.length} bytes: the file shrank")
        await writer.write(self.tail)

    async def write_with_length(self, writer: aiohttp.abc.AbstractStreamWriter, content_length: int | None) -> None:
        await self.write(writer)

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        raise TypeError("a file body is not text")


@dataclass
class Floor:
    """One run: what was sent, how long it took, and each file's answer (by relative path)."""

    files: int
    bytes: int
    concurrency: int
    wall_s: float
    client_cpu_s: float
    server_cpu_s: float
    client_cpu_total_s: float
    server_cpu_total_s: float
    server_loop_cpu_s: float = 0.0  # of server_cpu_s, the event loop's thread (the rest: the upload workers)
    answers: dict[str, dict[str, Any]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {"files": self.files, "bytes": self.bytes, "concurrency": self.concurrency,
                "wall_s": round(self.wall_s, 4), "client_cpu_s": round(self.client_cpu_s, 3),
                "server_cpu_s": round(self.server_cpu_s, 3), "client_cpu_total_s": round(self.client_cpu_total_s, 3),
                "server_cpu_total_s": round(self.server_cpu_total_s, 3),
                "server_loop_cpu_s": round(self.server_loop_cpu_s, 3), "failures": len(self.failures)}


def library(source: Path) -> list[tuple[str, Path, int]]:
    """Every regular file under `source` (symlinks not followed): relative path, path, size."""
    found = []
    for folder, _, names in os.walk(source):
        for name in names:
            path = Path(folder, name)
            info = path.lstat()
            if stat.S_ISREG(info.st_mode):
                found.append((path.relative_to(source).as_posix(), path, info.st_size))
    return sorted(found)


async def send_all(url: str, files: list[tuple[str, Path, int]], concurrency: int, floor: Floor) -> None:
    pending = iter(files)
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def worker() -> None:
            for relative, path, size in pending:
                try:
                    body = FilePart(path)
                    try:
                        async with session.post(url, data=body) as resp:
                            if resp.status != 200:
                                raise RuntimeError(f"HTTP {resp.status}: {(await resp.text())[:200]}")
                            answer: dict[str, Any] = await resp.json()
                    finally:
                        body.handle.close()
                    if answer.get("bytes") != size:
                        raise RuntimeError(f"the server stored {answer.get('bytes')} bytes of {size}")
                    floor.answers[relative] = answer
                except (OSError, aiohttp.ClientError, RuntimeError, ValueError) as exc:
                    floor.failures.append(f"{relative}: {type(exc).__name__}: {exc}")

        await asyncio.gather(*(worker() for _ in range(concurrency)))


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _cpu(pid: int, thread: int | None = None) -> float:
    """User + system CPU seconds of another process (or one of its threads) so far (/proc: clock ticks, 10 ms here)."""
    where = f"/proc/{pid}/task/{thread}/stat" if thread is not None else f"/proc/{pid}/stat"
    fields = Path(where).read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(source: Path, concurrency: int = CONCURRENCY, data_dir: Path | None = None) -> Floor:
    """Start the floor's server, send every file of `source` to it, stop it. Without `data_dir`
    the stored files go to a temp dir removed at the end."""
    temp = None
    if data_dir is None:
        data_dir = temp = Path(tempfile.mkdtemp(prefix="batch-floor-"))
    data_dir.mkdir(parents=True, exist_ok=True)
    server = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--serve", "--data-dir", str(data_dir)],
                              stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert server.stdout is not None
        line = server.stdout.readline()
        if not line:
            raise RuntimeError(f"the floor's server exited before listening (rc={server.wait()})")
        url = f"http://127.0.0.1:{json.loads(line)['port']}/"
        client0, server0, loop0, wall0 = _own_cpu(), _cpu(server.pid), _cpu(server.pid, server.pid), time.perf_counter()
        files = library(source)
        floor = Floor(len(files), sum(size for _, _, size in files), concurrency, 0.0, 0.0, 0.0, 0.0, 0.0)
        asyncio.run(send_all(url, files, concurrency, floor))
        floor.wall_s = time.perf_counter() - wall0
        client1, server1 = _own_cpu(), _cpu(server.pid)
        floor.client_cpu_s, floor.server_cpu_s = client1 - client0, server1 - server0
        floor.server_loop_cpu_s = _cpu(server.pid, server.pid) - loop0
        floor.client_cpu_total_s, floor.server_cpu_total_s = client1, server1
        return floor
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        if temp is not None:
            shutil.rmtree(temp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--source", type=Path, help="the library: every regular file under it is uploaded")
    parser.add_argument("--concurrency", type=int, default=CONCURRENCY,
                        help=f"uploads in flight (default {CONCURRENCY}, the batch client's default)")
    parser.add_argument("--data-dir", type=Path, help="where the server stores the files (default: a temp dir, removed)")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)  # the server process
    args = parser.parse_args(argv)
    if args.serve:
        if args.data_dir is None:
            parser.error("--serve needs --data-dir")
        asyncio.run(serve(args.data_dir))
        return 0
    if args.source is None or not args.source.is_dir():
        parser.error("--source must be a directory")
    if args.concurrency < 1:
        parser.error("--concurrency must be at least 1")
    floor = run(args.source, args.concurrency, args.data_dir)
    for failure in floor.failures[:20]:
        print(f"failed: {failure}", file=sys.stderr)
    print(json.dumps(floor.summary()), flush=True)
    return 1 if floor.failures else 0


if __name__ == "__main__":
    sys.exit(main())
