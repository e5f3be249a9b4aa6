"""Deletion protection: what a leaked API secret can no longer do (docs/threat-model.md).

Two per-environment settings, both off by default so Cloudinary's semantics stay as they are,
both changed only by the operator's CLI (a key that leaked must not be able to switch them off):

- a purge delay: an irreversible version deletion answers as today, but its rows and bytes
  wait `purge_delay_days` in a scheduled purge (MetadataStore.schedule_purge) that an admin can
  undo (console, `versionstore purge undo`) until the purge job makes it final;
- an append-only key pair: it can upload, restore, list and download, never delete
  (the per-route table is versionstore/http/append_only.py).

Every step is audited: purge_scheduled, purge_undone, purged.
"""

import logging
import secrets
import time
from collections.abc import Callable
from typing import Any

from versionstore import ticks
from versionstore.console.audit import AuditLog
from versionstore.errors import BadRequest, NotFound
from versionstore.models import Cloud, ScheduledPurge
from versionstore.repository import MetadataRepository
from versionstore.service import VersionService

log = logging.getLogger(__name__)

#: Due purges finished per pass of the job.
BATCH = 100
#: The longest delay accepted (a year): a typo must not keep bytes forever.
MAX_DELAY_DAYS = 366


async def set_purge_delay(meta: MetadataRepository, cloud: Cloud, days: int) -> None:
    if not 0 <= days <= MAX_DELAY_DAYS:
        raise BadRequest(f"purge delay must be 0..{MAX_DELAY_DAYS} days")
    await meta.set_protection(cloud.name, purge_delay_days=days)


async def issue_append_key(meta: MetadataRepository, cloud: Cloud) -> tuple[str, str]:
    """A new append-only key pair (replacing any earlier one), returned to be shown once."""
    key = str(secrets.randbelow(9 * 10**14) + 10**14)
    while key == cloud.api_key:
        key = str(secrets.randbelow(9 * 10**14) + 10**14)
    secret = secrets.token_urlsafe(21)
    await meta.set_protection(cloud.name, append_key=(key, secret))
    return key, secret


async def status(meta: MetadataRepository, cloud: Cloud) -> dict[str, Any]:
    """What `cloud status` and the settings extension show about protection."""
    return {
        "purge_delay_days": cloud.purge_delay_days,
        "append_only_key": cloud.append_key is not None,
        "scheduled_purges": await meta.count_scheduled_purges(cloud.name),
    }


def as_json(purge: ScheduledPurge) -> dict[str, Any]:
    """A purge as our extension, the CLI and the console show it (no snapshot item rows)."""
    return {
        "id": purge.id, "cloud_name": purge.cloud, "asset_id": purge.asset_id, "public_id": purge.public_id,
        "version_ids": [v["version_id"] for v in purge.versions], "bytes": sum(int(v["bytes"]) for v in purge.versions),
        "actor": purge.actor, "state": purge.state, "scheduled_at": purge.scheduled_at, "purge_at": purge.purge_at,
        "finished_at": purge.finished_at,
    }


def _detail(purge: ScheduledPurge) -> dict[str, Any]:
    return {"purge_id": purge.id, "version_ids": [v["version_id"] for v in purge.versions], "purge_at": purge.purge_at}


async def record_scheduled(audit: AuditLog, actor: str, purge: ScheduledPurge | None, address: str | None, via: str) -> None:
    """The audit record of a deletion the purge delay held back (nothing when it was not)."""
    if purge is not None:
        await audit.record(actor, "purge_scheduled", cloud=purge.cloud, target=f"{purge.asset_id} {purge.public_id}",
                           address=address, detail={**_detail(purge), "via": via})


async def undo(meta: MetadataRepository, purge_id: str, cloud: str | None, actor: str, address: str | None = None) -> ScheduledPurge:
    """Bring a scheduled purge's versions back as they were; audited, refused or not."""
    audit = AuditLog(meta)
    found = await meta.get_purge(purge_id)
    if found is None or (cloud is not None and found.cloud != cloud):
        raise NotFound(f"Scheduled purge not found - {purge_id}")
    target = f"{found.asset_id} {found.public_id}"
    try:
        undone = await meta.undo_purge(purge_id, time.time())
    except ValueError as exc:
        await audit.record(actor, "purge_undone", cloud=found.cloud, target=target, address=address, outcome="failed",
                           detail={**_detail(found), "error": str(exc)})
        raise BadRequest(str(exc)) from None
    if undone is None:
        await audit.record(actor, "purge_undone", cloud=found.cloud, target=target, address=address, outcome="failed",
                           detail={**_detail(found), "error": f"already {found.state}"})
        raise BadRequest(f"Purge {purge_id} is no longer scheduled (it was {(await meta.get_purge(purge_id) or found).state})")
    await audit.record(actor, "purge_undone", cloud=undone.cloud, target=target, address=address, detail=_detail(undone))
    return undone


async def run_due(service: VersionService, now: float, actor: str = "job:purge") -> int:
    """Finish every purge due at `now`: its revisions go once nothing else references them.
    Safe in several processes: finish_purge lets one of them win each purge."""
    audit = AuditLog(service.meta)
    done = 0
    while True:
        due = await service.meta.due_purges(now, BATCH)
        for purge in due:
            finished = await service.meta.finish_purge(purge.id, now)
            if finished is None:
                continue  # another process, or an undo, came first
            for digest in sorted({v["digest"] for v in finished.versions if v["backed_up"]}):
                await service.release_revision(finished.cloud, digest)
            await audit.record(actor, "purged", cloud=finished.cloud, target=f"{finished.asset_id} {finished.public_id}",
                               detail=_detail(finished))
            done += 1
        if len(due) < BATCH:
            return done


async def run_purges(service: VersionService, interval: float, clock: Callable[[], float] = time.time) -> None:
    """The server's loop around `run_due`; runs until cancelled."""
    await ticks.every(interval, lambda: run_due(service, clock()), log, "purging due deletions")
