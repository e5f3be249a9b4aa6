"""Identifiers: validation of client-chosen public IDs, generation of our own.

Public IDs never become file paths (blobs are stored by digest), but we still refuse the
hostile ones so that no later exporter, bucket layout or log viewer can be tricked by them.
"""

import re
import secrets

from versionstore.errors import BadRequest

DELIVERY_TYPES = ("upload", "private", "authenticated")

_HEX32 = re.compile(r"^[0-9a-f]{32}$")
_CLOUD_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
_MAX_PUBLIC_ID = 255


def new_hex_id() -> str:
    return secrets.token_hex(16)


def new_public_id() -> str:
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
    return "".join(secrets.choice(alphabet) for _ in range(20))


def is_hex_id(value: str) -> bool:
    return bool(_HEX32.match(value))


def check_cloud_name(name: str) -> str:
    if not _CLOUD_NAME.match(name):
        raise BadRequest(f"Invalid cloud name {name!r}: use a-z, 0-9, '_' and '-'")
    return name


def check_public_id(public_id: str, field: str = "public_id") -> str:
    if not public_id or len(public_id) > _MAX_PUBLIC_ID:
        raise BadRequest(f"Invalid {field} - must be 1 to {_MAX_PUBLIC_ID} characters")
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in public_id):
        raise BadRequest(f"Invalid {field} - control characters are not allowed")
    if "\\" in public_id or public_id.startswith("/") or public_id.endswith("/"):
        raise BadRequest(f"Invalid {field} - {public_id!r}")
    if any(part in ("", ".", "..") for part in public_id.split("/")):
        raise BadRequest(f"Invalid {field} - {public_id!r}")
    return public_id


def check_delivery_type(value: str) -> str:
    if value not in DELIVERY_TYPES:
        raise BadRequest(f"Invalid type - {value}")
    return value

