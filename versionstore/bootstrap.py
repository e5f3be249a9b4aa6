"""Composition root: the service's parts built from the configuration, in one place.

The HTTP app's cleanup context, the CLI commands and the tests open the metadata repository
(and the stores) here, so which backend a URL means is decided once.
"""

from versionstore.blobstore import BlobStore, open_store
from versionstore.blobstore.resilient import resilient
from versionstore.config import Config
from versionstore.metadata import MetadataStore
from versionstore.repository import MetadataRepository


async def open_metadata(config: Config) -> MetadataRepository:
    """The metadata repository `config.metadata_location` names (SQLite file or PostgreSQL),
    migrated to the current schema; the caller closes it."""
    return await MetadataStore.open(config.metadata_location)


def open_primary(config: Config) -> BlobStore:
    return resilient(open_store(config.primary_url))


def open_backup(config: Config) -> BlobStore:
    """The operator's default backup store (environments with their own bucket: targets.py)."""
    return resilient(open_store(config.backup_url))
