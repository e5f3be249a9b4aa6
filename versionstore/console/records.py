"""Plain records of the console's tables (schema migration 11)."""

from dataclasses import dataclass, field
from typing import Any

ROLES = ("viewer", "restorer", "admin")
ALL_CLOUDS = "*"


@dataclass(frozen=True)
class StaffMember:
    email: str
    password_hash: str
    role: str
    clouds: tuple[str, ...]
    disabled: bool = False
    failed_logins: int = 0
    locked_until: float | None = None
    created_at: float = 0.0

    def may_see(self, cloud: str) -> bool:
        return ALL_CLOUDS in self.clouds or cloud in self.clouds

    def may(self, role: str) -> bool:
        """Whether this member's role includes `role` (viewer < restorer < admin)."""
        return ROLES.index(self.role) >= ROLES.index(role)


@dataclass(frozen=True)
class ConsoleSession:
    token_hash: str
    email: str
    csrf_token: str
    address: str | None
    created_at: float
    last_seen_at: float


@dataclass(frozen=True)
class AuditRecord:
    seq: int
    at: float
    actor: str
    cloud: str | None
    action: str
    target: str | None
    detail: dict[str, Any] = field(default_factory=dict)
    address: str | None = None
    outcome: str = "ok"
    prev_hash: str = ""
    hash: str = ""
