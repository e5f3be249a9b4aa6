"""Plain records passed between the metadata store, the domain and the HTTP renderers."""

from dataclasses import dataclass, field, fields
from enum import StrEnum
from typing import Any


@dataclass(frozen=True)
class Cloud:
    name: str
    api_key: str
    api_secret: str
    auto_backup: bool
    created_at: float
    #: Where revisions go: None for the operator's default backup store, else a customer
    #: bucket URL (s3://bucket/prefix, gs://bucket/prefix) that holds the marker object.
    backup_target: str | None = None
    #: Deletion protection (versionstore/protection.py), set by the operator's CLI only:
    #: days an irreversible deletion waits before its bytes go (0: at once, as Cloudinary),
    #: and the append-only key pair (None: none issued).
    purge_delay_days: int = 0
    append_key: str | None = None
    append_secret: str | None = None


@dataclass(frozen=True)
class Version:
    version_id: str
    version: int
    digest: str
    bytes: int
    format: str | None
    backed_up: bool
    restored_from: str | None
    created_at: float
    #: Per-version attributes the asset shows while this version is current, so a restore
    #: brings back its own (NULL dimensions on rows older than schema migration 4).
    width: int | None = None
    height: int | None = None
    original_filename: str | None = None
    #: Hex MD5 of the bytes (Cloudinary's etag); None for versions stored before migration 6.
    md5: str | None = None


@dataclass
class Asset:
    pk: int | None
    cloud: str
    asset_id: str
    resource_type: str
    type: str
    public_id: str
    status: str  # 'live' | 'deleted'
    digest: str
    format: str | None
    bytes: int
    width: int | None
    height: int | None
    version: int
    version_id: str
    original_filename: str | None
    tags: list[str] = field(default_factory=list)
    context: dict[str, str] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    created_at: float = 0.0
    uploaded_at: float = 0.0
    deleted_at: float | None = None
    #: Bumped by every write of the row; each write is conditional on the value it read.
    generation: int = 0
    #: A history a rename with overwrite took the public_id from (docs/design.md): reachable
    #: by asset_id only; `public_id` is the name it had.
    detached: bool = False
    #: The current version's MD5 (the `etag`); None when it predates migration 6.
    md5: str | None = None

    @property
    def live(self) -> bool:
        return self.status == "live"


#: Cloudinary's per-item restore `error` for each of our reasons (spec section 7: a plain
#: string the SDKs never raise on); `backup_pending` is ours.
RESTORE_ERRORS = {
    "asset_not_found": "no_backup",
    "nothing_backed_up": "no_backup",
    "not_backed_up": "no_backup",
    "version_not_found": "failed",
    "backup_pending": "backup_pending",
    "revision_missing": "failed",
    "revision_corrupt": "failed",
    "backup_unavailable": "failed",
    "public_id_taken": "failed",
    "conflict": "failed",
}


@dataclass(frozen=True)
class RestoreFailure:
    """Why one item of a restore failed: a stable `reason` code and a sentence for people."""

    reason: str
    message: str

    @property
    def error(self) -> str:
        return RESTORE_ERRORS[self.reason]


@dataclass(frozen=True)
class PendingRevision:
    """A revision acknowledged to the client whose bytes are not in the backup target yet."""

    cloud: str
    digest: str
    bytes: int
    queued_at: float
    attempts: int
    next_attempt_at: float
    last_error: str | None


@dataclass(frozen=True)
class BackupHealth:
    cloud: str
    state: str  # healthy | marker_missing | failing
    last_error: str | None
    last_error_at: float | None
    updated_at: float


@dataclass
class Job:
    """Long work that survives restarts: bucket migration, initial backup (docs/design.md)."""

    id: str
    cloud: str
    kind: str
    status: str  # pending | active | completed | failed
    params: dict[str, Any] = field(default_factory=dict)
    cursor: dict[str, Any] = field(default_factory=dict)
    progress: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    notification_url: str | None = None
    created_at: float = 0.0
    started_at: float | None = None
    completed_at: float | None = None

    @property
    def open(self) -> bool:
        return self.status in ("pending", "active")


class SessionState(StrEnum):
    """A chunked upload: open (accepts chunks), assembling (one request owns it), finished."""

    OPEN = "open"
    ASSEMBLING = "assembling"
    FINISHED = "finished"


@dataclass(frozen=True)
class UploadSession:
    """One `upload_large` (keyed by its X-Unique-Upload-Id), as the database holds it."""

    cloud: str
    upload_id: str
    resource_type: str
    public_id: str  # decided by the chunk that opened it, echoed by every chunk
    total: int | None  # None until a chunk declares it (Node sends /-1 until the last)
    claimed: int  # bytes counted against the environment's cap
    state: SessionState
    created_at: float
    updated_at: float


@dataclass(frozen=True)
class UploadPart:
    """A received chunk: bytes [first, end) of the upload in read-only `spool/chunks/<file>`."""

    first: int
    end: int
    file: str


@dataclass(frozen=True)
class ScheduledPurge:
    """An irreversible version deletion held back by the environment's purge delay: the rows
    it removed (`versions`, as Version fields; `items`, the snapshot items they lost) wait here
    until an admin undoes it or the purge job makes it final at `purge_at`."""

    id: str
    cloud: str
    asset_pk: int
    asset_id: str
    public_id: str
    versions: list[dict[str, Any]]
    items: list[dict[str, Any]]
    actor: str
    state: str  # scheduled | undone | purged
    scheduled_at: float
    purge_at: float
    finished_at: float | None = None


#: (count, highest row id) of an asset's version rows, revisions_generation, verify_generation:
#: what a rendering of the asset's versions (`restorable` flags included) depends on.
VersionsKey = tuple[int, int, int, int]


@dataclass(frozen=True)
class Downloadable:
    """A version as `download_backup` needs it, read in one statement (one snapshot, one
    round trip on PostgreSQL): its asset's name, whether its revision still waits for the
    backup target, the last bad outcome of its backup copy, and the environment's target
    generation (so the target check needs no read of its own)."""

    public_id: str
    version: Version
    pending: bool
    bad: str | None
    target_generation: int


#: One asset's row as the metadata store read it (plain values: str, int, float, None), for
#: callers that reuse what they derived from a row while the row is unchanged (equal rows
#: decode to equal assets: versionstore/http/resource_rows.py). Decode with
#: `MetadataRepository.asset_of_row`; render a listing item straight from it with
#: `render.resource_of_row` (one pass, no Asset: a 500-item page's first walk).
AssetRow = tuple[Any, ...]
#: The columns of an AssetRow, in order: Asset's fields in field order, with `detached_from`
#: (the name a detached history had, else NULL) last in place of the model's `detached` flag.
ASSET_ROW_COLUMNS = (*(f.name for f in fields(Asset) if f.name != "detached"), "detached_from")
