"""The pending-backup drainer: revisions acknowledged while their target could not take them.

Each pending revision's bytes wait in the primary store (`<cloud>/pending/...`) with a row in
`backup_pending`. The drainer writes them to the environment's current target with backoff
and jitter per revision, then drops the row and the waiting copy, in that order: a crash in
between leaves a waiting copy without a row, which orphan collection removes. A revision is
never dropped while any version references it.

With several processes, each due row is claimed (`owner`, `lease_until`) by one drainer; a
drainer that dies leaves its rows to another once the lease has passed. The revision write
is journaled like an upload's (`Claims.writing`), and so waits for a target switch.
"""

import asyncio
import logging
import random
import time

from versionstore import layout
from versionstore.blobstore import BlobStoreError
from versionstore.claims import PENDING, REVISION
from versionstore.locks import wait_for_event
from versionstore.models import PendingRevision
from versionstore.service import RevisionCorrupt, VersionService
from versionstore.targets import FAILING, TargetUnavailable

log = logging.getLogger(__name__)

BATCH = 32
CONCURRENCY = 4


class PendingDrainer:
    def __init__(self, service: VersionService, *, interval: float = 1.0, max_backoff: float = 300.0) -> None:
        self.service = service
        self.meta = service.meta
        self.interval = interval
        self.max_backoff = max_backoff

    async def run(self) -> None:
        while True:
            try:
                drained = await self.drain_once()
            except Exception:
                log.exception("pending drainer pass failed; retrying")
                drained = 0
            if drained < BATCH:
                self.service.pending_added.clear()
                # Sleep until the next tick, or at once when an upload queues something.
                await wait_for_event(self.service.pending_added, self.interval)

    async def drain_once(self) -> int:
        """Try every due pending revision once; returns how many were due."""
        claims = self.service.claims
        due = await self.meta.claim_pending(time.time(), BATCH, claims.owner, claims.lease_until())
        limit = asyncio.Semaphore(CONCURRENCY)

        async def one(row: PendingRevision) -> None:
            async with limit:
                try:
                    # Journaled as a release: a crash between dropping the queue row and the
                    # waiting copy leaves that copy to orphan collection.
                    async with claims.releasing(row.cloud, [row.digest]):
                        await self._drain(row)
                finally:  # drained rows are gone; others (an error, cancelled) go back to the queue
                    await asyncio.shield(self.meta.release_pending(row.cloud, row.digest, claims.owner))

        await asyncio.gather(*(one(row) for row in due))
        return len(due)

    async def _drain(self, row: PendingRevision) -> None:
        service = self.service
        cloud = await self.meta.get_cloud(row.cloud)
        target = cloud.backup_target if cloud else None
        async with service.claims.writing(row.cloud, row.digest, [(REVISION, target)]) as ticket:
            cloud = await self.meta.get_cloud(row.cloud)  # fresh: a switch may have completed meanwhile
            if cloud is None or await self.meta.get_pending(row.cloud, row.digest) is None:
                return  # released meanwhile
            waiting = layout.pending_key(row.cloud, row.digest)
            recovered = False
            if not await self.meta.digest_referenced(row.cloud, row.digest, backup=True):
                await self.meta.clear_pending(row.cloud, row.digest)  # released meanwhile: drop the waiting copy
            else:
                try:
                    store = await service.targets.usable(cloud)
                    await service.copy_blob(service.primary, waiting, store, layout.revision_key(row.cloud, row.digest), row.digest)
                except TargetUnavailable as exc:
                    await self._retry_later(row, exc.message)
                    return
                except (BlobStoreError, RevisionCorrupt) as exc:
                    message = f"{type(exc).__name__}: {exc}"
                    await service.targets.record_failure(row.cloud, FAILING, message)
                    await self._retry_later(row, message)
                    return
                recovered = await service.targets.record_success(row.cloud)
                await self.meta.clear_pending(row.cloud, row.digest)
                ticket.settled = True  # the references are checked below, no collection needed
                log.info("pending revision %s of %s written to its backup target", row.digest, row.cloud)
        if not await self.meta.digest_referenced(row.cloud, row.digest, backup=True):
            # The version was deleted while the copy ran: its release saw the write and kept the bytes.
            await service.release_revision(row.cloud, row.digest)
        # Outside the write's journal row (it would count as a use of the digest).
        async with service.claims.deleting(row.cloud, row.digest, PENDING) as free:
            if free:
                await service.primary.delete(waiting)
        if recovered:
            await self.meta.retry_pending_now(row.cloud)

    async def _retry_later(self, row: PendingRevision, error: str) -> None:
        delay = min(self.max_backoff, 2.0 ** min(row.attempts, 16)) * random.uniform(0.5, 1.0)
        await self.meta.reschedule_pending(row.cloud, row.digest, time.time() + delay, error)
