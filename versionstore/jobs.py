"""Durable jobs: rows in `jobs`, run by the server, resumed from their cursor after a restart.

Anything may create a job (an API call, the CLI writing the database directly); the runner
polls for open jobs and runs each with the handler of its kind. A handler persists its cursor
and progress as it goes, and finishes the job itself (so a finishing step can commit in the
same transaction as the job's completion). A handler that raises fails the job.
"""

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from versionstore.locks import wait_for_event
from versionstore.models import Job
from versionstore.repository import MetadataRepository

log = logging.getLogger(__name__)

Handler = Callable[[Job], Awaitable[None]]
FinishHook = Callable[[Job], Awaitable[None]]


class JobRunner:
    def __init__(self, meta: MetadataRepository, handlers: dict[str, Handler], *, poll_interval: float = 1.0) -> None:
        self.meta = meta
        self.handlers = handlers
        self.poll_interval = poll_interval
        self.on_finish: list[FinishHook] = []
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self.wake = asyncio.Event()

    async def run(self) -> None:
        while True:
            try:
                for job in await self.meta.open_jobs():
                    if job.id not in self._tasks and job.kind in self.handlers:
                        self._tasks[job.id] = asyncio.create_task(self._run(job), name=f"job {job.kind} {job.id}")
            except Exception:
                log.exception("job poll failed")
            self.wake.clear()
            await wait_for_event(self.wake, self.poll_interval)

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
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
