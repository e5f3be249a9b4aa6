"""Normalise request parameters from every encoding the SDKs use into one dict.

Query strings, form bodies, multipart fields and JSON bodies all end up here (spec section 2):
`k[]` and `k[0]` collect into lists, booleans arrive as 1/0/true/false. A value the signature
leaves out (null, "", [], [""]) means "absent": `drop_blank` runs once a request's parameters
are complete, whatever the encoding, so signing and behaviour see the same parameters.
"""

import re
from collections.abc import Iterable, Mapping
from typing import Any

from versionstore.errors import BadRequest
from versionstore.signing import is_blank

_ARRAY_KEY = re.compile(r"^(?P<name>.+?)\[(?P<index>\d*)\]$")

Params = dict[str, Any]

#: Most tags in one parameter (Cloudinary allows up to 1000 tags per asset).
MAX_TAGS = 1000


def merge_pairs(pairs: Iterable[tuple[str, str]], into: Params | None = None) -> Params:
    """Fold (key, value) pairs into `into`, turning `k[]`/`k[N]` keys into lists."""
    out: Params = {} if into is None else into
    indexed: dict[str, list[tuple[int, str]]] = {}
    for key, value in pairs:
        match = _ARRAY_KEY.match(key) if "[" in key else None  # most keys are plain: no regex
        if match is None:
            out[key] = value
        elif match["index"] == "":
            existing = out.get(match["name"])
            if not isinstance(existing, list):
                existing = out[match["name"]] = []
            existing.append(value)
        else:
            indexed.setdefault(match["name"], []).append((int(match["index"]), value))
    for name, items in indexed.items():
        out[name] = [value for _, value in sorted(items)]
    return out


def drop_blank(params: Params) -> Params:
    """Remove every value the signature does not cover (see signing.is_blank)."""
    for key in [key for key, value in params.items() if is_blank(value)]:
        del params[key]
    return params


def merge_json(body: object, into: Params) -> Params:
    if not isinstance(body, Mapping):
        raise BadRequest("Request body must be a JSON object")
    for key, value in body.items():
        if value is not None:
            into[str(key)] = value
    return into


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def as_bool(value: object, default: bool | None = None) -> bool | None:
    if is_blank(value):
        return default  # never "" -> False: an empty value is unsigned, so it is absent
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        return bool(value)
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise BadRequest(f"Invalid boolean value {value!r}")


def as_list(value: object) -> list[str]:
    """Lists stay lists; a comma-joined string is split (the SDKs send both)."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value if v is not None and str(v) != ""]
    text = str(value)
    return [part for part in (p.strip() for p in text.split(",")) if part]


def as_bounded_list(value: object, name: str, limit: int) -> list[str]:
    """`as_list` of at most `limit` items, refused before splitting: splitting 500k ids held
    the event loop for half a second."""
    if isinstance(value, str) and value.count(",") >= limit or isinstance(value, (list, tuple)) and len(value) > limit:
        raise BadRequest(f"Too many {name} (max {limit})")
    values = as_list(value)
    if len(values) > limit:
        raise BadRequest(f"Too many {name} (max {limit})")
    return values


def as_int(value: object, name: str, default: int, low: int, high: int) -> int:
    if value is None or value == "":
        return default
    try:
        number = int(str(value))
    except ValueError:
        raise BadRequest(f"Invalid {name} - {value}") from None
    if not low <= number <= high:
        raise BadRequest(f"{name} must be between {low} and {high}")
    return number


def parse_pipe_map(value: object) -> dict[str, str]:
    """`k=v|k2=v2` (context/metadata on the wire) or a JSON object."""
    if value is None:
        return {}
    if isinstance(value, Mapping):
        return {str(k): str(v) for k, v in value.items()}
    out: dict[str, str] = {}
    for item in re.split(r"(?<!\\)\|", str(value)):
        if not item:
            continue
        key, _, val = item.partition("=")
        out[key.replace("\\|", "|").replace("\\=", "=")] = val.replace("\\|", "|").replace("\\=", "=")
    return out


def field_updates(params: Params) -> dict[str, Any]:
    """Tags, context and metadata changes present in a request (metadata-only updates)."""
    updates: dict[str, Any] = {}
    if "tags" in params:
        updates["tags"] = as_bounded_list(params["tags"], "tags", MAX_TAGS)
    if "context" in params:
        updates["context"] = parse_pipe_map(params["context"])
    if "metadata" in params:
        updates["metadata"] = parse_pipe_map(params["metadata"])
    return updates
