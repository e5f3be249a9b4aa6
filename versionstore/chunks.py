"""Chunked uploads (`upload_large`): private parts, published read-only, assembled into a new file.

Sessions are keyed by the client's `X-Unique-Upload-Id`. Python sends the real total on every
chunk; Node sends `/-1` until the last one. The life of one chunk:

1. `receive`: its bytes go to a private file (`spool/chunks/<random>.recv`, O_EXCL) that only
   this request ever opens, bounded by its Content-Range length.
2. The request is authenticated over all of its fields (the caller's job), then `commit`
   links the file create-only to `<random>.chunk`, read-only, and records it in the session
   (a database transaction that refuses a session that is not open).
3. The chunk that completes [0, total) claims the session (open -> assembling, a conditional
   UPDATE) and `assemble`s: the parts are copied in order into a new spool file while it is
   hashed. No chunk writer ever had that file open; it is what the upload path links.

So published bytes are immutable by construction: a late or duplicate chunk only ever writes
its own private file, and is refused at step 2 once the session is assembling or finished.

Several processes: the parts live in the data directory's spool and the sessions in the shared
database, so the chunks of one upload may reach different `--workers` of one machine. Servers
on several machines need a shared spool (or sticky routing); a part recorded by a server whose
spool this one cannot see is refused with a 409 that says so, never assembled short; the
client's retry of a chunk on a server that cannot read the recorded copy of its range replaces
that copy, so the server holding the other parts can finish.
"""

import asyncio
import contextlib
import logging
import os
import re
import secrets
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from versionstore.config import Config
from versionstore.durable import fsync_path
from versionstore.errors import BadRequest, Conflict, TooLarge
from versionstore.models import SessionState, UploadPart, UploadSession
from versionstore.repository import MetadataRepository
from versionstore.spool import BLOCK, Spooled, SpoolFile

log = logging.getLogger(__name__)

_UPLOAD_ID = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(-1|\d+)$")
#: Cloudinary's rule (and the S3 multipart minimum): every chunk but the last is >= 5 MiB.
MIN_PART = 5 << 20
#: The assembling request renews its claim every quarter of this; a claim not renewed for
#: this long belongs to a process that died, and the sweep reopens the session.
ASSEMBLY_LEASE = 120.0
#: Files in spool/chunks/ that no session records are removed once this old.
ORPHAN_AGE = 3600.0


@dataclass(frozen=True)
class ChunkRange:
    start: int
    end: int  # exclusive
    total: int | None

    @property
    def size(self) -> int:
        return self.end - self.start

    @property
    def last(self) -> bool:
        return self.total is not None and self.end == self.total


def parse_content_range(header: str) -> ChunkRange:
    match = _CONTENT_RANGE.match(header.strip())
    if not match:
        raise BadRequest(f"Invalid Content-Range header - {header}")
    start, last, total = int(match[1]), int(match[2]), int(match[3])
    if last < start or (total >= 0 and last >= total):
        raise BadRequest(f"Invalid Content-Range header - {header}")
    return ChunkRange(start, last + 1, None if total < 0 else total)


@dataclass(frozen=True)
class Progress:
    """What a committed chunk leaves: the session, bytes received, and the parts to assemble
    with the claim token when this chunk completed the upload."""

    session: UploadSession
    received: int
    parts: list[UploadPart] | None = None
    token: str | None = None


def _covered(parts: list[UploadPart]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for part in sorted(parts, key=lambda p: (p.first, p.end)):
        if merged and part.first <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], part.end))
        else:
            merged.append((part.first, part.end))
    return merged


def _pieces(parts: list[UploadPart], total: int) -> list[tuple[UploadPart, int, int]]:
    """(part, offset in it, length) tiling [0, total): greedy, furthest-reaching part first,
    so overlapping retries with other boundaries still assemble each byte once."""
    ordered = sorted(parts, key=lambda p: (p.first, p.end))
    pieces: list[tuple[UploadPart, int, int]] = []
    position, index, best = 0, 0, None
    while position < total:
        while index < len(ordered) and ordered[index].first <= position:
            if best is None or ordered[index].end > best.end:
                best = ordered[index]
            index += 1
        if best is None or best.end <= position:
            raise RuntimeError(f"parts do not cover byte {position}")  # checked before the claim
        pieces.append((best, position - best.first, best.end - position))
        position = best.end
    return pieces


def _write_all(fd: int, blocks: list[bytes]) -> None:
    for block in blocks:
        view = memoryview(block)
        while view:
            view = view[os.write(fd, view) :]



class ChunkAssembler:
    def __init__(self, meta: MetadataRepository, config: Config, new_spool: Callable[[], SpoolFile]) -> None:
        self.meta = meta
        self.config = config
        self.directory = config.spool_dir / "chunks"
        self.directory.mkdir(parents=True, exist_ok=True)
        self._new_spool = new_spool

    def check(self, upload_id: str, chunk: ChunkRange) -> None:
        """What the headers alone decide, before a byte of the body is read."""
        if not _UPLOAD_ID.match(upload_id):
            raise BadRequest("Invalid X-Unique-Upload-Id header")
        limit = self.config.max_upload_bytes
        if chunk.end > limit or (chunk.total or 0) > limit:
            raise TooLarge(f"File size too large. Maximum is {limit}.")
        if chunk.size > self.config.max_chunk_bytes:
            raise BadRequest(f"Chunk too large: {chunk.size} bytes. Maximum is {self.config.max_chunk_bytes}.")
        if not chunk.last and chunk.size < MIN_PART:
            raise BadRequest("All parts except EOF-chunk must be larger than 5mb")

    async def receive(self, chunk: ChunkRange, body: AsyncIterator[bytes]) -> Path:
        """The chunk's bytes in a new private file (fsynced); removed again on any failure."""
        path = self.directory / f"{secrets.token_hex(12)}.recv"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        written, pending_size = 0, 0
        pending: list[bytes] = []
        try:
            async for data in body:
                written += len(data)
                if written > chunk.size:
                    raise BadRequest("Chunk is larger than its Content-Range")
                pending.append(data)
                pending_size += len(data)
                if pending_size >= BLOCK:
                    await asyncio.to_thread(_write_all, fd, pending)
                    pending, pending_size = [], 0
            await asyncio.to_thread(_write_all, fd, pending)
            if written != chunk.size:
                raise BadRequest(f"Chunk has {written} bytes but its Content-Range says {chunk.size}")
            await asyncio.to_thread(os.fsync, fd)  # durable before any session names it
        except BaseException:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        os.close(fd)
        return path

    async def commit(
        self, cloud: str, upload_id: str, rt: str, chunk: ChunkRange, received: Path, public_id: str, named: tuple[str, ...]
    ) -> Progress:
        """Publish an authenticated chunk into its session (opening it if needed).

        `public_id` is the id a new session takes; `named` are the ids this chunk asks for
        explicitly (it must be the session's). Claims the session when it is complete."""
        published = self.directory / f"{secrets.token_hex(12)}.chunk"
        try:
            # Create-only: link() never replaces a name. The part is read-only from here on.
            await asyncio.to_thread(self._publish, received, published)
        except FileNotFoundError:
            raise BadRequest("Chunk expired before it was recorded; send it again") from None
        part = UploadPart(chunk.start, chunk.end, published.name)
        try:
            decide = self._decider(cloud, upload_id, rt, chunk, public_id, named)
            session, added, parts = await self.meta.add_upload_part(cloud, upload_id, part, decide)
        except BaseException:
            published.unlink(missing_ok=True)
            raise
        if not added:  # the same range again (a retry): the first copy stays, if this process can read it
            parts = await self._take_over_unreadable(cloud, upload_id, part, parts) or parts
            if part not in parts:
                published.unlink(missing_ok=True)
        covered = _covered(parts)
        progress = Progress(session, sum(end - start for start, end in covered))
        if session.total is None or covered != [(0, session.total)]:
            return progress
        token = secrets.token_hex(16)
        claimed = await self.meta.claim_upload_session(cloud, upload_id, token)
        if claimed is None:
            raise BadRequest(f"Upload {upload_id} is being assembled; its chunks cannot change")
        return replace(progress, parts=claimed, token=token)

    async def _take_over_unreadable(self, cloud: str, upload_id: str, part: UploadPart, parts: list[UploadPart]) -> list[UploadPart] | None:
        """A retry of a range whose recorded copy is not in this spool (a server on another
        machine received it; assembling here answered 409) replaces that copy with its own, so
        the server the client retries on can finish the upload. Else the session would wait
        for a part no server that holds the others can read."""
        recorded = next((p for p in parts if (p.first, p.end) == (part.first, part.end)), None)
        if recorded is None or await asyncio.to_thread((self.directory / recorded.file).exists):
            return None
        log.info("upload %s/%s: chunk %d-%d recorded on another server's spool; this retry's copy replaces it",
                 cloud, upload_id, part.first, part.end)
        return await self.meta.replace_upload_part(cloud, upload_id, recorded.file, part)

    @staticmethod
    def _publish(received: Path, published: Path) -> None:
        os.link(received, published)
        os.chmod(published, 0o444)
        fsync_path(published.parent)  # the name survives a crash before the row names it
        received.unlink()

    def _decider(
        self, cloud: str, upload_id: str, rt: str, chunk: ChunkRange, public_id: str, named: tuple[str, ...]
    ) -> Callable[[UploadSession | None, int, int], UploadSession]:
        config = self.config

        def decide(existing: UploadSession | None, others: int, others_claimed: int) -> UploadSession:
            now = time.time()
            if existing is None:
                if others >= config.chunk_sessions_max:
                    raise BadRequest(
                        f"Too many chunked uploads in progress ({others}); the limit is {config.chunk_sessions_max}. "
                        "Finish one or wait until idle ones expire"
                    )
                session = UploadSession(cloud, upload_id, rt, public_id, chunk.total, 0, SessionState.OPEN, now, now)
            else:
                session = _continued(existing, upload_id, rt, chunk, named)
            claimed = session.total if session.total is not None else max(session.claimed, chunk.end)
            if others_claimed + claimed > config.chunk_sessions_max_bytes:
                raise BadRequest(
                    f"Too many bytes in chunked uploads in progress: {others_claimed + claimed} would exceed "
                    f"{config.chunk_sessions_max_bytes}"
                )
            return replace(session, claimed=claimed, updated_at=now)

        return decide

    @asynccontextmanager
    async def claimed(self, progress: Progress) -> AsyncIterator[None]:
        """Hold the claim while the assembly and its publication run: renew its lease, and
        reopen the session if they fail (a retried chunk then finishes it)."""
        assert progress.token is not None
        session, token = progress.session, progress.token

        async def renew() -> None:
            while True:
                await asyncio.sleep(ASSEMBLY_LEASE / 4)
                await self.meta.renew_upload_claim(session.cloud, session.upload_id, token)

        renewer = asyncio.create_task(renew(), name=f"claim {session.cloud}/{session.upload_id}")
        try:
            yield
        except BaseException:
            await self.meta.reopen_upload_session(session.cloud, session.upload_id, token)
            raise
        finally:
            renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewer

    async def assemble(self, progress: Progress) -> Spooled:
        """Copy the parts in order into a new spool file, hashing as it goes."""
        assert progress.parts is not None and progress.session.total is not None
        spool = self._new_spool()
        try:
            for part, offset, length in _pieces(progress.parts, progress.session.total):
                await self._copy(self.directory / part.file, offset, length, spool)
            return await spool.finish(sync=False)  # the upload path makes it durable before linking
        except BaseException:
            spool.discard()
            raise

    @staticmethod
    async def _copy(path: Path, offset: int, length: int, spool: SpoolFile) -> None:
        try:
            fd = await asyncio.to_thread(os.open, path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            # Recorded in the shared database, but its bytes are on another machine's spool:
            # refuse clearly; the session reopens, so the chunks can go where they belong.
            raise Conflict(
                f"A chunk of this upload was received by another server whose spool this one cannot read; "
                f"chunked uploads need a shared spool directory or sticky routing (docs/scale-out.md). "
                f"Send the remaining chunks to the server that received the first ones (missing part {path.name})"
            ) from None
        try:
            end = offset + length
            while offset < end:
                data = await asyncio.to_thread(os.pread, fd, min(BLOCK, end - offset), offset)
                if not data:
                    raise RuntimeError(f"chunk part {path.name} is shorter than recorded")
                await spool.write(data)
                offset += len(data)
        finally:
            os.close(fd)

    async def finish(self, progress: Progress) -> None:
        """The upload is published: mark the session finished and remove its parts."""
        assert progress.token is not None
        session = progress.session
        for name in await self.meta.finish_upload_session(session.cloud, session.upload_id, progress.token):
            (self.directory / name).unlink(missing_ok=True)

    async def sweep(self, now: float | None = None) -> None:
        """Drop idle sessions with their parts, reopen assemblies of dead processes, and remove
        files no session records (a crash while receiving or between link and record)."""
        now = time.time() if now is None else now
        expired = await self.meta.expire_upload_sessions(now - self.config.chunk_session_ttl, now - ASSEMBLY_LEASE)
        for name in expired:
            (self.directory / name).unlink(missing_ok=True)
        recorded = await self.meta.upload_part_files()
        await asyncio.to_thread(self._remove_orphans, recorded, now - ORPHAN_AGE)

    def _remove_orphans(self, recorded: set[str], before: float) -> None:
        for path in self.directory.iterdir():
            try:
                info = path.stat()
            except FileNotFoundError:
                continue
            if max(info.st_mtime, info.st_ctime) < before and path.name not in recorded:
                path.unlink(missing_ok=True)
        for legacy in self.config.spool_dir.glob("*--*.chunks"):  # the layout before parts
            legacy.unlink(missing_ok=True)

    async def run_sweeper(self) -> None:
        while True:
            await asyncio.sleep(self.config.chunk_sweep_interval)
            try:
                await self.sweep()
            except Exception:
                log.exception("chunk session sweep failed; it runs again in %s s", self.config.chunk_sweep_interval)


def _continued(existing: UploadSession, upload_id: str, rt: str, chunk: ChunkRange, named: tuple[str, ...]) -> UploadSession:
    """The session after a further chunk, or a 400 when the chunk contradicts it."""
    if existing.state is SessionState.FINISHED:
        raise BadRequest(f"Upload {upload_id} is already finished; its chunks cannot change")
    if existing.state is not SessionState.OPEN:
        raise BadRequest(f"Upload {upload_id} is being assembled; its chunks cannot change")
    if existing.resource_type != rt:
        raise BadRequest(f"resource_type {rt} differs from the upload's ({existing.resource_type})")
    if named and existing.public_id not in named:
        raise BadRequest(f"public_id {named[0]} differs from the upload's ({existing.public_id})")
    total = existing.total
    if chunk.total is not None:
        if total is not None and chunk.total != total:
            raise BadRequest(f"Content-Range total {chunk.total} differs from the upload's ({total})")
        if total is None and existing.claimed > chunk.total:
            raise BadRequest(f"Content-Range total {chunk.total} is smaller than the chunks received ({existing.claimed})")
        total = chunk.total
    if total is not None and chunk.end > total:
        raise BadRequest(f"Chunk starts at {chunk.start}, beyond the upload's total ({total})" if chunk.start >= total
                         else f"Chunk ends at {chunk.end}, beyond the upload's total ({total})")
    return replace(existing, total=total)
