"""The metadata repository: one body of portable SQL on SQLite or PostgreSQL.

Every statement goes through a gateway (versionstore/gateway.py for SQLite, the embedded
default; versionstore/pg.py for PostgreSQL, which translates it): `_one`/`_all` for point
reads, `_scan` for reads whose cost grows with the library, `transaction()` for writes.
Write SQL in the subset both run: no INSERT OR ..., json_each, PRAGMA or lastrowid (RETURNING pk).
The public methods are the contract (versionstore/repository.py).
"""

import json
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import astuple, fields, replace
from pathlib import Path
from typing import Any

from versionstore.gateway import Gateway, IntegrityError, SqliteGateway, Transaction, migrations
from versionstore.models import (
    Asset,
    BackupHealth,
    Cloud,
    Job,
    PendingRevision,
    SessionState,
    UploadPart,
    UploadSession,
    Version,
)

_migrations = migrations  # the numbered blocks of schema.sql (tests build old databases from them)

#: Selected in this order; `detached_from` stands for the model's `detached` flag (see _asset).
_ASSET_COLUMNS = [*(f.name for f in fields(Asset) if f.name != "detached"), "detached_from"]
_VERSION_COLUMNS = [f.name for f in fields(Version)]


_CLOUD_SELECT = "SELECT name, api_key, api_secret, auto_backup, created_at, backup_target FROM clouds"


_SESSION_COLUMNS = "cloud, upload_id, resource_type, public_id, total, claimed, state, created_at, updated_at"


def _session(row: Sequence[Any]) -> UploadSession:
    cloud, upload_id, resource_type, public_id, total, claimed, state, created_at, updated_at = row
    return UploadSession(cloud, upload_id, resource_type, public_id, total, claimed, SessionState(state), created_at, updated_at)


def _cloud(row: Sequence[Any]) -> Cloud:
    return Cloud(row[0], row[1], row[2], bool(row[3]), row[4], row[5])


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


class AssetChanged(Exception):
    """The asset row is not the one the caller read: another write (an upload, a rename, a
    delete, in this process or another) committed in between. Nothing was written; re-read
    and decide again."""


def _detached_name(asset_id: str) -> str:
    """What a detached history holds in the public_id column: unique (its asset_id) and no
    name a client can choose (ids.check_public_id refuses control characters)."""
    return f"\x1fdetached/{asset_id}"


def _asset(row: Sequence[Any]) -> Asset:
    values = dict(zip(_ASSET_COLUMNS, row, strict=True))
    values["tags"] = json.loads(values["tags"])
    values["context"] = json.loads(values["context"])
    values["metadata"] = json.loads(values["metadata"])
    detached_from = values.pop("detached_from")
    if detached_from is not None:
        values["public_id"], values["detached"] = detached_from, True
    return Asset(**values)


_BACKED_UP = _VERSION_COLUMNS.index("backed_up")


def _version(row: Sequence[Any]) -> Version:
    # Positional (columns are selected in field order): this runs once per row of a
    # `versions=true` listing, where building a dict per row was a third of the CPU time.
    values = list(row)
    values[_BACKED_UP] = bool(values[_BACKED_UP])
    return Version(*values)


def _asset_row(asset: Asset) -> dict[str, Any]:
    """Column values of a whole row, without its generation (writes set that themselves)."""
    values = {f.name: getattr(asset, f.name) for f in fields(Asset) if f.name not in ("detached", "generation")}
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


_HAS_REVISION = "EXISTS (SELECT 1 FROM versions WHERE asset_pk = ? AND backed_up = 1)"


_ASSET_SELECT = f"SELECT {', '.join(_ASSET_COLUMNS)} FROM assets"
_VERSION_SELECT = f"SELECT {', '.join(_VERSION_COLUMNS)} FROM versions"
_VERSION_OF = (
    f"SELECT COALESCE(a.detached_from, a.public_id), {', '.join('v.' + c for c in _VERSION_COLUMNS)} "
    "FROM versions v JOIN assets a ON a.pk = v.asset_pk WHERE a.cloud = ? AND a.asset_id = ? AND v.version_id = ?"
)
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
        #: Migration numbers applied when this store was opened.
        self.applied_migrations = gateway.applied
        self._clouds: dict[str, Cloud | None] = {}
        self._clouds_version: object = None
        #: Bumped whenever a revision enters or leaves the pending queue or a version becomes
        #: a revision after the fact (initial backup); this process is the only writer of
        #: both: part of the key of anything cached that shows `restorable`.
        self.revisions_generation = 0

    @classmethod
    async def open(cls, location: Path | str) -> "MetadataStore":
        """Open the metadata at `location` (a SQLite file's path, or a sqlite:// or
        postgresql:// URL) and apply the migrations it lacks."""
        return cls(await open_gateway(sqlite_url(location) if isinstance(location, Path) else location))

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

    async def get_cloud(self, name: str) -> Cloud | None:
        """Read on every request (so CLI changes apply at once), cached until the gateway's
        epoch moves: on SQLite at any commit of any connection (PRAGMA data_version), on
        PostgreSQL at our own commits and at least once a second; a missing environment is
        cached only where the epoch sees every commit (SQLite)."""
        epoch = self._gate.cache_epoch()
        if epoch != self._clouds_version:
            self._clouds.clear()
            self._clouds_version = epoch
        if name not in self._clouds:
            row = await self._one(f"{_CLOUD_SELECT} WHERE name = ?", (name,))
            if row is None and not self._gate.caches_misses:
                return None
            self._clouds[name] = None if row is None else _cloud(row)
        return self._clouds[name]

    async def list_clouds(self) -> list[Cloud]:
        return [_cloud(row) for row in await self._all(f"{_CLOUD_SELECT} ORDER BY name")]

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

    async def find_assets(self, cloud: str, where: str, args: Sequence[Any], order: str, limit: int, offset: int = 0) -> list[Asset]:
        """Filtered listing; `where`/`order` are built by trusted callers (never from raw input)."""
        rows = await self._scan(
            f"{_ASSET_SELECT} WHERE cloud = ? AND ({where}) ORDER BY {order} LIMIT ? OFFSET ?",
            (cloud, *args, limit, offset),
        )
        return [_asset(r) for r in rows]

    async def count_assets(self, cloud: str, where: str, args: Sequence[Any]) -> int:
        rows = await self._scan(f"SELECT COUNT(*) FROM assets WHERE cloud = ? AND ({where})", (cloud, *args))
        return int(rows[0][0])

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

    async def list_tags(self, cloud: str, resource_type: str, prefix: str, limit: int, offset: int) -> list[str]:
        """Distinct tags of live assets of one resource type, sorted (Admin API `tags`)."""
        rows = await self._scan(
            "SELECT DISTINCT t.value FROM assets a, json_each(a.tags) t "
            "WHERE a.cloud = ? AND a.resource_type = ? AND a.status = 'live' AND substr(t.value, 1, ?) = ? "
            "ORDER BY t.value LIMIT ? OFFSET ?",
            (cloud, resource_type, len(prefix), prefix, limit, offset),
        )
        return [str(r[0]) for r in rows]

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

    async def save_version(self, asset: Asset, version: Version, *, pending: bool = False) -> Asset:
        """Insert or update the asset row and append its new version, atomically; with
        `pending`, queue its revision for the backup target in the same transaction.

        An update is a compare-and-set on the generation the caller read; an insert must find
        the name free. Otherwise AssetChanged, and nothing (version, queue entry) is written."""
        values = _asset_row(asset)
        try:
            async with self.transaction() as db:
                if pending:
                    await db.execute(
                        "INSERT INTO backup_pending (cloud, digest, bytes, queued_at, next_attempt_at) VALUES (?, ?, ?, ?, ?) "
                        "ON CONFLICT (cloud, digest) DO NOTHING",
                        (asset.cloud, version.digest, version.bytes, version.created_at, version.created_at),
                    )
                if asset.pk is None:
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
                await db.execute(_VERSION_INSERT, (asset.cloud, asset.pk, *astuple(version)))
        except sqlite3.IntegrityError as exc:
            if not _name_taken(exc):
                raise
            raise AssetChanged(asset.asset_id) from None
        if pending:
            self.revisions_generation += 1
        return asset

    async def update_fields(
        self, asset: Asset, *, tags: list[str] | None = None, context: dict[str, str] | None = None,
        metadata: dict[str, str] | None = None,
    ) -> Asset:
        """Write only the given metadata-only columns of a live asset, if its row is still the
        one read (AssetChanged otherwise). Version columns are never written from here."""
        changes = {k: v for k, v in (("tags", tags), ("context", context), ("metadata", metadata)) if v is not None}
        if not changes:
            return asset
        async with self.transaction() as db:
            cursor = await db.execute(
                f"UPDATE assets SET {', '.join(f'{k} = ?' for k in changes)}, generation = generation + 1 "
                "WHERE pk = ? AND generation = ? AND status = 'live'",
                (*(json.dumps(v) for v in changes.values()), asset.pk, asset.generation),
            )
            if not cursor.rowcount:
                raise AssetChanged(asset.asset_id)
        return replace(
            asset, tags=asset.tags if tags is None else tags, context=asset.context if context is None else context,
            metadata=asset.metadata if metadata is None else metadata, generation=asset.generation + 1,
        )

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
            await db.execute(
                "DELETE FROM assets WHERE pk = ? AND status = 'deleted' AND NOT EXISTS (SELECT 1 FROM versions WHERE asset_pk = ?)",
                (asset_pk, asset_pk),
            )
        return deleted

    async def digest_referenced(self, cloud: str, digest: str, *, backup: bool) -> bool:
        """Does any backed-up version (backup store) or live asset (primary store) use it?"""
        if backup:
            sql = "SELECT 1 FROM versions WHERE cloud = ? AND digest = ? AND backed_up = 1 LIMIT 1"
        else:
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

    async def due_pending(self, now: float, limit: int) -> list[PendingRevision]:
        rows = await self._all(f"{_PENDING_SELECT} WHERE next_attempt_at <= ? ORDER BY next_attempt_at LIMIT ?", (now, limit))
        return [PendingRevision(*r) for r in rows]

    async def get_pending(self, cloud: str, digest: str) -> PendingRevision | None:
        row = await self._one(f"{_PENDING_SELECT} WHERE cloud = ? AND digest = ?", (cloud, digest))
        return None if row is None else PendingRevision(*row)

    async def reschedule_pending(self, cloud: str, digest: str, next_attempt_at: float, error: str) -> None:
        async with self.transaction() as db:
            await db.execute(
                "UPDATE backup_pending SET attempts = attempts + 1, next_attempt_at = ?, last_error = ? WHERE cloud = ? AND digest = ?",
                (next_attempt_at, error, cloud, digest),
            )

    async def retry_pending_now(self, cloud: str) -> None:
        """The target just recovered: make every waiting revision due at once."""
        async with self.transaction() as db:
            await db.execute("UPDATE backup_pending SET next_attempt_at = 0 WHERE cloud = ?", (cloud,))

    async def clear_pending(self, cloud: str, digest: str) -> None:
        async with self.transaction() as db:
            await db.execute("DELETE FROM backup_pending WHERE cloud = ? AND digest = ?", (cloud, digest))
            self.revisions_generation += 1

    async def pending_summary(self, cloud: str) -> tuple[int, int, float | None]:
        """(count, bytes, oldest queued_at) of the environment's pending revisions."""
        row = await self._one("SELECT COUNT(*), COALESCE(SUM(bytes), 0), MIN(queued_at) FROM backup_pending WHERE cloud = ?", (cloud,))
        return int(row[0]), int(row[1]), row[2]

    async def get_health(self, cloud: str) -> BackupHealth | None:
        row = await self._one("SELECT cloud, state, last_error, last_error_at, updated_at FROM backup_health WHERE cloud = ?", (cloud,))
        return None if row is None else BackupHealth(*row)

    async def save_health(self, health: BackupHealth) -> None:
        async with self.transaction() as db:
            await db.execute(
                "INSERT INTO backup_health (cloud, state, last_error, last_error_at, updated_at) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (cloud) DO UPDATE SET state = excluded.state, last_error = excluded.last_error, "
                "last_error_at = excluded.last_error_at, updated_at = excluded.updated_at",
                astuple(health),
            )

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

    async def mark_backed_up(self, cloud: str, version_pk: int, version: Version, *, pending: bool, job_id: str) -> bool:
        """Make an existing version a revision (its bytes are in the target, or queued with
        `pending`), recording the job that did it. False when it already was one."""
        async with self.transaction() as db:
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
            self.revisions_generation += 1
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
