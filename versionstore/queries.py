"""Listing and search as a query value: what to match, in which order, from where.

The Search API expression subset and the Admin API listings both become an `AssetQuery`
(filters on named fields with named operators, a sort, a limit and a keyset position); the
metadata store compiles it into SQL (versionstore/metadata.py), so no view ever builds SQL and
another backend compiles the same value its own way.

Supported expression terms (joined by AND): `status`, `resource_type`, `type`, `public_id`
(exact, or prefix with a trailing `*`), `asset_id`, `format`, `tags`, `created_at`/`uploaded_at`
and `bytes` compared with `=`, `:`, `<`, `<=`, `>`, `>=` or a range `[from TO to]`.

Cursors are keyset positions (the sort-key values of the last row of a page), so a page walk
neither repeats nor skips an asset when others are added or deleted between pages. A cursor
carries a fingerprint of the query it belongs to and is refused with any other query.
"""

import base64
import binascii
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from versionstore.errors import BadRequest

#: Fields a filter may name, with the Python type of their values.
FILTER_FIELDS = {
    "status": str, "resource_type": str, "type": str, "public_id": str, "asset_id": str, "format": str,
    "created_at": float, "uploaded_at": float, "deleted_at": float, "bytes": int, "tag": str, "context": str,
}
#: Fields a query may sort by (`pk`, the row id, is the tie-breaker every sort ends with).
SORT_FIELDS = {"created_at": float, "uploaded_at": float, "deleted_at": float, "public_id": str, "bytes": int, "asset_id": str, "pk": int}
#: Operators: equality, membership, string prefix, comparisons, `has` for context keys, and
#: `contains` (a fragment anywhere in the string: the console's search, not index-backed).
OPERATORS = {"=", "in", "prefix", "<", "<=", ">", ">=", "has", "contains"}

_SEARCH_FIELDS = {"status", "resource_type", "type", "public_id", "asset_id", "format", "created_at", "uploaded_at", "bytes", "tags"}
_SEARCH_SORTABLE = {"created_at", "uploaded_at", "public_id", "bytes", "asset_id"}
_STATUS = {"active": "live", "deleted": "deleted"}
_OPERATORS = (">=", "<=", "=", ":", "<", ">")  # two-character operators first
_COMPARISONS = {"=": "=", ":": "=", "<": "<", "<=": "<=", ">": ">", ">=": ">="}

#: Longest search expression accepted, in characters; longer ones are refused before parsing.
MAX_EXPRESSION_CHARS = 4096
#: Most terms joined by AND (each becomes one or two filters).
MAX_TERMS = 50
#: Largest offset an offset cursor (job and tag lists) may carry.
MAX_OFFSET = 1 << 31
#: `total_count` of a search counts matches up to this many; beyond it the answer is this
#: number and `total_count_exact` is false (docs/api.md), so a search never counts the library.
COUNT_CEILING = 1_000


@dataclass(frozen=True)
class Filter:
    """`field op value`; for `context` the value is `(key, value)` (`=`) or the key (`has`)."""

    field: str
    op: str
    value: Any


@dataclass(frozen=True)
class SortKey:
    field: str
    descending: bool


@dataclass(frozen=True)
class AssetQuery:
    """A page of assets: all `filters` hold, in `sort` order (always ending with `pk`), at
    most `limit`, strictly after the row whose sort-key values are `after`."""

    filters: tuple[Filter, ...]
    sort: tuple[SortKey, ...]
    limit: int
    after: tuple[Any, ...] | None = None
    fingerprint: str = field(init=False, compare=False)

    def __post_init__(self) -> None:
        for item in self.filters:
            if item.field not in FILTER_FIELDS or item.op not in OPERATORS:
                raise ValueError(f"unsupported filter {item}")
        if not self.sort or self.sort[-1].field != "pk" or any(key.field not in SORT_FIELDS for key in self.sort):
            raise ValueError(f"a sort ends with pk: {self.sort}")
        shape = repr((self.filters, self.sort)).encode()
        object.__setattr__(self, "fingerprint", hashlib.blake2b(shape, digest_size=8).hexdigest())

    def page(self, limit: int, after: tuple[Any, ...] | None) -> "AssetQuery":
        return AssetQuery(self.filters, self.sort, limit, after)


def sort_values(query: AssetQuery, row: Any) -> tuple[Any, ...]:
    """The sort-key values of a returned asset: where the next page starts."""
    return tuple(getattr(row, key.field) for key in query.sort)


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
    if not text.isascii() or not text.isdigit() or len(text) > 18:
        raise BadRequest(f"Invalid bytes value in expression - {value[:64]!r} (a whole number)")
    return int(text)


def _time(value: str) -> float:
    text = value.strip().strip('"')
    if text.isascii() and text.replace(".", "", 1).isdigit() and len(text) <= 20:
        return _number(text)
    if text[:-1].isdigit() and text[-1:] in ("s", "m", "h", "d", "w"):
        raise BadRequest("Relative times are not supported; give ISO-8601 dates")
    parsed = iso_seconds(text)
    if parsed is None:
        raise BadRequest(f"Invalid date in expression - {value[:64]!r}")
    return parsed


def iso_seconds(text: str) -> float | None:
    """ISO 8601 as unix seconds, UTC when no offset is given; None when it is not ISO 8601.
    (Search expressions and the point-in-time `at` share this reading.)"""
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


@dataclass
class Term:
    key: str
    op: str
    value: str | None = None
    lo: str | None = None
    hi: str | None = None


def _filters(term: Term) -> list[Filter]:
    """One expression term as filters (a day or a range is two)."""
    key, op, value = term.key, term.op, term.value
    if key not in _SEARCH_FIELDS:
        raise BadRequest(f"Unsupported search field - {key}")
    if key in ("created_at", "uploaded_at", "bytes"):
        convert = _time if key != "bytes" else _bytes
        if term.lo is not None and term.hi is not None:
            return [Filter(key, ">=", convert(term.lo)), Filter(key, "<=", convert(term.hi))]
        compare = _COMPARISONS[op]
        if key != "bytes" and compare == "=":
            day = _time(value or "")
            return [Filter(key, ">=", day), Filter(key, "<", day + 86400)]
        return [Filter(key, compare, convert(value or ""))]
    if op not in ("=", ":") or value is None:
        raise BadRequest(f"Unsupported operator for {key}")
    if key == "status":
        if value not in _STATUS:
            raise BadRequest(f"Unsupported status - {value}")
        return [Filter("status", "=", _STATUS[value])]
    if key == "tags":
        return [Filter("tag", "=", value)]
    if key == "public_id" and value.endswith("*"):
        return [Filter("public_id", "prefix", value[:-1])]
    return [Filter(key, "=", value)]


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


def parse_expression(expression: str) -> list[Filter]:
    """The filters of a search expression (an empty expression matches everything)."""
    if not isinstance(expression, str):
        raise BadRequest("Invalid expression - must be a string")
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise BadRequest(f"Search expression too long ({len(expression)} characters, max {MAX_EXPRESSION_CHARS})")
    found: list[Filter] = []
    scanner = _Scanner(expression.strip())
    if scanner.at_end():
        return found
    terms = 0
    while True:
        terms += 1
        if terms > MAX_TERMS:
            raise BadRequest(f"Too many terms in search expression (max {MAX_TERMS})")
        found.extend(_filters(scanner.term()))
        if not scanner.separator():
            return found


def search_query(expression: str, sort_by: object, limit: int) -> AssetQuery:
    """The Search API: live assets only unless the expression names a status, as on Cloudinary."""
    found = parse_expression(expression)
    if not any(item.field == "status" for item in found):
        found.append(Filter("status", "=", "live"))
    return AssetQuery(tuple(found), _search_sort(sort_by), limit)


def _search_sort(sort_by: object) -> tuple[SortKey, ...]:
    """`sort_by` as keys; without one, newest row first. Ties go by row id in the direction of
    the last key, so one index serves both the order and the keyset position."""
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
    keys: list[SortKey] = []
    for field_name, direction in items:
        if field_name not in _SEARCH_SORTABLE:
            raise BadRequest(f"Unsupported sort_by - {field_name} (sortable: {', '.join(sorted(_SEARCH_SORTABLE))})")
        if direction.lower() not in ("asc", "desc"):
            raise BadRequest(f"Unsupported sort_by - {field_name} {direction} (direction: asc or desc)")
        if all(key.field != field_name for key in keys):
            keys.append(SortKey(field_name, direction.lower() == "desc"))
    keys.append(SortKey("pk", keys[-1].descending if keys else True))
    return tuple(keys)


def listing_query(
    resource_type: str, type_: str | None, extra: list[Filter], direction: object, limit: int, *, by_public_id: bool
) -> AssetQuery:
    """Admin API listings of live assets: newest first by `created_at`, or by `public_id`
    (ascending unless told) when a prefix is given, as on Cloudinary. `direction` is asc/desc
    or 1/-1; the row id breaks ties in the same direction."""
    text = str(direction).strip().lower() if direction not in (None, "") else ""
    if text in ("asc", "1"):
        descending = False
    elif text in ("desc", "-1"):
        descending = True
    elif text == "":
        descending = not by_public_id
    else:
        raise BadRequest(f"Invalid direction - {direction} (asc, desc, 1 or -1)")
    filters = [Filter("status", "=", "live"), Filter("resource_type", "=", resource_type)]
    if type_ is not None:
        filters.append(Filter("type", "=", type_))
    column = "public_id" if by_public_id else "created_at"
    sort = (SortKey(column, descending), SortKey("pk", descending))
    return AssetQuery((*filters, *extra), sort, limit)


def by_asset_ids(asset_ids: list[str]) -> AssetQuery:
    """Live assets among these ids, in row order."""
    filters = (Filter("status", "=", "live"), Filter("asset_id", "in", tuple(asset_ids)))
    return AssetQuery(filters, (SortKey("pk", False),), len(asset_ids))


def everything(limit: int) -> AssetQuery:
    """Every asset row of an environment, live or deleted, in row order (tests, tools)."""
    return AssetQuery((), (SortKey("pk", False),), limit)


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


# --- cursors ---------------------------------------------------------------------------------

#: Longest cursor accepted (a keyset cursor holds a public_id, itself at most a few hundred bytes).
MAX_CURSOR_CHARS = 4096


def _pack(data: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(data, separators=(",", ":")).encode()).decode().rstrip("=")


def _unpack(cursor: object) -> object:
    text = str(cursor)
    if len(text) > MAX_CURSOR_CHARS:
        raise BadRequest("Invalid next_cursor")
    try:
        return json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
    except (ValueError, binascii.Error, RecursionError):
        raise BadRequest("Invalid next_cursor") from None


def encode_cursor(offset: int) -> str:
    """An offset cursor (lists that are small by nature: jobs)."""
    return _pack({"o": offset})


def decode_cursor(cursor: object) -> int:
    """The offset in a cursor we issued: a whole number from 0 to MAX_OFFSET, nothing else (a
    float, 1e400, 2**63 or a nested document is a client error, not a crash in the database)."""
    if not cursor:
        return 0
    data = _unpack(cursor)
    offset = data.get("o") if isinstance(data, dict) else None
    if type(offset) is not int or not 0 <= offset <= MAX_OFFSET:
        raise BadRequest("Invalid next_cursor")
    return offset


def encode_keyset(query: AssetQuery, values: tuple[Any, ...]) -> str:
    return _pack({"q": query.fingerprint, "k": list(values)})


def decode_keyset(query: AssetQuery, cursor: object) -> tuple[Any, ...] | None:
    """The position in a cursor issued for this same query (filters and sort), with one value
    of the right type per sort key; anything else is a 400 `Invalid next_cursor`."""
    if not cursor:
        return None
    data = _unpack(cursor)
    if not isinstance(data, dict) or data.get("q") != query.fingerprint:
        raise BadRequest("Invalid next_cursor")
    values = data.get("k")
    if not isinstance(values, list) or len(values) != len(query.sort):
        raise BadRequest("Invalid next_cursor")
    for key, value in zip(query.sort, values, strict=True):
        if not _fits(SORT_FIELDS[key.field], value):
            raise BadRequest("Invalid next_cursor")
    return tuple(values)


def _fits(kind: type, value: object) -> bool:
    if kind is str:
        return isinstance(value, str)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool) and -(1 << 63) <= value < (1 << 63)
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def encode_tag_cursor(last: str) -> str:
    return _pack({"t": last})


def decode_tag_cursor(cursor: object) -> str | None:
    """The last tag of the previous page of a tags list."""
    if not cursor:
        return None
    data = _unpack(cursor)
    last = data.get("t") if isinstance(data, dict) else None
    if not isinstance(last, str):
        raise BadRequest("Invalid next_cursor")
    return last


def prefix_successor(prefix: str) -> str | None:
    """The least string greater than every string starting with `prefix` (code-point order),
    so `prefix <= s < successor` is a prefix match an index can answer as one range. None
    when no such string exists (an empty prefix, or one of only the highest code point)."""
    chars = list(prefix)
    while chars:
        last = ord(chars.pop())
        if last < 0x10FFFF:
            following = last + 1 if last + 1 != 0xD800 else 0xE000  # skip the surrogates
            return "".join(chars) + chr(following)
    return None
