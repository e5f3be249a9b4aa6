"""Plain records passed between the metadata store, the domain and the HTTP renderers."""

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Cloud:
    name: str
    api_key: str
    api_secret: str
    auto_backup: bool
    created_at: float


@dataclass(frozen=True)
class Version:
    version_id: str
    version: int
    digest: str
    bytes: int
    format: str | None
    backed_up: bool
    restored_from: str | None
    created_at: float


@dataclass
class Asset:
    pk: int | None
    cloud: str
    asset_id: str
    resource_type: str
    type: str
    public_id: str
    status: str  # 'live' | 'deleted'
    digest: str
    format: str | None
    bytes: int
    width: int | None
    height: int | None
    version: int
    version_id: str
    original_filename: str | None
    tags: list[str] = field(default_factory=list)
    context: dict[str, str] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    created_at: float = 0.0
    uploaded_at: float = 0.0
    deleted_at: float | None = None

    @property
    def live(self) -> bool:
        return self.status == "live"
