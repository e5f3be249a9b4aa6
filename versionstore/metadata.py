"""The metadata repository: one body of portable SQL on SQLite or PostgreSQL.

Every statement goes through a gateway (versionstore/gateway.py for SQLite, the embedded
default; versionstore/pg.py for PostgreSQL, which translates it): `_one`/`_all` for point
reads, `_scan` for reads whose cost grows with the library, `transaction()` for writes.
Write SQL in the subset both run: no INSERT OR ..., json_each, PRAGMA or lastrowid (RETURNING pk).
The public methods are the contract (versionstore/repository.py).
"""

import asyncio
import json
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, astuple, fields, replace
from pathlib import Path
from typing import Any, NamedTuple

from versionstore import queries
from versionstore.archive_records import CONTENT_DELETED, ArchiveFile, MemberGone
from versionstore.console.records import AuditRecord, ConsoleSession, StaffMember
from versionstore.drill_records import SCRATCH_MARK, AlertState, DrillScheduleRow
from versionstore.epoch_cache import EpochCache
from versionstore.gateway import Gateway, IntegrityError, SqliteGateway, Transaction, migrations
from versionstore.models import (
    ASSET_ROW_COLUMNS,
    Asset,
    AssetRow,
    BackupHealth,
    Cloud,
    Downloadable,
    Job,
    PendingRevision,
    ScheduledPurge,
    SessionState,
    UploadPart,
    UploadSession,
    Version,
    VersionsKey,
)
from versionstore.queries import SORT_FIELDS, AssetQuery, Filter, SortKey
from versionstore.snapshot_records import PointInTimeRow, ScheduleRow, Snapshot, SnapshotItem

_migrations = migrations  # the numbered blocks of schema.sql (tests build old databases from them)

#: Selected in this order; `detached_from` stands for the model's `detached` flag (see _asset).
_ASSET_COLUMNS = list(ASSET_ROW_COLUMNS)
_VERSION_COLUMNS = [f.name for f in fields(Version)]


#: Environments get_cloud keeps, found or missing (a name is a few dozen bytes).
CLOUDS_CACHED = 4096
#: With the environment's deletion protection (schema migration 13; no row: none).
_CLOUD_SELECT = (
    "SELECT name, api_key, api_secret, auto_backup, created_at, backup_target, "
    "COALESCE(p.purge_delay_days, 0), p.append_key, p.append_secret FROM clouds LEFT JOIN cloud_protection p ON p.cloud = name"
)


_SESSION_COLUMNS = "cloud, upload_id, resource_type, public_id, total, claimed, state, created_at, updated_at"


def _session(row: Sequence[Any]) -> UploadSession:
    cloud, upload_id, resource_type, public_id, total, claimed, state, created_at, updated_at = row
    return UploadSession(cloud, upload_id, resource_type, public_id, total, claimed, SessionState(state), created_at, updated_at)


def _cloud(row: Sequence[Any]) -> Cloud:
    return Cloud(row[0], row[1], row[2], bool(row[3]), row[4], row[5], int(row[6]), row[7], row[8])


_JOB_COLUMNS = [f.name for f in fields(Job)]
_JOB_JSON = ("params", "cursor", "progress")
_JOB_SELECT = f"SELECT {', '.join(_JOB_COLUMNS)} FROM jobs"


def _job(row: Sequence[Any]) -> Job:
    values = dict(zip(_JOB_COLUMNS, row, strict=True))
    for name in _JOB_JSON:
        values[name] = json.loads(values[name])
    return Job(**values)


def _job_row(job: Job) -> dict[str, Any]:
    values = {name: getattr(job, name) for name in _JOB_COLUMNS}
    for name in _JOB_JSON:
        values[name] = json.dumps(values[name])
    return values


_BAD_OUTCOMES = ("missing", "corrupt")

_PENDING_SELECT = "SELECT cloud, digest, bytes, queued_at, attempts, next_attempt_at, last_error FROM backup_pending"


#: The generation that moves whenever a version's `restorable` may change (see revisions_generation).
REVISIONS = "revisions"
#: Rows per multi-row INSERT: 7,000 parameters, below SQLite's and PostgreSQL's 32,766/32,767.
_ROWS_PER_INSERT = 1000
#: Journal rows up to which `begin_writes_many` runs as a point transaction (one upload's are
#: at most four; a batched import's many run on the writer thread).
_POINT_ROWS = 16


def target_generation(cloud: str) -> str:
    """The generation that moves whenever any process records the health of the environment's target."""
    return f"targets:{cloud}"


class WriteExpired(Exception):
    """A blob write's journal row was taken by orphan collection (its lease ran out while the
    writer stalled): its blob may be gone, so the metadata naming it is not committed."""
_SNAPSHOT_COLUMNS = [f.name for f in fields(Snapshot)]
_SNAPSHOT_SELECT = f"SELECT {', '.join(_SNAPSHOT_COLUMNS)} FROM snapshots"
#: Recomputes a snapshot's counts from its items (inside an UPDATE of that snapshot row).
_SNAPSHOT_COUNTS = (
    "asset_count = (SELECT COUNT(*) FROM snapshot_items i WHERE i.snapshot_id = snapshots.id), "
    "uncovered_count = (SELECT COUNT(*) FROM snapshot_items i WHERE i.snapshot_id = snapshots.id AND i.covered = 0), "
    "size_bytes = (SELECT COALESCE(SUM(i.bytes), 0) FROM snapshot_items i WHERE i.snapshot_id = snapshots.id)"
)
_PIT_SELECT = (
    "SELECT a.pk, a.asset_id, a.resource_type, a.type, a.public_id, a.status, a.version_id, a.digest, cv.backed_up, "
    "a.deleted_at, a.created_at, tv.version_id, tv.digest, tv.backed_up FROM assets a "
    "LEFT JOIN versions cv ON cv.version_id = a.version_id"
)


def _snapshot(row: Sequence[Any]) -> Snapshot:
    values = dict(zip(_SNAPSHOT_COLUMNS, row, strict=True))
    values["pinned"], values["pending_deletion"] = bool(values["pinned"]), bool(values["pending_deletion"])
    return Snapshot(**values)


def _pit_row(r: Sequence[Any]) -> PointInTimeRow:
    return PointInTimeRow(
        int(r[0]), r[1], r[2], r[3], r[4], r[5] == "live", r[6], r[7], bool(r[8]), r[9], float(r[10]),
        r[11], r[12], None if r[13] is None else bool(r[13]),
    )


class AssetChanged(Exception):
    """The asset row is not the one the caller read: another write (an upload, a rename, a
    delete, in this process or another) committed in between. Nothing was written; re-read
    and decide again."""


def _detached_name(asset_id: str) -> str:
    """What a detached history holds in the public_id column: unique (its asset_id) and no
    name a client can choose (ids.check_public_id refuses control characters)."""
    return f"\x1fdetached/{asset_id}"


def _json_column(text: str) -> Any:
    """A JSON column's value. Most assets have no tags, context or metadata, and json.loads
    of "[]" or "{}" was a visible share of decoding a row (orjson would be faster for the
    rest, but it turns integers beyond 64 bits into floats)."""
    if text == "[]":
        return []
    if text == "{}":
        return {}
    return json.loads(text)


_TAGS, _CONTEXT, _METADATA, _PUBLIC_ID = (_ASSET_COLUMNS.index(c) for c in ("tags", "context", "metadata", "public_id"))
#: Columns before and after the model's `detached` field (the row ends with `detached_from`).
_BEFORE_DETACHED = [f.name for f in fields(Asset)].index("detached")


def _asset(row: Sequence[Any]) -> Asset:
    # Positional (columns are selected in field order, `detached` aside): this runs once per
    # row of a listing page, where a dict per row and Asset(**values) were a visible share.
    values = list(row)
    values[_TAGS] = _json_column(values[_TAGS])
    values[_CONTEXT] = _json_column(values[_CONTEXT])
    values[_METADATA] = _json_column(values[_METADATA])
    detached_from = values.pop()
    if detached_from is not None:
        values[_PUBLIC_ID] = detached_from
    values.insert(_BEFORE_DETACHED, detached_from is not None)
    return Asset(*values)


_BACKED_UP = _VERSION_COLUMNS.index("backed_up")


def _versions_key(row: Sequence[Any]) -> VersionsKey:
    return int(row[0]), int(row[1]), int(row[2]), int(row[3])


def _version(row: Sequence[Any]) -> Version:
    # Positional (columns are selected in field order): this runs once per row of a
    # `versions=true` listing, where building a dict per row was a third of the CPU time.
    values = list(row)
    values[_BACKED_UP] = bool(values[_BACKED_UP])
    return Version(*values)


#: The Asset fields `_asset_row` copies as they are (names computed once: `fields()` per upload showed in profiles).
_ASSET_ROW_FIELDS = [f.name for f in fields(Asset) if f.name not in ("detached", "generation")]


def _asset_row(asset: Asset) -> dict[str, Any]:
    """Column values of a whole row, without its generation (writes set that themselves)."""
    values = {name: getattr(asset, name) for name in _ASSET_ROW_FIELDS}
    values["tags"] = json.dumps(asset.tags)
    values["context"] = json.dumps(asset.context)
    values["metadata"] = json.dumps(asset.metadata)
    values["detached_from"] = asset.public_id if asset.detached else None
    if asset.detached:
        values["public_id"] = _detached_name(asset.asset_id)
    return values


def _name_taken(exc: sqlite3.IntegrityError) -> bool:
    """A write lost a race for (cloud, resource_type, type, public_id) to another writer."""
    return isinstance(exc, IntegrityError) and exc.table == "assets"


#: A scheduled purge's revision (schema migration 13): referenced until the purge is undone or done.
_PURGE_HOLD = "SELECT 1 FROM purge_holds WHERE cloud = ? AND digest = ?"
#: A kept archive's member (schema migration 18): referenced until the archive is removed or
#: withdrawn (an irreversible deletion of the version withdraws it: docs/design.md).
_ARCHIVE_HOLD = (
    "SELECT 1 FROM archive_members m JOIN archive_files f ON f.job_id = m.job_id WHERE m.cloud = ? AND m.digest = ? "
    "AND f.removed_at IS NULL AND f.removed_reason IS NULL"
)
#: The advisory lock an archive's registration and a version's irreversible deletion share: one
#: of the two sees the other (no archive keeps a version deleted while it was being recorded).
_ARCHIVE_LOCK = "archive_members"
#: Members per INSERT statement of an archive's registration (4 values each: within every limit).
_MEMBER_BATCH = 200
_PURGE_COLUMNS = "id, cloud, asset_pk, asset_id, public_id, versions, items, actor, state, scheduled_at, purge_at, finished_at"
_ITEM_COLUMNS = "snapshot_id, cloud, asset_pk, asset_id, resource_type, type, public_id, version_id, digest, bytes, covered"
_HAS_REVISION = "EXISTS (SELECT 1 FROM versions WHERE asset_pk = ? AND backed_up = 1)"


_ASSET_SELECT = f"SELECT {', '.join(_ASSET_COLUMNS)} FROM assets"
_VERSION_SELECT = f"SELECT {', '.join(_VERSION_COLUMNS)} FROM versions"
_VERSION_OF_COLUMNS = f"COALESCE(a.detached_from, a.public_id), {', '.join('v.' + c for c in _VERSION_COLUMNS)}"
_VERSION_OF_WHERE = "FROM versions v JOIN assets a ON a.pk = v.asset_pk WHERE a.cloud = ? AND a.asset_id = ? AND v.version_id = ?"
_VERSION_OF = f"SELECT {_VERSION_OF_COLUMNS} {_VERSION_OF_WHERE}"
#: version_of, with the checks download_backup makes on the same revision (pending_digests,
#: bad_revisions) and the environment's target generation as extra columns.
_DOWNLOADABLE = (
    f"SELECT {_VERSION_OF_COLUMNS}, "
    "EXISTS (SELECT 1 FROM backup_pending p WHERE p.cloud = a.cloud AND p.digest = v.digest), "
    "(SELECT b.outcome FROM blob_checks b WHERE b.cloud = a.cloud AND b.digest = v.digest AND b.store = 'backup' "
    "AND b.outcome IN ('missing', 'corrupt')), "
    f"COALESCE((SELECT g.value FROM generations g WHERE g.name = ?), 0) {_VERSION_OF_WHERE}"
)
#: An asset row `a`'s VersionsKey as columns (their placeholder, first: the generation's name).
_VERSIONS_KEY_COLUMNS = (
    "(SELECT COUNT(*) FROM versions v WHERE v.asset_pk = a.pk), (SELECT COALESCE(MAX(v.pk), 0) FROM versions v WHERE v.asset_pk = a.pk), "
    "COALESCE((SELECT g.value FROM generations g WHERE g.name = ?), 0), (SELECT COALESCE(MAX(b.outcome_seq), 0) FROM blob_checks b)"
)
_KEYED_ASSET_SELECT = f"SELECT {', '.join('a.' + c for c in _ASSET_COLUMNS)}, {_VERSIONS_KEY_COLUMNS} FROM assets a"
_VERSION_INSERT = (
    f"INSERT INTO versions (cloud, asset_pk, {', '.join(_VERSION_COLUMNS)}) "
    f"VALUES (?, ?, {', '.join('?' * len(_VERSION_COLUMNS))})"
)

SQLITE_SCHEME = "sqlite://"
POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def sqlite_url(path: Path) -> str:
    return f"{SQLITE_SCHEME}{path}"


def sqlite_path(url: str) -> Path | None:
    """The file of a `sqlite:///abs/path` URL; None for any other URL."""
    return Path(url[len(SQLITE_SCHEME):]) if url.startswith(SQLITE_SCHEME) else None


def check_metadata_url(url: str) -> str:
    """The URL unchanged if a backend understands it, else ValueError with a one-line reason."""
    path = sqlite_path(url)
    if path is not None and not path.is_absolute():
        raise ValueError(f"{url!r}: a sqlite URL needs an absolute path (sqlite:///srv/data/metadata.sqlite3)")
    if path is None and not url.startswith(POSTGRES_SCHEMES):
        raise ValueError(f"{url!r}: expected sqlite:///PATH or postgresql://USER@HOST:PORT/DB")
    return url


async def open_gateway(url: str) -> Gateway:
    """The gateway a metadata URL names, its schema migrated."""
    path = sqlite_path(check_metadata_url(url))
    if path is not None:
        return await SqliteGateway.open(path)
    from versionstore.pg import PgGateway  # asyncpg is only loaded when PostgreSQL is used

    return await PgGateway.open(url)


class MetadataStore:
    def __init__(self, gateway: Gateway) -> None:
        self._gate = gateway
        # Bound once: the point reads are on the hot path, a forwarding call would cost.
        self._one = gateway.one
        self._all = gateway.all
        self._scan = gateway.scan
        self.transaction = gateway.transaction
        #: For a few indexed statements (an upload's commits): one thread hop (the COMMIT) on SQLite.
        self.point_transaction = gateway.point_transaction
        #: Migration numbers applied when this store was opened.
        self.applied_migrations = gateway.applied
        #: Environments by name, found (a 1-tuple of the Cloud) or not (of None): the name comes
        #: from the request path, so the budget bounds what strangers' names can occupy.
        self._clouds: EpochCache[str, tuple[Cloud | None]] = EpochCache(CLOUDS_CACHED)

    @classmethod
    async def open(cls, location: Path | str) -> "MetadataStore":
        """Open the metadata at `location` (a SQLite file's path, or a sqlite:// or
        postgresql:// URL), apply the migrations it lacks, and write the label side rows of
        assets stored before migration 9 (backfill_labels)."""
        store = cls(await open_gateway(sqlite_url(location) if isinstance(location, Path) else location))
        try:
            await store.backfill_labels()
        except BaseException:
            await store.close()
            raise
        return store

    async def close(self) -> None:
        await self._gate.close()

    # --- product environments -------------------------------------------------------------

    async def create_cloud(self, name: str, api_key: str, api_secret: str, auto_backup: bool) -> Cloud:
        cloud = Cloud(name, api_key, api_secret, auto_backup, time.time())
        async with self.transaction() as db:
            await db.execute(
                "INSERT INTO clouds (name, api_key, api_secret, auto_backup, created_at) VALUES (?, ?, ?, ?, ?)",
                (name, api_key, api_secret, int(auto_backup), cloud.created_at),
            )
        return cloud

    async def get_cloud(self, name: str, epoch: object | None = None) -> Cloud | None:
        """Read on every request (so CLI changes apply at once), reused, found or missing,
        while `commit_epoch()` stays where it was before the read (versionstore/epoch_cache.py:
        a `cloud create` of another process shows at once on SQLite, within its notification's
        delivery on PostgreSQL and at the latest pg.CACHE_SECONDS later). Without an epoch
        (PostgreSQL's listener down) it is read every time. `epoch`: what the caller's
        `commit_epoch()` just returned (a request reads it once), None to read it here."""
        if epoch is None:
            epoch = self._gate.commit_epoch()
        hit = self._clouds.get(name, epoch)
        if hit is None:
            row = await self._one(f"{_CLOUD_SELECT} WHERE name = ?", (name,))
            hit = (None if row is None else _cloud(row),)
            self._clouds.put(name, epoch, hit)
        return hit[0]

    async def list_clouds(self) -> list[Cloud]:
        """The product environments (not the restore drills' scratch environments)."""
        rows = await self._all(f"{_CLOUD_SELECT} WHERE name NOT LIKE ? ORDER BY name", (f"%{SCRATCH_MARK}%",))
        return [_cloud(row) for row in rows]

    async def set_auto_backup(self, name: str, enabled: bool) -> None:
        async with self.transaction() as db:
            await db.execute("UPDATE clouds SET auto_backup = ? WHERE name = ?", (int(enabled), name))

    # --- assets ---------------------------------------------------------------------------

    async def get_asset(self, cloud: str, resource_type: str, type_: str, public_id: str) -> Asset | None:
        row = await self._one(
            f"{_ASSET_SELECT} WHERE cloud = ? AND resource_type = ? AND type = ? AND public_id = ?",
            (cloud, resource_type, type_, public_id),
        )
        return None if row is None else _asset(row)

    async def get_asset_by_id(self, cloud: str, asset_id: str) -> Asset | None:
        row = await self._one(f"{_ASSET_SELECT} WHERE cloud = ? AND asset_id = ?", (cloud, asset_id))
        return None if row is None else _asset(row)

    async def versions(self, asset_pk: int) -> list[Version]:
        rows = await self._all(f"{_VERSION_SELECT} WHERE asset_pk = ? ORDER BY version, pk", (asset_pk,))
        return [_version(r) for r in rows]

    async def versions_signature(self, asset_pk: int) -> tuple[int, int]:
        """(count, highest row id) of an asset's versions. Version rows are never updated and
        row ids only grow, so this pair changes whenever the set of versions does: a cheap
        key for caching anything derived from the whole history."""
        row = await self._one("SELECT COUNT(*), COALESCE(MAX(pk), 0) FROM versions WHERE asset_pk = ?", (asset_pk,))
        return int(row[0]), int(row[1])

    async def version_of(self, cloud: str, asset_id: str, version_id: str) -> tuple[str, Version] | None:
        """(public_id, version) in one query: the download path needs no more."""
        row = await self._one(_VERSION_OF, (cloud, asset_id, version_id))
        return None if row is None else (row[0], _version(row[1:]))

    async def backup_bytes(self, asset_pk: int) -> int:
        row = await self._one(
            "SELECT COALESCE(SUM(bytes), 0) FROM (SELECT DISTINCT digest, bytes FROM versions WHERE asset_pk = ? AND backed_up = 1) AS d",
            (asset_pk,),
        )
        return int(row[0])

    async def usage_totals(self, cloud: str) -> tuple[int, int, int]:
        """(live assets, bytes of their current originals, bytes of backed-up versions).
        Backup bytes count each asset's distinct revisions once, like `backup_bytes`."""
        rows = await self._scan(
            "SELECT (SELECT COUNT(*) FROM assets WHERE cloud = ? AND status = 'live'), "
            "(SELECT COALESCE(SUM(bytes), 0) FROM assets WHERE cloud = ? AND status = 'live'), "
            "(SELECT COALESCE(SUM(bytes), 0) FROM (SELECT DISTINCT asset_pk, digest, bytes FROM versions "
            "WHERE cloud = ? AND backed_up = 1) AS d)",
            (cloud, cloud, cloud),
        )
        return int(rows[0][0]), int(rows[0][1]), int(rows[0][2])

    # --- structured metadata field definitions ------------------------------------------------

    async def metadata_fields(self, cloud: str) -> list[dict[str, Any]]:
        rows = await self._all("SELECT definition FROM metadata_fields WHERE cloud = ? ORDER BY position", (cloud,))
        return [json.loads(r[0]) for r in rows]

    async def metadata_field(self, cloud: str, external_id: str) -> dict[str, Any] | None:
        row = await self._one("SELECT definition FROM metadata_fields WHERE cloud = ? AND external_id = ?", (cloud, external_id))
        return None if row is None else dict(json.loads(row[0]))

    async def add_metadata_field(self, cloud: str, definition: dict[str, Any]) -> bool:
        """Insert a definition; False when the external_id is taken."""
        try:
            async with self.transaction() as db:
                await self._gate.lock(db, f"metadata_fields/{cloud}")  # position: MAX + 1
                await db.execute(
                    "INSERT INTO metadata_fields (cloud, external_id, definition, position) "
                    "VALUES (?, ?, ?, (SELECT COALESCE(MAX(position), 0) + 1 FROM metadata_fields WHERE cloud = ?))",
                    (cloud, definition["external_id"], json.dumps(definition), cloud),
                )
        except sqlite3.IntegrityError:
            return False
        return True

    async def replace_metadata_field(self, cloud: str, definition: dict[str, Any]) -> None:
        async with self.transaction() as db:
            await db.execute(
                "UPDATE metadata_fields SET definition = ? WHERE cloud = ? AND external_id = ?",
                (json.dumps(definition), cloud, definition["external_id"]),
            )

    async def delete_metadata_field(self, cloud: str, external_id: str) -> bool:
        async with self.transaction() as db:
            cursor = await db.execute("DELETE FROM metadata_fields WHERE cloud = ? AND external_id = ?", (cloud, external_id))
            return bool(cursor.rowcount)

    # --- writes (each in one transaction) --------------------------------------------------

    async def save_version(
        self, asset: Asset, version: Version, *, pending: bool = False, done_writes: Sequence[int] = ()
    ) -> Asset:
        """Insert or update the asset row and append its new version, atomically; with
        `pending`, queue its revision for the backup target in the same transaction.

        An update is a compare-and-set on the generation the caller read; an insert must find
        the name free. Otherwise AssetChanged, and nothing (version, queue entry) is written.
        `done_writes` are the journal rows of the blob writes this commit names: removed in the
        same transaction, which fails (WriteExpired) if orphan collection took any of them."""
        return (await self.save_versions([(asset, version, pending)], done_writes=done_writes))[0]

    async def save_versions(
        self, items: Sequence[tuple[Asset, Version, bool]], *, done_writes: Sequence[int] = ()
    ) -> list[Asset]:
        """`save_version` of several (asset, version, pending) in one transaction (a batched
        import: one commit, one fsync): all of them, or AssetChanged and none."""
        await self._save_versions(items, done_writes, None)
        return [asset for asset, _, _ in items]

    async def _save_versions(
        self, items: Sequence[tuple[Asset, Version, bool]], done_writes: Sequence[int],
        claim: tuple[str, str, str, float] | None,
    ) -> bool:
        """The transaction of save_versions; with `claim` (cloud, digest, owner, lease_until),
        also take that digest's deletion claim in it. Whether the claim was taken."""
        try:
            async with (self.point_transaction() if len(items) == 1 else self.transaction()) as db:
                await self._finish_writes(db, done_writes)
                for asset, version, pending in items:
                    await self._append_version(db, asset, version, pending)
                return claim is not None and await self._claim_deletion(db, *claim)
        except sqlite3.IntegrityError as exc:
            if not _name_taken(exc):
                raise
            raise AssetChanged(items[0][0].asset_id) from None

    async def _append_version(self, db: Transaction, asset: Asset, version: Version, pending: bool) -> None:
        values = _asset_row(asset)
        if pending:
            await self._bump(db, REVISIONS)
            await db.execute(
                "INSERT INTO backup_pending (cloud, digest, bytes, queued_at, next_attempt_at) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (cloud, digest) DO NOTHING",
                (asset.cloud, version.digest, version.bytes, version.created_at, version.created_at),
            )
        new = asset.pk is None
        if new:
            del values["pk"]
            cursor = await db.execute(
                f"INSERT INTO assets ({', '.join(values)}, generation) VALUES ({', '.join('?' * len(values))}, 0) RETURNING pk",
                tuple(values.values()),
            )
            (pk,) = await cursor.fetchone()
            asset.pk, asset.generation = int(pk), 0
        else:
            pk = values.pop("pk")
            cursor = await db.execute(
                f"UPDATE assets SET {', '.join(f'{k} = ?' for k in values)}, generation = generation + 1 "
                "WHERE pk = ? AND generation = ?",
                (*values.values(), pk, asset.generation),
            )
            if not cursor.rowcount:
                raise AssetChanged(asset.asset_id)
            asset.generation += 1
        # A Version holds scalars only: its values as they are (astuple's deep copy showed in profiles).
        await db.execute(_VERSION_INSERT, (asset.cloud, asset.pk, *(getattr(version, name) for name in _VERSION_COLUMNS)))
        await _write_labels(db, asset, fresh=new)

    async def update_fields(
        self, asset: Asset, *, tags: list[str] | None = None, context: dict[str, str] | None = None,
        metadata: dict[str, str] | None = None,
    ) -> Asset:
        """Write only the given metadata-only columns of a live asset, if its row is still the
        one read (AssetChanged otherwise). Version columns are never written from here."""
        changes = {k: v for k, v in (("tags", tags), ("context", context), ("metadata", metadata)) if v is not None}
        if not changes:
            return asset
        updated = replace(
            asset, tags=asset.tags if tags is None else tags, context=asset.context if context is None else context,
            metadata=asset.metadata if metadata is None else metadata, generation=asset.generation + 1,
        )
        async with self.transaction() as db:
            cursor = await db.execute(
                f"UPDATE assets SET {', '.join(f'{k} = ?' for k in changes)}, generation = generation + 1 "
                "WHERE pk = ? AND generation = ? AND status = 'live'",
                (*(json.dumps(v) for v in changes.values()), asset.pk, asset.generation),
            )
            if not cursor.rowcount:
                raise AssetChanged(asset.asset_id)
            await _write_labels(db, updated)
        return updated

    async def rename_asset(
        self, asset: Asset, to_type: str, to_public_id: str, *, replacing: Asset | None = None, now: float = 0.0
    ) -> Asset:
        """Move a live asset to a new name, atomically taking it from `replacing` (the asset
        that holds it, as read): that one is forgotten if nothing of it is backed up, else
        detached (docs/design.md). Every row is compared-and-set; AssetChanged otherwise."""
        try:
            async with self.transaction() as db:
                if replacing is not None:
                    await self._retire(db, replacing, now, detach=True)
                cursor = await db.execute(
                    "UPDATE assets SET type = ?, public_id = ?, generation = generation + 1 "
                    "WHERE pk = ? AND generation = ? AND status = 'live'",
                    (to_type, to_public_id, asset.pk, asset.generation),
                )
                if not cursor.rowcount:
                    raise AssetChanged(asset.asset_id)
        except sqlite3.IntegrityError as exc:
            if not _name_taken(exc):
                raise
            raise AssetChanged(asset.asset_id) from None
        return replace(asset, type=to_type, public_id=to_public_id, generation=asset.generation + 1)

    async def delete_asset(self, asset: Asset, now: float) -> bool:
        """Delete a live asset as read: it stays as a reservation while any version is backed
        up (True), else its row and versions go (False). AssetChanged if the row moved on."""
        async with self.transaction() as db:
            return await self._retire(db, asset, now, detach=False)

    @staticmethod
    async def _retire(db: Transaction, asset: Asset, now: float, *, detach: bool) -> bool:
        """Inside a transaction: reserve (or, with `detach`, detach from its name) an asset that
        has a backed-up version, or forget one that has none; which of the two is decided by
        the rows as they are now, not by the caller's read. True when the row stays."""
        name = ", public_id = ?, detached_from = ?" if detach else ""
        names = (_detached_name(asset.asset_id), asset.public_id) if detach else ()
        cursor = await db.execute(
            f"UPDATE assets SET status = 'deleted', deleted_at = COALESCE(deleted_at, ?){name}, generation = generation + 1 "
            f"WHERE pk = ? AND generation = ? AND {_HAS_REVISION}",
            (now, *names, asset.pk, asset.generation, asset.pk),
        )
        if cursor.rowcount:
            await db.execute("UPDATE asset_tags SET live = 0 WHERE asset_pk = ?", (asset.pk,))  # the tag index's status
            return True
        cursor = await db.execute(
            f"DELETE FROM assets WHERE pk = ? AND generation = ? AND NOT {_HAS_REVISION}", (asset.pk, asset.generation, asset.pk)
        )
        if not cursor.rowcount:
            raise AssetChanged(asset.asset_id)
        return False

    async def delete_versions(self, asset_pk: int, version_ids: Sequence[str]) -> list[str]:
        """Delete versions of an asset, never the current version of a live one (checked in the
        same statement, whatever the caller read). A deleted asset left without versions goes."""
        async with self.transaction() as db:
            deleted = []
            for version_id in version_ids:
                cursor = await db.execute(
                    "DELETE FROM versions WHERE asset_pk = ? AND version_id = ? "
                    "AND NOT EXISTS (SELECT 1 FROM assets WHERE pk = ? AND status = 'live' AND version_id = ?)",
                    (asset_pk, version_id, asset_pk, version_id),
                )
                if cursor.rowcount:
                    deleted.append(version_id)
            await self._drop_snapshot_items(db, asset_pk, deleted)  # irreversible means final: docs/design.md
            await self._withdraw_archives(db, deleted, time.time())  # in archives too
            await db.execute(
                "DELETE FROM assets WHERE pk = ? AND status = 'deleted' AND NOT EXISTS (SELECT 1 FROM versions WHERE asset_pk = ?)",
                (asset_pk, asset_pk),
            )
        return deleted

    async def digest_referenced(self, cloud: str, digest: str, *, backup: bool) -> bool:
        """Does any backed-up version, snapshot or kept archive (backup store) or live asset
        (primary store) use it?"""
        if backup:
            # A snapshot's reference holds the revision too (docs/snapshots.md), whatever
            # happens to version rows: the one place every blob deletion asks.
            sql = ("SELECT 1 FROM versions WHERE cloud = ? AND digest = ? AND backed_up = 1 UNION ALL "
                   "SELECT 1 FROM snapshot_items WHERE cloud = ? AND digest = ? AND covered = 1 UNION ALL "
                   f"{_PURGE_HOLD} UNION ALL {_ARCHIVE_HOLD} LIMIT 1")
            return await self._one(sql, (cloud, digest) * 4) is not None
        sql = "SELECT 1 FROM assets WHERE cloud = ? AND digest = ? AND status = 'live' LIMIT 1"
        return await self._one(sql, (cloud, digest)) is not None

    # --- chunked upload sessions ------------------------------------------------------------
    # A session's state only moves open -> assembling -> finished (or back to open when an
    # assembly fails or its lease ran out), always by an UPDATE conditional on the state it
    # leaves, so several processes on one database agree on who may add or assemble.

    async def get_upload_session(self, cloud: str, upload_id: str) -> UploadSession | None:
        row = await self._one(f"SELECT {_SESSION_COLUMNS} FROM upload_sessions WHERE cloud = ? AND upload_id = ?", (cloud, upload_id))
        return None if row is None else _session(row)

    async def add_upload_part(
        self,
        cloud: str,
        upload_id: str,
        part: UploadPart,
        decide: Callable[[UploadSession | None, int, int], UploadSession],
    ) -> tuple[UploadSession, bool, list[UploadPart]]:
        """Record a received part in its open session, in one transaction.

        `decide(existing, other open sessions, their claimed bytes)` returns the session row to
        write (or raises to refuse). Returns (the session, whether the part was new, all parts).
        """
        async with self.transaction() as db:
            await self._gate.lock(db, f"upload_sessions/{cloud}")  # the cap is decided over all sessions
            cursor = await db.execute(
                f"SELECT {_SESSION_COLUMNS} FROM upload_sessions WHERE cloud = ? AND upload_id = ?", (cloud, upload_id)
            )
            row = await cursor.fetchone()
            cursor = await db.execute(
                "SELECT COUNT(*), COALESCE(SUM(claimed), 0) FROM upload_sessions "
                "WHERE cloud = ? AND upload_id != ? AND state != 'finished'",
                (cloud, upload_id),
            )
            others, claimed = await cursor.fetchone()
            session = decide(None if row is None else _session(row), others, claimed)
            cursor = await db.execute(
                "INSERT INTO upload_sessions (cloud, upload_id, resource_type, public_id, total, claimed, state, created_at, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?, 'open', ?, ?) "
                "ON CONFLICT (cloud, upload_id) DO UPDATE SET total = excluded.total, claimed = excluded.claimed, "
                "updated_at = excluded.updated_at WHERE upload_sessions.state = 'open'",
                (cloud, upload_id, session.resource_type, session.public_id, session.total, session.claimed,
                 session.created_at, session.updated_at),
            )
            if cursor.rowcount != 1:
                raise RuntimeError(f"upload session {cloud}/{upload_id} is not open")  # decide() saw it open
            cursor = await db.execute(
                "INSERT INTO upload_parts (cloud, upload_id, first_byte, end_byte, file) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (cloud, upload_id, first_byte, end_byte) DO NOTHING",
                (cloud, upload_id, part.first, part.end, part.file),
            )
            added = cursor.rowcount == 1
            parts = await self._parts(db, cloud, upload_id)
        return session, added, parts

    async def replace_upload_part(self, cloud: str, upload_id: str, old_file: str, part: UploadPart) -> list[UploadPart] | None:
        """A retried chunk's copy takes the place of the recorded copy of the same range (which
        its process cannot read: another machine's spool), while the session is open; returns
        all parts, or None when the session or that copy changed meanwhile."""
        async with self.transaction() as db:
            cursor = await db.execute(
                "UPDATE upload_parts SET file = ? WHERE cloud = ? AND upload_id = ? AND first_byte = ? AND end_byte = ? "
                "AND file = ? AND EXISTS (SELECT 1 FROM upload_sessions s WHERE s.cloud = ? AND s.upload_id = ? AND s.state = 'open')",
                (part.file, cloud, upload_id, part.first, part.end, old_file, cloud, upload_id),
            )
            if cursor.rowcount != 1:
                return None
            return await self._parts(db, cloud, upload_id)

    @staticmethod
    async def _parts(db: Transaction, cloud: str, upload_id: str) -> list[UploadPart]:
        cursor = await db.execute(
            "SELECT first_byte, end_byte, file FROM upload_parts WHERE cloud = ? AND upload_id = ? ORDER BY first_byte, end_byte",
            (cloud, upload_id),
        )
        return [UploadPart(*row) for row in await cursor.fetchall()]

    async def claim_upload_session(self, cloud: str, upload_id: str, token: str) -> list[UploadPart] | None:
        """open -> assembling, owned by `token`; returns the parts (fixed from now on), or None
        when the session was not open (another request is assembling it, or it is finished)."""
        async with self.transaction() as db:
            cursor = await db.execute(
                "UPDATE upload_sessions SET state = 'assembling', claim = ?, updated_at = ? "
                "WHERE cloud = ? AND upload_id = ? AND state = 'open'",
                (token, time.time(), cloud, upload_id),
            )
            if cursor.rowcount != 1:
                return None
            return await self._parts(db, cloud, upload_id)

    async def finish_upload_session(self, cloud: str, upload_id: str, token: str) -> list[str]:
        """assembling -> finished (kept to refuse late chunks until it expires); returns the part
        files, no longer referenced, for the caller to remove."""
        async with self.transaction() as db:
            cursor = await db.execute(
                "UPDATE upload_sessions SET state = 'finished', claim = NULL, updated_at = ? "
                "WHERE cloud = ? AND upload_id = ? AND state = 'assembling' AND claim = ?",
                (time.time(), cloud, upload_id, token),
            )
            if cursor.rowcount != 1:
                return []
            files = [part.file for part in await self._parts(db, cloud, upload_id)]
            await db.execute("DELETE FROM upload_parts WHERE cloud = ? AND upload_id = ?", (cloud, upload_id))
        return files

    async def renew_upload_claim(self, cloud: str, upload_id: str, token: str) -> bool:
        """The assembling request is alive: move its lease forward (see expire_upload_sessions)."""
        async with self.transaction() as db:
            cursor = await db.execute(
                "UPDATE upload_sessions SET updated_at = ? WHERE cloud = ? AND upload_id = ? AND state = 'assembling' AND claim = ?",
                (time.time(), cloud, upload_id, token),
            )
            return cursor.rowcount == 1

    async def reopen_upload_session(self, cloud: str, upload_id: str, token: str) -> bool:
        """assembling -> open after a failed assembly, so a retried chunk can finish it."""
        async with self.transaction() as db:
            cursor = await db.execute(
                "UPDATE upload_sessions SET state = 'open', claim = NULL, updated_at = ? "
                "WHERE cloud = ? AND upload_id = ? AND state = 'assembling' AND claim = ?",
                (time.time(), cloud, upload_id, token),
            )
            return cursor.rowcount == 1

    async def expire_upload_sessions(self, idle_before: float, lease_before: float) -> list[str]:
        """Drop open and finished sessions idle since `idle_before`, reopen assemblies whose
        owner has not renewed its claim since `lease_before` (a crashed process); returns the dropped
        sessions' part files for the caller to remove."""
        stale = "SELECT cloud, upload_id FROM upload_sessions WHERE state IN ('open', 'finished') AND updated_at < ?"
        async with self.transaction() as db:
            cursor = await db.execute(f"SELECT file FROM upload_parts WHERE (cloud, upload_id) IN ({stale})", (idle_before,))
            files = [row[0] for row in await cursor.fetchall()]
            await db.execute(f"DELETE FROM upload_parts WHERE (cloud, upload_id) IN ({stale})", (idle_before,))
            await db.execute(f"DELETE FROM upload_sessions WHERE (cloud, upload_id) IN ({stale})", (idle_before,))
            await db.execute(
                "UPDATE upload_sessions SET state = 'open', claim = NULL WHERE state = 'assembling' AND updated_at < ?",
                (lease_before,),
            )
        return files

    async def upload_part_files(self) -> set[str]:
        return {row[0] for row in await self._all("SELECT file FROM upload_parts")}

    # --- backup targets, the pending queue and health ----------------------------------------

    async def pending_digests(self, cloud: str, digests: Sequence[str]) -> set[str]:
        """Which of these digests still wait for the backup target (usually none: one probe)."""
        if not digests or await self._one("SELECT 1 FROM backup_pending LIMIT 1") is None:
            return set()
        marks = ", ".join("?" * len(set(digests)))
        rows = await self._all(f"SELECT digest FROM backup_pending WHERE cloud = ? AND digest IN ({marks})", (cloud, *set(digests)))
        return {r[0] for r in rows}

    async def get_pending(self, cloud: str, digest: str) -> PendingRevision | None:
        row = await self._one(f"{_PENDING_SELECT} WHERE cloud = ? AND digest = ?", (cloud, digest))
        return None if row is None else PendingRevision(*row)

    async def reschedule_pending(self, cloud: str, digest: str, next_attempt_at: float, error: str) -> None:
        async with self.transaction() as db:
            await db.execute(
                "UPDATE backup_pending SET attempts = attempts + 1, next_attempt_at = ?, last_error = ?, owner = NULL, "
                "lease_until = 0 WHERE cloud = ? AND digest = ?",
                (next_attempt_at, error, cloud, digest),
            )

    async def retry_pending_now(self, cloud: str) -> None:
        """The target just recovered: make every waiting revision due at once."""
        async with self.transaction() as db:
            await db.execute("UPDATE backup_pending SET next_attempt_at = 0 WHERE cloud = ?", (cloud,))

    async def clear_pending(self, cloud: str, digest: str) -> None:
        async with self.transaction() as db:
            await db.execute("DELETE FROM backup_pending WHERE cloud = ? AND digest = ?", (cloud, digest))
            await self._bump(db, REVISIONS)

    async def pending_summary(self, cloud: str) -> tuple[int, int, float | None]:
        """(count, bytes, oldest queued_at) of the environment's pending revisions."""
        row = await self._one("SELECT COUNT(*), COALESCE(SUM(bytes), 0), MIN(queued_at) FROM backup_pending WHERE cloud = ?", (cloud,))
        return int(row[0]), int(row[1]), row[2]

    async def get_health(self, cloud: str) -> BackupHealth | None:
        row = await self._one("SELECT cloud, state, last_error, last_error_at, updated_at FROM backup_health WHERE cloud = ?", (cloud,))
        return None if row is None else BackupHealth(*row)

    async def save_health(self, health: BackupHealth) -> None:
        """Persist a target's health; its generation moves, so every process drops what it
        cached about that target (BackupTargets)."""
        async with self.transaction() as db:
            await db.execute(
                "INSERT INTO backup_health (cloud, state, last_error, last_error_at, updated_at) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (cloud) DO UPDATE SET state = excluded.state, last_error = excluded.last_error, "
                "last_error_at = excluded.last_error_at, updated_at = excluded.updated_at",
                astuple(health),
            )
            await self._bump(db, target_generation(health.cloud))

    async def revisions_after(self, cloud: str, after_pk: int, limit: int) -> list[tuple[int, str, int]]:
        """(version pk, digest, bytes) of backed-up versions in commit order: a migration's
        cursor is the last pk it copied, so versions committed during the copy come after it."""
        rows = await self._scan(
            "SELECT pk, digest, bytes FROM versions WHERE cloud = ? AND backed_up = 1 AND pk > ? ORDER BY pk LIMIT ?",
            (cloud, after_pk, limit),
        )
        return [(int(r[0]), r[1], int(r[2])) for r in rows]

    async def live_assets_after(self, cloud: str, after_pk: int, limit: int) -> list[tuple[Asset, int, bool, str | None]]:
        """(asset, current version's row id, whether it is a revision, the job that made it one)
        of live assets in row order: an initial backup's cursor is the last asset row it examined."""
        rows = await self._scan(
            f"SELECT {', '.join('a.' + c for c in _ASSET_COLUMNS)}, v.pk, v.backed_up, v.backup_job FROM assets a "
            "JOIN versions v ON v.version_id = a.version_id "
            "WHERE a.cloud = ? AND a.status = 'live' AND a.pk > ? ORDER BY a.pk LIMIT ?",
            (cloud, after_pk, limit),
        )
        width = len(_ASSET_COLUMNS)
        return [(_asset(r[:width]), int(r[width]), bool(r[width + 1]), r[width + 2]) for r in rows]

    async def unbacked_totals(self, cloud: str) -> tuple[int, int]:
        """(assets, bytes) of live assets whose current version is not a revision."""
        rows = await self._scan(
            "SELECT COUNT(*), COALESCE(SUM(v.bytes), 0) FROM assets a JOIN versions v ON v.version_id = a.version_id "
            "WHERE a.cloud = ? AND a.status = 'live' AND v.backed_up = 0",
            (cloud,),
        )
        return int(rows[0][0]), int(rows[0][1])

    async def mark_backed_up(
        self, cloud: str, version_pk: int, version: Version, *, pending: bool, job_id: str, done_writes: Sequence[int] = ()
    ) -> bool:
        """Make an existing version a revision (its bytes are in the target, or queued with
        `pending`), recording the job that did it. False when it already was one.
        `done_writes`: as in save_version."""
        async with self.transaction() as db:
            await self._finish_writes(db, done_writes)
            cursor = await db.execute(
                "UPDATE versions SET backed_up = 1, backup_job = ? WHERE pk = ? AND backed_up = 0", (job_id, version_pk)
            )
            if not cursor.rowcount:
                return False
            if pending:
                await db.execute(
                    "INSERT INTO backup_pending (cloud, digest, bytes, queued_at, next_attempt_at) VALUES (?, ?, ?, ?, ?) "
                    "ON CONFLICT (cloud, digest) DO NOTHING",
                    (cloud, version.digest, version.bytes, time.time(), 0),
                )
            await self._bump(db, REVISIONS)
        return True

    async def job_backups(self, job_id: str) -> tuple[int, int]:
        """(versions, bytes) a job made revisions: exact however often it was restarted."""
        row = await self._one("SELECT COUNT(*), COALESCE(SUM(bytes), 0) FROM versions WHERE backup_job = ?", (job_id,))
        return int(row[0]), int(row[1])

    async def revision_totals(self, cloud: str) -> tuple[int, int]:
        """(versions, bytes) backed up in the environment: a migration's denominator."""
        rows = await self._scan("SELECT COUNT(*), COALESCE(SUM(bytes), 0) FROM versions WHERE cloud = ? AND backed_up = 1", (cloud,))
        return int(rows[0][0]), int(rows[0][1])

    # --- jobs -------------------------------------------------------------------------------

    async def create_job(self, job: Job) -> Job | None:
        """Insert a job; None when the environment already has an open job of that kind."""
        values = _job_row(job)
        try:
            async with self.transaction() as db:
                await db.execute(
                    f"INSERT INTO jobs ({', '.join(values)}) VALUES ({', '.join('?' * len(values))})", tuple(values.values())
                )
        except sqlite3.IntegrityError:
            return None
        return job

    async def save_job(self, job: Job, *, backup_target: tuple[str, str | None] | None = None) -> bool:
        """Persist a job's state; `backup_target=(cloud, url)` switches the environment's
        target in the same transaction (a migration's last step).

        Only an open job is written: once a job is completed, failed or cancelled (by another
        request, while its runner was mid-batch) its row is final. False when it was not open,
        and then nothing (not the switch either) is written."""
        values = _job_row(job)
        job_id = values.pop("id")
        async with self.transaction() as db:
            cursor = await db.execute(
                f"UPDATE jobs SET {', '.join(f'{k} = ?' for k in values)} WHERE id = ? AND status IN ('pending', 'active')",
                (*values.values(), job_id),
            )
            if not cursor.rowcount:
                return False
            if backup_target is not None:
                await db.execute("UPDATE clouds SET backup_target = ? WHERE name = ?", (backup_target[1], backup_target[0]))
        return True

    async def get_job(self, cloud: str, job_id: str) -> Job | None:
        row = await self._one(f"{_JOB_SELECT} WHERE cloud = ? AND id = ?", (cloud, job_id))
        return None if row is None else _job(row)

    async def list_jobs(self, cloud: str, kind: str, limit: int, offset: int = 0) -> list[Job]:
        rows = await self._all(
            f"{_JOB_SELECT} WHERE cloud = ? AND kind = ? ORDER BY created_at DESC, id LIMIT ? OFFSET ?", (cloud, kind, limit, offset)
        )
        return [_job(r) for r in rows]

    async def open_jobs(self, cloud: str | None = None, kind: str | None = None) -> list[Job]:
        sql, args = f"{_JOB_SELECT} WHERE status IN ('pending', 'active')", []
        if cloud is not None:
            sql, args = sql + " AND cloud = ?", [cloud]
        if kind is not None:
            sql, args = sql + " AND kind = ?", [*args, kind]
        return [_job(r) for r in await self._all(sql + " ORDER BY created_at", args)]

    # --- verify and scrub (versionstore/verify.py) -------------------------------------------

    async def record_checks(self, cloud: str, digest: str, outcomes: dict[str, tuple[str, str | None]]) -> bool:
        """Record the checks of one revision, {store: (outcome, detail)}, in one transaction."""
        return await self.record_checks_many(cloud, [(digest, outcomes)])

    async def record_checks_many(self, cloud: str, checks: Sequence[tuple[str, dict[str, tuple[str, str | None]]]]) -> bool:
        """Record the checks of many revisions in one transaction (one fsync for a scrub's batch).

        True when a store's copy went from good to bad or back: then `outcome_seq` moves on, so
        caches keyed on `verify_generation` (the versions JSON) are rebuilt in every process."""
        now = time.time()
        rows = [(digest, store, outcome, detail) for digest, outcomes in checks for store, (outcome, detail) in outcomes.items()]
        if not rows:
            return False
        digests = sorted({row[0] for row in rows})
        async with self.transaction() as db:
            await self._gate.lock(db, "blob_checks")  # outcome_seq: MAX + 1, decided on what was bad before
            bad_before: set[tuple[str, str]] = set()
            for start in range(0, len(digests), 500):  # one query per 500 digests, not one per row
                part = digests[start : start + 500]
                cursor = await db.execute(
                    f"SELECT digest, store FROM blob_checks WHERE cloud = ? AND outcome IN ('missing', 'corrupt') "
                    f"AND digest IN ({', '.join('?' * len(part))})", (cloud, *part),
                )
                bad_before.update((r[0], r[1]) for r in await cursor.fetchall())
            flipped = {(d, s) for d, s, outcome, _ in rows if ((d, s) in bad_before) != (outcome in _BAD_OUTCOMES)}
            seq = 0
            if flipped:
                (seq,) = await (await db.execute("SELECT COALESCE(MAX(outcome_seq), 0) + 1 FROM blob_checks")).fetchone()
            # An unchanged good/bad state keeps its sequence number (0 means "keep" on conflict).
            await db.executemany(
                "INSERT INTO blob_checks (cloud, digest, store, outcome, detail, last_verified_at, outcome_seq) "
                "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (cloud, digest, store) DO UPDATE SET outcome = excluded.outcome, "
                "detail = excluded.detail, last_verified_at = excluded.last_verified_at, outcome_seq = "
                "CASE WHEN excluded.outcome_seq > 0 THEN excluded.outcome_seq ELSE blob_checks.outcome_seq END",
                [(cloud, d, s, outcome, detail, now, seq if (d, s) in flipped else 0) for d, s, outcome, detail in rows],
            )
        return bool(flipped)

    async def forget_checks(self, cloud: str, digest: str) -> None:
        """Clear the damage marks of a revision nothing references any more (its bytes are being
        deleted), so a later upload of the same bytes does not inherit them. Rows are kept, not
        deleted: `verify_generation` (a MAX) must never go back."""
        async with self.transaction() as db:
            await self._gate.lock(db, "blob_checks")
            (seq,) = await (await db.execute("SELECT COALESCE(MAX(outcome_seq), 0) + 1 FROM blob_checks")).fetchone()
            await db.execute(
                "UPDATE blob_checks SET outcome = 'ok', detail = 'released: no version references these bytes', outcome_seq = ? "
                "WHERE cloud = ? AND digest = ? AND outcome IN ('missing', 'corrupt')",
                (seq, cloud, digest),
            )

    async def verify_generation(self) -> int:
        """Moves on whenever a stored copy turns bad or good again (an indexed MAX)."""
        row = await self._one("SELECT COALESCE(MAX(outcome_seq), 0) FROM blob_checks")
        return int(row[0])

    async def bad_revisions(self, cloud: str, digests: Sequence[str]) -> dict[str, str]:
        """{digest: outcome} of these revisions whose backup copy was last found missing or corrupt."""
        if not digests or await self._one("SELECT 1 FROM blob_checks WHERE outcome IN ('missing', 'corrupt') LIMIT 1") is None:
            return {}
        marks = ", ".join("?" * len(set(digests)))
        rows = await self._all(
            f"SELECT digest, outcome FROM blob_checks WHERE cloud = ? AND store = 'backup' AND outcome IN ('missing', 'corrupt') "
            f"AND digest IN ({marks})",
            (cloud, *set(digests)),
        )
        return {r[0]: r[1] for r in rows}

    async def last_verified_at(self, cloud: str, digest: str, store: str) -> float | None:
        row = await self._one(
            "SELECT last_verified_at FROM blob_checks WHERE cloud = ? AND digest = ? AND store = ?", (cloud, digest, store)
        )
        return None if row is None else float(row[0])

    async def checked_since(self, cloud: str, digests: Sequence[str], since: float) -> set[str]:
        """Which of these revisions' backup copies were checked at or after `since`."""
        found: set[str] = set()
        for start in range(0, len(digests), 500):
            part = digests[start : start + 500]
            rows = await self._all(
                f"SELECT digest FROM blob_checks WHERE cloud = ? AND store = 'backup' AND last_verified_at >= ? "
                f"AND digest IN ({', '.join('?' * len(part))})",
                (cloud, since, *part),
            )
            found.update(r[0] for r in rows)
        return found

    async def check_summary(self, cloud: str) -> dict[str, Any]:
        """Counts of the last recorded outcome per store, only of revisions still referenced."""
        rows = await self._scan(
            "SELECT c.store, c.outcome, COUNT(*), MAX(c.last_verified_at) FROM blob_checks c WHERE c.cloud = ? "
            "AND EXISTS (SELECT 1 FROM versions v WHERE v.cloud = c.cloud AND v.digest = c.digest) GROUP BY c.store, c.outcome",
            (cloud,),
        )
        summary: dict[str, Any] = {"last_verified_at": None}
        for store, outcome, count, last in rows:
            summary.setdefault(store, {})[outcome] = int(count)
            if summary["last_verified_at"] is None or last > summary["last_verified_at"]:
                summary["last_verified_at"] = float(last)
        return summary

    # --- staff, sessions, audit (support console, versionstore/console/) ----------------------

    async def add_staff(self, member: StaffMember) -> bool:
        """False when a member with this email exists."""
        async with self.transaction() as db:
            cursor = await db.execute(
                "INSERT INTO staff (email, password_hash, role, clouds, disabled, failed_logins, created_at) "
                "VALUES (?, ?, ?, ?, 0, 0, ?) ON CONFLICT (email) DO NOTHING RETURNING email",
                (member.email, member.password_hash, member.role, json.dumps(list(member.clouds)), member.created_at),
            )
            return await cursor.fetchone() is not None

    async def get_staff(self, email: str) -> StaffMember | None:
        row = await self._one(f"{_STAFF_SELECT} WHERE email = ?", (email,))
        return None if row is None else _staff(row)

    async def list_staff(self) -> list[StaffMember]:
        return [_staff(r) for r in await self._all(f"{_STAFF_SELECT} ORDER BY email")]

    async def update_staff(self, email: str, *, password_hash: str | None = None, disabled: bool | None = None) -> bool:
        """Change a password or the disabled flag; either ends every session of the member."""
        sets: list[str] = []
        args: list[Any] = []
        if password_hash is not None:
            sets += ["password_hash = ?", "failed_logins = 0", "locked_until = NULL"]
            args.append(password_hash)
        if disabled is not None:
            sets.append("disabled = ?")
            args.append(int(disabled))
        async with self.transaction() as db:
            cursor = await db.execute(f"UPDATE staff SET {', '.join(sets)} WHERE email = ? RETURNING email", (*args, email))
            found = await cursor.fetchone() is not None
            await db.execute("DELETE FROM console_sessions WHERE email = ?", (email,))
        return found

    async def record_login_failure(self, email: str, now: float, max_failures: int, lock_seconds: float) -> float | None:
        """Count a failed sign-in; at `max_failures` consecutive ones the account is locked
        until the returned time (None while not locked). The count is kept in the row, so it
        holds across processes."""
        async with self.transaction() as db:
            cursor = await db.execute(
                "UPDATE staff SET failed_logins = failed_logins + 1 WHERE email = ? RETURNING failed_logins", (email,)
            )
            row = await cursor.fetchone()
            if row is None or int(row[0]) < max_failures:
                return None
            until = now + lock_seconds
            await db.execute("UPDATE staff SET locked_until = ?, failed_logins = 0 WHERE email = ?", (until, email))
            return until

    async def record_login_success(self, email: str) -> None:
        async with self.transaction() as db:
            await db.execute("UPDATE staff SET failed_logins = 0, locked_until = NULL WHERE email = ?", (email,))

    async def create_console_session(self, session: ConsoleSession) -> None:
        async with self.transaction() as db:
            await db.execute(
                "INSERT INTO console_sessions (token_hash, email, csrf_token, address, created_at, last_seen_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (session.token_hash, session.email, session.csrf_token, session.address, session.created_at, session.last_seen_at),
            )

    async def get_console_session(self, token_hash: str) -> ConsoleSession | None:
        row = await self._one(
            "SELECT token_hash, email, csrf_token, address, created_at, last_seen_at FROM console_sessions WHERE token_hash = ?",
            (token_hash,),
        )
        return None if row is None else ConsoleSession(*row)

    async def touch_console_session(self, token_hash: str, now: float) -> None:
        async with self.transaction() as db:
            await db.execute("UPDATE console_sessions SET last_seen_at = ? WHERE token_hash = ?", (now, token_hash))

    async def delete_console_sessions(self, *, token_hash: str | None = None, older_than: float | None = None) -> None:
        """End one session, or every session last seen before `older_than`."""
        async with self.transaction() as db:
            if token_hash is not None:
                await db.execute("DELETE FROM console_sessions WHERE token_hash = ?", (token_hash,))
            if older_than is not None:
                await db.execute("DELETE FROM console_sessions WHERE last_seen_at < ?", (older_than,))

    async def append_audit(self, record: AuditRecord, seal: Callable[[AuditRecord], str]) -> AuditRecord:
        """Append one record after the current head, read inside this write transaction, so
        concurrent writers queue instead of forking the chain (`prev_hash` is also UNIQUE:
        a writer on another connection that read the same head fails and retries)."""
        for _attempt in range(5):
            try:
                async with self.transaction() as db:
                    await self._gate.lock(db, "audit")  # writers queue here instead of racing for the head
                    cursor = await db.execute("SELECT seq, hash FROM audit_head WHERE id = 1")
                    head = await cursor.fetchone()
                    seq, prev_hash = (int(head[0]) + 1, str(head[1])) if head else (1, AUDIT_GENESIS)
                    sealed = replace(record, seq=seq, prev_hash=prev_hash)
                    sealed = replace(sealed, hash=seal(sealed))
                    await db.execute(
                        f"INSERT INTO audit_log ({_AUDIT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", _audit_row(sealed)
                    )
                    await db.execute(
                        "INSERT INTO audit_head (id, seq, hash) VALUES (1, ?, ?) "
                        "ON CONFLICT (id) DO UPDATE SET seq = excluded.seq, hash = excluded.hash",
                        (sealed.seq, sealed.hash),
                    )
                return sealed
            except sqlite3.IntegrityError:
                continue
        raise RuntimeError("the audit log kept changing under this writer")

    async def audit_head(self) -> tuple[int, str] | None:
        row = await self._one("SELECT seq, hash FROM audit_head WHERE id = 1")
        return None if row is None else (int(row[0]), str(row[1]))

    async def audit_records(
        self, after_seq: int, limit: int, *, before_seq: int | None = None, filters: dict[str, str] | None = None
    ) -> list[AuditRecord]:
        """Records in seq order after `after_seq`, or newest first before `before_seq`;
        `filters` compare whole columns (cloud, actor, action, outcome) or `target_like`."""
        clauses: list[str] = ["seq > ?"]
        args: list[Any] = [after_seq]
        if before_seq is not None:
            clauses.append("seq < ?")
            args.append(before_seq)
        for column, value in (filters or {}).items():
            if column in ("cloud", "actor", "action", "outcome"):
                clauses.append(f"{column} = ?")
                args.append(value)
            elif column == "target_like":
                clauses.append("target LIKE ? ESCAPE '\\'")
                args.append(f"%{like_escape(value)}%")
        order = "seq DESC" if before_seq is not None else "seq"
        rows = await self._scan(
            f"SELECT {_AUDIT_COLUMNS} FROM audit_log WHERE {' AND '.join(clauses)} ORDER BY {order} LIMIT ?", (*args, limit)
        )
        return [_audit(r) for r in rows]



    # --- listing and search (libsize: queries.AssetQuery compiled to SQL) ---------------------
    # Every query here is an index range whatever the library size (tests/test_library_scale.py
    # pins the plans): filters and sorts have matching indexes (schema migration 9), tags and
    # context entries live in side tables, pages continue from a keyset position, counts stop
    # at a ceiling.

    async def find_assets(self, cloud: str, query: AssetQuery) -> list[Asset]:
        """One page of assets matching `query`, in its order, after its keyset position. A long
        page is decoded off the event loop (500 rows of JSON columns is tens of milliseconds)."""
        rows = await self._scan(*select_sql(cloud, query))
        if len(rows) > _DECODE_ON_LOOP:
            return await asyncio.to_thread(lambda: [_asset(r) for r in rows])
        return [_asset(r) for r in rows]

    async def count_assets(self, cloud: str, query: AssetQuery, ceiling: int) -> int:
        """How many assets match `query` (its position ignored), counting no further than `ceiling`."""
        return int((await self._scan(*count_sql(cloud, query, ceiling)))[0][0])

    async def list_tags(self, cloud: str, resource_type: str, prefix: str, limit: int, after: str | None) -> list[str]:
        """Distinct tags of live assets of one resource type, sorted, after `after` (Admin API
        `tags`). Walks the distinct tags one index probe each (a loose index scan), so the cost
        follows the number of distinct tags listed, not the number of tagged assets."""
        start = max(prefix, after or "")
        end = queries.prefix_successor(prefix) if prefix else None
        bound = "AND tag < ?" if end is not None else ""
        first = ">" if after is not None and after >= prefix else ">="
        rows = await self._scan(
            "WITH RECURSIVE walk(tag) AS ("
            f"SELECT MIN(tag) FROM asset_tags WHERE cloud = ? AND tag {first} ? {bound} "
            f"UNION ALL SELECT (SELECT MIN(tag) FROM asset_tags WHERE cloud = ? AND tag > walk.tag {bound}) "
            "FROM walk WHERE walk.tag IS NOT NULL) "
            "SELECT tag FROM walk WHERE tag IS NOT NULL AND EXISTS (SELECT 1 FROM asset_tags t CROSS JOIN assets a "
            "WHERE t.cloud = ? AND t.tag = walk.tag AND t.live = 1 AND a.pk = t.asset_pk AND a.resource_type = ?) "
            "LIMIT ?",
            (cloud, start, *([end] if end else []), cloud, *([end] if end else []), cloud, resource_type, limit),
        )
        return [str(r[0]) for r in rows]

    async def backfill_labels(self, batch: int = 5000) -> None:
        """Write the tag and context side rows of assets stored before schema migration 9, in
        batches that each commit with their position (an interrupted start resumes)."""
        while (row := await self._one("SELECT after_pk FROM label_backfill")) is not None:
            rows = await self._scan(
                "SELECT pk, cloud, created_at, tags, context, status FROM assets WHERE pk > ? ORDER BY pk LIMIT ?", (row[0], batch)
            )
            async with self.transaction() as db:
                await _insert_labels(db, [
                    _Labels(pk, cloud, at, json.loads(tags), json.loads(context), status == "live")
                    for pk, cloud, at, tags, context, status in rows
                ])
                if rows:
                    await db.execute("UPDATE label_backfill SET after_pk = ?", (rows[-1][0],))
                else:
                    await db.execute("DELETE FROM label_backfill")



    # --- operations: readiness probe and read-path cache keys (versionstore/http/readiness.py,
    # --- versionstore/http/versions_cache.py) -------------------------------------------------

    async def ping(self) -> None:
        """A trivial query that reads a table, run off the event loop (the readiness probe)."""
        await self._scan("SELECT 1 FROM clouds LIMIT 1")

    def commit_epoch(self) -> object | None:
        """A value that moves at every commit of every connection and process: on SQLite
        `PRAGMA data_version`, at once; on PostgreSQL (versionstore/pg.py, pg_commits.py) at
        this process's commits at once and at another's as its notification is delivered, and
        in any case every pg.CACHE_SECONDS; None while PostgreSQL's listener is not connected.
        While it returns the value it returned before a read, nothing that read saw has
        changed (up to that delivery): what is reused across requests (a rendered resource, a
        download's checks, an environment) is cached on it (versionstore/epoch_cache.py)."""
        return self._gate.commit_epoch()

    # --- several processes: the write journal, claims, leases and generations -----------------
    # (docs/design.md, "Processes, claims and leases"). Every claim is a conditional write; a
    # holder's lease is renewed by its process's heartbeat (renew_leases). Checks that must see
    # another process's claim follow the pattern "commit my claim, then read theirs": of two
    # racing parties at least one sees the other, on SQLite and on PostgreSQL (read committed).

    @staticmethod
    async def _bump(db: Transaction, name: str) -> None:
        await db.execute(
            "INSERT INTO generations (name, value) VALUES (?, 1) ON CONFLICT (name) DO UPDATE SET value = generations.value + 1",
            (name,),
        )

    async def bump_generation(self, name: str) -> None:
        async with self.transaction() as db:
            await self._bump(db, name)

    async def generation(self, name: str) -> int:
        """A counter caches key on (one indexed read; 0 until first bumped)."""
        row = await self._one("SELECT value FROM generations WHERE name = ?", (name,))
        return 0 if row is None else int(row[0])

    async def revisions_generation(self) -> int:
        """Moves whenever a revision enters or leaves the pending queue or a version becomes a
        revision after the fact, in any process: part of the key of anything cached that shows
        `restorable`."""
        return await self.generation(REVISIONS)

    @staticmethod
    async def _finish_writes(db: Transaction, ids: Sequence[int]) -> None:
        """Inside the commit naming the blobs: remove their journal rows, which must still be
        live. A lease that ran out never comes back (renew_leases only extends live ones), so
        orphan collection may delete such a write's blob and this commit cannot name it."""
        if not ids:
            return
        # One statement for all of them: each statement inside a SQLite transaction is a hop to
        # the writer thread (docs/performance.md, "Small uploads without aiohttp's multipart reader").
        wanted = sorted(set(ids))
        marks = ", ".join("?" * len(wanted))
        cursor = await db.execute(f"DELETE FROM inflight_writes WHERE id IN ({marks}) AND lease_until > ?", (*wanted, time.time()))
        if cursor.rowcount != len(wanted):
            raise WriteExpired(f"the lease of blob writes {wanted} ran out before their commit")

    async def begin_writes(
        self, cloud: str, digest: str, roles: Sequence[tuple[str, str | None]], owner: str, lease_until: float
    ) -> list[int]:
        """Journal blob writes about to start, one row per (role, target); returns their ids."""
        return (await self.begin_writes_many(cloud, [digest], roles, owner, lease_until))[0]

    async def begin_writes_many(
        self, cloud: str, digests: Sequence[str], roles: Sequence[tuple[str, str | None]], owner: str, lease_until: float,
        *, releasing: Sequence[str] = (),
    ) -> list[list[int]]:
        """`begin_writes` of several digests in one transaction: the ids per digest, in order.
        With `releasing`, also the `release` rows of those digests (Claims.writing: one commit
        for both journals), their ids as one more list, last."""
        now = time.time()
        rows = [(cloud, digest, role, target, owner, now, lease_until) for digest in digests for role, target in roles]
        rows += [(cloud, digest, "release", None, owner, now, lease_until) for digest in releasing]
        new_ids: list[int] = []
        async with (self.point_transaction() if len(rows) <= _POINT_ROWS else self.transaction()) as db:
            # A few statements of many rows, not one per row (each is a hop to SQLite's writer
            # thread). Ids are handed out in the order of the VALUES rows, whatever order
            # RETURNING lists them in, so the sorted ids are the rows' ids in order.
            for start in range(0, len(rows), _ROWS_PER_INSERT):
                chunk = rows[start : start + _ROWS_PER_INSERT]
                cursor = await db.execute(
                    "INSERT INTO inflight_writes (cloud, digest, role, target, owner, started_at, lease_until) VALUES "
                    + ", ".join(["(?, ?, ?, ?, ?, ?, ?)"] * len(chunk)) + " RETURNING id",
                    [value for row in chunk for value in row],
                )
                new_ids += sorted(int(row[0]) for row in await cursor.fetchall())
        per_digest = [new_ids[i * len(roles) : (i + 1) * len(roles)] for i in range(len(digests))]
        return [*per_digest, new_ids[len(digests) * len(roles) :]] if releasing else per_digest

    async def end_writes(self, ids: Sequence[int], *, expire: bool) -> None:
        """Remove journal rows (the write is named by committed metadata, or was abandoned before
        any blob was written), or with `expire` end their lease now, so orphan collection checks
        whether anything references their blobs."""
        if not ids:
            return
        async with self.transaction() as db:
            await self._end_writes(db, ids, expire)

    @staticmethod
    async def _end_writes(db: Transaction, ids: Sequence[int], expire: bool) -> None:
        if not ids:
            return
        marks = ", ".join("?" * len(ids))
        if expire:
            await db.execute(f"UPDATE inflight_writes SET lease_until = 0 WHERE id IN ({marks})", tuple(ids))
        else:
            await db.execute(f"DELETE FROM inflight_writes WHERE id IN ({marks})", tuple(ids))

    async def deletion_claimed(self, cloud: str, digest: str, now: float) -> bool:
        """Is a live deletion of this digest in progress (a writer must wait for it)?"""
        row = await self._one("SELECT 1 FROM blob_deletions WHERE cloud = ? AND digest = ? AND lease_until > ?", (cloud, digest, now))
        return row is not None

    async def switch_claimed(self, cloud: str, now: float) -> bool:
        """Is a target switch of the environment in progress (a revision write must wait for it)?"""
        row = await self._one("SELECT 1 FROM target_switches WHERE cloud = ? AND lease_until > ?", (cloud, now))
        return row is not None

    async def claim_deletion(self, cloud: str, digest: str, owner: str, lease_until: float) -> bool:
        """Claim the right to delete a digest's blobs: False while another live claim holds it."""
        async with self.transaction() as db:
            return await self._claim_deletion(db, cloud, digest, owner, lease_until)

    @staticmethod
    async def _claim_deletion(db: Transaction, cloud: str, digest: str, owner: str, lease_until: float) -> bool:
        cursor = await db.execute(
            "INSERT INTO blob_deletions (cloud, digest, owner, lease_until) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (cloud, digest) DO UPDATE SET owner = excluded.owner, lease_until = excluded.lease_until "
            "WHERE blob_deletions.lease_until <= ?",
            (cloud, digest, owner, lease_until, time.time()),
        )
        return cursor.rowcount == 1

    async def release_deletion(self, cloud: str, digest: str, owner: str) -> None:
        async with self.transaction() as db:
            await db.execute("DELETE FROM blob_deletions WHERE cloud = ? AND digest = ? AND owner = ?", (cloud, digest, owner))

    async def digest_in_use(self, cloud: str, digest: str, now: float, role: str) -> bool:
        """Under a deletion claim: does a live write, or metadata of `role`, reference the digest?
        One statement (one snapshot): a writer removes its journal row in the commit that names
        the digest, so a snapshot without the row has the reference. A `release` row is no use."""
        references = {
            "original": ["SELECT 1 FROM assets WHERE cloud = ? AND digest = ? AND status = 'live'"],
            # A snapshot's item holds its revision as a version does (docs/snapshots.md).
            "revision": ["SELECT 1 FROM versions WHERE cloud = ? AND digest = ? AND backed_up = 1",
                         "SELECT 1 FROM snapshot_items WHERE cloud = ? AND digest = ? AND covered = 1",
                         _PURGE_HOLD,  # a scheduled purge holds it until undone or done
                         _ARCHIVE_HOLD],  # so does a kept archive that lists it
            "pending": ["SELECT 1 FROM backup_pending WHERE cloud = ? AND digest = ?"],
        }[role]
        row = await self._one(
            "SELECT EXISTS (SELECT 1 FROM inflight_writes WHERE cloud = ? AND digest = ? AND lease_until > ? AND role != 'release') "
            + "".join(f"OR EXISTS ({sql}) " for sql in references),
            (cloud, digest, now, *[value for _ in references for value in (cloud, digest)]),
        )
        return bool(row[0])

    async def expired_writes(self, now: float, limit: int) -> list[tuple[int, str, str, str, str | None]]:
        """(id, cloud, digest, role, target) of journal rows whose lease has passed: writes that
        crashed, stalled or ended without a commit naming them."""
        rows = await self._all(
            "SELECT id, cloud, digest, role, target FROM inflight_writes WHERE lease_until <= ? ORDER BY lease_until, id LIMIT ?",
            (now, limit),
        )
        return [(int(r[0]), r[1], r[2], r[3], r[4]) for r in rows]

    async def drop_expired_writes(self, ids: Sequence[int]) -> None:
        """Remove journal rows of writes that can no longer commit (their lease has passed)."""
        marks = ", ".join("?" * len(ids))
        async with self.transaction() as db:
            await db.execute(f"DELETE FROM inflight_writes WHERE id IN ({marks}) AND lease_until <= ?", (*ids, time.time()))

    async def claim_switch(self, cloud: str, owner: str, lease_until: float) -> bool:
        async with self.transaction() as db:
            cursor = await db.execute(
                "INSERT INTO target_switches (cloud, owner, lease_until) VALUES (?, ?, ?) "
                "ON CONFLICT (cloud) DO UPDATE SET owner = excluded.owner, lease_until = excluded.lease_until "
                "WHERE target_switches.lease_until <= ? OR target_switches.owner = excluded.owner",
                (cloud, owner, lease_until, time.time()),
            )
            return cursor.rowcount == 1

    async def release_switch(self, cloud: str, owner: str) -> None:
        async with self.transaction() as db:
            await db.execute("DELETE FROM target_switches WHERE cloud = ? AND owner = ?", (cloud, owner))

    async def revision_writes_in_flight(self, cloud: str, now: float) -> int:
        row = await self._one(
            "SELECT COUNT(*) FROM inflight_writes WHERE cloud = ? AND role = 'revision' AND lease_until > ?", (cloud, now)
        )
        return int(row[0])

    async def claim_job(self, job_id: str, owner: str, lease_until: float) -> bool:
        """Take an open job nobody holds (or whose holder's lease ran out): one process runs it."""
        async with self.transaction() as db:
            cursor = await db.execute(
                "UPDATE jobs SET owner = ?, lease_until = ? WHERE id = ? AND status IN ('pending', 'active') "
                "AND (owner IS NULL OR owner = ? OR lease_until <= ?)",
                (owner, lease_until, job_id, owner, time.time()),
            )
            return cursor.rowcount == 1

    async def renew_job(self, job_id: str, owner: str, lease_until: float) -> bool:
        """Extend a held job's lease; False when it is no longer ours (taken over, or closed)."""
        async with self.transaction() as db:
            cursor = await db.execute(
                "UPDATE jobs SET lease_until = ? WHERE id = ? AND owner = ? AND status IN ('pending', 'active')",
                (lease_until, job_id, owner),
            )
            return cursor.rowcount == 1

    async def release_job(self, job_id: str, owner: str) -> None:
        """Give a job up at shutdown, so another process takes it at once, not after the lease."""
        async with self.transaction() as db:
            await db.execute("UPDATE jobs SET owner = NULL, lease_until = 0 WHERE id = ? AND owner = ?", (job_id, owner))

    async def claim_pending(self, now: float, limit: int, owner: str, lease_until: float) -> list[PendingRevision]:
        """Claim up to `limit` due pending revisions nobody holds; returns them."""
        async with self.transaction() as db:
            cursor = await db.execute(
                "UPDATE backup_pending SET owner = ?, lease_until = ? WHERE (cloud, digest) IN ("
                "SELECT cloud, digest FROM backup_pending WHERE next_attempt_at <= ? AND lease_until <= ? "
                "ORDER BY next_attempt_at LIMIT ?) AND lease_until <= ? "
                "RETURNING cloud, digest, bytes, queued_at, attempts, next_attempt_at, last_error",
                (owner, lease_until, now, now, limit, now),
            )
            rows = await cursor.fetchall()
        return [PendingRevision(*r) for r in rows]

    async def release_pending(self, cloud: str, digest: str, owner: str) -> None:
        async with self.transaction() as db:
            await db.execute(
                "UPDATE backup_pending SET owner = NULL, lease_until = 0 WHERE cloud = ? AND digest = ? AND owner = ?",
                (cloud, digest, owner),
            )

    async def renew_leases(self, owner: str, lease_until: float) -> None:
        """The process is alive: extend every lease it still holds (one heartbeat, every
        table). A lease that already ran out stays out: others may have acted on it."""
        now = time.time()
        async with self.transaction() as db:
            for table in ("inflight_writes", "blob_deletions", "target_switches", "backup_pending"):
                await db.execute(f"UPDATE {table} SET lease_until = ? WHERE owner = ? AND lease_until > ?", (lease_until, owner, now))

    async def lease_owners(self, now: float) -> set[str]:
        """Owners holding a live lease anywhere (to find the ones whose process has died)."""
        rows = await self._all(
            "SELECT owner FROM inflight_writes WHERE lease_until > ? UNION SELECT owner FROM blob_deletions WHERE lease_until > ? "
            "UNION SELECT owner FROM target_switches WHERE lease_until > ? UNION SELECT owner FROM backup_pending "
            "WHERE owner IS NOT NULL AND lease_until > ? UNION SELECT owner FROM jobs WHERE owner IS NOT NULL AND lease_until > ?",
            (now, now, now, now, now),
        )
        return {r[0] for r in rows}

    async def expire_owner(self, owner: str) -> None:
        """End every lease of an owner known to be dead now, instead of when they run out."""
        async with self.transaction() as db:
            for table in ("inflight_writes", "blob_deletions", "target_switches", "backup_pending", "jobs"):
                await db.execute(f"UPDATE {table} SET lease_until = 0 WHERE owner = ?", (owner,))

    # --- snapshots, schedules, point-in-time selections (versionstore/snapshots.py) ---------
    # Portable SQL only (runs on SQLite and PostgreSQL): a snapshot is taken by one
    # INSERT ... SELECT in one transaction, so it is consistent and costs no round trip per asset.

    async def create_snapshot(self, snapshot: Snapshot) -> Snapshot:
        """Insert the snapshot and its items (each in-scope live asset's current version) in
        one transaction; the counts are computed from the items in the same transaction."""
        values = {f.name: getattr(snapshot, f.name) for f in fields(Snapshot)}
        values["pinned"], values["pending_deletion"] = int(snapshot.pinned), int(snapshot.pending_deletion)
        async with self.transaction() as db:
            await db.execute(
                f"INSERT INTO snapshots ({', '.join(values)}) VALUES ({', '.join('?' * len(values))})", tuple(values.values())
            )
            await db.execute(
                "INSERT INTO snapshot_items (snapshot_id, cloud, asset_pk, asset_id, resource_type, type, public_id, "
                "version_id, digest, bytes, covered) "
                "SELECT CAST(? AS TEXT), a.cloud, a.pk, a.asset_id, a.resource_type, a.type, a.public_id, v.version_id, v.digest, v.bytes, "
                "v.backed_up FROM assets a JOIN versions v ON v.version_id = a.version_id "
                "WHERE a.cloud = ? AND a.status = 'live' AND substr(a.public_id, 1, ?) = ?",
                (snapshot.id, snapshot.cloud, len(snapshot.prefix), snapshot.prefix),
            )
            await db.execute(f"UPDATE snapshots SET {_SNAPSHOT_COUNTS}, status = 'completed' WHERE id = ?", (snapshot.id,))
            cursor = await db.execute(f"{_SNAPSHOT_SELECT} WHERE id = ?", (snapshot.id,))
            row = await cursor.fetchone()
        assert row is not None
        return _snapshot(row)

    async def record_snapshot(self, snapshot: Snapshot) -> None:
        """Insert a snapshot row as it is (a failed scheduled run, so it shows and alerts)."""
        values = {f.name: getattr(snapshot, f.name) for f in fields(Snapshot)}
        values["pinned"], values["pending_deletion"] = int(snapshot.pinned), int(snapshot.pending_deletion)
        async with self.transaction() as db:
            await db.execute(
                f"INSERT INTO snapshots ({', '.join(values)}) VALUES ({', '.join('?' * len(values))})", tuple(values.values())
            )

    async def get_snapshot(self, cloud: str, snapshot_id: str) -> Snapshot | None:
        row = await self._one(f"{_SNAPSHOT_SELECT} WHERE cloud = ? AND id = ?", (cloud, snapshot_id))
        return None if row is None else _snapshot(row)

    async def list_snapshots(self, cloud: str, limit: int, before: tuple[float, str] | None = None) -> list[Snapshot]:
        """Newest first; `before` is the (created_at, id) of the last one of the previous page."""
        if before is None:
            rows = await self._all(f"{_SNAPSHOT_SELECT} WHERE cloud = ? ORDER BY created_at DESC, id DESC LIMIT ?", (cloud, limit))
        else:
            rows = await self._all(
                f"{_SNAPSHOT_SELECT} WHERE cloud = ? AND (created_at < ? OR (created_at = ? AND id < ?)) "
                "ORDER BY created_at DESC, id DESC LIMIT ?",
                (cloud, before[0], before[0], before[1], limit),
            )
        return [_snapshot(r) for r in rows]

    async def snapshot_items(self, snapshot_id: str, after_asset_pk: int, limit: int, *, covered: bool | None = None) -> list[SnapshotItem]:
        where = "" if covered is None else f" AND covered = {int(covered)}"
        rows = await self._scan(
            "SELECT asset_pk, asset_id, resource_type, type, public_id, version_id, digest, bytes, covered FROM snapshot_items "
            f"WHERE snapshot_id = ? AND asset_pk > ?{where} ORDER BY asset_pk LIMIT ?",
            (snapshot_id, after_asset_pk, limit),
        )
        return [SnapshotItem(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], bool(r[8])) for r in rows]

    async def snapshot_unique_bytes(self, cloud: str, snapshot_ids: Sequence[str]) -> int:
        """Bytes of revisions these snapshots reference that no other snapshot references and
        no live asset has as its current original: the history only they keep addressable."""
        return await self._snapshot_only_bytes(
            snapshot_ids, "SELECT 1 FROM assets a WHERE a.cloud = s.cloud AND a.digest = s.digest AND a.status = 'live'"
        )

    async def snapshot_freed_bytes(self, cloud: str, snapshot_ids: Sequence[str]) -> int:
        """Bytes that would become unreferenced (collectable) if these snapshots went: revisions
        they reference that no other snapshot and no backed-up version references."""
        return await self._snapshot_only_bytes(
            snapshot_ids, "SELECT 1 FROM versions v WHERE v.cloud = s.cloud AND v.digest = s.digest AND v.backed_up = 1"
        )

    async def _snapshot_only_bytes(self, snapshot_ids: Sequence[str], also_held_by: str) -> int:
        """Bytes of the revisions these snapshots reference that no other snapshot references
        and `also_held_by` (a subquery correlated on `s`, from a fixed set) does not hold."""
        if not snapshot_ids:
            return 0
        marks = ", ".join("?" * len(snapshot_ids))
        rows = await self._scan(
            "SELECT COALESCE(SUM(t.bytes), 0) FROM (SELECT DISTINCT s.digest, s.bytes FROM snapshot_items s "
            f"WHERE s.snapshot_id IN ({marks}) AND s.covered = 1 "
            f"AND NOT EXISTS (SELECT 1 FROM snapshot_items o WHERE o.cloud = s.cloud AND o.digest = s.digest "
            f"AND o.snapshot_id NOT IN ({marks})) "
            f"AND NOT EXISTS ({also_held_by})) t",
            (*snapshot_ids, *snapshot_ids),
        )
        return int(rows[0][0])

    async def delete_snapshot(self, cloud: str, snapshot_id: str, owner: str, lease_until: float) -> list[tuple[int, str]]:
        """Delete a snapshot and its items. The revisions it may have been the last reference
        of (covered items whose digest no backed-up version names: usually none) are journaled
        in the same transaction as releases (role `release`, `owner`'s lease) and returned as
        (journal id, digest): the caller releases each under its deletion claim, which checks
        every reference again (another snapshot's item, a write in flight), then removes the
        row. Another snapshot's items are not ruled out here: two deletions committing at once
        on PostgreSQL would each see the other's items and release neither. A process that
        dies before its releases leaves the rows to orphan collection."""
        now = time.time()
        journaled: list[tuple[int, str]] = []
        async with self.transaction() as db:
            cursor = await db.execute(
                "SELECT DISTINCT s.digest FROM snapshot_items s WHERE s.snapshot_id = ? AND s.covered = 1 "
                "AND NOT EXISTS (SELECT 1 FROM versions v WHERE v.cloud = s.cloud AND v.digest = s.digest AND v.backed_up = 1)",
                (snapshot_id,),
            )
            digests = [r[0] for r in await cursor.fetchall()]
            await db.execute("DELETE FROM snapshot_items WHERE snapshot_id = ?", (snapshot_id,))
            cursor = await db.execute("DELETE FROM snapshots WHERE cloud = ? AND id = ?", (cloud, snapshot_id))
            if not cursor.rowcount:
                return []
            for digest in digests:
                cursor = await db.execute(
                    "INSERT INTO inflight_writes (cloud, digest, role, target, owner, started_at, lease_until) "
                    "VALUES (?, ?, 'release', NULL, ?, ?, ?) RETURNING id",
                    (cloud, digest, owner, now, lease_until),
                )
                row = await cursor.fetchone()
                assert row is not None
                journaled.append((int(row[0]), digest))
        return journaled

    async def update_snapshot(self, cloud: str, snapshot_id: str, **columns: Any) -> bool:
        """Set plain columns (pinned, expires_at, pending_deletion, note); False when not found."""
        values = {k: int(v) if isinstance(v, bool) else v for k, v in columns.items()}
        async with self.transaction() as db:
            cursor = await db.execute(
                f"UPDATE snapshots SET {', '.join(f'{k} = ?' for k in values)} WHERE cloud = ? AND id = ?",
                (*values.values(), cloud, snapshot_id),
            )
            return bool(cursor.rowcount)

    @staticmethod
    async def _drop_snapshot_items(db: Transaction, asset_pk: int, version_ids: Sequence[str]) -> None:
        """Inside a version deletion's transaction: the asset's deleted versions leave every
        snapshot that listed them, and those snapshots are marked changed (docs/design.md)."""
        for start in range(0, len(version_ids), 500):
            part = list(version_ids[start : start + 500])
            marks = ", ".join("?" * len(part))
            cursor = await db.execute(
                f"SELECT DISTINCT snapshot_id FROM snapshot_items WHERE asset_pk = ? AND version_id IN ({marks})", (asset_pk, *part)
            )
            touched = [r[0] for r in await cursor.fetchall()]
            if not touched:
                continue
            await db.execute(f"DELETE FROM snapshot_items WHERE asset_pk = ? AND version_id IN ({marks})", (asset_pk, *part))
            for snapshot_id in touched:
                await db.execute(
                    f"UPDATE snapshots SET removed_items = removed_items + asset_count - "
                    f"(SELECT COUNT(*) FROM snapshot_items WHERE snapshot_id = ?), {_SNAPSHOT_COUNTS}, changed_at = ? WHERE id = ?",
                    (snapshot_id, time.time(), snapshot_id),
                )

    # schedules

    async def get_schedule(self, cloud: str) -> ScheduleRow | None:
        row = await self._one("SELECT cloud, schedule, policy, next_run_at, last_run_at FROM snapshot_schedules WHERE cloud = ?", (cloud,))
        return None if row is None else ScheduleRow(row[0], json.loads(row[1]), json.loads(row[2]), row[3], row[4])

    async def list_schedules(self) -> list[ScheduleRow]:
        rows = await self._all("SELECT cloud, schedule, policy, next_run_at, last_run_at FROM snapshot_schedules ORDER BY cloud")
        return [ScheduleRow(r[0], json.loads(r[1]), json.loads(r[2]), r[3], r[4]) for r in rows]

    async def set_schedule(self, row: ScheduleRow) -> None:
        async with self.transaction() as db:
            await db.execute(
                "INSERT INTO snapshot_schedules (cloud, schedule, policy, next_run_at, last_run_at) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (cloud) DO UPDATE SET schedule = excluded.schedule, policy = excluded.policy, "
                "next_run_at = excluded.next_run_at",
                (row.cloud, json.dumps(row.schedule), json.dumps(row.policy), row.next_run_at, row.last_run_at),
            )

    async def delete_schedule(self, cloud: str) -> bool:
        return await self._delete_schedule_row("snapshot_schedules", cloud)

    async def claim_schedule_run(self, cloud: str, due: float, next_run_at: float, now: float) -> bool:
        return await self._claim_run("snapshot_schedules", cloud, due, next_run_at, now)

    async def _delete_schedule_row(self, table: str, cloud: str) -> bool:
        """`table` is snapshot_schedules or drill_schedules (never input)."""
        async with self.transaction() as db:
            cursor = await db.execute(f"DELETE FROM {table} WHERE cloud = ?", (cloud,))
            return bool(cursor.rowcount)

    async def _claim_run(self, table: str, cloud: str, due: float, next_run_at: float, now: float) -> bool:
        """Compare-and-set on a schedule `table`: exactly one process (or tick) takes the run
        that was due at `due`."""
        async with self.transaction() as db:
            cursor = await db.execute(
                f"UPDATE {table} SET next_run_at = ?, last_run_at = ? WHERE cloud = ? AND next_run_at = ?",
                (next_run_at, now, cloud, due),
            )
            return bool(cursor.rowcount)

    # point-in-time selections (versionstore/pitr.py)

    async def point_in_time(self, cloud: str, prefix: str, at: float, after_pk: int, limit: int) -> list[PointInTimeRow]:
        """Assets of the environment under `prefix` (not detached histories), each with its
        current state and its newest version created at or before `at`, in row order."""
        rows = await self._scan(
            f"{_PIT_SELECT} LEFT JOIN versions tv ON tv.pk = (SELECT v2.pk FROM versions v2 WHERE v2.asset_pk = a.pk "
            "AND v2.created_at <= ? ORDER BY v2.version DESC, v2.pk DESC LIMIT 1) "
            "WHERE a.cloud = ? AND a.detached_from IS NULL AND substr(a.public_id, 1, ?) = ? AND a.pk > ? ORDER BY a.pk LIMIT ?",
            (at, cloud, len(prefix), prefix, after_pk, limit),
        )
        return [_pit_row(r) for r in rows]

    async def snapshot_selection(self, cloud: str, snapshot_id: str, prefix: str, after_pk: int, limit: int) -> list[PointInTimeRow]:
        """Like point_in_time, with the snapshot's item as the version "at T": assets under
        `prefix` now, and every asset the snapshot lists wherever its name went since."""
        rows = await self._scan(
            f"{_PIT_SELECT} LEFT JOIN snapshot_items s ON s.snapshot_id = ? AND s.asset_pk = a.pk "
            "LEFT JOIN versions tv ON tv.version_id = s.version_id "
            "WHERE a.cloud = ? AND a.detached_from IS NULL AND (substr(a.public_id, 1, ?) = ? OR s.asset_pk IS NOT NULL) "
            "AND a.pk > ? ORDER BY a.pk LIMIT ?",
            (snapshot_id, cloud, len(prefix), prefix, after_pk, limit),
        )
        return [_pit_row(r) for r in rows]

    # --- the read path in one statement (issue 11: PostgreSQL answers each statement with a
    # --- round trip, so a request reads what it needs at once) --------------------------------

    async def downloadable(self, cloud: str, asset_id: str, version_id: str) -> Downloadable | None:
        """A version and all `download_backup` decides on, read together: the asset's name,
        whether the revision is pending or its backup copy bad, the target generation. None
        when the asset has no such version."""
        row = await self._one(_DOWNLOADABLE, (target_generation(cloud), cloud, asset_id, version_id))
        if row is None:
            return None
        return Downloadable(row[0], _version(row[1:-3]), bool(row[-3]), row[-2], int(row[-1]))

    async def get_asset_keyed(self, cloud: str, resource_type: str, type_: str, public_id: str) -> tuple[Asset, VersionsKey] | None:
        """get_asset, and in the same statement what a rendering of the asset's versions is
        valid for (VersionsKey: versions_signature, revisions_generation, verify_generation):
        the `versions=true` read."""
        row = await self._one(
            f"{_KEYED_ASSET_SELECT} WHERE a.cloud = ? AND a.resource_type = ? AND a.type = ? AND a.public_id = ?",
            (REVISIONS, cloud, resource_type, type_, public_id),
        )
        return None if row is None else (_asset(row[:-4]), _versions_key(row[-4:]))

    async def get_asset_by_id_keyed(self, cloud: str, asset_id: str) -> tuple[Asset, VersionsKey] | None:
        """get_asset_by_id and the asset's versions_key in one statement."""
        row = await self._one(f"{_KEYED_ASSET_SELECT} WHERE a.cloud = ? AND a.asset_id = ?", (REVISIONS, cloud, asset_id))
        return None if row is None else (_asset(row[:-4]), _versions_key(row[-4:]))


    # --- restore drills and alerts (versionstore/drills.py, versionstore/alerts.py) ----------
    # Portable SQL only. A drill's scratch environment is named `<cloud>.drill-<job id>`
    # (drill_records.SCRATCH_MARK): list_clouds leaves those out.

    async def get_drill_schedule(self, cloud: str) -> DrillScheduleRow | None:
        row = await self._one(f"{_DRILL_SCHEDULE_SELECT} WHERE cloud = ?", (cloud,))
        return None if row is None else _drill_schedule(row)

    async def list_drill_schedules(self) -> list[DrillScheduleRow]:
        return [_drill_schedule(r) for r in await self._all(f"{_DRILL_SCHEDULE_SELECT} ORDER BY cloud")]

    async def set_drill_schedule(self, row: DrillScheduleRow) -> None:
        async with self.transaction() as db:
            await db.execute(
                "INSERT INTO drill_schedules (cloud, schedule, sample, next_run_at, last_run_at) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (cloud) DO UPDATE SET schedule = excluded.schedule, sample = excluded.sample, "
                "next_run_at = excluded.next_run_at",
                (row.cloud, json.dumps(row.schedule), json.dumps(row.sample), row.next_run_at, row.last_run_at),
            )

    async def delete_drill_schedule(self, cloud: str) -> bool:
        return await self._delete_schedule_row("drill_schedules", cloud)

    async def claim_drill_run(self, cloud: str, due: float, next_run_at: float, now: float) -> bool:
        """Compare-and-set: exactly one process (or tick) takes the drill that was due at `due`."""
        return await self._claim_run("drill_schedules", cloud, due, next_run_at, now)

    async def get_alert_url(self, cloud: str) -> str | None:
        row = await self._one("SELECT notification_url FROM alert_settings WHERE cloud = ?", (cloud,))
        return None if row is None else row[0]

    async def set_alert_url(self, cloud: str, url: str | None) -> None:
        async with self.transaction() as db:
            await db.execute(
                "INSERT INTO alert_settings (cloud, notification_url) VALUES (?, ?) "
                "ON CONFLICT (cloud) DO UPDATE SET notification_url = excluded.notification_url",
                (cloud, url),
            )

    async def record_outcome(self, cloud: str, operation: str, now: float, error: str | None) -> None:
        """The latest outcome of a watched operation: a failure (with `error`) or a success."""
        failed = error is not None
        async with self.transaction() as db:
            await db.execute(
                "INSERT INTO alert_state (cloud, operation, failing, failures, last_error, last_failure_at, last_success_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (cloud, operation) DO UPDATE SET failing = excluded.failing, "
                "failures = alert_state.failures + excluded.failures, "
                "last_error = COALESCE(excluded.last_error, alert_state.last_error), "
                "last_failure_at = COALESCE(excluded.last_failure_at, alert_state.last_failure_at), "
                "last_success_at = COALESCE(excluded.last_success_at, alert_state.last_success_at)",
                (cloud, operation, int(failed), int(failed), error, now if failed else None, None if failed else now),
            )

    async def alert_states(self, cloud: str | None = None) -> list[AlertState]:
        where, args = ("WHERE cloud = ? ", (cloud,)) if cloud is not None else ("", ())
        rows = await self._all(
            "SELECT cloud, operation, failing, failures, last_error, last_failure_at, last_success_at FROM alert_state "
            f"{where}ORDER BY cloud, operation",
            args,
        )
        return [AlertState(r[0], r[1], bool(r[2]), r[3], r[4], r[5], r[6]) for r in rows]

    async def drill_environments(self) -> list[str]:
        """Names of the drills' scratch environments that still exist."""
        rows = await self._all("SELECT name FROM clouds WHERE name LIKE ? ORDER BY name", (f"%{SCRATCH_MARK}%",))
        return [r[0] for r in rows]

    async def environment_assets(self, cloud: str, after_pk: int, limit: int) -> list[tuple[int, str]]:
        """(row, asset_id) of every asset of the environment, live or not, in row order."""
        rows = await self._all(
            "SELECT pk, asset_id FROM assets WHERE cloud = ? AND pk > ? ORDER BY pk LIMIT ?", (cloud, after_pk, limit)
        )
        return [(r[0], r[1]) for r in rows]

    async def drop_environment(self, cloud: str) -> bool:
        """Remove an emptied environment's row and bookkeeping; False (nothing removed) while it
        still has an asset or a write in flight (whose blobs orphan collection must still find
        through the environment)."""
        async with self.transaction() as db:
            cursor = await db.execute(
                "DELETE FROM clouds WHERE name = ? AND NOT EXISTS (SELECT 1 FROM assets WHERE cloud = ?) "
                "AND NOT EXISTS (SELECT 1 FROM inflight_writes WHERE cloud = ?) "
                "AND NOT EXISTS (SELECT 1 FROM backup_pending WHERE cloud = ?)",
                (cloud, cloud, cloud, cloud),
            )
            if not cursor.rowcount:
                return False
            for table in ("backup_health", "blob_checks", "alert_state", "alert_settings", "drill_schedules", "archive_settings"):
                await db.execute(f"DELETE FROM {table} WHERE cloud = ?", (cloud,))
        return True
    # --- deletion protection (versionstore/protection.py, schema migration 13) ---------------
    # Set by the operator's CLI only. A scheduled purge moves the deleted versions' rows (and
    # the snapshot items they lose) into one scheduled_purges row and holds their revisions in
    # purge_holds; undo puts the rows back, the purge job drops the hold and the rows stay gone.
    # Both leave 'scheduled' by an UPDATE conditional on it: one process wins.

    async def set_protection(
        self, cloud: str, *, purge_delay_days: int | None = None, append_key: tuple[str, str] | None = None
    ) -> None:
        """Change the environment's purge delay and/or (re)issue its append-only key pair."""
        async with self.transaction() as db:
            await db.execute("INSERT INTO cloud_protection (cloud) VALUES (?) ON CONFLICT (cloud) DO NOTHING", (cloud,))
            if purge_delay_days is not None:
                await db.execute("UPDATE cloud_protection SET purge_delay_days = ? WHERE cloud = ?", (purge_delay_days, cloud))
            if append_key is not None:
                await db.execute(
                    "UPDATE cloud_protection SET append_key = ?, append_secret = ? WHERE cloud = ?", (*append_key, cloud)
                )

    async def schedule_purge(
        self, purge_id: str, asset: Asset, version_ids: Sequence[str], actor: str, now: float, purge_at: float
    ) -> ScheduledPurge | None:
        """Like delete_versions (never the current version of a live asset, checked in the
        statement), but the rows are kept in a scheduled purge and the asset row stays.
        None when no version was removed."""
        async with self.transaction() as db:
            taken: list[dict[str, Any]] = []
            for version_id in version_ids:
                cursor = await db.execute(
                    f"{_VERSION_SELECT} WHERE asset_pk = ? AND version_id = ? "
                    "AND NOT EXISTS (SELECT 1 FROM assets WHERE pk = ? AND status = 'live' AND version_id = ?)",
                    (asset.pk, version_id, asset.pk, version_id),
                )
                row = await cursor.fetchone()
                if row is None:
                    continue
                await db.execute("DELETE FROM versions WHERE asset_pk = ? AND version_id = ?", (asset.pk, version_id))
                taken.append(asdict(_version(row)))
            if not taken:
                return None
            removed = [v["version_id"] for v in taken]
            marks = ", ".join("?" * len(removed))
            cursor = await db.execute(
                f"SELECT {_ITEM_COLUMNS} FROM snapshot_items WHERE asset_pk = ? AND version_id IN ({marks})", (asset.pk, *removed)
            )
            names = _ITEM_COLUMNS.split(", ")
            items = [dict(zip(names, r, strict=True)) for r in await cursor.fetchall()]
            await self._drop_snapshot_items(db, asset.pk or 0, removed)
            purge = ScheduledPurge(
                purge_id, asset.cloud, asset.pk or 0, asset.asset_id, asset.public_id, taken, items,
                actor, "scheduled", now, purge_at,
            )
            await db.execute(
                f"INSERT INTO scheduled_purges ({_PURGE_COLUMNS}) VALUES ({', '.join('?' * 12)})",
                (purge.id, purge.cloud, purge.asset_pk, purge.asset_id, purge.public_id, json.dumps(taken), json.dumps(items),
                 actor, purge.state, now, purge_at, None),
            )
            for digest in sorted({v["digest"] for v in taken if v["backed_up"]}):
                await db.execute("INSERT INTO purge_holds (purge_id, cloud, digest) VALUES (?, ?, ?)", (purge_id, asset.cloud, digest))
        return purge

    async def get_purge(self, purge_id: str) -> ScheduledPurge | None:
        row = await self._one(f"SELECT {_PURGE_COLUMNS} FROM scheduled_purges WHERE id = ?", (purge_id,))
        return None if row is None else _purge(row)

    async def list_purges(self, cloud: str | None, state: str | None, limit: int) -> list[ScheduledPurge]:
        """Newest first, one environment's or all, in one state or any."""
        where, args = [], []
        for column, value in (("cloud", cloud), ("state", state)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        clause = f" WHERE {' AND '.join(where)}" if where else ""
        rows = await self._all(
            f"SELECT {_PURGE_COLUMNS} FROM scheduled_purges{clause} ORDER BY scheduled_at DESC, id LIMIT ?", (*args, limit)
        )
        return [_purge(r) for r in rows]

    async def count_scheduled_purges(self, cloud: str) -> int:
        row = await self._one("SELECT COUNT(*) FROM scheduled_purges WHERE cloud = ? AND state = 'scheduled'", (cloud,))
        return int(row[0])

    async def due_purges(self, now: float, limit: int) -> list[ScheduledPurge]:
        rows = await self._all(
            f"SELECT {_PURGE_COLUMNS} FROM scheduled_purges WHERE state = 'scheduled' AND purge_at <= ? ORDER BY purge_at, id LIMIT ?",
            (now, limit),
        )
        return [_purge(r) for r in rows]

    async def undo_purge(self, purge_id: str, now: float) -> ScheduledPurge | None:
        """Put a scheduled purge's versions (and snapshot items whose snapshot still exists)
        back exactly as they were. None if it is no longer scheduled; ValueError (nothing
        changed) if its asset is gone meanwhile."""
        async with self.transaction() as db:
            purge = await self._leave_scheduled(db, purge_id, "undone", now, due=False)
            if purge is None:
                return None
            cursor = await db.execute("SELECT 1 FROM assets WHERE pk = ? AND asset_id = ?", (purge.asset_pk, purge.asset_id))
            if await cursor.fetchone() is None:
                raise ValueError(f"asset {purge.asset_id} no longer exists; its versions cannot come back")
            for values in purge.versions:
                await db.execute(_VERSION_INSERT, (purge.cloud, purge.asset_pk, *astuple(Version(**values))))
            for item in purge.items:
                cursor = await db.execute("SELECT 1 FROM snapshots WHERE id = ?", (item["snapshot_id"],))
                if await cursor.fetchone() is None:
                    continue  # the snapshot was deleted meanwhile
                await db.execute(
                    f"INSERT INTO snapshot_items ({_ITEM_COLUMNS}) VALUES ({', '.join('?' * 11)}) "
                    "ON CONFLICT (snapshot_id, asset_pk) DO NOTHING",
                    tuple(item[c] for c in _ITEM_COLUMNS.split(", ")),
                )
                await db.execute(
                    "UPDATE snapshots SET removed_items = removed_items - "
                    f"((SELECT COUNT(*) FROM snapshot_items i WHERE i.snapshot_id = snapshots.id) - asset_count), {_SNAPSHOT_COUNTS} "
                    "WHERE id = ?",
                    (item["snapshot_id"],),
                )
        return purge

    @staticmethod
    async def _leave_scheduled(db: Transaction, purge_id: str, state: str, now: float, *, due: bool) -> ScheduledPurge | None:
        """Inside a transaction: move a purge from 'scheduled' to `state` (conditional: one
        caller wins; `due`: only once purge_at has come), drop its hold, and return it."""
        condition = " AND purge_at <= ?" if due else ""
        cursor = await db.execute(
            f"UPDATE scheduled_purges SET state = ?, finished_at = ? WHERE id = ? AND state = 'scheduled'{condition}",
            (state, now, purge_id, *((now,) if due else ())),
        )
        if not cursor.rowcount:
            return None
        cursor = await db.execute(f"SELECT {_PURGE_COLUMNS} FROM scheduled_purges WHERE id = ?", (purge_id,))
        row = await cursor.fetchone()
        assert row is not None  # updated just now, in this transaction
        await db.execute("DELETE FROM purge_holds WHERE purge_id = ?", (purge_id,))
        return _purge(row)

    async def finish_purge(self, purge_id: str, now: float) -> ScheduledPurge | None:
        """Make a due purge final: drop its hold (the caller then releases the revisions
        nothing else references) and a deleted asset left without versions. None if another
        process finished or undid it first."""
        async with self.transaction() as db:
            purge = await self._leave_scheduled(db, purge_id, "purged", now, due=True)
            if purge is None:
                return None
            await self._withdraw_archives(db, [v["version_id"] for v in purge.versions], now)  # final: in archives too
            await db.execute(
                "DELETE FROM assets WHERE pk = ? AND status = 'deleted' AND NOT EXISTS (SELECT 1 FROM versions WHERE asset_pk = ?)",
                (purge.asset_pk, purge.asset_pk),
            )
        return purge

    # --- archive files and their removal (versionstore/archives.py, schema migration 16) -------

    async def register_archive_file(self, record: ArchiveFile) -> None:
        """Record a tar an archive job is about to store, before it is stored (so no file is
        ever left without its row); a rerun's registration replaces the earlier one."""
        async with self.transaction() as db:
            await self._upsert_archive_file(db, record)

    async def get_archive_file(self, cloud: str, job_id: str) -> ArchiveFile | None:
        row = await self._one(f"{_ARCHIVE_FILE_SELECT} WHERE a.cloud = ? AND a.job_id = ?", (cloud, job_id))
        return None if row is None else ArchiveFile(*row)

    async def due_archive_files(self, now: float, orphaned_before: float, limit: int) -> list[ArchiveFile]:
        """Files to remove at `now`: an export's past its `expires_at`, any file whose job
        failed, an import's whose job completed, and one whose job never came to exist
        (registered before `orphaned_before`: a crash between storing it and creating the job)."""
        rows = await self._all(
            f"{_ARCHIVE_FILE_SELECT} LEFT JOIN jobs j ON j.id = a.job_id WHERE a.removed_at IS NULL AND (a.expires_at <= ? "
            "OR j.status = 'failed' OR (a.kind = 'import' AND j.status = 'completed') "
            "OR (j.id IS NULL AND a.registered_at <= ?)) ORDER BY a.registered_at, a.job_id LIMIT ?",
            (now, orphaned_before, limit),
        )
        return [ArchiveFile(*row) for row in rows]

    async def mark_archive_removed(self, job_id: str, now: float) -> bool:
        """Record the file's removal; False when another process (or request) recorded it first."""
        async with self.transaction() as db:
            cursor = await db.execute(
                "UPDATE archive_files SET removed_at = ? WHERE job_id = ? AND removed_at IS NULL", (now, job_id)
            )
            return cursor.rowcount == 1

    # --- per-environment archive settings (versionstore/archive_removal.py, schema migration 17) ---

    async def get_archive_keep_days(self, cloud: str) -> int | None:
        """The environment's default `keep_days` for archive exports; None: the server's."""
        row = await self._one("SELECT keep_days FROM archive_settings WHERE cloud = ?", (cloud,))
        return None if row is None else int(row[0])

    async def set_archive_keep_days(self, cloud: str, days: int | None) -> None:
        """Set the environment's default `keep_days`, or with None go back to the server's."""
        async with self.transaction() as db:
            if days is None:
                await db.execute("DELETE FROM archive_settings WHERE cloud = ?", (cloud,))
            else:
                await db.execute(
                    "INSERT INTO archive_settings (cloud, keep_days) VALUES (?, ?) "
                    "ON CONFLICT (cloud) DO UPDATE SET keep_days = excluded.keep_days",
                    (cloud, days),
                )

    # --- listing pages as rows (bigpage: a page reuses the rendering of rows it has seen) -----

    async def find_asset_rows(self, cloud: str, query: AssetQuery) -> list[AssetRow]:
        """find_assets' rows, not decoded: a caller keeps what it derived from a row for as
        long as the row reads the same (versionstore/http/resource_rows.py)."""
        return await self._scan(*select_sql(cloud, query))

    @staticmethod
    def asset_of_row(row: AssetRow) -> Asset:
        """The asset a row of find_asset_rows holds."""
        return _asset(row)

    # --- composed archives: the revisions an export lists (archive_compose.py, schema migration 18) ---

    async def register_archive_layout(self, record: ArchiveFile, members: Iterable[tuple[str, str]]) -> None:
        """Record an export's layout before it is stored, with the (version_id, digest) of every
        original it lists: from the commit on, those revisions are held while the archive is
        kept (digest_in_use). MemberGone (nothing recorded) when a listed version no longer
        exists: deleted since the export read it. A rerun's registration replaces the earlier one."""
        async with self.transaction() as db:
            await self._gate.lock(db, _ARCHIVE_LOCK)
            await db.execute("DELETE FROM archive_members WHERE job_id = ?", (record.job_id,))
            batch: list[tuple[str, str]] = []
            for member in members:
                batch.append(member)
                if len(batch) == _MEMBER_BATCH:
                    await self._add_members(db, record, batch)
                    batch = []
            await self._add_members(db, record, batch)
            cursor = await db.execute(
                "SELECT m.version_id FROM archive_members m WHERE m.job_id = ? AND NOT EXISTS (SELECT 1 FROM versions v "
                "WHERE v.version_id = m.version_id AND v.digest = m.digest AND v.backed_up = 1) LIMIT 1",
                (record.job_id,),
            )
            if (gone := await cursor.fetchone()) is not None:
                raise MemberGone(f"version {gone[0]} was deleted while the archive was prepared")
            await self._upsert_archive_file(db, record)

    @staticmethod
    async def _upsert_archive_file(db: Transaction, record: ArchiveFile) -> None:
        await db.execute(
            "INSERT INTO archive_files (job_id, cloud, kind, store_key, registered_at, expires_at, removed_at) "
            "VALUES (?, ?, ?, ?, ?, ?, NULL) ON CONFLICT (job_id) DO UPDATE SET store_key = excluded.store_key, "
            "registered_at = excluded.registered_at, expires_at = excluded.expires_at, removed_at = NULL, removed_reason = NULL",
            (record.job_id, record.cloud, record.kind, record.key, record.registered_at, record.expires_at),
        )

    @staticmethod
    async def _add_members(db: Transaction, record: ArchiveFile, batch: Sequence[tuple[str, str]]) -> None:
        if batch:
            await db.execute(
                "INSERT INTO archive_members (job_id, cloud, version_id, digest) VALUES "
                + ", ".join("(?, ?, ?, ?)" for _ in batch) + " ON CONFLICT (job_id, version_id) DO NOTHING",
                [value for version_id, digest in batch for value in (record.job_id, record.cloud, version_id, digest)],
            )

    async def _withdraw_archives(self, db: Transaction, version_ids: Sequence[str], now: float) -> None:
        """Inside an irreversible deletion's transaction: every kept archive listing one of
        these versions stops being downloadable at once and holds nothing any more
        (`removed_reason`); the removal pass removes its layout (its expiry is now)."""
        if not version_ids:
            return
        await self._gate.lock(db, _ARCHIVE_LOCK)
        marks = ", ".join("?" * len(version_ids))
        await db.execute(
            "UPDATE archive_files SET removed_reason = ?, expires_at = ? WHERE removed_at IS NULL AND removed_reason IS NULL "
            f"AND job_id IN (SELECT job_id FROM archive_members WHERE version_id IN ({marks}))",
            (CONTENT_DELETED, now, *version_ids),
        )

    async def archive_member_digests(self, job_id: str, after: str, limit: int) -> list[str]:
        """The distinct revisions an archive lists, in order, after `after` (a page)."""
        rows = await self._all(
            "SELECT DISTINCT digest FROM archive_members WHERE job_id = ? AND digest > ? ORDER BY digest LIMIT ?",
            (job_id, after, limit),
        )
        return [row[0] for row in rows]

    # --- an overwrite's commits (docs/design.md, "Write order") ------------------------------
    # Each commit is an fsync of the WAL (synchronous=FULL): an overwrite takes the deletion
    # claim on the original it replaces in its version commit, and ends that claim together
    # with the release rows in one more commit, instead of a commit for each.

    async def save_version_claiming(
        self, asset: Asset, version: Version, *, pending: bool = False, done_writes: Sequence[int] = (),
        replaced: str, owner: str, lease_until: float,
    ) -> tuple[Asset, bool]:
        """`save_version`, and in the same transaction the deletion claim (claim_deletion) on
        `replaced`, the digest whose original the new version supersedes: the claim is committed
        before the caller reads whether anything still uses that digest, as `Claims.deleting`
        does. Returns the asset and whether the claim was taken (False while another live claim
        holds the digest: the caller then claims it the usual way)."""
        claimed = await self._save_versions([(asset, version, pending)], done_writes, (asset.cloud, replaced, owner, lease_until))
        return asset, claimed

    async def end_deletion(self, cloud: str, digest: str, owner: str, release_ids: Sequence[int], *, expire: bool) -> None:
        """release_deletion and end_writes(release_ids, expire=...) in one transaction."""
        async with self.point_transaction() as db:
            await db.execute("DELETE FROM blob_deletions WHERE cloud = ? AND digest = ? AND owner = ?", (cloud, digest, owner))
            await self._end_writes(db, release_ids, expire)


_ARCHIVE_FILE_SELECT = (
    "SELECT a.job_id, a.cloud, a.kind, a.store_key, a.registered_at, a.expires_at, a.removed_at, a.removed_reason "
    "FROM archive_files a"
)


def _purge(row: Sequence[Any]) -> ScheduledPurge:
    values = list(row)
    values[5], values[6] = json.loads(values[5]), json.loads(values[6])
    return ScheduledPurge(*values)


# --- staff, sessions, audit: row helpers -----------------------------------------------------

_STAFF_SELECT = "SELECT email, password_hash, role, clouds, disabled, failed_logins, locked_until, created_at FROM staff"
_AUDIT_COLUMNS = "seq, at, actor, cloud, action, target, detail, address, outcome, prev_hash, hash"
#: The `prev_hash` of the first audit record.
AUDIT_GENESIS = "0" * 64


def _staff(row: Sequence[Any]) -> StaffMember:
    email, password_hash, role, clouds, disabled, failed, locked_until, created_at = row
    return StaffMember(email, password_hash, role, tuple(json.loads(clouds)), bool(disabled), int(failed), locked_until, created_at)


def _audit_row(record: AuditRecord) -> tuple[Any, ...]:
    return (
        record.seq, record.at, record.actor, record.cloud, record.action, record.target,
        json.dumps(record.detail, sort_keys=True), record.address, record.outcome, record.prev_hash, record.hash,
    )


def _audit(row: Sequence[Any]) -> AuditRecord:
    seq, at, actor, cloud, action, target, detail, address, outcome, prev_hash, hash_ = row
    return AuditRecord(int(seq), float(at), actor, cloud, action, target, json.loads(detail), address, outcome, prev_hash, hash_)


def like_escape(text: str) -> str:
    """`text` matched literally inside a LIKE pattern written with ESCAPE '\\'."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


#: Rows of a page decoded on the event loop; longer pages are decoded in a worker thread.
_DECODE_ON_LOOP = 50
_NAME = "COALESCE(a.detached_from, a.public_id)"
#: Column expressions of the fields a query names (from this fixed table, never from input).
_FIELD_SQL = {
    "status": "a.status", "resource_type": "a.resource_type", "type": "a.type", "public_id": _NAME,
    "asset_id": "a.asset_id", "format": "a.format", "created_at": "a.created_at", "uploaded_at": "a.uploaded_at",
    "deleted_at": "a.deleted_at", "bytes": "a.bytes", "pk": "a.pk", "plain_public_id": "a.public_id",
}
#: The same fields on the tag side table, when a tag filter drives the query.
_TAG_SQL = {"created_at": "t.created_at", "pk": "t.asset_pk"}
_COMPARE = {"=": "=", "<": "<", "<=": "<=", ">": ">", ">=": ">="}


def select_sql(cloud: str, query: AssetQuery) -> tuple[str, list[Any]]:
    """The statement of one page of `query` (public for the query-plan tests)."""
    source, where, args = _compile(cloud, query, keyset=True)
    order = ", ".join(f"{_sort_column(query, key)} {'DESC' if key.descending else 'ASC'}" for key in query.sort)
    columns = ", ".join("a." + c for c in _ASSET_COLUMNS)
    return f"SELECT {columns} FROM {source} WHERE {where} ORDER BY {order} LIMIT ?", [*args, query.limit]


def count_sql(cloud: str, query: AssetQuery, ceiling: int) -> tuple[str, list[Any]]:
    """The statement counting `query`'s matches up to `ceiling`. When the tag index answers
    every filter (schema migration 19), the count walks that index alone: no asset row is
    read per match, so its cost is the ceiling's, whatever the library."""
    source, where, args = _compile(cloud, query, keyset=False)
    return f"SELECT COUNT(*) FROM (SELECT 1 FROM {source} WHERE {where} LIMIT ?) matches", [*args, ceiling]


def _driving_tag(query: AssetQuery) -> Filter | None:
    """The tag filter to walk the tag index from, when the sort is one that index holds."""
    if all(key.field in _TAG_SQL for key in query.sort):
        return next((item for item in query.filters if item.field == "tag"), None)
    return None


def _sort_column(query: AssetQuery, key: SortKey) -> str:
    """The expression a sort key orders by. When a name or id filter picks the rows, it is
    masked from indexes (`+x`, `x || ''`: the same values), so the plan is that filter's index
    and a sort of its few rows, never a walk of the sort's index over the whole library."""
    column = _TAG_SQL[key.field] if _driving_tag(query) is not None else _FIELD_SQL[key.field]
    if _narrowed_elsewhere(query):
        return f"{column} || ''" if SORT_FIELDS[key.field] is str else f"+{column}"
    return column


def _compile(cloud: str, query: AssetQuery, *, keyset: bool) -> tuple[str, str, list[Any]]:
    """(FROM, WHERE, arguments) of a query; values are always bound, never spliced. With a
    driving tag, the filters the tag row answers are checked there (in the index walked); a
    count whose filters all are never joins the asset rows."""
    driving = _driving_tag(query)
    source = "assets a"
    clauses, args = ["a.cloud = ?"], [cloud]
    on_tag_row: dict[Filter, tuple[str, list[Any]]] = {}
    if driving is not None:
        on_tag_row = {item: found for item in query.filters if (found := _tag_row_filter(item)) is not None}
        if not keyset and all(item is driving or item in on_tag_row for item in query.filters):
            source, clauses, args = "asset_tags t", ["t.cloud = ?", "t.tag = ?"], [cloud, driving.value]
        else:
            source = "asset_tags t CROSS JOIN assets a"
            clauses = ["t.cloud = ?", "t.tag = ?", "a.pk = t.asset_pk", *clauses]
            args = [cloud, driving.value, *args]
    live_only = Filter("status", "=", "live") in query.filters
    for item in query.filters:
        if item is driving:
            continue
        sql, values = on_tag_row.get(item) or _filter_sql(cloud, item)
        if live_only and item.field == "public_id" and item.op in ("=", "in"):
            # A live asset is never detached: its public_id column is its name, and the
            # unique (cloud, resource_type, type, public_id) index finds it.
            plain, more = _filter_sql(cloud, replace(item, field="plain_public_id"))
            sql, values = f"{sql} AND {plain}", [*values, *more]
        clauses.append(sql)
        args.extend(values)
    if keyset and query.after is not None:
        columns = [_sort_column(query, key) for key in query.sort]
        sql, values = _after(columns, [key.descending for key in query.sort], list(query.after))
        clauses.append(sql)
        args.extend(values)
    return source, " AND ".join(clauses), args


def _tag_row_filter(item: Filter) -> tuple[str, list[Any]] | None:
    """A filter as a condition on the tag side row, when that row holds its field: `live`
    mirrors the asset's status (schema migration 19), `created_at` never changes."""
    if item.field == "status" and item.op == "=" and item.value in ("live", "deleted"):
        return "t.live = ?", [int(item.value == "live")]
    if item.field == "created_at" and item.op in _COMPARE:
        return f"t.created_at {_COMPARE[item.op]} ?", [item.value]
    return None


def _narrowed_elsewhere(query: AssetQuery) -> bool:
    """A name or id filter picks a few rows by another index than the sort's."""
    narrow = {item.field for item in query.filters if item.field in ("public_id", "asset_id") and item.op in ("=", "in", "prefix")}
    return bool(narrow) and query.sort[0].field not in narrow


def _filter_sql(cloud: str, item: Filter) -> tuple[str, list[Any]]:
    if item.field == "tag":
        return "a.pk IN (SELECT asset_pk FROM asset_tags WHERE cloud = ? AND tag = ?)", [cloud, item.value]
    if item.field == "context":
        if item.op == "has":
            return "a.pk IN (SELECT asset_pk FROM asset_context WHERE cloud = ? AND key = ?)", [cloud, item.value]
        key, value = item.value
        return "a.pk IN (SELECT asset_pk FROM asset_context WHERE cloud = ? AND key = ? AND value = ?)", [cloud, key, value]
    column = _FIELD_SQL[item.field]
    if item.op == "in":
        return f"{column} IN ({', '.join('?' * len(item.value))})", list(item.value)
    if item.op == "contains":
        return f"{column} LIKE ? ESCAPE '\\'", [f"%{like_escape(item.value)}%"]
    if item.op == "prefix":
        end = queries.prefix_successor(item.value)
        if end is None:
            return f"{column} >= ?", [item.value]
        return f"{column} >= ? AND {column} < ?", [item.value, end]
    return f"{column} {_COMPARE[item.op]} ?", [item.value]


def _after(columns: list[str], descending: list[bool], values: list[Any]) -> tuple[str, list[Any]]:
    """Rows strictly after a keyset position. One direction: a row-value comparison (one index
    range on both backends); mixed directions: the first key bounds the range, the rest
    decide ties."""
    if len(set(descending)) == 1:
        op = "<" if descending[0] else ">"
        marks = ", ".join("?" * len(values))
        return f"({', '.join(columns)}) {op} ({marks})", values
    first, op = columns[0], "<" if descending[0] else ">"
    rest, rest_values = _after(columns[1:], descending[1:], values[1:])
    return f"{first} {op}= ? AND ({first} {op} ? OR ({first} = ? AND {rest}))", [values[0]] * 3 + rest_values


async def _write_labels(db: Transaction, asset: Asset, *, fresh: bool = False) -> None:
    """Make an asset's tag and context side rows what its row says (same transaction). A
    `fresh` row (just inserted: pks are never reused) has none to delete: two statements fewer
    per new asset of a batched import's commit."""
    if not fresh:
        await db.execute("DELETE FROM asset_tags WHERE asset_pk = ?", (asset.pk,))
        await db.execute("DELETE FROM asset_context WHERE asset_pk = ?", (asset.pk,))
    await _insert_labels(db, [_Labels(asset.pk or 0, asset.cloud, asset.created_at, asset.tags, asset.context, asset.live)])


class _Labels(NamedTuple):
    """What an asset's side rows are made of: its row id, environment, creation time (the
    tag index's order), tags, context entries, and whether it is live (the tag index's status)."""

    pk: int
    cloud: str
    created_at: float
    tags: list[str]
    context: dict[str, Any]
    live: bool


async def _insert_labels(db: Transaction, assets: Sequence[_Labels]) -> None:
    """The side rows of assets, in two statements."""
    tags = [(a.cloud, str(tag), a.pk, a.created_at, int(a.live)) for a in assets for tag in a.tags]
    context = [
        (a.cloud, str(key), value if isinstance(value, str) else json.dumps(value), a.pk)
        for a in assets for key, value in a.context.items()
    ]
    if tags:
        await db.executemany(
            "INSERT INTO asset_tags (cloud, tag, asset_pk, created_at, live) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT (cloud, tag, asset_pk) DO NOTHING",
            tags,
        )
    if context:
        await db.executemany(
            "INSERT INTO asset_context (cloud, key, value, asset_pk) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (cloud, key, value, asset_pk) DO NOTHING",
            context,
        )


# --- restore drills: row helpers -------------------------------------------------------------

_DRILL_SCHEDULE_SELECT = "SELECT cloud, schedule, sample, next_run_at, last_run_at FROM drill_schedules"


def _drill_schedule(row: Sequence[Any]) -> DrillScheduleRow:
    return DrillScheduleRow(row[0], json.loads(row[1]), json.loads(row[2]), row[3], row[4])
