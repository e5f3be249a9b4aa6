"""The I/O of `initial-backup` (versionstore/backup_client.py): where assets come from (a
directory or a manifest), the server (Upload and Admin API with retries), and what a run
remembers (the state file that lets the next run skip what this one backed up).

Sources are generators, so a manifest of millions of lines is never held in memory; only the
keys seen so far are (to refuse two entries that would overwrite each other). Public IDs follow
Cloudinary's convention: image and video IDs have no extension, raw IDs keep theirs.
"""

import asyncio
import base64
import concurrent.futures
import contextlib
import csv
import errno
import fcntl
import http.client
import json
import mmap
import os
import random
import re
import socket
import stat
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

import blake3

from versionstore.backup_http import READ_TIMEOUT, USER_AGENT, Answer, Endpoint, ExchangeError, Ticket
from versionstore.block_pool import BlockPool

RESOURCE_TYPES = ("image", "video", "raw")
IMAGE_EXTENSIONS = frozenset({"ai", "arw", "avif", "bmp", "cr2", "djvu", "dng", "eps", "gif", "heic", "heif", "ico", "jp2", "jpe",
                              "jpeg", "jpg", "jxl", "nef", "pdf", "png", "psd", "svg", "tga", "tif", "tiff", "webp"})
VIDEO_EXTENSIONS = frozenset({"3gp", "aac", "aiff", "avi", "flac", "flv", "m2ts", "m4a", "m4v", "mkv", "mov", "mp3", "mp4", "mpeg",
                              "mpg", "mts", "ogg", "ogv", "opus", "ts", "wav", "webm", "wmv"})  # Cloudinary files audio as video
#: Remote assets: the bytes live elsewhere, there is no original to back up (same list as the server's job).
REMOTE_TYPES = frozenset({"fetch", "facebook", "twitter", "twitter_name", "gravatar", "youtube", "hulu", "vimeo", "animoto",
                          "worldstarhiphop", "dailymotion", "list", "multi", "text", "sprite"})
#: Outcomes after which the asset's current bytes are a revision (or acknowledged as one).
BACKED_UP = frozenset({"uploaded", "already_backed_up"})
STATE_FILE = ".initial-backup-state.jsonl"


def extension(name: str) -> str:
    base = name.rsplit("/", 1)[-1]
    return base.rsplit(".", 1)[-1].lower() if "." in base.strip(".") else ""


def resource_type_for(name: str) -> str:
    ext = extension(name)
    return "image" if ext in IMAGE_EXTENSIONS else "video" if ext in VIDEO_EXTENSIONS else "raw"


def public_id_for(relative: str, resource_type: str) -> str:
    """`a/b/logo.png` -> `a/b/logo` (image, video); `a/b/notes.txt` -> `a/b/notes.txt` (raw)."""
    if resource_type != "raw" and extension(relative):
        return relative.rsplit(".", 1)[0]
    return relative


@dataclass(frozen=True, slots=True)
class Item:
    """One asset to back up; `error` is set when its manifest line is unusable."""

    public_id: str
    resource_type: str
    type: str
    source: str  # absolute path or URL, as reported and recorded
    is_url: bool = False
    error: str | None = None
    #: (size, mtime_ns) from the directory walk's own stat: an unchanged file is skipped on it
    #: without another stat (None for manifest items, which are stat'ed when processed).
    listed: tuple[int, int] | None = None

    @property
    def key(self) -> str:
        return f"{self.resource_type}/{self.type}/{self.public_id}"


def walk_directory(root: Path, folder: str = "", exclude: Iterable[Path] = ()) -> Iterator[Item]:
    """Regular files under `root` in sorted order; dotfiles and dot-directories are skipped,
    symlinked directories are not followed."""
    root = Path(os.path.abspath(root))
    excluded = {os.path.abspath(p) for p in exclude}
    prefix = folder.strip("/") + "/" if folder.strip("/") else ""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            if name.startswith(".") or path in excluded:
                continue
            try:
                info = os.stat(path)  # what os.path.isfile asks (symlinks followed), kept for the unchanged check
            except OSError:
                continue
            if not stat.S_ISREG(info.st_mode):
                continue
            relative = Path(path).relative_to(root).as_posix()
            resource_type = resource_type_for(relative)
            yield Item(prefix + public_id_for(relative, resource_type), resource_type, "upload", path,
                       listed=(info.st_size, info.st_mtime_ns))


def read_manifest(manifest: Path) -> Iterator[Item]:
    """JSON lines (one object per line) or, for a `.csv` file, rows under a header line.
    Relative paths are relative to the manifest's directory; a `path` may also be a URL."""
    base = manifest.parent.absolute()
    with open(manifest, newline="", encoding="utf-8") as handle:
        if manifest.suffix.lower() == ".csv":
            reader = csv.DictReader(handle)
            if reader.fieldnames is None or "public_id" not in reader.fieldnames:
                raise ValueError(f"{manifest}: the CSV header must name a public_id column")
            for row in reader:
                yield _manifest_item(row, base, f"{manifest.name}:{reader.line_num}")
            return
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as exc:
                record = {"error": f"not JSON ({exc})"}
            yield _manifest_item(record if isinstance(record, dict) else {"error": "not a JSON object"}, base, f"{manifest.name}:{number}")


def _manifest_item(record: dict[str, Any], base: Path, where: str) -> Item:
    """An Item, with `error` set (and `source` naming the line when there is no path) if unusable."""

    def field(name: str) -> str:
        value = record.get(name)
        return "" if value is None else str(value).strip()

    public_id, path, url, type_ = field("public_id"), field("path"), field("url"), field("type") or "upload"
    if path.startswith(("http://", "https://")) and not url:
        path, url = "", path
    source = url or (os.path.normpath(base / path) if path else where)
    resource_type = field("resource_type") or resource_type_for(url.split("?", 1)[0] if url else path)
    error = field("error") or None
    if error is None and not public_id:
        error = "public_id is missing"
    elif error is None and not (url or path) and type_ not in REMOTE_TYPES:
        error = "needs a path or an http(s) url"
    elif error is None and resource_type not in RESOURCE_TYPES:
        error = f"resource_type must be image, video or raw, not {resource_type!r}"
    elif error is None and url and not url.startswith(("http://", "https://")):
        error = f"url must be http(s): {url}"
    return Item(public_id, resource_type, type_, source, is_url=bool(url), error=error)


def refuse_duplicates(items: Iterable[Item]) -> Iterator[Item]:
    """Two sources for one public_id would overwrite each other on every run: the later fails."""
    seen: dict[str, str] = {}
    for item in items:
        first = seen.setdefault(item.key, item.source)
        if first != item.source and item.error is None:
            item = Item(item.public_id, item.resource_type, item.type, item.source, item.is_url,
                        f"public_id {item.public_id!r} is also used for {first}", item.listed)
        yield item


def hash_file(path: str) -> str:
    """BLAKE3 hex digest, memory-mapped and multi-threaded (call it in a worker thread)."""
    hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
    hasher.update_mmap(path)
    return hasher.hexdigest()


@dataclass(frozen=True, slots=True)
class Remembered:
    size: int
    mtime_ns: int
    digest: str
    outcome: str


class StateFile:
    """Append-only JSON lines, one per finished asset, fsynced before the asset counts as done.

    Lines are group-committed: whoever takes the lock writes every line queued so far, so
    concurrent workers share one fsync. A line torn by a kill is ignored when loading; the last
    line for a (target, key, source) wins.
    """

    def __init__(self, path: Path, target: str) -> None:
        self.path = path
        self.target = target
        self._queued: list[str] = []
        self._lock = asyncio.Lock()

    def load(self) -> dict[tuple[str, str], Remembered]:
        known: dict[tuple[str, str], Remembered] = {}
        if not self.path.exists():
            return known
        with open(self.path, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                try:
                    entry = json.loads(line)
                    if entry.get("target") == self.target:
                        known[(entry["key"], entry["source"])] = Remembered(
                            int(entry["size"]), int(entry["mtime_ns"]), str(entry["digest"]), str(entry["outcome"])
                        )
                except (ValueError, KeyError, TypeError, AttributeError):
                    continue
        return known

    async def record(self, item: Item, **fields: Any) -> None:
        entry = {"target": self.target, "key": item.key, "public_id": item.public_id, "resource_type": item.resource_type,
                 "type": item.type, "source": item.source, **fields, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        self._queued.append(json.dumps(entry, ensure_ascii=False) + "\n")
        async with self._lock:
            if self._queued:
                lines, self._queued = self._queued, []
                await asyncio.to_thread(self._append, "".join(lines))

    def _append(self, text: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a+b") as handle:
            if handle.tell() > 0:
                handle.seek(-1, os.SEEK_END)
                if handle.read(1) != b"\n":
                    text = "\n" + text  # the previous run was killed mid-line
            handle.write(text.encode())
            handle.flush()
            os.fsync(handle.fileno())


# --- the server ------------------------------------------------------------------------------

T = TypeVar("T")
CHUNK = 1 << 20
BLOCK = 4 << 20  # read (and hashed) ahead of the socket, per upload in flight
_READERS = concurrent.futures.ThreadPoolExecutor(32, thread_name_prefix="initial-backup-read")
#: The read buffers of the direct path (`FileBody`), reused across uploads: two per upload in
#: flight, kept for up to 16 uploads in flight (more are freed when given back).
_BLOCKS = BlockPool(2 * 16 * BLOCK)
_PAGE = mmap.PAGESIZE
BACKOFF_BASE, BACKOFF_MAX, RETRY_AFTER_MAX = 0.5, 30.0, 60.0
URL_FORMAT = "cloudinary://api_key:api_secret@cloud_name?upload_prefix=http://host:port"


@dataclass(frozen=True)
class Target:
    cloud: str
    api_key: str
    api_secret: str
    prefix: str

    @property
    def base(self) -> str:
        return f"{self.prefix}/v1_1/{self.cloud}"

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> "Target":
        """CLOUDINARY_URL, or the separate CLOUDINARY_* variables the Python SDK also reads."""
        url = env.get("CLOUDINARY_URL", "")
        if url:
            parts = urlsplit(url)
            credentials, at, cloud = parts.netloc.rpartition("@")
            key, _, secret = credentials.partition(":")
            if parts.scheme != "cloudinary" or not (at and key and secret and cloud):
                raise ValueError(f"CLOUDINARY_URL must look like {URL_FORMAT}")
            prefix = parse_qs(parts.query).get("upload_prefix", [""])[0]
            target = cls(cloud, unquote(key), unquote(secret), prefix)
        elif env.get("CLOUDINARY_CLOUD_NAME"):
            target = cls(env["CLOUDINARY_CLOUD_NAME"], env.get("CLOUDINARY_API_KEY", ""), env.get("CLOUDINARY_API_SECRET", ""),
                         env.get("CLOUDINARY_UPLOAD_PREFIX", ""))
        else:
            raise ValueError(f"set CLOUDINARY_URL={URL_FORMAT}")
        target = cls(target.cloud, target.api_key, target.api_secret, (target.prefix or "https://api.cloudinary.com").rstrip("/"))
        if not target.prefix.startswith(("http://", "https://")) or not target.api_key or not target.api_secret:
            raise ValueError(f"CLOUDINARY_URL needs an api_key, an api_secret and an http(s) upload_prefix: {URL_FORMAT}")
        try:
            where = urlsplit(target.prefix)
            where.port  # noqa: B018  # raises ValueError for a port that is not a number in range
        except ValueError as exc:
            raise ValueError(f"the upload_prefix {target.prefix!r} is not a valid URL ({exc}): {URL_FORMAT}") from None
        if not where.hostname:
            raise ValueError(f"the upload_prefix {target.prefix!r} names no host: {URL_FORMAT}")
        return target


class RequestFailed(Exception):
    """Permanent for this asset (or this call): retrying would get the same answer."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.message, self.status = message, status

    def job_id(self) -> str | None:
        found = re.search(r"\(([0-9a-f]{32})\)", self.message)
        return found[1] if found else None


class Transient(Exception):
    """5xx, 420 and 429: worth another try after a pause (at least Retry-After, when given)."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


#: Worth another try: the server said so, or the exchange failed on the way (a lost connection,
#: a timeout, a file that changed while it was sent).
TRANSIENT = (Transient, ExchangeError)


class FileBody:
    """A whole multipart/form-data body (the fields, then the file) with its exact length, so the
    request carries a Content-Length instead of chunked encoding. Sent by an exchange's thread
    (versionstore/backup_http.py): `head` with the request's headers, the rest by `send`.

    A second thread reads the file one block ahead of the socket, so the sending thread never
    waits on the disk for the next block; with a `hasher` it also hashes the block.

    Where the file system allows it, the file is read with O_DIRECT into two page-aligned
    buffers taken from a pool that every upload reuses, and written to the socket from them.
    The library is read once and never again by this run, so passing it through the page cache
    only costs: every page of it is fresh memory the CPU touches first in the kernel's copy to
    the server (on this project's VMs three times the CPU of a copy from memory already in use,
    docs/performance.md, "The batch client reads past the page cache"), and it evicts what
    the machine's other programs had cached. Elsewhere (tmpfs, some network file systems) the
    bytes go to the socket with `sendfile` from the page cache, which the thread fills ahead
    (`MADV_POPULATE_READ` on a read-only mapping, or a read when it hashes).

    Either way, the file's size, mtime and ctime are compared before the closing boundary is
    sent: a file that changed under the upload aborts the request, so the server stores nothing
    torn (the asset is retried). `sent(n)` is called after each block went out, before the next.
    """

    def __init__(self, fields: Iterable[tuple[str, str]], path: str, filename: str, sent: Callable[[int], None],
                 hasher: "blake3.blake3 | None" = None) -> None:
        self.boundary = os.urandom(16).hex()
        self.handle = open(path, "rb")
        info = os.fstat(self.handle.fileno())
        self.size, self.opened = info.st_size, _identity(info)
        head = b"".join(self._part(_disposition(name), b"text/plain; charset=utf-8") + value.encode() + b"\r\n"
                        for name, value in fields)
        self.head = head + self._part(_disposition("file", filename), b"application/octet-stream")
        self.tail = b"\r\n--" + self.boundary.encode() + b"--\r\n"
        self.content_type = f"multipart/form-data; boundary={self.boundary}"
        self.length = len(self.head) + self.size + len(self.tail)
        self.sent, self.hasher = sent, hasher
        self._ahead: concurrent.futures.Future[None] | None = None
        self._buffer: bytearray | None = None
        self.finished: float | None = None  # when the last byte was handed to the socket
        self.direct = _direct_reads(self.handle.fileno())
        if not self.direct:
            with contextlib.suppress(OSError, AttributeError):
                os.posix_fadvise(self.handle.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)

    def _part(self, disposition: str, content_type: bytes) -> bytes:
        return (b"--" + self.boundary.encode() + b"\r\nContent-Disposition: " + disposition.encode()
                + b"\r\nContent-Type: " + content_type + b"\r\n\r\n")

    def _read_ahead(self, offset: int, count: int) -> None:
        """Bring [offset, offset + count) into the page cache (read and hashed when there is a
        hasher, else only paged in) and ask the kernel to start reading the block after it."""
        fd = self.handle.fileno()
        with contextlib.suppress(OSError, AttributeError):
            os.posix_fadvise(fd, offset + count, count, os.POSIX_FADV_WILLNEED)
        if self.hasher is None and _page_in(fd, offset, count):
            return
        if self._buffer is None:  # one per upload: a block is read only after the one before it was
            self._buffer = bytearray(min(BLOCK, self.size))
        self._read_block(offset, count, self._buffer)

    def _read_block(self, offset: int, count: int, block: mmap.mmap | bytearray) -> None:
        """Read [offset, offset + count) into `block` (and hash it): with O_DIRECT in whole pages,
        the last block's too (a read past the end stops at it). A read O_DIRECT refuses (EINVAL)
        turns it off for the rest of the file."""
        fd, view, done = self.handle.fileno(), memoryview(block), 0
        while done < count:
            end = min(len(block), -(-count // _PAGE) * _PAGE) if self.direct else count
            try:
                n = os.preadv(fd, [view[done:end]], offset + done)
            except OSError as exc:
                if exc.errno != errno.EINVAL or not self.direct:
                    raise
                self.direct = False
                fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_DIRECT)
                continue
            if n == 0:
                raise FileChanged("the file shrank while it was being uploaded; run again")
            done += n
        if self.hasher is not None:
            self.hasher.update(view[:count])

    def send(self, sock: socket.socket) -> None:
        """The file, then the tail (the head went out with the headers): block by block, the next
        block read by another thread while this one goes to the socket, from two pooled buffers
        in turn (O_DIRECT), else with sendfile."""
        blocks = [_BLOCKS.take(BLOCK) for _ in range(min(2, -(-self.size // BLOCK)))] if self.direct else []
        offset, turn = 0, 0
        try:
            if self.size:
                self._ahead = self._read_next(0, blocks[0] if blocks else None)
            while self._ahead is not None:
                self._ahead.result()
                count = min(BLOCK, self.size - offset)
                following, block = offset + count, blocks[turn] if blocks else None
                turn = (turn + 1) % len(blocks) if blocks else 0
                self._ahead = None
                if following < self.size:  # into the other buffer: `sendall` is done with it
                    self._ahead = self._read_next(following, blocks[turn] if blocks else None)
                self._send(sock, offset, count, block)
                self.sent(count)
                offset = following
        finally:
            if self._ahead is None or self._ahead.done():  # else the thread still reads into one: left to the GC
                _BLOCKS.give(blocks)
        if _identity(os.fstat(self.handle.fileno())) != self.opened:
            raise FileChanged("the file changed while it was being uploaded; run again")
        sock.sendall(self.tail)
        self.finished = time.monotonic()

    def _read_next(self, offset: int, block: mmap.mmap | None) -> "concurrent.futures.Future[None]":
        count = min(BLOCK, self.size - offset)
        if block is not None:
            return _READERS.submit(self._read_block, offset, count, block)
        return _READERS.submit(self._read_ahead, offset, count)

    def _send(self, sock: socket.socket, offset: int, count: int, block: mmap.mmap | None) -> None:
        """[offset, offset + count) of the file: from `block` where it was read into one, else by sendfile."""
        if block is not None:
            sock.sendall(memoryview(block)[:count])
        elif sock.sendfile(self.handle, offset, count) != count:
            raise FileChanged("the file shrank while it was being uploaded; run again")

    def __enter__(self) -> "FileBody":
        return self

    def __exit__(self, *exc: object) -> None:
        if self._ahead is not None:  # a failed send: the reader still uses the file (one block at most)
            concurrent.futures.wait([self._ahead])
        self.handle.close()


def _disposition(name: str, filename: str | None = None) -> str:
    """A part's Content-Disposition, the file name as a quoted string in UTF-8 (`"` and `\\`
    escaped, CR and LF percent-encoded as browsers do, so a name cannot end the header line).
    Before 0.6 the name went percent-encoded (aiohttp's client), which the server kept as the
    asset's `original_filename`: `my photo` became `my%20photo`."""
    value = f'form-data; name="{name}"'
    if filename is None:
        return value
    quoted = filename.replace("\\", "\\\\").replace('"', '\\"').replace("\r", "%0D").replace("\n", "%0A")
    return f'{value}; filename="{quoted}"'


class FileChanged(OSError):
    """The file changed under the upload: the request is abandoned, the asset retried."""


def _direct_reads(fd: int) -> bool:
    """Turn O_DIRECT on for `fd`; False where the file system (or the platform) has none."""
    if not hasattr(os, "O_DIRECT"):
        return False
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_DIRECT)
    except OSError:
        return False
    return True


def _identity(info: os.stat_result) -> tuple[int, int, int]:
    """What changes when a file's bytes are rewritten (ctime too, so a reset mtime does not hide it)."""
    return info.st_size, info.st_mtime_ns, info.st_ctime_ns


#: madvise(MADV_POPULATE_READ) (Linux 5.14): fault a mapping's pages in, reading them from disk, without copying.
_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22) if sys.platform == "linux" else None


def _page_in(fd: int, offset: int, length: int) -> bool:
    """Read [offset, offset + length) of the file into the page cache without copying it into the
    process; False when this kernel cannot (the caller reads it instead). `offset` is a multiple
    of BLOCK, so of the page size. A range past the end of a file that shrank also answers False,
    and the caller's read reports the shrink."""
    if _POPULATE_READ is None or length == 0:
        return False
    try:
        with mmap.mmap(fd, length, prot=mmap.PROT_READ, offset=offset) as mapped:
            mapped.madvise(_POPULATE_READ)
    except (OSError, ValueError):
        return False
    return True


def _segment(value: str) -> str:
    """Percent-encode one path segment; `.` and `..` too, so no client or proxy resolves them."""
    return quote(value, safe="").replace(".", "%2E") if value in (".", "..") else quote(value, safe="")


def remote_outcome(resource: dict[str, Any] | None, digest: str) -> tuple[str | None, str | None]:
    """('already_backed_up' | 'backup_pending' | None, version_id): are `digest`'s bytes the live
    asset's current version, and is that version a revision (or acknowledged as one)?"""
    if resource is None or resource.get("status", "active") != "active" or resource.get("blake3") != digest:
        return None, None
    current = resource.get("version_id")
    for version in resource.get("versions") or []:
        if version.get("version_id") == current:
            if version.get("restorable"):
                return "already_backed_up", str(current)
            if version.get("backup_pending"):
                return "backup_pending", str(current)
    return None, None


TIMELINE_VARIABLE = "VERSIONSTORE_INITIAL_BACKUP_TIMELINE"


class Timeline:
    """With $VERSIONSTORE_INITIAL_BACKUP_TIMELINE naming a file, one JSON line per upload attempt:
    `bytes`, and in seconds since the run started `start`, `sent` (the body's last byte handed to
    the socket) and `end` (the answer read). scripts/bench_initial_backup.py reads it to show how
    many uploads were in flight and how long each waited for the server after sending."""

    def __init__(self, path: str | None) -> None:
        self.handle = open(path, "a", buffering=1, encoding="utf-8") if path else None
        self.origin = time.monotonic()

    def note(self, size: int, start: float, sent: float | None, end: float) -> None:
        if self.handle is not None:
            times = {name: None if t is None else round(t - self.origin, 6) for name, t in (("start", start), ("sent", sent), ("end", end))}
            self.handle.write(json.dumps({"bytes": size, **times}) + "\n")


class Api:
    """Basic-auth calls to one environment; `retrying` wraps one call in backoff with jitter.
    Each exchange runs on one of `workers` threads (versionstore/backup_http.py); `close` when done."""

    def __init__(self, target: Target, retries: int, on_retry: Callable[[], None], workers: int) -> None:
        self.target, self.retries, self.on_retry = target, retries, on_retry
        self.endpoint = Endpoint(target.base, workers)
        self.timeline = Timeline(os.environ.get(TIMELINE_VARIABLE))
        credentials = base64.b64encode(f"{target.api_key}:{target.api_secret}".encode()).decode()
        self.auth = {"Authorization": f"Basic {credentials}"}

    def close(self) -> None:
        self.endpoint.close()

    @staticmethod
    def describe(exc: BaseException) -> str:
        return str(exc) or type(exc).__name__

    async def pause(self, attempt: int, exc: BaseException) -> None:
        self.on_retry()
        ceiling = min(BACKOFF_MAX, BACKOFF_BASE * 2 ** (attempt - 1))
        hint = min(exc.retry_after or 0.0, RETRY_AFTER_MAX) if isinstance(exc, Transient) else 0.0
        await asyncio.sleep(max(hint, ceiling / 2 + random.uniform(0, ceiling / 2)))

    async def retrying(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        attempt = 0
        while True:
            try:
                return await call()
            except TRANSIENT as exc:
                attempt += 1
                if attempt > self.retries:
                    raise RequestFailed(f"{what}: gave up after {self.retries} retries: {self.describe(exc)}") from exc
                await self.pause(attempt, exc)

    async def _on_thread(self, work: Callable[[Ticket], T]) -> T:
        """`work(ticket)` on an exchange thread. Cancelled (Ctrl-C), the exchange is aborted and
        waited for, so no thread is left sending a file that is about to be closed."""
        ticket = Ticket()
        done = asyncio.get_running_loop().run_in_executor(self.endpoint.executor, work, ticket)
        try:
            return await asyncio.shield(done)
        except asyncio.CancelledError:
            ticket.abort()
            await asyncio.wait([done])
            raise

    async def call(self, method: str, segments: Iterable[str], params: Sequence[tuple[str, str]] | Mapping[str, str] = (),
                   json_body: Any = None, body: "FileBody | None" = None) -> dict[str, Any]:
        target = "/" + "/".join(map(_segment, segments))
        if params:
            target += "?" + urlencode(params, quote_via=quote)
        headers = dict(self.auth)
        payload: bytes | FileBody | None = body
        if json_body is not None:
            headers["Content-Type"] = "application/json"
            payload = json.dumps(json_body).encode()
        elif method == "POST" and body is None:
            payload = b""
        answer = await self._on_thread(lambda ticket: self.endpoint.exchange(method, target, headers, payload, ticket))
        return _result(answer)

    async def ping(self) -> dict[str, Any]:
        return await self.call("GET", ["ping"])

    async def lookup(self, item: Item) -> dict[str, Any] | None:
        try:
            return await self.call("GET", ["resources", item.resource_type, item.type, *item.public_id.split("/")],
                                   params={"versions": "true"})
        except RequestFailed as exc:
            if exc.status == 404:
                return None
            raise

    async def upload(
        self, item: Item, path: str, filename: str, sent: Callable[[int], None], hasher: "blake3.blake3 | None" = None
    ) -> dict[str, Any]:
        """Multipart upload whose file part streams from disk (`FileBody`: never the whole file in
        memory), hashed on the way into `hasher` when one is given."""
        fields = (("public_id", item.public_id), ("type", item.type), ("backup", "true"), ("overwrite", "true"))
        start = time.monotonic()
        with FileBody(fields, path, filename, _on_loop(asyncio.get_running_loop(), sent), hasher) as body:
            try:
                return await self.call("POST", [item.resource_type, "upload"], body=body)
            finally:
                self.timeline.note(body.size, start, body.finished, time.monotonic())

    async def download(self, url: str, directory: str | None) -> tuple[str, int, str]:
        """Stream a URL to a temp file, hashing as it goes: (path, size, digest). No Basic auth is sent."""
        return await self._on_thread(lambda ticket: _download(url, directory, ticket))

    async def open_job_id(self) -> str | None:
        """The open initial-backup job, when a 409's message did not name it."""
        listing = await self.retrying("list jobs", lambda: self.call("GET", ["operations", "initial_backup"], params={"max_results": "50"}))
        return next((str(j["id"]) for j in listing.get("initial_backups") or [] if j.get("status") in ("pending", "active")), None)


def _result(answer: Answer) -> dict[str, Any]:
    """A 200's JSON object; else RequestFailed, or Transient for 5xx, 420 and 429."""
    try:
        body = json.loads(answer.body)
    except ValueError:
        body = None
    if answer.status == 200 and isinstance(body, dict) and "error" not in body:
        return body
    error = body.get("error") if isinstance(body, dict) else None
    message = str(error.get("message")) if isinstance(error, dict) else f"HTTP {answer.status} {answer.reason}"
    if answer.status >= 500 or answer.status in (420, 429):
        retry_after = answer.headers.get("Retry-After", "")
        raise Transient(f"HTTP {answer.status}: {message}", float(retry_after) if retry_after.isdigit() else None)
    raise RequestFailed(message, answer.status)


def _on_loop(loop: asyncio.AbstractEventLoop, call: Callable[[int], None]) -> Callable[[int], None]:
    """`call`, made callable from an exchange thread: it runs on `loop` (the progress bars live
    there) and returns when it has, so a block's `sent` runs before the next block goes out."""

    def run(n: int) -> None:
        done: concurrent.futures.Future[None] = concurrent.futures.Future()

        def step() -> None:
            try:
                call(n)
            except BaseException as exc:
                done.set_exception(exc)
            else:
                done.set_result(None)

        loop.call_soon_threadsafe(step)
        done.result()

    return run


def _download(url: str, directory: str | None, ticket: Ticket) -> tuple[str, int, str]:
    """`Api.download` on an exchange thread: redirects followed, no proxy from the environment
    (as before 0.6), 5xx and 429 transient; an aborted download stops at its next chunk.
    urllib is imported here: only manifests with URLs need it."""
    import urllib.error
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request(url, headers={"Accept-Encoding": "identity", "User-Agent": USER_AGENT})
    handle = tempfile.NamedTemporaryFile(prefix="initial-backup-", dir=directory, delete=False)
    hasher, size = blake3.blake3(), 0
    try:
        try:
            with opener.open(request, timeout=READ_TIMEOUT) as response:
                if response.status != 200:
                    raise RequestFailed(f"download failed: HTTP {response.status} {response.reason}")
                while chunk := response.read(CHUNK):
                    if ticket.aborted:
                        raise ExchangeError("download aborted")
                    size += len(chunk)
                    hasher.update(chunk)
                    handle.write(chunk)
        except urllib.error.HTTPError as exc:
            message = f"download failed: HTTP {exc.code} {exc.reason}"
            raise Transient(message) if exc.code >= 500 or exc.code == 429 else RequestFailed(message) from None
        except (OSError, http.client.HTTPException) as exc:  # URLError is an OSError
            raise ExchangeError(f"download failed: {getattr(exc, 'reason', None) or exc}") from exc
        handle.close()
        return handle.name, size, hasher.hexdigest()
    except BaseException:
        handle.close()
        os.unlink(handle.name)
        raise
