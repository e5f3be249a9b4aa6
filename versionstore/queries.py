"""Listing and search: the Search API expression subset, turned into safe SQL.

Supported terms (joined by AND): `status`, `resource_type`, `type`, `public_id` (exact, or
prefix with a trailing `*`), `asset_id`, `format`, `tags`, `created_at`/`uploaded_at`
compared with `=`, `:`, `<`, `<=`, `>`, `>=` or a range `[from TO to]`. Values are bound as
parameters; column names come from a fixed table, never from the request.
"""

import base64
import binascii
import json
import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from versionstore.errors import BadRequest

_COLUMNS = {
    "status": "status",
    "resource_type": "resource_type",
    "type": "type",
    # A detached history (docs/design.md) is found under the name it had.
    "public_id": "COALESCE(detached_from, public_id)",
    "asset_id": "asset_id",
    "format": "format",
    "created_at": "created_at",
    "uploaded_at": "uploaded_at",
    "bytes": "bytes",
    "tags": "tags",
}
_SORTABLE = {"created_at", "uploaded_at", "public_id", "bytes", "asset_id"}
_STATUS = {"active": "live", "deleted": "deleted"}
_OPERATORS = (">=", "<=", "=", ":", "<", ">")  # two-character operators first

#: Longest search expression accepted, in characters; longer ones are refused before parsing.
MAX_EXPRESSION_CHARS = 4096
#: Most terms joined by AND (SQLite's expression depth limit is 1000; each term adds up to two).
MAX_TERMS = 50
#: Largest listing/search offset a cursor may carry (far beyond any real page walk).
MAX_OFFSET = 1 << 31


@dataclass
class Query:
    where: str
    args: list[Any]
    order: str


@dataclass
class Term:
    key: str
    op: str
    value: str | None = None
    lo: str | None = None
    hi: str | None = None


def _number(text: str) -> float:
    try:
        number = float(text)
    except ValueError:
        raise BadRequest(f"Invalid number in expression - {text[:64]!r}") from None
    if not math.isfinite(number):
        raise BadRequest(f"Invalid number in expression - {text[:64]!r}")
    return number


def _bytes(value: str) -> int:
    text = value.strip().strip('"')
    if not text.isascii() or not text.isdigit() or len(text) > 20:
        raise BadRequest(f"Invalid bytes value in expression - {value[:64]!r} (a whole number)")
    return int(text)


def _time(value: str) -> float:
    text = value.strip().strip('"')
    if text.isascii() and text.replace(".", "", 1).isdigit() and len(text) <= 20:
        return _number(text)
    if text[:-1].isdigit() and text[-1:] in ("s", "m", "h", "d", "w"):
        raise BadRequest("Relative times are not supported; give ISO-8601 dates")
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise BadRequest(f"Invalid date in expression - {value[:64]!r}") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


def _term(term: Term) -> tuple[str, list[Any]]:
    key, op, value = term.key, term.op, term.value
    column = _COLUMNS.get(key)
    if column is None:
        raise BadRequest(f"Unsupported search field - {key}")
    if key in ("created_at", "uploaded_at", "bytes"):
        convert = _time if key != "bytes" else _bytes
        if term.lo is not None and term.hi is not None:
            return f"{column} BETWEEN ? AND ?", [convert(term.lo), convert(term.hi)]
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


# Each pattern is one character class, matched once at a given position: it can only run
# forward, never backtrack, so a scan costs at most the length of what it consumes.
_SPACES = re.compile(r"\s*")
_KEY = re.compile(r"[a-z_]*")
_NOT_SPACE = re.compile(r"\S*")


class _Scanner:
    """A single left-to-right pass over the expression: every character is consumed once, so
    parsing time is linear in the (capped) length whatever the input. No backtracking: the old
    whole-term regular expression took 16.8 s on 20,000 repetitions of " TO"."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def fail(self, what: str) -> BadRequest:
        near = self.text[self.pos : self.pos + 40]
        return BadRequest(
            f"Unsupported search expression - {what} at character {self.pos + 1} near {near!r} "
            "(supported: key=value terms joined by AND)"
        )

    def at_end(self) -> bool:
        return self.pos >= len(self.text)

    def take(self, pattern: re.Pattern[str]) -> str:
        match = pattern.match(self.text, self.pos)
        assert match is not None  # every pattern above also matches the empty string
        self.pos = match.end()
        return match.group()

    def take_until(self, char: str, missing: str) -> str:
        end = self.text.find(char, self.pos)
        if end < 0:
            raise self.fail(missing)
        found, self.pos = self.text[self.pos : end], end + 1
        return found

    def term(self) -> Term:
        key = self.take(_KEY)
        if not key:
            raise self.fail("expected a field name")
        self.take(_SPACES)
        op = next((o for o in _OPERATORS if self.text.startswith(o, self.pos)), None)
        if op is None:
            raise self.fail("expected an operator (=, :, <, <=, >, >=)")
        self.pos += len(op)
        self.take(_SPACES)
        if self.at_end():
            raise self.fail("expected a value")
        first = self.text[self.pos]
        if first == "[":
            self.pos += 1
            words = self.take_until("]", "unclosed range").split()
            if len(words) != 3 or words[1] != "TO":
                raise self.fail("a range is [from TO to]")
            return Term(key, op, lo=words[0], hi=words[2])
        if first == '"':
            self.pos += 1
            return Term(key, op, value=self.take_until('"', "unclosed quote"))
        return Term(key, op, value=self.take(_NOT_SPACE))

    def separator(self) -> bool:
        """After a term: True when `AND` follows (consumed), False at the end."""
        spaces = self.take(_SPACES)
        if self.at_end():
            return False
        if not spaces or self.text[self.pos : self.pos + 3].upper() != "AND":
            raise self.fail("expected AND between terms")
        self.pos += 3
        if not self.take(_SPACES) or self.at_end():
            raise self.fail("expected a term after AND")
        return True


def parse_expression(expression: str) -> tuple[list[str], list[Any], bool]:
    """Return (SQL clauses, args, whether the expression names a status)."""
    if not isinstance(expression, str):
        raise BadRequest("Invalid expression - must be a string")
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise BadRequest(f"Search expression too long ({len(expression)} characters, max {MAX_EXPRESSION_CHARS})")
    clauses: list[str] = []
    args: list[Any] = []
    names_status = False
    scanner = _Scanner(expression.strip())
    if scanner.at_end():
        return clauses, args, False
    terms = 0
    while True:
        terms += 1
        if terms > MAX_TERMS:
            raise BadRequest(f"Too many terms in search expression (max {MAX_TERMS})")
        term = scanner.term()
        sql, values = _term(term)
        names_status |= term.key == "status"
        clauses.append(sql)
        args.extend(values)
        if not scanner.separator():
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
        except (ValueError, RecursionError):
            raise BadRequest(f"Invalid sort_by - {sort_by[:64]}") from None
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


_MAX_CURSOR_CHARS = 256


def decode_cursor(cursor: object) -> int:
    """The offset in a cursor we issued: a whole number from 0 to MAX_OFFSET, nothing else (a
    float, 1e400, 2**63 or a nested document is a client error, not a crash in SQLite)."""
    if not cursor:
        return 0
    text = str(cursor)
    if len(text) > _MAX_CURSOR_CHARS:
        raise BadRequest("Invalid next_cursor")
    try:
        data = json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
    except (ValueError, binascii.Error, RecursionError):
        raise BadRequest("Invalid next_cursor") from None
    offset = data.get("o") if isinstance(data, dict) else None
    if type(offset) is not int or not 0 <= offset <= MAX_OFFSET:
        raise BadRequest("Invalid next_cursor")
    return offset
