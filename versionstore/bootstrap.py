"""Composition root: the service's parts built from the configuration, in one place.

The HTTP app's cleanup context, the CLI commands and the tests open the metadata repository,
the stores and the claims here (`open_service`), so which backend a URL means, and that a
process which writes holds its leases alive, is decided once.
"""

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from versionstore.blobstore import BlobStore, open_store
from versionstore.blobstore.resilient import resilient
from versionstore.config import Config
from versionstore.metadata import MetadataStore
from versionstore.repository import MetadataRepository

if TYPE_CHECKING:  # imported when a service is opened: `versionstore --help` stays fast
    from versionstore.service import VersionService


async def open_metadata(config: Config) -> MetadataRepository:
    """The metadata repository `config.metadata_location` names (SQLite file or PostgreSQL),
    migrated to the current schema; the caller closes it."""
    return await MetadataStore.open(config.metadata_location)


def open_primary(config: Config) -> BlobStore:
    return resilient(open_store(config.primary_url))


def open_backup(config: Config) -> BlobStore:
    """The operator's default backup store (environments with their own bucket: targets.py)."""
    return resilient(open_store(config.backup_url))


@contextlib.asynccontextmanager
async def open_service(config: Config) -> AsyncIterator["VersionService"]:
    """Everything a process needs to read and write versions: the metadata, the primary store,
    the backup targets and this process's claims with their lease heartbeat running (so the
    journal rows and deletion claims of a long run, a server's or a CLI's, stay valid for the
    whole run). Closed in reverse order, also when a later step of the opening fails."""
    from versionstore.claims import Claims
    from versionstore.service import VersionService
    from versionstore.targets import BackupTargets

    config.spool_dir.mkdir(parents=True, exist_ok=True)
    async with contextlib.AsyncExitStack() as opened:
        meta = await open_metadata(config)
        opened.push_async_callback(meta.close)
        primary = open_primary(config)
        opened.push_async_callback(primary.close)
        targets = BackupTargets(meta, open_backup(config), marker_ttl=config.marker_ttl)
        opened.push_async_callback(targets.close)
        claims = Claims(meta, lease=config.lease_seconds)
        heartbeat = asyncio.create_task(claims.run_heartbeat(), name="lease heartbeat")
        opened.push_async_callback(_cancel, heartbeat)
        yield VersionService(meta, primary, targets, config.spool_dir, config.max_upload_bytes, claims)


async def _cancel(task: "asyncio.Task[None]") -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
