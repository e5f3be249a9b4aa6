"""Plain records of snapshots and their schedules, shared by the metadata store and the domain."""

from dataclasses import dataclass
from typing import Any


@dataclass
class Snapshot:
    id: str
    cloud: str
    type: str  # manual | scheduled
    status: str  # queued | running | completed | failed
    note: str | None
    prefix: str
    created_by: str
    pinned: bool = False
    asset_count: int = 0
    uncovered_count: int = 0
    size_bytes: int = 0
    changed_at: float | None = None
    removed_items: int = 0
    error: str | None = None
    created_at: float = 0.0
    expires_at: float | None = None
    pending_deletion: bool = False


@dataclass(frozen=True)
class SnapshotItem:
    asset_pk: int
    asset_id: str
    resource_type: str
    type: str
    public_id: str
    version_id: str
    digest: str
    bytes: int
    covered: bool


@dataclass(frozen=True)
class ScheduleRow:
    cloud: str
    schedule: dict[str, Any]
    policy: dict[str, Any]
    next_run_at: float
    last_run_at: float | None


@dataclass(frozen=True)
class PointInTimeRow:
    """One asset of a point-in-time selection: its current state and its version at T."""

    asset_pk: int
    asset_id: str
    resource_type: str
    type: str
    public_id: str
    live: bool
    current_version_id: str
    current_digest: str
    current_backed_up: bool
    deleted_at: float | None
    created_at: float
    at_version_id: str | None
    at_digest: str | None
    at_backed_up: bool | None
