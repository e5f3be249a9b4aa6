"""Cloudinary request signatures (Upload API and download URLs), pure functions.

The SDKs sign with SHA-1 or SHA-256 and signature version 1 or 2, and the server cannot be
told which, so verification tries every combination (spec section 3).
"""

import hashlib
import hmac
from collections.abc import Iterable, Mapping

#: Never part of the string to sign.
UNSIGNED_KEYS = frozenset({"signature", "api_key", "file", "resource_type", "cloud_name"})
#: Python >= 1.46 leaves these out of the signature on the tags/context/metadata endpoints.
OPTIONALLY_UNSIGNED = ("notification_url", "batch_id")


def is_blank(value: object) -> bool:
    """Left out of the string to sign (None, "", [], [""]), so it must also mean "absent" to
    every handler: otherwise an unsigned empty value could change what a request does."""
    if type(value) is str:  # nearly every parameter: no need to flatten it
        return not value
    return value is None or _flat(value) == ""


def _flat(value: object) -> str:
    if type(value) is str:
        return value
    if isinstance(value, (list, tuple)):
        return ",".join(_flat(v) for v in value)
    if value is True:
        return "1"
    if value is False:
        return "0"
    return str(value)


def string_to_sign(
    params: Mapping[str, object], version: int = 2, skip: Iterable[str] = ()
) -> str:
    excluded = UNSIGNED_KEYS.union(skip) if skip else UNSIGNED_KEYS
    pairs = []
    for key, value in params.items():
        if key in excluded or value is None:
            continue
        flat = _flat(value)
        if not flat:  # blank (is_blank)
            continue
        text = f"{key}={flat}"
        if version >= 2 and "&" in text:
            text = text.replace("&", "%26")
        pairs.append(text)
    return "&".join(sorted(pairs))


#: The constructors themselves: hashlib.new() looks the name up on every call (signed downloads
#: check a signature per request).
_HASHES = {"sha1": hashlib.sha1, "sha256": hashlib.sha256}


def sign(to_sign: str, secret: str, algorithm: str = "sha1") -> str:
    data = (to_sign + secret).encode()
    make = _HASHES.get(algorithm)
    return make(data).hexdigest() if make is not None else hashlib.new(algorithm, data).hexdigest()


def verify(
    params: Mapping[str, object], secret: str, signature: str, optional_skip: bool = False
) -> tuple[bool, str]:
    """Return (matches, v2 string to sign) trying {v2, v1} x {sha1, sha256}.

    The string is returned for the error message Cloudinary gives on a mismatch.
    """
    algorithm = "sha256" if len(signature) == 64 else "sha1"
    skips: list[tuple[str, ...]] = [()]
    if optional_skip:
        skips.append(OPTIONALLY_UNSIGNED)
    primary = string_to_sign(params, 2)
    offered = signature.lower()
    for skip in skips:
        for version in (2, 1):
            to_sign = primary if version == 2 and not skip else string_to_sign(params, version, skip)
            candidate = sign(to_sign, secret, algorithm)
            if hmac.compare_digest(candidate, offered):
                return True, primary
    return False, primary


def response_signature(public_id: str, version: int, secret: str) -> str:
    """The `signature` field of upload results (checked by verify_api_response_signature)."""
    return sign(f"public_id={public_id}&version={version}", secret, "sha1")
