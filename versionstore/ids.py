"""Identifiers: validation of client-chosen public IDs, generation of our own.

Public IDs never become file paths (blobs are stored by digest), but we still refuse the
hostile ones so that no later exporter, bucket layout or log viewer can be tricked by them.
"""

import re
import secrets
import unicodedata

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


# Unicode categories refused anywhere in an id: controls (Cc, C0 and C1), format characters (Cf:
# bidi overrides and isolates, zero-width characters, the BOM, soft hyphen, tag characters),
# line and paragraph separators (Zl, Zp) and lone surrogates (Cs). Such a character makes an id
# that looks like another one, reorders what a reader sees, or breaks a line in a log or export.
_INVISIBLE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})


def check_public_id(public_id: str, field: str = "public_id") -> str:
    if not public_id or len(public_id) > _MAX_PUBLIC_ID:
        raise BadRequest(f"Invalid {field} - must be 1 to {_MAX_PUBLIC_ID} characters")
    if any(unicodedata.category(ch) in _INVISIBLE_CATEGORIES for ch in public_id):
        raise BadRequest(f"Invalid {field} - control, invisible and line separator characters are not allowed")
    if "\\" in public_id or public_id.startswith("/") or public_id.endswith("/"):
        raise BadRequest(f"Invalid {field} - {public_id!r}")
    for part in public_id.split("/"):
        if part in ("", ".", ".."):
            raise BadRequest(f"Invalid {field} - {public_id!r}")
        if part != part.strip():
            raise BadRequest(f"Invalid {field} - no blank segments and no leading or trailing whitespace")
    return public_id


def check_delivery_type(value: str) -> str:
    if value not in DELIVERY_TYPES:
        raise BadRequest(f"Invalid type - {value}")
    return value

