"""Claims across processes: what keeps blobs, target switches and background work correct
when several service processes (and the CLI) share one database and one set of stores.

- `writing()` journals a blob write before it starts (`inflight_writes`) and waits while a
  deletion of the same digest, or (for revisions) a switch of the environment's target, holds
  its claim. The metadata commit that names the blob removes the journal rows in its own
  transaction; a write that ends otherwise expires them, and `collect_expired()` decides.
- `deleting()` claims a digest for deletion and says whether anything still uses it: a blob is
  deleted only when no version, no pending revision and no live in-flight write references it.
- `switching_target()` holds an environment's target exclusively (a migration's last pass).
- Leases are renewed by one heartbeat per process (`run_heartbeat`); a process that dies stops
  renewing, and its claims lapse after `lease` seconds.

This module does not know about HTTP. The SQL is in MetadataRepository.
"""

import asyncio
import logging
import os
import secrets
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from versionstore.repository import MetadataRepository

log = logging.getLogger(__name__)

#: Seconds a claim outlives its holder's last heartbeat (VERSIONSTORE_LEASE_SECONDS).
DEFAULT_LEASE = 30.0
#: How long a writer waits between looks at a deletion or switch that blocks it.
WAIT_STEP = 0.02

ORIGINAL, REVISION, PENDING, RELEASE = "original", "revision", "pending", "release"


def new_owner() -> str:
    """A name for this process in claims: host, pid and a random part (pids are reused)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


@dataclass
class WriteTicket:
    """The journal rows of one write; `commit_ids()` hands them to the metadata commit."""

    ids: list[int]
    committed: bool = False
    #: What the rows journal: the digest and the (role, target) of each row, in order.
    digest: str = ""
    roles: list[tuple[str, str | None]] = field(default_factory=list)
    #: Set by a writer that checks the references itself after the write (then the rows are
    #: simply removed instead of left, expired, to orphan collection).
    settled: bool = False
    _handed: list[int] = field(default_factory=list)
    #: `release` rows journaled with the write (`writing(releasing=...)`): the caller wraps the
    #: releases after its commit in `released(release_ids)`.
    release_ids: list[int] = field(default_factory=list)

    def commit_ids(self) -> list[int]:
        """Ids for save_version/mark_backed_up(done_writes=...); once they commit, the rows are gone."""
        self._handed = list(self.ids)
        return self._handed


class Claims:
    def __init__(self, meta: MetadataRepository, *, owner: str | None = None, lease: float = DEFAULT_LEASE) -> None:
        self.meta = meta
        self.owner = owner or new_owner()
        self.lease = lease

    def lease_until(self) -> float:
        return time.time() + self.lease

    # --- blob writes ------------------------------------------------------------------------

    @asynccontextmanager
    async def writing(
        self, cloud: str, digest: str, roles: Sequence[tuple[str, str | None]], *, releasing: Sequence[str] = ()
    ) -> AsyncIterator[WriteTicket]:
        """Journal a write of `digest`'s blobs in these (role, target) places for its duration.

        The journal row is committed first and the claims of others read second, so a deletion
        racing with this write either sees the row (and keeps the blob) or is seen here (and
        waited for). When the body leaves normally after a commit that took the rows
        (`ticket.commit_ids()`), nothing is left to do; otherwise the rows expire at once and
        orphan collection removes whatever blob nothing references.

        `releasing`: digests the commit stops referencing, journaled as `releasing()` would but
        in the same transaction as the write's rows (one commit, one fsync, instead of two).
        Their rows outlive the body when it leaves normally (`ticket.release_ids`: the caller
        releases under `released()`), and expire with the others when it raises."""
        async with self.writing_many(cloud, [digest], roles, releasing=releasing) as tickets:
            yield tickets[0]

    @asynccontextmanager
    async def writing_many(
        self, cloud: str, digests: Sequence[str], roles: Sequence[tuple[str, str | None]], *, releasing: Sequence[str] = ()
    ) -> AsyncIterator[list[WriteTicket]]:
        """`writing` of several digests, journaled in one transaction (a batched import): one
        ticket per digest, in order (the `releasing` rows on the first)."""
        tickets = await self.begin_writing(cloud, digests, roles, releasing=releasing)
        try:
            yield tickets
        except BaseException:
            await asyncio.shield(self.end_writing(tickets, expire=True))
            raise
        await self.end_writing(tickets, expire=None)

    async def begin_writing(
        self, cloud: str, digests: Sequence[str], roles: Sequence[tuple[str, str | None]], *, releasing: Sequence[str] = ()
    ) -> list[WriteTicket]:
        """`writing_many` for writes that outlive one block (an archive import links each member
        as it is read and commits them later): the caller ends every ticket (`end_writing`, or
        `abandon` for writes that will never commit)."""
        journaled, release_ids = await self._begin(cloud, digests, roles, list(dict.fromkeys(releasing)))
        tickets = [WriteTicket(ids, digest=digest, roles=list(roles)) for digest, ids in zip(digests, journaled, strict=True)]
        if tickets:
            tickets[0].release_ids = release_ids
        return tickets

    async def _begin(
        self, cloud: str, digests: Sequence[str], roles: Sequence[tuple[str, str | None]], releasing: Sequence[str]
    ) -> tuple[list[list[int]], list[int]]:
        revision = any(role == REVISION for role, _ in roles)
        while True:
            ids = await self.meta.begin_writes_many(cloud, digests, roles, self.owner, self.lease_until(), releasing=releasing)
            release_ids = ids.pop() if releasing else []
            now = time.time()
            blocked = revision and await self.meta.switch_claimed(cloud, now)
            for digest in digests:
                blocked = blocked or await self.meta.deletion_claimed(cloud, digest, now)
            if not blocked:
                return ids, release_ids
            withdrawn = [i for some in ids for i in some] + release_ids
            await self.meta.end_writes(withdrawn, expire=False)  # nothing written or released yet: withdraw
            await asyncio.sleep(WAIT_STEP)

    async def end_writing(self, tickets: Sequence[WriteTicket], *, expire: bool | None) -> None:
        """Drop (or expire) the rows no commit took; `expire=None`: as each ticket says."""
        by_expiry: dict[bool, list[int]] = {True: [], False: []}
        for ticket in tickets:
            remaining = [i for i in ticket.ids if i not in ticket._handed] if ticket.committed else ticket.ids
            by_expiry[not ticket.settled if expire is None else expire].extend(remaining)
            if expire:
                by_expiry[True].extend(ticket.release_ids)  # the release may not happen: orphan collection checks
        for expiring, ids in by_expiry.items():
            await self.meta.end_writes(ids, expire=expiring)

    async def abandon(
        self, cloud: str, tickets: Sequence[WriteTicket], remove: Callable[[str, str, str, str | None], Awaitable[None]]
    ) -> None:
        """Settle now, as orphan collection would a lease later, writes that will never commit
        (a refused archive import): their rows expired, then each blob that nothing else uses
        (no version, no other live write) removed under its digest's deletion claim. A row
        whose digest another process's deletion holds stays, expired, for orphan collection."""
        live = [ticket for ticket in tickets if not ticket.committed]
        await self.meta.end_writes([i for ticket in live for i in ticket.ids], expire=True)
        settled = []
        for ticket in live:
            for write_id, (role, target) in zip(ticket.ids, ticket.roles, strict=True):
                if await self._collect_one(remove, cloud, ticket.digest, role, target):
                    settled.append(write_id)
        if settled:
            await self.meta.drop_expired_writes(settled)

    # --- blob deletions ---------------------------------------------------------------------

    @asynccontextmanager
    async def releasing(self, cloud: str, digests: Sequence[str]) -> AsyncIterator[None]:
        """Around a metadata change that drops references to these digests and the release of
        their blobs after it: journaled (role `release`, this process's lease), so a process
        that dies between the commit and the release leaves the blobs to orphan collection."""
        unique = list(dict.fromkeys(digests))
        journaled = await self.meta.begin_writes_many(cloud, unique, [(RELEASE, None)], self.owner, self.lease_until()) if unique else []
        ids = [i for some in journaled for i in some]
        async with self.released(ids):
            yield

    @asynccontextmanager
    async def released(self, ids: Sequence[int]) -> AsyncIterator[None]:
        """Around the releases of journaled `release` rows (`releasing`'s, or those a metadata
        change wrote in its own transaction, like a snapshot's deletion): removed when the body
        ends normally, expired at once otherwise, so orphan collection checks their digests."""
        try:
            yield
        except BaseException:
            # The release may not have happened: orphan collection checks these digests.
            await asyncio.shield(self.meta.end_writes(ids, expire=True))
            raise
        await self.meta.end_writes(ids, expire=False)

    @asynccontextmanager
    async def deleting(self, cloud: str, digest: str, role: str, *, wait: bool = True) -> AsyncIterator[bool | None]:
        """Claim the digest for deletion; yields True when its `role` blob may be deleted now
        (nothing references it and no live write of it is in flight), False to leave it. While
        another deletion of the digest holds the claim this waits for it, or without `wait`
        yields None at once (both falsy)."""
        while not await self.meta.claim_deletion(cloud, digest, self.owner, self.lease_until()):
            if not wait:
                yield None
                return
            await asyncio.sleep(WAIT_STEP)
        try:
            yield not await self.meta.digest_in_use(cloud, digest, time.time(), role)
        finally:
            await asyncio.shield(self.meta.release_deletion(cloud, digest, self.owner))

    @asynccontextmanager
    async def deleting_claimed(self, cloud: str, digest: str, role: str, release_ids: Sequence[int]) -> AsyncIterator[bool]:
        """`deleting` under a claim a metadata commit already took (an overwrite's version
        commit, MetadataRepository.save_version_claiming), inside `released(release_ids)`: the
        claim and the release rows end in one commit (removed; the rows expired, for orphan
        collection, when the body raises)."""
        try:
            yield not await self.meta.digest_in_use(cloud, digest, time.time(), role)
        except BaseException:
            await asyncio.shield(self.meta.end_deletion(cloud, digest, self.owner, release_ids, expire=True))
            raise
        await self.meta.end_deletion(cloud, digest, self.owner, release_ids, expire=False)

    async def collect_expired(self, remove: Callable[[str, str, str, str | None], Awaitable[None]], *, batch: int = 256) -> int:
        """Orphan collection from the journal: for each write whose lease passed (a crash, or a
        write that ended without a commit naming it), delete its blob unless something uses it.
        Such a write can no longer commit (see MetadataRepository._finish_writes). Cost grows with
        those writes, never with the number of blobs. Returns how many rows were settled."""
        settled = 0
        while rows := await self.meta.expired_writes(time.time(), batch):
            done = []
            for write_id, cloud, digest, role, target in rows:
                if await self._collect_one(remove, cloud, digest, role, target):
                    done.append(write_id)
            if not done:
                break
            await self.meta.drop_expired_writes(done)
            settled += len(done)
        return settled

    async def _collect_one(
        self, remove: Callable[[str, str, str, str | None], Awaitable[None]], cloud: str, digest: str, role: str, target: str | None
    ) -> bool:
        """One expired row; False when another process's deletion holds the digest (try later)."""
        for kind in (ORIGINAL, REVISION, PENDING) if role == RELEASE else (role,):
            async with self.deleting(cloud, digest, kind, wait=False) as free:
                if free is None:
                    return False
                if free:
                    await remove(cloud, digest, kind, target)
        return True

    # --- target switches --------------------------------------------------------------------

    @asynccontextmanager
    async def switching_target(self, cloud: str) -> AsyncIterator[None]:
        """Hold the environment's backup target alone: no revision write starts meanwhile, and
        the ones in flight (in any process) are waited for before the body runs."""
        await _until(lambda: self.meta.claim_switch(cloud, self.owner, self.lease_until()))
        try:
            await _until(lambda: self._no_revision_writes(cloud))
            yield
        finally:
            await asyncio.shield(self.meta.release_switch(cloud, self.owner))

    async def _no_revision_writes(self, cloud: str) -> bool:
        return not await self.meta.revision_writes_in_flight(cloud, time.time())

    # --- dead owners -----------------------------------------------------------------------

    async def expire_dead_owners(self) -> list[str]:
        """End at once the leases of processes of this host that no longer exist (a SIGKILLed
        worker, a crashed serve), so their jobs, pending revisions and crashed writes are taken
        over now rather than a lease later. Only a shortcut: a wrong guess (a pid reused) ends
        leases a live holder still needs, which makes its commit fail (WriteExpired) and its
        job stop, never a blob vanish under a version. Returns the owners expired."""
        host = socket.gethostname()
        dead = [owner for owner in await self.meta.lease_owners(time.time()) if owner != self.owner and _dead_here(owner, host)]
        for owner in dead:
            log.info("process %s is gone: its claims are released now", owner)
            await self.meta.expire_owner(owner)
        return dead

    # --- heartbeat --------------------------------------------------------------------------

    async def run_heartbeat(self) -> None:
        """Renew every lease this process holds, three times per lease."""
        while True:
            await asyncio.sleep(self.lease / 3)
            try:
                await self.meta.renew_leases(self.owner, self.lease_until())
            except Exception:
                log.exception("lease heartbeat failed; retrying")


async def _until(condition: Callable[[], Awaitable[bool]]) -> None:
    """Poll a condition another process may change (no event crosses processes)."""
    while True:
        if await condition():
            return
        await asyncio.sleep(WAIT_STEP)


def _dead_here(owner: str, host: str) -> bool:
    """Is `owner` (new_owner's host:pid:token) a process of this host that no longer runs?"""
    parts = owner.rsplit(":", 2)
    if len(parts) != 3 or parts[0] != host or not parts[1].isdigit():
        return False
    try:
        os.kill(int(parts[1]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False
