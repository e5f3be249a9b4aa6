"""`versionstore metadata copy`: move an installation's metadata from SQLite to PostgreSQL.

Every table of the source is copied in row order, a batch per transaction, with
`ON CONFLICT DO NOTHING`: run again after an interruption (a kill, a lost connection), it
skips what is already there and copies the rest, so the result is the same. Row ids are kept
(identity columns are BY DEFAULT), then the destination's sequences are moved past them.
Verified at the end: row counts per table, and a digest of every version row (its id, version
id, BLAKE3 digest, size) on both sides. The service must be stopped while it runs.

The SQL here is generic over tables (names and columns read from the source), not the
repository's: that stays in versionstore/metadata.py.
"""

import asyncio
import hashlib
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from versionstore.config import ConfigError
from versionstore.gateway import Gateway
from versionstore.metadata import open_gateway, sqlite_path

#: Tables in foreign-key order; tables added later are copied after these, by name.
TABLE_ORDER = (
    "clouds", "metadata_fields", "assets", "versions", "upload_sessions", "upload_parts",
    "backup_pending", "backup_health", "jobs", "blob_checks",
)
_VERSION_DIGEST_COLUMNS = "pk, version_id, digest, bytes"


@dataclass
class CopyReport:
    rows: dict[str, tuple[int, int]] = field(default_factory=dict)  # table -> (source, destination)
    versions_checked: int = 0
    mismatches: list[str] = field(default_factory=list)

    @property
    def verified(self) -> bool:
        return not self.mismatches

    def as_dict(self) -> dict[str, Any]:
        return {
            "verified": self.verified,
            "tables": {t: {"source": s, "destination": d} for t, (s, d) in self.rows.items()},
            "versions_checked": self.versions_checked,
            "mismatches": self.mismatches,
        }


class _Source:
    """The SQLite file, read-only, read in a worker thread."""

    def __init__(self, path: Path) -> None:
        self.db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)

    def tables(self) -> list[str]:
        names = {r[0] for r in self.db.execute("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")}
        return [t for t in TABLE_ORDER if t in names] + sorted(names - set(TABLE_ORDER))

    def columns(self, table: str) -> list[str]:
        return [r[1] for r in self.db.execute(f"PRAGMA table_info({table})")]

    def count(self, table: str) -> int:
        return int(self.db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])

    def batch(self, table: str, columns: list[str], after: int, limit: int) -> list[tuple[Any, ...]]:
        return self.db.execute(
            f"SELECT rowid, {', '.join(columns)} FROM {table} WHERE rowid > ? ORDER BY rowid LIMIT ?", (after, limit)
        ).fetchall()

    def version_rows(self, limit: int) -> Iterator[list[tuple[Any, ...]]]:
        after = -1
        while rows := self.db.execute(
            f"SELECT {_VERSION_DIGEST_COLUMNS} FROM versions WHERE pk > ? ORDER BY pk LIMIT ?", (after, limit)
        ).fetchall():
            yield rows
            after = rows[-1][0]


async def copy_metadata(source_url: str, target_url: str, *, batch: int = 2000, progress: bool = True) -> CopyReport:
    path = sqlite_path(source_url)
    if path is None or not path.is_file():
        raise ConfigError(f"--from: {source_url!r} is not the URL of an existing SQLite file (sqlite:///PATH)")
    if sqlite_path(target_url) == path:
        raise ConfigError("--from and --to name the same database")
    await (await open_gateway(source_url)).close()  # bring the source to the current schema first
    source = _Source(path)
    target = await open_gateway(target_url)
    try:
        tables = await asyncio.to_thread(source.tables)
        total = sum([await asyncio.to_thread(source.count, t) for t in tables])
        with tqdm(total=total, unit="row", desc="copy", disable=not progress or None) as bar:
            for table in tables:
                await _copy_table(source, target, table, batch, bar.update)
        if not target_url.startswith(("sqlite:",)):
            await _advance_sequences(target, tables)
        return await _verify(source, target, tables, batch)
    finally:
        await target.close()
        source.db.close()


async def _copy_table(source: _Source, target: Gateway, table: str, batch: int, advance: Any) -> None:
    columns = await asyncio.to_thread(source.columns, table)
    insert = f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))}) ON CONFLICT DO NOTHING"
    after = -1
    while rows := await asyncio.to_thread(source.batch, table, columns, after, batch):
        async with target.transaction() as db:
            await db.executemany(insert, [row[1:] for row in rows])
        after = rows[-1][0]
        advance(len(rows))


async def _advance_sequences(target: Gateway, tables: list[str]) -> None:
    """Identity columns continue after the copied row ids (PostgreSQL)."""
    rows = await target.all(
        "SELECT table_name, column_name FROM information_schema.columns WHERE is_identity = 'YES' AND table_schema = current_schema()"
    )
    async with target.transaction() as db:
        for table, column in rows:
            if table in tables:
                await db.execute(
                    f"SELECT setval(pg_get_serial_sequence('{table}', '{column}'), "
                    f"(SELECT COALESCE(MAX({column}), 0) + 1 FROM {table}), false)"
                )


async def _verify(source: _Source, target: Gateway, tables: list[str], batch: int) -> CopyReport:
    report = CopyReport()
    for table in tables:
        expected = await asyncio.to_thread(source.count, table)
        found = int((await target.one(f"SELECT COUNT(*) FROM {table}"))[0])
        report.rows[table] = (expected, found)
        if expected != found:
            report.mismatches.append(f"{table}: {expected} rows in the source, {found} in the destination")
    after = -1
    for rows in source.version_rows(batch):
        theirs = await target.all(
            f"SELECT {_VERSION_DIGEST_COLUMNS} FROM versions WHERE pk > ? AND pk <= ? ORDER BY pk", (after, rows[-1][0])
        )
        if _digest(rows) != _digest(theirs):
            report.mismatches.append(f"versions with pk in ({after}, {rows[-1][0]}] differ")
        report.versions_checked += len(rows)
        after = rows[-1][0]
    return report


def _digest(rows: list[Any]) -> str:
    return hashlib.sha256(repr([tuple(r) for r in rows]).encode()).hexdigest()
