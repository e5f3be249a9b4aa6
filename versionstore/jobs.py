"""Durable jobs: rows in `jobs`, run by the server, resumed from their cursor after a restart.

Anything may create a job (an API call, the CLI writing the database directly); the runner
polls for open jobs and runs each with the handler of its kind. A handler persists its cursor
and progress as it goes, and finishes the job itself (so a finishing step can commit in the
same transaction as the job's completion). A handler that raises fails the job.

Several processes may run a runner on one database: a job runs in the one process that
claimed it (`jobs.owner`, `jobs.lease_until`, a conditional UPDATE). The runner renews the
lease of each job it runs three times per lease; a process that dies stops renewing, and
another runner takes the job over once the lease has passed, resuming from its cursor. A
runner that finds its claim gone (taken over after it stalled) cancels its own run.
"""

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from versionstore.claims import DEFAULT_LEASE, new_owner
from versionstore.locks import wait_for_event
from versionstore.models import Job
from versionstore.repository import MetadataRepository

log = logging.getLogger(__name__)

Handler = Callable[[Job], Awaitable[None]]
FinishHook = Callable[[Job], Awaitable[None]]


class JobRunner:
    def __init__(
        self, meta: MetadataRepository, handlers: dict[str, Handler], *, poll_interval: float = 1.0,
        owner: str | None = None, lease: float = DEFAULT_LEASE,
    ) -> None:
        self.meta = meta
        self.handlers = handlers
        self.poll_interval = poll_interval
        self.owner = owner or new_owner()
        self.lease = lease
        self.on_finish: list[FinishHook] = []
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self.wake = asyncio.Event()

    async def run(self) -> None:
        heartbeat = asyncio.create_task(self._heartbeat(), name="job lease heartbeat")
        try:
            while True:
                try:
                    await self.poll_once()
                except Exception:
                    log.exception("job poll failed")
                self.wake.clear()
                await wait_for_event(self.wake, self.poll_interval)
        finally:
            heartbeat.cancel()

    async def poll_once(self) -> None:
        """Start every open job this runner can run and claims (others run elsewhere)."""
        for job in await self.meta.open_jobs():
            if job.id in self._tasks or job.kind not in self.handlers:
                continue
            if not await self.meta.claim_job(job.id, self.owner, time.time() + self.lease):
                continue  # another process holds it, its lease still running
            fresh = await self.meta.get_job(job.cloud, job.id)  # the cursor as the last holder left it
            if fresh is None or not fresh.open:
                continue
            self._tasks[job.id] = asyncio.create_task(self._run(fresh), name=f"job {job.kind} {job.id}")

    async def run_here(self, job: Job) -> bool:
        """Claim one open job and run it in this task, renewing its lease (a CLI command that
        performs its own job). False when another process holds it: it runs there."""
        if not await self.meta.claim_job(job.id, self.owner, time.time() + self.lease):
            return False
        this = asyncio.current_task()
        assert this is not None
        self._tasks[job.id] = this
        heartbeat = asyncio.create_task(self._heartbeat(), name="job lease heartbeat")
        try:
            fresh = await self.meta.get_job(job.cloud, job.id)
            if fresh is not None and fresh.open:
                await self._run(fresh)
        finally:
            heartbeat.cancel()
            await self.meta.release_job(job.id, self.owner)
        return True

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.lease / 3)
            for job_id, task in list(self._tasks.items()):
                try:
                    held = await self.meta.renew_job(job_id, self.owner, time.time() + self.lease)
                except Exception:
                    log.exception("job %s: lease renewal failed; retrying", job_id)
                    continue
                if not held and not task.done():
                    log.warning("job %s: claim lost (finished elsewhere or taken over); stopping here", job_id)
                    task.cancel()

    async def _run(self, job: Job) -> None:
        try:
            if job.status == "pending":
                job.status, job.started_at = "active", time.time()
                await self.meta.save_job(job)
            log.info("job %s (%s of %s) running", job.id, job.kind, job.cloud)
            await self.handlers[job.kind](job)
        except asyncio.CancelledError:
            raise  # shutting down: the job stays active and resumes at the next start
        except Exception as exc:
            log.exception("job %s (%s of %s) failed", job.id, job.kind, job.cloud)
            job.status, job.error, job.completed_at = "failed", f"{type(exc).__name__}: {exc}", time.time()
            await self.meta.save_job(job)
        finally:
            self._tasks.pop(job.id, None)
        if not job.open:
            log.info("job %s (%s of %s) %s", job.id, job.kind, job.cloud, job.status)
            for hook in self.on_finish:
                try:
                    await hook(job)
                except Exception:
                    log.exception("job %s finish hook failed", job.id)

    async def close(self) -> None:
        """Stop running jobs and give their claims up, so another process resumes them at once."""
        running = list(self._tasks.items())
        for _, task in running:
            task.cancel()
        await asyncio.gather(*(task for _, task in running), return_exceptions=True)
        for job_id, _ in running:
            try:
                await self.meta.release_job(job_id, self.owner)
            except Exception:
                log.exception("job %s: could not release its claim; it lapses with its lease", job_id)
