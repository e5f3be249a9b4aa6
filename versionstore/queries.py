"""Listing and search: the Search API expression subset, turned into safe SQL.

Supported terms (joined by AND): `status`, `resource_type`, `type`, `public_id` (exact, or
prefix with a trailing `*`), `asset_id`, `format`, `tags`, `created_at`/`uploaded_at`
compared with `=`, `:`, `<`, `<=`, `>`, `>=` or a range `[from TO to]`. Values are bound as
parameters; column names come from a fixed table, never from the request.
"""

import base64
import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from versionstore.errors import BadRequest

_COLUMNS = {
    "status": "status",
    "resource_type": "resource_type",
    "type": "type",
    "public_id": "public_id",
    "asset_id": "asset_id",
    "format": "format",
    "created_at": "created_at",
    "uploaded_at": "uploaded_at",
    "bytes": "bytes",
    "tags": "tags",
}
_SORTABLE = {"created_at", "uploaded_at", "public_id", "bytes", "asset_id"}
_TERM = re.compile(
    r"""\s*(?P<key>[a-z_]+)\s*(?P<op>>=|<=|=|:|<|>)\s*
        (?:\[(?P<lo>[^\]]*?)\s+TO\s+(?P<hi>[^\]]*?)\]|"(?P<quoted>[^"]*)"|(?P<bare>[^\s]+))\s*""",
    re.X,
)
_STATUS = {"active": "live", "deleted": "deleted"}


@dataclass
class Query:
    where: str
    args: list[Any]
    order: str


def _time(value: str) -> float:
    text = value.strip().strip('"')
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    match = re.fullmatch(r"(\d+)([smhdw])", text)
    if match:
        raise BadRequest("Relative times are not supported; give ISO-8601 dates")
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise BadRequest(f"Invalid date in expression - {value}") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


def _term(key: str, op: str, value: str | None, lo: str | None, hi: str | None) -> tuple[str, list[Any]]:
    column = _COLUMNS.get(key)
    if column is None:
        raise BadRequest(f"Unsupported search field - {key}")
    if key in ("created_at", "uploaded_at", "bytes"):
        convert = _time if key != "bytes" else float
        if lo is not None and hi is not None:
            return f"{column} BETWEEN ? AND ?", [convert(lo), convert(hi)]
        sql_op = {"=": "=", ":": "=", "<": "<", "<=": "<=", ">": ">", ">=": ">="}[op]
        if key != "bytes" and sql_op == "=":
            day = _time(value or "")
            return f"{column} >= ? AND {column} < ?", [day, day + 86400]
        return f"{column} {sql_op} ?", [convert(value or "")]
    if op not in ("=", ":") or value is None:
        raise BadRequest(f"Unsupported operator for {key}")
    if key == "status":
        if value not in _STATUS:
            raise BadRequest(f"Unsupported status - {value}")
        return "status = ?", [_STATUS[value]]
    if key == "tags":
        return "EXISTS (SELECT 1 FROM json_each(assets.tags) WHERE json_each.value = ?)", [value]
    if value.endswith("*"):
        prefix = value[:-1]
        return f"substr({column}, 1, ?) = ?", [len(prefix), prefix]
    return f"{column} = ?", [value]


def parse_expression(expression: str) -> tuple[list[str], list[Any], bool]:
    """Return (SQL clauses, args, whether the expression names a status)."""
    clauses: list[str] = []
    args: list[Any] = []
    names_status = False
    text = (expression or "").strip()
    if not text:
        return clauses, args, False
    for part in re.split(r"\s+AND\s+", text, flags=re.I):
        match = _TERM.fullmatch(part)
        if match is None:
            raise BadRequest(f"Unsupported search expression - {part!r} (supported: key=value terms joined by AND)")
        value = match["quoted"] if match["quoted"] is not None else match["bare"]
        sql, values = _term(match["key"], match["op"], value, match["lo"], match["hi"])
        names_status |= match["key"] == "status"
        clauses.append(sql)
        args.extend(values)
    return clauses, args, names_status


def search_query(expression: str, sort_by: object) -> Query:
    clauses, args, names_status = parse_expression(expression)
    if not names_status:
        clauses.append("status = 'live'")  # like Cloudinary: deleted assets only when asked
    return Query(" AND ".join(clauses) or "1", args, _order(sort_by))


def _order(sort_by: object) -> str:
    items: list[tuple[str, str]] = []
    entries: list[object]
    if isinstance(sort_by, str):
        try:
            entries = json.loads(sort_by) if sort_by.startswith("[") else [{sort_by: "desc"}]
        except ValueError:
            raise BadRequest(f"Invalid sort_by - {sort_by}") from None
    elif isinstance(sort_by, list):
        entries = sort_by
    elif isinstance(sort_by, dict):
        entries = [sort_by]
    else:
        entries = []
    for item in entries:
        if isinstance(item, dict):
            items.extend((str(k), str(v)) for k, v in item.items())
        else:
            items.append((str(item), "desc"))
    parts = []
    for field_name, direction in items:
        if field_name not in _SORTABLE:
            raise BadRequest(f"Unsupported sort_by - {field_name} (sortable: {', '.join(sorted(_SORTABLE))})")
        if direction.lower() not in ("asc", "desc"):
            raise BadRequest(f"Unsupported sort_by - {field_name} {direction} (direction: asc or desc)")
        parts.append(f"{field_name} {direction.upper()}")
    parts.append("pk DESC" if not parts else "pk ASC")
    return ", ".join(parts)


def listing_order(direction: object, *, by_public_id: bool) -> str:
    """Admin API listings: newest first by `created_at`, or by `public_id` (ascending unless
    told) when a prefix is given, as on Cloudinary. `direction` is asc/desc or 1/-1. The row
    id breaks ties in the same direction, so offset cursors see one total order."""
    text = str(direction).strip().lower() if direction not in (None, "") else ""
    if text in ("asc", "1"):
        sql_direction = "ASC"
    elif text in ("desc", "-1"):
        sql_direction = "DESC"
    elif text == "":
        sql_direction = "ASC" if by_public_id else "DESC"
    else:
        raise BadRequest(f"Invalid direction - {direction} (asc, desc, 1 or -1)")
    column = "public_id" if by_public_id else "created_at"
    return f"{column} {sql_direction}, pk {sql_direction}"


#: `with_field` values we can honour (the resource carries them whenever they are set).
WITH_FIELDS = {"tags", "context", "metadata"}


def check_search_options(params: dict[str, Any]) -> None:
    """Search API request fields we do not support are a 400 naming them, never ignored."""
    if params.get("aggregate") not in (None, "", []):
        raise BadRequest("Unsupported search option - aggregate (aggregations are not supported)")
    for value in _names(params.get("with_field")):
        if value not in WITH_FIELDS:
            raise BadRequest(f"Unsupported with_field - {value} (supported: {', '.join(sorted(WITH_FIELDS))})")


def _names(value: object) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [str(v).strip() for v in value if str(v).strip()]
    return [part.strip() for part in str(value).split(",") if part.strip()]


def encode_cursor(offset: int) -> str:
    return base64.urlsafe_b64encode(json.dumps({"o": offset}).encode()).decode().rstrip("=")


def decode_cursor(cursor: object) -> int:
    if not cursor:
        return 0
    try:
        text = str(cursor)
        data = json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
        return max(0, int(data["o"]))
    except (ValueError, KeyError, TypeError):
        raise BadRequest("Invalid next_cursor") from None
