"""Alerts: a snapshot, a retention run or a restore drill that fails must be noticed.

Every failure raises the alarm five ways, so whichever one an operator watches sees it: a log
line at ERROR, a Prometheus counter (`versionstore_snapshot_failures_total`,
`versionstore_drill_failures_total`), the operation's state in the database (`failing`, read
by the console's operations page and by /metrics as the last success time), an audit record,
and a POST of a JSON summary to the environment's alert `notification_url` when one is set.
A success clears `failing` and records the time. The POST goes through the sender the HTTP
layer gives (the job notifier, with its egress policy); this module knows no HTTP.
"""

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from versionstore import telemetry
from versionstore.console.audit import AuditLog
from versionstore.repository import MetadataRepository

log = logging.getLogger(__name__)

SNAPSHOT, RETENTION, DRILL = "snapshot", "retention", "drill"
OPERATIONS = (SNAPSHOT, RETENTION, DRILL)

#: POSTs `body` to `url` (retrying, within the egress policy); never raises.
Send = Callable[[str, dict[str, Any]], Awaitable[None]]


class Alerts:
    def __init__(self, meta: MetadataRepository, send: Send | None = None, clock: Callable[[], float] = time.time) -> None:
        self.meta = meta
        self.send = send
        self.clock = clock

    async def failed(self, cloud: str, operation: str, error: str, *, target: str | None = None,
                     detail: dict[str, Any] | None = None) -> None:
        """Raise the alarm for one failure. Each channel is tried even if another fails."""
        now = self.clock()
        log.error("%s of %s failed%s: %s", operation, cloud, f" ({target})" if target else "", error)
        counters = telemetry.metrics()
        if operation == DRILL:
            counters.drill_failures.labels(cloud).inc()
        else:
            counters.snapshot_failures.labels(cloud, operation).inc()
        body = {"notification_type": "alert", "alert": f"{operation}_failed", "cloud_name": cloud, "operation": operation,
                "target": target, "error": error, "at": now, **(detail or {})}
        for step in (self._record(cloud, operation, now, error), self._audit(cloud, operation, target, error, detail),
                     self._post(cloud, body)):
            try:
                await step
            except Exception:
                log.exception("alert for %s of %s: a channel failed", operation, cloud)

    async def succeeded(self, cloud: str, operation: str) -> None:
        await self.meta.record_outcome(cloud, operation, self.clock(), None)

    async def _record(self, cloud: str, operation: str, now: float, error: str) -> None:
        await self.meta.record_outcome(cloud, operation, now, error[:1000])

    async def _audit(self, cloud: str, operation: str, target: str | None, error: str, detail: dict[str, Any] | None) -> None:
        await AuditLog(self.meta).record(f"system:{operation}", f"{operation}_failed", cloud=cloud, target=target,
                                         outcome="failed", detail={"error": error[:1000], **(detail or {})})

    async def _post(self, cloud: str, body: dict[str, Any]) -> None:
        url = await self.meta.get_alert_url(cloud)
        if url and self.send is not None:
            await self.send(url, body)
