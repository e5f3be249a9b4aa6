"""Library snapshots: a consistent point-in-time list of (asset, version) per environment or prefix.

A snapshot copies no bytes. Its items name the revision each in-scope live asset's current
version points at, taken by one INSERT ... SELECT in one transaction (consistent, and cheap at
any library size), and that reference keeps the revision from being collected
(`MetadataRepository.digest_referenced`). An asset whose current version was uploaded without
backup is listed as *not covered* (`covered: false`): its bytes exist only as the primary copy,
which the next upload replaces, so the snapshot cannot promise them (docs/snapshots.md).
"""

import logging
import time
from dataclasses import asdict
from typing import Any

from versionstore.alerts import SNAPSHOT, Alerts
from versionstore.errors import BadRequest, Forbidden, NotFound
from versionstore.ids import new_hex_id
from versionstore.repository import MetadataRepository
from versionstore.service import VersionService
from versionstore.snapshot_records import Snapshot, SnapshotItem

log = logging.getLogger(__name__)

MANUAL, SCHEDULED = "manual", "scheduled"
MAX_NOTE = 1000
MAX_PREFIX = 255


def check_prefix(value: object) -> str:
    prefix = "" if value is None else str(value)
    if len(prefix) > MAX_PREFIX or any(ord(c) < 0x20 for c in prefix):
        raise BadRequest(f"Invalid prefix: at most {MAX_PREFIX} characters, no control characters")
    return prefix


def check_note(value: object) -> str | None:
    if value is None or value == "":
        return None
    note = str(value)
    if len(note) > MAX_NOTE:
        raise BadRequest(f"note is too long (at most {MAX_NOTE} characters)")
    return note


class Snapshots:
    """Create, list, delete and pin snapshots; deleting one releases what only it held."""

    def __init__(self, service: VersionService, alerts: Alerts | None = None) -> None:
        self.service = service
        self.meta: MetadataRepository = service.meta
        #: Where a failed snapshot raises the alarm (the server's has the alert sender).
        self.alerts = alerts or Alerts(service.meta)

    async def create(
        self, cloud: str, *, note: str | None, prefix: str = "", type_: str = MANUAL, created_by: str = "api",
        now: float | None = None,
    ) -> Snapshot:
        snapshot = Snapshot(
            id=new_hex_id(), cloud=cloud, type=type_, status="running", note=check_note(note), prefix=check_prefix(prefix),
            created_by=created_by, created_at=time.time() if now is None else now,
        )
        try:
            created = await self.meta.create_snapshot(snapshot)
        except Exception as exc:
            # Nothing of the snapshot was written (one transaction); record the failure so it
            # shows in the list, and raise the alarm (alerts.py).
            snapshot.status, snapshot.error = "failed", f"{type(exc).__name__}: {exc}"
            await self.meta.record_snapshot(snapshot)
            await self.alerts.failed(cloud, SNAPSHOT, snapshot.error, target=snapshot.id, detail={"created_by": created_by})
            return snapshot
        await self.alerts.succeeded(cloud, SNAPSHOT)
        return created

    async def get(self, cloud: str, snapshot_id: str) -> Snapshot:
        found = await self.meta.get_snapshot(cloud, snapshot_id)
        if found is None:
            raise NotFound(f"Snapshot not found - {snapshot_id}")
        return found

    async def delete(self, cloud: str, snapshot_id: str, *, by_retention: bool = False) -> Snapshot:
        """By hand only manual, unpinned snapshots; retention only scheduled, unpinned ones."""
        snapshot = await self.get(cloud, snapshot_id)
        if snapshot.pinned:
            raise Forbidden(f"Snapshot {snapshot_id} is pinned; unpin it first")
        if not by_retention and snapshot.type != MANUAL:
            raise Forbidden(f"Snapshot {snapshot_id} is scheduled: its retention policy removes it, not a user")
        claims = self.service.claims
        # The revisions only this snapshot may have held are journaled in the deletion's own
        # transaction: a crash before their release leaves them to orphan collection.
        journal = await self.meta.delete_snapshot(cloud, snapshot_id, claims.owner, claims.lease_until())
        async with claims.released([write_id for write_id, _ in journal]):
            for _, digest in journal:
                # Under the digest's deletion claim, every reference is checked again (another
                # snapshot's item, a version, an upload of the same bytes in any process).
                await self.service.release_revision(cloud, digest)
        return snapshot

    async def pin(self, cloud: str, snapshot_id: str, pinned: bool) -> Snapshot:
        await self.get(cloud, snapshot_id)
        columns: dict[str, Any] = {"pinned": pinned}
        if pinned:
            columns.update(expires_at=None, pending_deletion=False)
        await self.meta.update_snapshot(cloud, snapshot_id, **columns)
        return await self.get(cloud, snapshot_id)

    async def describe(self, snapshot: Snapshot, *, unique_bytes: bool = True) -> dict[str, Any]:
        """The API's and the CLI's view of a snapshot (times as unix seconds; the HTTP layer
        renders them). `unique_bytes` reads every item of the snapshot: lists skip it (null)
        unless asked."""
        body = asdict(snapshot)
        if snapshot.status != "completed":
            body["unique_bytes"] = 0  # a failed snapshot has no items
        else:
            body["unique_bytes"] = await self.meta.snapshot_unique_bytes(snapshot.cloud, [snapshot.id]) if unique_bytes else None
        body["changed"] = snapshot.changed_at is not None
        if snapshot.type == MANUAL or snapshot.pinned:
            body["expires_at"] = None
        return body


def item_dict(item: SnapshotItem) -> dict[str, Any]:
    return {
        "asset_id": item.asset_id, "resource_type": item.resource_type, "type": item.type, "public_id": item.public_id,
        "version_id": item.version_id, "blake3": item.digest, "bytes": item.bytes, "covered": item.covered,
    }
