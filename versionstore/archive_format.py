"""The archive file format: a POSIX (pax) tar whose first member is `manifest.jsonl`.

    manifest.jsonl                              line 1: the header, then one line per original
    <resource_type>/<type>/<public_id>.<format> the original's bytes, in manifest order

The manifest comes first so an importer can check every member while streaming, without
seeking. Member names come from public IDs, which are hostile input: each path segment is
escaped (no `..`, no absolute path, no empty segment, no control characters) and long or
non-ASCII names go in pax headers. The name is only where the bytes are: an importer takes the
public_id, digests and attributes from the manifest. This module is pure and blocking (run it
in a worker thread); `archives.py` drives it.
"""

import collections
import hashlib
import json
import os
import tarfile
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import IO, Any, TypeVar

import blake3

from versionstore.errors import BadRequest
from versionstore.ids import DELIVERY_TYPES, check_public_id

FORMAT = "versionstore-archive/1"
MANIFEST = "manifest.jsonl"
BLOCK = 512
#: Bytes per read and hash step: large enough that per-call costs (a thread hand-off for MD5,
#: a system call) vanish beside the hashing, small enough to keep memory bounded.
READ = 4 << 20
#: A manifest line per original; one this large would list millions: refuse beyond it.
MAX_MANIFEST = 512 << 20
ENTRY_FIELDS = (
    "path", "public_id", "resource_type", "type", "format", "asset_id", "version_id", "blake3", "md5", "bytes",
    "created_at", "tags", "context", "metadata",
)

RESOURCE_TYPES = ("image", "video", "raw")
Progress = Callable[[int], object]
T = TypeVar("T")
_MD5_THREAD = ThreadPoolExecutor(1, thread_name_prefix="archive-md5")
#: Blocks a verifying reader may hand the MD5 lane before it waits for the oldest.
MD5_AHEAD = 3


class ArchiveInvalid(Exception):
    """The archive is not one this version wrote, or not as its manifest says (tampered,
    truncated, extra or missing members). The message says which member and why."""


def _escaped(text: str) -> str:
    return "".join(f"%{b:02X}" for b in text.encode())


def _segment(text: str) -> str:
    """One path segment, made safe and kept distinct: `%` itself is escaped, so every escape
    is unambiguous; an empty segment becomes `%00` (no public_id holds a NUL)."""
    if text in ("", ".", ".."):
        return _escaped(text) if text else "%00"
    return "".join(_escaped(ch) if ch in "%\\" or ord(ch) < 32 or ord(ch) == 127 else ch for ch in text)


def member_name(resource_type: str, type_: str, public_id: str, fmt: str | None) -> str:
    """`<resource_type>/<type>/<public_id>.<format>` with every segment made safe: the same
    public_id always gives the same name, and no name leaves the archive's root."""
    name = public_id if not fmt or public_id.endswith(f".{fmt}") else f"{public_id}.{fmt}"
    return "/".join(_segment(part) for part in (resource_type, type_, *name.split("/")))


def is_safe(name: str) -> bool:
    parts = name.split("/")
    return not name.startswith("/") and all(p not in ("", ".", "..") for p in parts) and "\\" not in name


# --- writing ------------------------------------------------------------------------------------


def member_header(name: str, size: int, mtime: float) -> bytes:
    """A member's pax header: always the same bytes for the same name, size and time (a
    virtual archive re-makes its headers at every download, archive_compose.py)."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uname, info.gname = size, int(mtime), 0o644, "", ""
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def padding(size: int) -> int:
    """Zero bytes after a member of `size` bytes (to the next block)."""
    return -size % BLOCK


def end_blocks(size: int) -> int:
    """Zero bytes that end an archive whose members fill `size` bytes: two blocks, then up to
    tar's record size."""
    return 2 * BLOCK + (-(size + 2 * BLOCK) % tarfile.RECORDSIZE)


def header_line(header: dict[str, Any]) -> bytes:
    return (json.dumps(header, sort_keys=True, separators=(",", ":")) + "\n").encode()


def entry_line(entry: dict[str, Any]) -> bytes:
    return (json.dumps({k: entry[k] for k in ENTRY_FIELDS}, sort_keys=True, separators=(",", ":")) + "\n").encode()


# --- reading and verifying ---------------------------------------------------------------------


@dataclass
class Manifest:
    header: dict[str, Any]
    entries: list[dict[str, Any]] = field(default_factory=list)


_HEX = frozenset("0123456789abcdef")


def _hex(value: object, length: int) -> bool:
    return isinstance(value, str) and len(value) == length and set(value) <= _HEX


def _entry_problem(entry: dict[str, Any]) -> str | None:
    """What makes an entry unusable, checked as the API checks the same fields: an archive
    imports nothing an upload could not have made."""
    if not isinstance(entry["bytes"], int) or entry["bytes"] < 0:
        return "bytes must be a whole number"
    if entry["resource_type"] not in RESOURCE_TYPES or entry["type"] not in DELIVERY_TYPES:
        return f"bad resource_type or type {entry['resource_type']!r}/{entry['type']!r}"
    if not isinstance(entry["public_id"], str):
        return "public_id must be a string"
    try:
        check_public_id(entry["public_id"])
    except BadRequest as exc:
        return exc.message
    if not _hex(entry["blake3"], 64) or not (entry["md5"] is None or _hex(entry["md5"], 32)):
        return "blake3 and md5 must be hex digests"
    if not (isinstance(entry["tags"], list) and all(isinstance(t, str) for t in entry["tags"])):
        return "tags must be a list of strings"
    if not (isinstance(entry["context"], dict) and all(isinstance(v, str) for v in entry["context"].values())):
        return "context must map names to strings"
    if not isinstance(entry["metadata"], dict):
        return "metadata must be an object"
    if not all(isinstance(entry[k], str) for k in ("asset_id", "version_id")) or not isinstance(entry["created_at"], (int, float)):
        return "asset_id, version_id and created_at are needed"
    return None


def _parse_manifest(data: bytes, size: int) -> Manifest:
    if len(data) != size:
        raise ArchiveInvalid(f"{MANIFEST}: truncated")
    try:
        lines = [json.loads(line) for line in data.decode().splitlines() if line.strip()]
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArchiveInvalid(f"{MANIFEST} is not JSON lines: {exc}") from None
    if not lines or not isinstance(lines[0], dict) or lines[0].get("format") != FORMAT:
        raise ArchiveInvalid(f"{MANIFEST}: not a {FORMAT} archive")
    manifest = Manifest(lines[0], [])
    seen: set[str] = set()
    for number, entry in enumerate(lines[1:], start=2):
        if not isinstance(entry, dict) or any(k not in entry for k in ENTRY_FIELDS):
            raise ArchiveInvalid(f"{MANIFEST} line {number}: needs {', '.join(ENTRY_FIELDS)}")
        path = entry["path"]
        if not isinstance(path, str) or not is_safe(path) or path == MANIFEST or path in seen:
            raise ArchiveInvalid(f"{MANIFEST} line {number}: unsafe or repeated path {path!r}")
        problem = _entry_problem(entry)
        if problem is not None:
            raise ArchiveInvalid(f"{MANIFEST} line {number}: {problem}")
        seen.add(path)
        manifest.entries.append(entry)
    if manifest.header.get("count") != len(manifest.entries):
        raise ArchiveInvalid(f"{MANIFEST}: the header counts {manifest.header.get('count')} entries, it lists {len(manifest.entries)}")
    return manifest


class ArchiveReader:
    """Streams an archive once, checking it against its manifest: the manifest first, then
    exactly its members, each a regular file of the listed size whose BLAKE3 and MD5 match.
    Blocking calls, one at a time (from one worker thread or several in turn). Every
    difference, truncation included, raises ArchiveInvalid."""

    def __init__(self, handle: IO[bytes], *, hashed: bool = True) -> None:
        self.hashed = hashed  # False: members are only read; the caller compares their digests
        # A file on disk: tarfile reads the headers and seeks over the data, which members read
        # with positioned reads (no copies through tarfile's stream buffers).
        self._fd = handle.fileno()
        self._tar = _tar_errors(lambda: tarfile.open(fileobj=handle, mode="r:"))
        first = self._next_info()
        if first is None or first.name != MANIFEST or not first.isreg():
            raise ArchiveInvalid(f"the first member must be {MANIFEST}")
        if first.size > MAX_MANIFEST:
            raise ArchiveInvalid(f"{MANIFEST} is larger than {MAX_MANIFEST} bytes")
        self.manifest = _parse_manifest(_tar_errors(lambda: os.pread(self._fd, first.size, first.offset_data)), first.size)
        self._expected = {e["path"]: e for e in self.manifest.entries}
        self._current: Member | None = None

    def _next_info(self) -> tarfile.TarInfo | None:
        info = _tar_errors(self._tar.next)
        self._tar.members.clear()  # type: ignore[attr-defined]  # tarfile keeps every header it read: memory bounded per member, not per archive
        return info

    def next_member(self, progress: Progress | None = None) -> "Member | None":
        """The next member, unread; None at the end, once every listed member was seen."""
        if self._current is not None:
            self._current.check()
        self._current = None
        info = self._next_info()
        if info is None:
            if self._expected:
                missing = next(iter(self._expected))
                raise ArchiveInvalid(f"{missing}: in the manifest, not in the archive ({len(self._expected)} missing: truncated?)")
            return None
        entry = self._expected.pop(info.name, None)
        if entry is None:
            raise ArchiveInvalid(f"{info.name}: not in the manifest (or there twice)")
        if not info.isreg() or info.size != entry["bytes"]:
            raise ArchiveInvalid(f"{info.name}: {info.size} bytes of type {info.type!r}, the manifest says a file of {entry['bytes']}")
        self._current = Member(entry, self._fd, info.offset_data, progress, self.hashed)
        return self._current

    def close(self) -> None:
        self._tar.close()


def verify(handle: IO[bytes], progress: Progress | None = None) -> Manifest:
    """Read the whole archive, checking every member; its manifest."""
    reader = ArchiveReader(handle)
    try:
        while (member := reader.next_member(progress)) is not None:
            member.check()
    finally:
        reader.close()
    return reader.manifest


def _tar_errors(call: Callable[[], T]) -> T:
    try:
        return call()
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise ArchiveInvalid(f"not a complete tar archive: {exc}") from None


class Member:
    """One member read through its hashes (MD5 on a second thread, beside BLAKE3): what the
    caller reads is what gets checked. The MD5 lane takes the blocks in order and the reader
    runs up to MD5_AHEAD blocks ahead of it, so the serial hash always has the next block
    waiting. Unhashed, the caller compares the digests it computed while writing the bytes
    somewhere (`compare`)."""

    def __init__(self, entry: dict[str, Any], fd: int, offset: int, progress: Progress | None, hashed: bool = True) -> None:
        self.entry, self.left, self.progress, self.hashed = entry, int(entry["bytes"]), progress, hashed
        self.fd, self.offset = fd, offset
        self.blake3 = blake3.blake3()  # one thread: the MD5 lane has the other core
        # No MD5 to check (a version older than MD5s): none computed here, the importer's
        # staging computes the one the new version records.
        self.md5 = hashlib.md5(usedforsecurity=False) if entry["md5"] is not None else None
        self._md5_pending: collections.deque[Future[None]] = collections.deque()
        self._checked = False

    def read(self, size: int = READ) -> bytes:
        data = _tar_errors(lambda: os.pread(self.fd, min(size, self.left), self.offset)) if self.left else b""
        if self.left and not data:
            raise ArchiveInvalid(f"{self.entry['path']}: truncated")
        self.left -= len(data)
        self.offset += len(data)
        if self.hashed and data:
            if self.md5 is not None:  # both hashes release the GIL
                self._md5_pending.append(_MD5_THREAD.submit(self.md5.update, data))
                while len(self._md5_pending) > MD5_AHEAD:  # memory: MD5_AHEAD blocks
                    self._md5_pending.popleft().result()
            self.blake3.update(data)
        if self.progress is not None:
            self.progress(len(data))
        return data

    def _md5_hexdigest(self) -> str | None:
        while self._md5_pending:
            self._md5_pending.popleft().result()
        return self.md5.hexdigest() if self.md5 is not None else None

    def readinto(self, buffer: memoryview) -> int:
        """The next bytes into `buffer` (at most its length), unhashed: for a caller that hashes
        what it reads itself (staging.Stager) and then `compare`s. One copy, no allocation."""
        want = min(len(buffer), self.left)
        if not want:
            return 0
        got = _tar_errors(lambda: os.preadv(self.fd, [buffer[:want]], self.offset))
        if not got:
            raise ArchiveInvalid(f"{self.entry['path']}: truncated")
        self.left -= got
        self.offset += got
        if self.progress is not None:
            self.progress(got)
        return got

    def check(self) -> None:
        """Read what is left, then compare both digests with the manifest's. Unhashed, there is
        nothing to compare: the rest is not read (tarfile checks that it is there)."""
        if self._checked or not self.hashed:
            return
        while self.read():
            pass
        self._checked = True
        if self.hashed:
            self.compare(self.blake3.hexdigest(), self._md5_hexdigest())

    def compare(self, actual_blake3: str, actual_md5: str | None) -> None:
        """The digests of the bytes read against the manifest's (`actual_md5` None: no MD5 was
        computed here, as for an entry without one)."""
        entry = self.entry
        if actual_blake3 != entry["blake3"]:
            raise ArchiveInvalid(f"{entry['path']}: BLAKE3 {actual_blake3} does not match the manifest's {entry['blake3']}")
        if entry["md5"] is not None and actual_md5 is not None and actual_md5 != entry["md5"]:  # None: not computed here
            raise ArchiveInvalid(f"{entry['path']}: MD5 {actual_md5} does not match the manifest's {entry['md5']}")


