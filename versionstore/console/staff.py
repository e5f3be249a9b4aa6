"""Staff accounts: who may sign in to the console, with which role, for which environments.

Sign-in is rate-limited twice: per account (consecutive failures lock it, recorded in the
database so every process sees it) and per client address (a sliding window in this process,
so one address cannot walk through many accounts).
"""

import re
import time
from collections import deque
from dataclasses import dataclass

from versionstore.console import passwords
from versionstore.console.records import ALL_CLOUDS, ROLES, StaffMember
from versionstore.repository import MetadataRepository

#: Consecutive failed sign-ins that lock an account, and for how long.
MAX_FAILURES = 5
LOCK_SECONDS = 15 * 60
#: Failed sign-ins one address may make in ADDRESS_WINDOW seconds, whatever the accounts.
ADDRESS_FAILURES = 20
ADDRESS_WINDOW = 15 * 60

_EMAIL = re.compile(r"^[^@\s]{1,64}@[^@\s]{1,190}$")


class StaffError(ValueError):
    """A staff command that cannot be done (unknown member, bad role, duplicate)."""


class SignInRefused(Exception):
    """Why a sign-in failed; `message` is what the page may say (never which part was wrong)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.message = message


@dataclass
class AddressLimiter:
    """Failed sign-ins per client address in a sliding window (per process)."""

    limit: int = ADDRESS_FAILURES
    window: float = ADDRESS_WINDOW

    def __post_init__(self) -> None:
        self._failures: dict[str, deque[float]] = {}

    def blocked(self, address: str, now: float) -> bool:
        failures = self._failures.get(address)
        while failures and failures[0] <= now - self.window:
            failures.popleft()
        if failures is not None and not failures:
            del self._failures[address]
        return failures is not None and len(failures) >= self.limit

    def fail(self, address: str, now: float) -> None:
        if len(self._failures) > 100_000:
            self._failures.clear()  # bounded memory under a spray of addresses
        self._failures.setdefault(address, deque()).append(now)


class StaffAccounts:
    def __init__(self, meta: MetadataRepository, limiter: AddressLimiter | None = None) -> None:
        self.meta = meta
        self.limiter = limiter or AddressLimiter()

    async def check_new(self, email: str, role: str, clouds: list[str]) -> str:
        """The normalised email of a member that `add` could create (before a password is asked)."""
        email = normalise_email(email)
        if role not in ROLES:
            raise StaffError(f"role must be one of {', '.join(ROLES)}")
        for name in clouds:
            if await self.meta.get_cloud(name) is None:
                raise StaffError(f"no product environment named {name!r}")
        if await self.meta.get_staff(email) is not None:
            raise StaffError(f"staff member {email} already exists")
        return email

    async def add(self, email: str, role: str, clouds: list[str], password: str) -> StaffMember:
        email = await self.check_new(email, role, clouds)
        try:
            encoded = await passwords.hash_password(password)
        except passwords.WeakPassword as exc:
            raise StaffError(str(exc)) from None
        member = StaffMember(email, encoded, role, tuple(clouds) or (ALL_CLOUDS,), created_at=time.time())
        if not await self.meta.add_staff(member):
            raise StaffError(f"staff member {email} already exists")
        return member

    async def set_disabled(self, email: str, disabled: bool) -> None:
        if not await self.meta.update_staff(normalise_email(email), disabled=disabled):
            raise StaffError(f"no staff member {email}")

    async def reset_password(self, email: str, password: str) -> None:
        try:
            encoded = await passwords.hash_password(password)
        except passwords.WeakPassword as exc:
            raise StaffError(str(exc)) from None
        if not await self.meta.update_staff(normalise_email(email), password_hash=encoded):
            raise StaffError(f"no staff member {email}")

    async def authenticate(self, email: str, password: str, address: str) -> StaffMember:
        """The member these credentials sign in, or SignInRefused (counted towards lockouts)."""
        now = time.time()
        wrong = SignInRefused("bad_credentials", "Wrong email or password.")
        if self.limiter.blocked(address, now):
            raise SignInRefused("address_limited", "Too many failed sign-ins from this address; try again later.")
        try:
            email = normalise_email(email)
        except StaffError:
            self.limiter.fail(address, now)
            raise wrong from None
        member = await self.meta.get_staff(email)
        if member is not None and member.locked_until is not None and member.locked_until > now:
            raise SignInRefused("locked", "This account is locked after repeated failed sign-ins; try again later.")
        if not await passwords.matches(member.password_hash if member else None, password) or member is None:
            self.limiter.fail(address, now)
            if member is not None and await self.meta.record_login_failure(email, now, MAX_FAILURES, LOCK_SECONDS):
                raise SignInRefused("locked", "This account is locked after repeated failed sign-ins; try again later.")
            raise wrong
        if member.disabled:
            raise SignInRefused("disabled", "This account is disabled.")
        await self.meta.record_login_success(email)
        return member


def normalise_email(email: str) -> str:
    email = email.strip().lower()
    if not _EMAIL.match(email):
        raise StaffError(f"not an email address: {email!r}")
    return email
