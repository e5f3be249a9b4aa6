"""Console sessions: random cookie values, stored server-side by their SHA-256, with an idle
and an absolute expiry and a per-session CSRF token."""

import hashlib
import hmac
import secrets
import time

from versionstore.console.records import ConsoleSession, StaffMember
from versionstore.repository import MetadataRepository

IDLE_SECONDS = 30 * 60
ABSOLUTE_SECONDS = 12 * 3600
#: A session's last_seen_at is written at most this often (not on every page view).
TOUCH_EVERY = 60


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Sessions:
    def __init__(self, meta: MetadataRepository, idle: float = IDLE_SECONDS, absolute: float = ABSOLUTE_SECONDS) -> None:
        self.meta = meta
        self.idle = idle
        self.absolute = absolute

    async def start(self, member: StaffMember, address: str | None) -> tuple[str, ConsoleSession]:
        """A new session; returns the cookie value (only its hash is stored)."""
        token = secrets.token_urlsafe(32)
        now = time.time()
        session = ConsoleSession(_digest(token), member.email, secrets.token_urlsafe(32), address, now, now)
        await self.meta.delete_console_sessions(older_than=now - self.idle)  # sweep expired ones
        await self.meta.create_console_session(session)
        return token, session

    async def resolve(self, token: str | None) -> tuple[ConsoleSession, StaffMember] | None:
        """The live session and its (enabled) member for a cookie value, else None."""
        if not token or len(token) > 200:
            return None
        session = await self.meta.get_console_session(_digest(token))
        if session is None:
            return None
        now = time.time()
        if now - session.last_seen_at > self.idle or now - session.created_at > self.absolute:
            await self.meta.delete_console_sessions(token_hash=session.token_hash)
            return None
        member = await self.meta.get_staff(session.email)
        if member is None or member.disabled:
            return None
        if now - session.last_seen_at > TOUCH_EVERY:
            await self.meta.touch_console_session(session.token_hash, now)
        return session, member

    async def end(self, token: str | None) -> None:
        if token:
            await self.meta.delete_console_sessions(token_hash=_digest(token))


def csrf_ok(session: ConsoleSession, submitted: object) -> bool:
    return isinstance(submitted, str) and hmac.compare_digest(session.csrf_token.encode(), submitted.encode())
