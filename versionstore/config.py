"""Service configuration: command-line flags override VERSIONSTORE_* environment variables."""

import os
from dataclasses import dataclass
from pathlib import Path

GiB = 1 << 30


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value else default


def _env_float(name: str, default: float) -> float:
    value = os.environ.get(name)
    return float(value) if value else default


@dataclass(frozen=True)
class Config:
    data_dir: Path
    host: str = "127.0.0.1"
    port: int = 8765
    #: Largest original accepted, whole or assembled from chunks (oversize gets a 400).
    max_upload_bytes: int = 20 * GiB
    #: Largest non-upload request body (Admin JSON/form/multipart).
    max_body_bytes: int = 10 << 20
    #: Seconds allowed to fetch a remote `file` URL.
    fetch_timeout: float = 300.0
    primary_store: str | None = None
    backup_store: str | None = None
    #: Seconds a customer bucket's marker check is trusted before it is made again.
    marker_ttl: float = 60.0
    #: Longest wait between two attempts to write a pending revision to its target.
    pending_retry_max: float = 300.0
    #: How often the drainer and the job runner look for work they were not woken for.
    poll_interval: float = 1.0
    #: Seconds between scheduled verify jobs per environment (0: off); see docs/operations.md.
    verify_interval: float = 86400.0
    #: MB/s a scheduled verify job may read (0: unlimited), so uploads keep their share of the disk.
    verify_rate: float = 50.0

    @classmethod
    def from_env(cls, data_dir: Path, **overrides: object) -> "Config":
        values: dict[str, object] = {
            "max_upload_bytes": _env_int("VERSIONSTORE_MAX_UPLOAD_BYTES", cls.max_upload_bytes),
            "max_body_bytes": _env_int("VERSIONSTORE_MAX_BODY_BYTES", cls.max_body_bytes),
            "fetch_timeout": _env_float("VERSIONSTORE_FETCH_TIMEOUT", cls.fetch_timeout),
            "primary_store": os.environ.get("VERSIONSTORE_PRIMARY_STORE"),
            "backup_store": os.environ.get("VERSIONSTORE_BACKUP_STORE"),
            "marker_ttl": _env_float("VERSIONSTORE_MARKER_TTL", cls.marker_ttl),
            "pending_retry_max": _env_float("VERSIONSTORE_PENDING_RETRY_MAX", cls.pending_retry_max),
            "poll_interval": _env_float("VERSIONSTORE_POLL_INTERVAL", cls.poll_interval),
            "verify_interval": _env_float("VERSIONSTORE_VERIFY_INTERVAL", cls.verify_interval),
            "verify_rate": _env_float("VERSIONSTORE_VERIFY_RATE", cls.verify_rate),
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(data_dir=data_dir, **values)  # type: ignore[arg-type]

    @property
    def db_path(self) -> Path:
        return self.data_dir / "metadata.sqlite3"

    @property
    def spool_dir(self) -> Path:
        return self.data_dir / "spool"

    @property
    def primary_url(self) -> str:
        return self.primary_store or str(self.data_dir / "primary")

    @property
    def backup_url(self) -> str:
        return self.backup_store or str(self.data_dir / "backup")
