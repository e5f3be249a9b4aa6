"""`notification_url` callbacks: a JSON summary POSTed when a job ends, with retries.

A receiver that is down or answers non-2xx is retried with exponential backoff and jitter
(`attempts` in all); the outcome is logged either way and never changes the job's status.
Receivers are reached through the egress policy (fetch.py): an internal address is refused at
connect time, never retried, and redirects are not followed.
"""

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from yarl import URL

from versionstore.egress import EgressPolicy
from versionstore.http.fetch import RefusedAddress, check_url
from versionstore.models import Job

log = logging.getLogger(__name__)

Describe = Callable[[Job], Awaitable[dict[str, Any]]]


class Notifier:
    def __init__(
        self, session: aiohttp.ClientSession, describe: Describe, policy: EgressPolicy, *, attempts: int = 5, base_delay: float = 1.0
    ) -> None:
        self.session = session
        self.policy = policy
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
                url = URL(job.notification_url)
                check_url(url, self.policy)
                async with self.session.post(url, json=body, timeout=timeout, allow_redirects=False) as response:
                    if 200 <= response.status < 300:
                        log.info("job %s: notified %s", job.id, job.notification_url)
                        return
                    problem = f"HTTP {response.status}"
            except RefusedAddress as exc:
                log.warning("job %s: notification to %s refused: %s", job.id, job.notification_url, exc)
                return
            except aiohttp.ClientConnectorError as exc:
                if isinstance(exc.os_error, RefusedAddress):
                    log.warning("job %s: notification to %s refused: %s", job.id, job.notification_url, exc.os_error)
                    return
                problem = f"{type(exc).__name__}: {exc}"
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                problem = f"{type(exc).__name__}: {exc}"
            log.warning(
                "job %s: notification to %s failed (attempt %d/%d): %s", job.id, job.notification_url, attempt, self.attempts, problem
            )
            if attempt < self.attempts:
                await asyncio.sleep(random.uniform(0.5, 1.0) * self.base_delay * 2 ** (attempt - 1))
