"""Plain records of archive files, shared by the metadata store and the domain (archives.py)."""

from dataclasses import dataclass

#: The job kinds of an archive export and import.
EXPORT, IMPORT = "archive_export", "archive_import"
EXPORT_FILE, IMPORT_FILE = "export", "import"
#: A CLI import's private staging directory in the spool: `<prefix><random>/`.
IMPORT_STAGING = "archive-import-"


@dataclass(frozen=True)
class ArchiveFile:
    """A tar an archive job keeps in the default backup store: an export's published archive
    (removed once `expires_at` passes) or an import's uploaded one (removed once its job has
    ended). `removed_at` is set once, by whichever process removed it."""

    job_id: str
    cloud: str
    kind: str  # export | import
    key: str
    registered_at: float
    expires_at: float | None
    removed_at: float | None = None
