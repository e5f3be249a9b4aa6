"""Composition root: the service's parts built from the configuration, in one place.

The HTTP app's cleanup context, the CLI commands and the tests open the metadata repository
(and the stores) here, so which backend a URL means is decided once.
"""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from versionstore.blobstore import BlobStore, open_store
from versionstore.blobstore.resilient import resilient
from versionstore.config import Config
from versionstore.metadata import MetadataStore
from versionstore.repository import MetadataRepository

if TYPE_CHECKING:
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


@asynccontextmanager
async def opened_service(config: Config) -> "AsyncIterator[VersionService]":
    """The domain over the configured metadata and stores, for a CLI command; closed after."""
    from versionstore.service import VersionService
    from versionstore.targets import BackupTargets

    meta = await open_metadata(config)
    primary = open_primary(config)
    targets = BackupTargets(meta, open_backup(config))
    config.spool_dir.mkdir(parents=True, exist_ok=True)
    try:
        yield VersionService(meta, primary, targets, config.spool_dir, config.max_upload_bytes)
    finally:
        await targets.close()
        await primary.close()
        await meta.close()
