"""`notification_url` callbacks: a JSON summary POSTed when a job ends, with retries.

A receiver that is down or answers non-2xx is retried with exponential backoff and jitter
(`attempts` in all); the outcome is logged either way and never changes the job's status.
"""

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

from versionstore.models import Job

log = logging.getLogger(__name__)

Describe = Callable[[Job], Awaitable[dict[str, Any]]]


class Notifier:
    def __init__(self, session: aiohttp.ClientSession, describe: Describe, *, attempts: int = 5, base_delay: float = 1.0) -> None:
        self.session = session
        self.describe = describe
        self.attempts = attempts
        self.base_delay = base_delay

    async def __call__(self, job: Job) -> None:
        if not job.notification_url:
            return
        body = {"notification_type": job.kind, "cloud_name": job.cloud, **await self.describe(job)}
        timeout = aiohttp.ClientTimeout(total=30)
        for attempt in range(1, self.attempts + 1):
            try:
                async with self.session.post(job.notification_url, json=body, timeout=timeout) as response:
                    if 200 <= response.status < 300:
                        log.info("job %s: notified %s", job.id, job.notification_url)
                        return
                    problem = f"HTTP {response.status}"
            except (aiohttp.ClientError, TimeoutError) as exc:
                problem = f"{type(exc).__name__}: {exc}"
            log.warning(
                "job %s: notification to %s failed (attempt %d/%d): %s", job.id, job.notification_url, attempt, self.attempts, problem
            )
            if attempt < self.attempts:
                await asyncio.sleep(random.uniform(0.5, 1.0) * self.base_delay * 2 ** (attempt - 1))
