"""Service configuration: command-line flags override VERSIONSTORE_* environment variables.

Paths are made absolute here, once, against the working directory of the process that reads
them: every later user (stores, the database, the spool) sees absolute paths only.
"""

import os
from dataclasses import dataclass
from pathlib import Path

MiB = 1 << 20
GiB = 1 << 30
DATA_DIR_VARIABLE = "VERSIONSTORE_DATA_DIR"
METADATA_URL_VARIABLE = "VERSIONSTORE_METADATA_URL"


class ConfigError(ValueError):
    """A setting that cannot work; its message is one line meant for the operator."""


class StartupError(Exception):
    """The service could not start with these settings (busy port, unreadable store, ...); one line."""


def data_dir_from(flag: Path | str | None) -> Path:
    """The data directory: the `--data-dir` flag, else VERSIONSTORE_DATA_DIR, made absolute."""
    value = flag if flag not in (None, "") else os.environ.get(DATA_DIR_VARIABLE)
    if not value:
        raise ConfigError(f"no data directory: pass --data-dir DIR or set {DATA_DIR_VARIABLE}")
    return absolute(value)


def absolute(path: Path | str) -> Path:
    """`~` expanded, made absolute against the working directory, `..` folded."""
    return Path(os.path.abspath(os.path.expanduser(path)))


def store_location(value: str) -> str:
    """A store named by a bare path (`data/primary`, `~/x`, `/srv/x`) becomes an absolute path;
    URLs (`file://`, `s3://`, `gs://`, `memory:`) pass unchanged."""
    if "://" in value or value.startswith("memory:"):
        return value
    return str(absolute(value))


def _env_int(name: str, default: int) -> int:
    return int(_env_number(name, default, int))


def _env_float(name: str, default: float) -> float:
    return _env_number(name, default, float)


def _env_number(name: str, default: float, kind: type[int] | type[float]) -> float:
    value = os.environ.get(name)
    if not value:
        return default
    try:
        return kind(value)
    except ValueError:
        raise ConfigError(f"{name}={value!r} is not {'an integer' if kind is int else 'a number'}") from None


def _env_list(name: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in os.environ.get(name, "").split(",") if item.strip())


@dataclass(frozen=True)
class Config:
    data_dir: Path
    host: str = "127.0.0.1"
    port: int = 8765
    #: Largest original accepted, whole or assembled from chunks (oversize gets a 400).
    max_upload_bytes: int = 20 * GiB
    #: Largest non-upload request body (Admin JSON/form/multipart).
    max_body_bytes: int = 10 << 20
    #: Bytes all not-yet-authenticated requests together may hold (fields in memory, a file part
    #: sent before the signature on disk); one such request may hold at most max_body_bytes.
    unauth_budget_bytes: int = 64 << 20
    #: Multipart upload bodies up to this many bytes (by their Content-Length) are read whole and
    #: parsed in one pass (http/small_body.py); larger ones stream. 0 streams every body.
    small_body_bytes: int = 256 << 10
    #: Seconds allowed to fetch a remote `file` URL.
    fetch_timeout: float = 300.0
    primary_store: str | None = None
    backup_store: str | None = None
    #: Where the metadata lives: `sqlite:///PATH` or `postgresql://USER@HOST:PORT/DB`; None is
    #: the embedded default, `metadata.sqlite3` in the data directory.
    metadata_url: str | None = None
    #: Seconds a customer bucket's marker check is trusted before it is made again.
    marker_ttl: float = 60.0
    #: Longest wait between two attempts to write a pending revision to its target.
    pending_retry_max: float = 300.0
    #: How often the drainer and the job runner look for work they were not woken for.
    poll_interval: float = 1.0
    #: Largest single chunk of an `upload_large` (its bytes may reach disk before the
    #: signature is checked when the file part precedes it).
    max_chunk_bytes: int = 512 * MiB
    #: Chunked uploads in progress per product environment; a new one beyond it gets a 400.
    chunk_sessions_max: int = 100
    #: Bytes the chunked uploads in progress of one environment may claim (declared totals,
    #: or the furthest chunk while the total is unknown).
    chunk_sessions_max_bytes: int = 100 * GiB
    #: Seconds a chunked upload may stay idle before it is dropped with its parts.
    chunk_session_ttl: float = 24 * 3600.0
    #: How often idle chunked uploads and leftover chunk files are swept.
    chunk_sweep_interval: float = 300.0
    #: Free bytes on the data dir's file system below which health and status report `low_space`.
    min_free_bytes: int = 1 * GiB
    #: Hosts and CIDRs that remote `file` fetches and `notification_url` callbacks may reach
    #: although they are loopback, private, link-local or otherwise internal (default deny).
    fetch_allow: tuple[str, ...] = ()
    #: Admin API calls allowed per environment per hour (420 beyond); 0 means no limit.
    admin_rate_limit: int = 0
    #: Seconds between scheduled verify jobs per environment (0: off); see docs/operations.md.
    verify_interval: float = 86400.0
    #: MB/s a scheduled verify job may read (0: unlimited), so uploads keep their share of the disk.
    verify_rate: float = 50.0
    #: Log lines as `text` (for people) or `json` (one object per line, with the request id).
    log_format: str = "text"
    #: Directory for multi-process metric files (prometheus-client's multiprocess mode); None:
    #: this process keeps its metrics in memory. Falls back to PROMETHEUS_MULTIPROC_DIR.
    metrics_dir: Path | None = None
    #: Bearer token that opens `/metrics` to any client; without one only local clients may scrape.
    metrics_token: str | None = None
    #: Service processes `serve` runs on the one port (`--workers`, VERSIONSTORE_WORKERS).
    workers: int = 1
    #: Seconds a process's claims (jobs, pending revisions, blob writes in flight, deletions,
    #: a target switch) outlive its last heartbeat: how soon another process takes over.
    lease_seconds: float = 30.0
    #: Seconds between two passes of orphan collection over the write journal's expired rows.
    journal_sweep_interval: float = 10.0
    #: Days a prepared archive export stays downloadable before it is removed, unless its
    #: request asked for another `keep_days` (docs/snapshots.md, "Removal").
    archive_keep_days: int = 7
    #: Seconds the requests in flight get to finish after SIGTERM/SIGINT before they are cut;
    #: the process exits at most a few seconds later (docs/operations.md, "Stopping").
    shutdown_grace: float = 20.0

    @classmethod
    def from_env(cls, data_dir: Path, **overrides: object) -> "Config":
        values: dict[str, object] = {
            "max_upload_bytes": _env_int("VERSIONSTORE_MAX_UPLOAD_BYTES", cls.max_upload_bytes),
            "max_body_bytes": _env_int("VERSIONSTORE_MAX_BODY_BYTES", cls.max_body_bytes),
            "unauth_budget_bytes": _env_int("VERSIONSTORE_UNAUTH_BUDGET_BYTES", cls.unauth_budget_bytes),
            "small_body_bytes": _env_int("VERSIONSTORE_SMALL_BODY_BYTES", cls.small_body_bytes),
            "fetch_timeout": _env_float("VERSIONSTORE_FETCH_TIMEOUT", cls.fetch_timeout),
            "primary_store": os.environ.get("VERSIONSTORE_PRIMARY_STORE") or None,
            "backup_store": os.environ.get("VERSIONSTORE_BACKUP_STORE") or None,
            "metadata_url": os.environ.get(METADATA_URL_VARIABLE) or None,
            "marker_ttl": _env_float("VERSIONSTORE_MARKER_TTL", cls.marker_ttl),
            "pending_retry_max": _env_float("VERSIONSTORE_PENDING_RETRY_MAX", cls.pending_retry_max),
            "poll_interval": _env_float("VERSIONSTORE_POLL_INTERVAL", cls.poll_interval),
            "max_chunk_bytes": _env_int("VERSIONSTORE_MAX_CHUNK_BYTES", cls.max_chunk_bytes),
            "chunk_sessions_max": _env_int("VERSIONSTORE_CHUNK_SESSIONS_MAX", cls.chunk_sessions_max),
            "chunk_sessions_max_bytes": _env_int("VERSIONSTORE_CHUNK_SESSIONS_MAX_BYTES", cls.chunk_sessions_max_bytes),
            "chunk_session_ttl": _env_float("VERSIONSTORE_CHUNK_SESSION_TTL", cls.chunk_session_ttl),
            "chunk_sweep_interval": _env_float("VERSIONSTORE_CHUNK_SWEEP_INTERVAL", cls.chunk_sweep_interval),
            "min_free_bytes": _env_int("VERSIONSTORE_MIN_FREE_BYTES", cls.min_free_bytes),
            "fetch_allow": _env_list("VERSIONSTORE_FETCH_ALLOW"),
            "admin_rate_limit": _env_int("VERSIONSTORE_ADMIN_RATE_LIMIT", cls.admin_rate_limit),
            "verify_interval": _env_float("VERSIONSTORE_VERIFY_INTERVAL", cls.verify_interval),
            "verify_rate": _env_float("VERSIONSTORE_VERIFY_RATE", cls.verify_rate),
            "log_format": os.environ.get("VERSIONSTORE_LOG_FORMAT") or cls.log_format,
            "metrics_dir": os.environ.get("VERSIONSTORE_METRICS_DIR") or os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None,
            "metrics_token": os.environ.get("VERSIONSTORE_METRICS_TOKEN") or None,
            "workers": _env_int("VERSIONSTORE_WORKERS", cls.workers),
            "lease_seconds": _env_float("VERSIONSTORE_LEASE_SECONDS", cls.lease_seconds),
            "journal_sweep_interval": _env_float("VERSIONSTORE_JOURNAL_SWEEP_INTERVAL", cls.journal_sweep_interval),
            "archive_keep_days": _env_int("VERSIONSTORE_ARCHIVE_KEEP_DAYS", cls.archive_keep_days),
            "shutdown_grace": _env_float("VERSIONSTORE_SHUTDOWN_GRACE", cls.shutdown_grace),
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(data_dir=data_dir, **values)  # type: ignore[arg-type]

    def __post_init__(self) -> None:
        object.__setattr__(self, "data_dir", absolute(self.data_dir))
        for name in ("primary_store", "backup_store"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, store_location(value))
        if self.metrics_dir is not None:
            object.__setattr__(self, "metrics_dir", absolute(self.metrics_dir))

    def check(self) -> None:
        """Refuse a store name no backend understands, before anything is opened."""
        from versionstore.blobstore import parse_store_url
        from versionstore.logs import FORMATS

        if self.log_format not in FORMATS:
            raise ConfigError(f"log format {self.log_format!r}: use one of {', '.join(FORMATS)} (VERSIONSTORE_LOG_FORMAT)")
        if not 0 <= self.shutdown_grace <= 3600:
            raise ConfigError(f"shutdown grace {self.shutdown_grace}: use 0 to 3600 seconds (VERSIONSTORE_SHUTDOWN_GRACE)")

        for role, url in (("primary store", self.primary_url), ("backup store", self.backup_url)):
            try:
                parse_store_url(url)
            except ValueError as exc:
                raise ConfigError(f"{role}: {exc}") from None
        self.check_metadata()

    def check_metadata(self) -> None:
        """Refuse a metadata URL no backend understands (ConfigError, one line)."""
        from versionstore.metadata import check_metadata_url

        try:
            check_metadata_url(self.metadata_location)
        except ValueError as exc:
            raise ConfigError(f"metadata: {exc}") from None

    @property
    def db_path(self) -> Path:
        return self.data_dir / "metadata.sqlite3"

    @property
    def metadata_location(self) -> str:
        """The metadata URL in use: the setting, else the SQLite file in the data directory."""
        return self.metadata_url or f"sqlite://{self.db_path}"

    @property
    def spool_dir(self) -> Path:
        return self.data_dir / "spool"

    @property
    def primary_url(self) -> str:
        return self.primary_store or str(self.data_dir / "primary")

    @property
    def backup_url(self) -> str:
        return self.backup_store or str(self.data_dir / "backup")
