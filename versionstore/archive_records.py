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
    #: Why it went before its time: `content_deleted` (a version it lists was deleted
    #: irreversibly; set in that deletion's transaction, the file removed by the next pass).
    removed_reason: str | None = None

    @property
    def removed(self) -> bool:
        """No longer downloadable (removed, or withdrawn and waiting for its removal)."""
        return self.removed_at is not None or self.removed_reason is not None


#: The reason an irreversible version deletion gives the archives listing the version.
CONTENT_DELETED = "content_deleted"


class MemberGone(Exception):
    """A version the archive lists was deleted while it was being prepared (the export fails)."""
