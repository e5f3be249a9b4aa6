"""`notification_url` callbacks: a JSON summary POSTed when a job ends (or an alert is raised,
versionstore/alerts.py), with retries.

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
from versionstore.http.fetch import RefusedAddress, check_url, guarded_session
from versionstore.models import Job

log = logging.getLogger(__name__)

Describe = Callable[[Job], Awaitable[dict[str, Any]]]
Send = Callable[[str, dict[str, Any]], Awaitable[None]]


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
        await self.post(job.notification_url, body, f"job {job.id}")

    async def post(self, target: str, body: dict[str, Any], what: str) -> None:
        """POST `body` as JSON to `target`, retrying; logs the outcome, never raises."""
        timeout = aiohttp.ClientTimeout(total=30)
        for attempt in range(1, self.attempts + 1):
            try:
                url = URL(target)
                check_url(url, self.policy)
                async with self.session.post(url, json=body, timeout=timeout, allow_redirects=False) as response:
                    if 200 <= response.status < 300:
                        log.info("%s: notified %s", what, target)
                        return
                    problem = f"HTTP {response.status}"
            except RefusedAddress as exc:
                log.warning("%s: notification to %s refused: %s", what, target, exc)
                return
            except aiohttp.ClientConnectorError as exc:
                if isinstance(exc.os_error, RefusedAddress):
                    log.warning("%s: notification to %s refused: %s", what, target, exc.os_error)
                    return
                problem = f"{type(exc).__name__}: {exc}"
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                problem = f"{type(exc).__name__}: {exc}"
            log.warning("%s: notification to %s failed (attempt %d/%d): %s", what, target, attempt, self.attempts, problem)
            if attempt < self.attempts:
                await asyncio.sleep(random.uniform(0.5, 1.0) * self.base_delay * 2 ** (attempt - 1))


def alert_sender(notifier: Notifier) -> Send:
    """What versionstore.alerts POSTs an alert with: the server's notifier."""

    async def send(url: str, body: dict[str, Any]) -> None:
        await notifier.post(url, body, f"alert {body.get('alert')} of {body.get('cloud_name')}")

    return send


def one_shot_alert_sender(policy: EgressPolicy, base_delay: float) -> Send:
    """For a process without a long-lived client session (a CLI command): a session per alert."""

    async def no_summary(job: Job) -> dict[str, Any]:
        return {}

    async def send(url: str, body: dict[str, Any]) -> None:
        async with guarded_session(policy, auto_decompress=False) as session:
            await alert_sender(Notifier(session, no_summary, policy, base_delay=base_delay))(url, body)

    return send
