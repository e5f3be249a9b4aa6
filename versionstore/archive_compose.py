"""The virtual archive: an export's tar described once, composed from the revisions at each read.

An export copies no bytes (docs/snapshots.md, "Export"; docs/design.md). Its *layout* is a small
object in the default backup store that re-makes the tar byte for byte, the same bytes the
former copying writer produced:

    line 1   {"format": LAYOUT_FORMAT, "size", "count", "manifest": <its size>, "created_at"}
    then     the manifest member's bytes (archive_format: header line, one line per original)
    then     one JSON line per original: [offset of its header in the tar, header size, path,
             size, created_at, blake3]

A member's header is re-made from (path, size, created_at) (`archive_format.member_header`,
deterministic) and its bytes are read from the environment's revision `<cloud>/revisions/<blake3>`
(the key is derived from the archive's own environment, never read from the layout). Every
member read whole is checked against its BLAKE3 on the way out and its last chunk held back
until it matches; a full read is also checked against the whole archive's BLAKE3. So a damaged
or vanished revision cuts the transfer, it never serves wrong bytes.

Blocking file reads of the layout are small lines (the manifest is streamed in blocks); member
bytes stream through `BlobStore.read`, one chunk ahead: memory stays bounded per read.
"""

import asyncio
import json
import mmap
import os
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import blake3

from versionstore import archive_format as fmt
from versionstore import layout
from versionstore.blobstore import BlobNotFound, BlobStore
from versionstore.staging import write_soon
from versionstore.verify import INLINE_HASH

LAYOUT_FORMAT = "versionstore-archive-layout/1"
#: Bytes per read of the manifest out of the layout file.
MANIFEST_READ = 1 << 20


class MemberFailed(fmt.ArchiveInvalid):
    """A member's revision is missing or no longer hashes to its name: the composed stream
    stops before that member's last bytes."""


@dataclass(frozen=True)
class Segment:
    """A stretch of the tar: literal bytes (`data`: a header, padding, the end blocks), the
    manifest (`manifest`: read from the layout file) or an original's bytes (`blake3`)."""

    start: int
    size: int
    data: bytes = b""
    manifest: bool = False
    path: str = ""
    blake3: str = ""


# --- describing: the layout file -------------------------------------------------------------------


def write_layout(out: Path, header: dict[str, Any], entries_path: Path) -> tuple[int, int]:
    """The layout of the archive whose manifest is `header` then the spooled entry lines at
    `entries_path` (one original each, in member order): written to `out`; (tar size, count).
    Blocking; bounded memory (lines are streamed twice)."""
    first = fmt.header_line(header)
    manifest_size = len(first) + entries_path.stat().st_size
    created_at = header["created_at"]
    members = out.with_name(out.name + ".members")
    position = len(fmt.member_header(fmt.MANIFEST, manifest_size, created_at)) + manifest_size + fmt.padding(manifest_size)
    count = 0
    try:
        with entries_path.open("rb") as entries, members.open("wb") as lines:
            for line in entries:
                entry = json.loads(line)
                head = len(fmt.member_header(entry["path"], entry["bytes"], entry["created_at"]))
                row = [position, head, entry["path"], entry["bytes"], entry["created_at"], entry["blake3"]]
                lines.write(json.dumps(row, separators=(",", ":")).encode() + b"\n")
                position += head + entry["bytes"] + fmt.padding(entry["bytes"])
                count += 1
        size = position + fmt.end_blocks(position)
        description = {"format": LAYOUT_FORMAT, "size": size, "count": count, "manifest": manifest_size, "created_at": created_at}
        with out.open("wb") as handle, entries_path.open("rb") as entries, members.open("rb") as lines:
            handle.write(json.dumps(description, sort_keys=True).encode() + b"\n")
            handle.write(first)
            shutil.copyfileobj(entries, handle, MANIFEST_READ)
            shutil.copyfileobj(lines, handle, MANIFEST_READ)
    finally:
        members.unlink(missing_ok=True)
    return size, count


class Layout:
    """A layout file read back: its description, and the tar's segments in order."""

    def __init__(self, handle: IO[bytes]) -> None:
        self.handle = handle
        try:
            description = json.loads(handle.readline())
            if description.get("format") != LAYOUT_FORMAT:
                raise ValueError(description.get("format"))
            self.size, self.count = int(description["size"]), int(description["count"])
            self.manifest_size, self.created_at = int(description["manifest"]), float(description["created_at"])
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise fmt.ArchiveInvalid(f"not an archive layout: {exc}") from None
        self.manifest_at = handle.tell()

    def segments(self, start: int = 0) -> Iterator[Segment]:
        """The segments that end after `start`, in order (members wholly before it are
        skipped by their recorded offsets, their headers never re-made)."""
        manifest_head = fmt.member_header(fmt.MANIFEST, self.manifest_size, self.created_at)
        for segment in (Segment(0, len(manifest_head), manifest_head), Segment(len(manifest_head), self.manifest_size, manifest=True)):
            if segment.start + segment.size > start:
                yield segment
        position = len(manifest_head) + self.manifest_size
        yield from _zeros(position, fmt.padding(self.manifest_size), start)
        self.handle.seek(self.manifest_at + self.manifest_size)
        position += fmt.padding(self.manifest_size)
        for line in self.handle:
            offset, head, path, size, created_at, digest = json.loads(line)
            if offset != position:
                raise fmt.ArchiveInvalid(f"archive layout: {path} at {offset}, expected at {position}")
            end = offset + head + size + fmt.padding(size)
            if end > start:
                header = fmt.member_header(path, size, created_at)
                if len(header) != head:
                    raise fmt.ArchiveInvalid(f"archive layout: {path}'s header is not the one described")
                yield Segment(offset, head, header)
                if size:
                    yield Segment(offset + head, size, path=path, blake3=digest)
                yield from _zeros(offset + head + size, fmt.padding(size), start)
            position = end
        if position + fmt.end_blocks(position) != self.size:
            raise fmt.ArchiveInvalid(f"archive layout: {position + fmt.end_blocks(position)} bytes, described as {self.size}")
        yield from _zeros(position, fmt.end_blocks(position), start)

    def read_manifest(self, lo: int, hi: int) -> bytes:
        self.handle.seek(self.manifest_at + lo)
        return self.handle.read(hi - lo)


def _zeros(start: int, size: int, after: int) -> Iterator[Segment]:
    if size and start + size > after:
        yield Segment(start, size, bytes(size))


def entries(layout_file: IO[bytes]) -> Iterator[dict[str, Any]]:
    """The manifest's entries of a layout file (from its start)."""
    layout_file.seek(0)
    described = Layout(layout_file)
    layout_file.seek(described.manifest_at)
    left = described.manifest_size
    layout_file.readline()  # the manifest's header line
    left -= layout_file.tell() - described.manifest_at
    while left > 0:
        line = layout_file.readline()
        left -= len(line)
        yield json.loads(line)


# --- composing ---------------------------------------------------------------------------------


#: Before each member: raise to stop the stream (the archive was withdrawn meanwhile).
BeforeMember = Callable[[], Awaitable[None]]


async def compose(
    described: Layout, store: BlobStore, cloud: str, start: int, stop: int, digest: str | None = None,
    before_member: BeforeMember | None = None, whole: Any = None,
) -> AsyncIterator[bytes]:
    """The tar's bytes [start, stop). Each member read whole is proven by its BLAKE3 before
    its last chunk is yielded; with `digest` and the whole range, the archive too before its
    end blocks (`whole`: the hasher fed every byte of a full read, made here when not given).
    MemberFailed (or ArchiveInvalid) stops the stream early: never wrong bytes."""
    if (start, stop) != (0, described.size):
        whole = digest = None
    elif whole is None and digest is not None:
        whole = blake3.blake3(max_threads=blake3.blake3.AUTO)
    segments = described.segments(start)  # small buffered line reads: inline
    for segment in segments:
        if segment.start >= stop:
            return
        if segment.start + segment.size <= start:  # before the range (its member's padding is not)
            continue
        lo, hi = max(start, segment.start) - segment.start, min(stop, segment.start + segment.size) - segment.start
        if segment.blake3:
            if before_member is not None:
                await before_member()
            key = layout.revision_key(cloud, segment.blake3)
            async for chunk in _member(store, key, segment, lo, hi, whole):
                yield chunk
            continue
        if segment.manifest:
            for at in range(lo, hi, MANIFEST_READ):
                chunk = await asyncio.to_thread(described.read_manifest, at, min(hi, at + MANIFEST_READ))
                await _update(chunk, whole)
                yield chunk
            continue
        chunk = segment.data[lo:hi]
        if whole is not None:
            whole.update(chunk)
            last = segment.start + segment.size == described.size
            if last and digest is not None and (actual := whole.hexdigest()) != digest:
                raise fmt.ArchiveInvalid(f"the composed archive hashes to {actual}, not {digest}")
        yield chunk


async def _member(store: BlobStore, key: str, segment: Segment, lo: int, hi: int, whole: Any) -> AsyncIterator[bytes]:
    """A member's bytes [lo, hi), one chunk read ahead; read whole, hashed and its last chunk
    held back until the hash matches."""
    checked = blake3.blake3(max_threads=blake3.blake3.AUTO) if (lo, hi) == (0, segment.size) else None
    chunks = store.read(key, lo, hi)
    sent = 0
    try:
        held: bytes | None = None
        following = asyncio.ensure_future(anext(chunks, None))
        try:
            while (chunk := await following) is not None:
                following = asyncio.ensure_future(anext(chunks, None))
                await _update(chunk, whole, checked)
                if held is not None:
                    yield held
                    sent += len(held)
                held = chunk
        finally:
            if not following.done():
                following.cancel()
                await asyncio.gather(following, return_exceptions=True)
    except BlobNotFound:
        raise MemberFailed(f"{segment.path}: revision {segment.blake3} is missing from backup storage") from None
    finally:
        await chunks.aclose()  # type: ignore[attr-defined]
    got = sent + (len(held) if held is not None else 0)
    if got != hi - lo:
        raise MemberFailed(f"{segment.path}: revision {segment.blake3} has {got - (hi - lo):+d} bytes against its size in backup storage")
    if checked is not None and (actual := checked.hexdigest()) != segment.blake3:
        raise MemberFailed(f"{segment.path}: revision {segment.blake3} hashes to {actual} in backup storage")
    if held is not None:
        yield held


async def _update(data: bytes, *hashers: Any) -> None:
    """Feed `data` to each hasher given (None: skipped), off the event loop when it is large."""
    live = [h for h in hashers if h is not None]
    if not live:
        return
    if len(data) < INLINE_HASH:
        for hasher in live:
            hasher.update(data)
        return
    await asyncio.to_thread(_feed, live, data)


def _feed(hashers: list[Any], data: bytes) -> None:
    for hasher in hashers:
        hasher.update(data)


async def hashed(
    described: Layout, store: BlobStore, cloud: str, out: IO[bytes] | None = None, progress: fmt.Progress | None = None,
) -> str:
    """The whole tar composed once, every member proven by its BLAKE3 while the tar is hashed
    (in the same step); its BLAKE3. Written to `out` (the CLI's export), or nowhere (the export
    job's check pass)."""
    hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
    if out is None and store.local_path(layout.revision_key(cloud, "0" * 64)) is not None:
        return await _hashed_in_place(described, store, cloud, hasher, progress)
    async for chunk in compose(described, store, cloud, 0, described.size, whole=hasher):
        if out is not None:
            await asyncio.wrap_future(write_soon(out, chunk))  # all of it, on the write thread
        if progress is not None:
            progress(len(chunk))
    return hasher.hexdigest()


async def _hashed_in_place(described: Layout, store: BlobStore, cloud: str, whole: Any, progress: fmt.Progress | None) -> str:
    """`hashed` with nothing to write, on a local store: each member's file mapped once and
    fed to both hashers (its own and the tar's) on a worker thread, where BLAKE3 uses every
    core; chunked reads through the store cost the check pass ~4x the time on 512 MiB."""
    for segment in described.segments(0):
        if segment.blake3:
            path = store.local_path(layout.revision_key(cloud, segment.blake3))
            assert path is not None
            await asyncio.to_thread(_prove_in_place, path, segment, whole)
        elif segment.manifest:
            for at in range(0, segment.size, MANIFEST_READ):
                whole.update(await asyncio.to_thread(described.read_manifest, at, min(segment.size, at + MANIFEST_READ)))
        else:
            whole.update(segment.data)
        if progress is not None:
            progress(segment.size)
    return str(whole.hexdigest())


def _prove_in_place(path: str, segment: Segment, whole: Any) -> None:
    """Feed a member's file to the tar's hasher and prove it against its BLAKE3 (MemberFailed
    with the same reasons as a streamed read: missing, wrong size, wrong bytes)."""
    checked = blake3.blake3(max_threads=blake3.blake3.AUTO)
    try:
        handle = open(path, "rb")  # noqa: SIM115 (closed below, after the mapping)
    except FileNotFoundError:
        raise MemberFailed(f"{segment.path}: revision {segment.blake3} is missing from backup storage") from None
    with handle:
        size = os.fstat(handle.fileno()).st_size
        if size != segment.size:
            raise MemberFailed(
                f"{segment.path}: revision {segment.blake3} has {size - segment.size:+d} bytes against its size in backup storage"
            )
        if size:
            with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
                checked.update(mapped)
                whole.update(mapped)
    if (actual := checked.hexdigest()) != segment.blake3:
        raise MemberFailed(f"{segment.path}: revision {segment.blake3} hashes to {actual} in backup storage")
