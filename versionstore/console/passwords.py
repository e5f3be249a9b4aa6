"""Staff passwords: argon2id (memory-hard), hashed and checked off the event loop."""

import asyncio
import secrets

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

#: argon2-cffi's RFC 9106 "low memory" profile: argon2id, 64 MiB, 3 passes.
_HASHER = PasswordHasher()
#: Checked when the account does not exist, so a wrong email costs the same time as a wrong password.
#: Made on first use (`dummy_hash`; the server warms it at start): a full-cost hash at import
#: taxed every CLI start that imports the console.
_DUMMY: str | None = None


def dummy_hash() -> str:
    """The hash an unknown account's password is checked against (blocking: call off the loop)."""
    global _DUMMY
    if _DUMMY is None:
        _DUMMY = _HASHER.hash(secrets.token_urlsafe(16))
    return _DUMMY

MIN_LENGTH = 12


class WeakPassword(ValueError):
    pass


def check_strength(password: str) -> None:
    if len(password) < MIN_LENGTH:
        raise WeakPassword(f"a staff password needs at least {MIN_LENGTH} characters")


def generate() -> str:
    """A random password for `--generate` (printed once, never stored in clear)."""
    return secrets.token_urlsafe(18)


async def hash_password(password: str) -> str:
    check_strength(password)
    return await asyncio.to_thread(_HASHER.hash, password)


async def matches(encoded: str | None, password: str) -> bool:
    def check() -> bool:
        try:
            return _HASHER.verify(encoded or dummy_hash(), password) and encoded is not None
        except (VerificationError, InvalidHashError):
            return False

    return await asyncio.to_thread(check)
