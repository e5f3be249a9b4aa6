"""Structured metadata field definitions (Cloudinary's `metadata_fields`) and value checks.

An environment defines its fields once; every `metadata` value sent with an upload or a
metadata-only update is checked against them, as on Cloudinary: an unknown external_id, an
enum/set value that is not an active datasource entry, a non-integer for an integer field, a
malformed date or a value outside the field's `validation` is a 400 and nothing is stored.
Definitions are plain dicts in Cloudinary's JSON shape; this module does not know about HTTP.
"""

import json
import re
from collections.abc import Mapping
from datetime import date
from typing import Any

from versionstore.errors import BadRequest
from versionstore.ids import new_hex_id
from versionstore.repository import MetadataRepository

TYPES = ("string", "integer", "date", "enum", "set")
_EXTERNAL_ID = re.compile(r"^[A-Za-z0-9_-]{1,255}$")
_VALIDATIONS = ("greater_than", "less_than", "strlen", "and")
_UPDATABLE = ("label", "mandatory", "default_value", "default_disabled", "validation", "restrictions", "allow_dynamic_list_values")

Field = dict[str, Any]


def _external_id(value: object, what: str) -> str:
    text = str(value or "")
    if not _EXTERNAL_ID.match(text):
        raise BadRequest(f"Invalid {what} - {text!r} (letters, digits, _ and -, at most 255)")
    return text


def _datasource(value: object, field_type: str) -> dict[str, Any]:
    if field_type not in ("enum", "set"):
        if value not in (None, {}, ""):
            raise BadRequest(f"datasource is only for enum and set fields, not {field_type}")
        return {}
    values = value.get("values") if isinstance(value, Mapping) else None
    if not isinstance(values, list) or not values:
        raise BadRequest(f"A {field_type} field needs datasource.values")
    return {"values": _entries(values, [])}


def _entries(new: list[Any], existing: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Merge datasource entries: an entry with a known external_id replaces its value."""
    out = [dict(e) for e in existing]
    by_id = {e["external_id"]: e for e in out}
    for item in new:
        if not isinstance(item, Mapping) or not str(item.get("value") or ""):
            raise BadRequest("Each datasource entry needs a value")
        entry_id = _external_id(item.get("external_id") or new_hex_id()[:16], "datasource external_id")
        if entry_id in by_id:
            by_id[entry_id].update(value=str(item["value"]), state="active")
        else:
            by_id[entry_id] = {"external_id": entry_id, "value": str(item["value"]), "state": "active"}
            out.append(by_id[entry_id])
    return out


def _check_validation(rule: object, field_type: str) -> dict[str, Any] | None:
    """A validation rule, normalised so that applying it later cannot fail: `strlen` bounds are
    whole numbers (string fields only); `greater_than`/`less_than` compare integers or dates
    and need a `value` of the field's type."""
    if rule in (None, {}, ""):
        return None
    if not isinstance(rule, Mapping) or rule.get("type") not in _VALIDATIONS:
        raise BadRequest(f"Unsupported validation - {str(rule)[:200]} (supported: {', '.join(_VALIDATIONS)})")
    kind = rule["type"]
    out = dict(rule)
    if kind == "and":
        rules = rule.get("rules")
        if not isinstance(rules, list) or not rules:
            raise BadRequest("An 'and' validation needs rules")
        out["rules"] = [_check_validation(inner, field_type) for inner in rules]
    elif kind == "strlen":
        if field_type != "string":
            raise BadRequest(f"A strlen validation applies to string fields, not {field_type}")
        for bound in ("min", "max"):
            if rule.get(bound) is not None:
                out[bound] = _whole(rule[bound], f"strlen {bound}")
    else:
        if field_type not in ("integer", "date"):
            raise BadRequest(f"A {kind} validation applies to integer and date fields, not {field_type}")
        if rule.get("value") is None:
            raise BadRequest(f"A {kind} validation needs a value")
        out["value"] = _whole(rule["value"], f"{kind} value") if field_type == "integer" else _date(rule["value"], f"{kind} value")
        out["equals"] = bool(rule.get("equals", False))
    return out


def _whole(value: object, what: str) -> int:
    try:
        if isinstance(value, bool):
            raise ValueError
        return int(str(value))
    except ValueError:
        raise BadRequest(f"Invalid {what} - {str(value)[:64]!r} is not a whole number") from None


def _date(value: object, what: str) -> str:
    try:
        return date.fromisoformat(str(value)).isoformat()
    except ValueError:
        raise BadRequest(f"Invalid {what} - {str(value)[:64]!r} is not a date (YYYY-MM-DD)") from None


def new_field(params: Mapping[str, Any]) -> Field:
    """A definition from a create request (Cloudinary's field shape), checked."""
    field_type = str(params.get("type") or "")
    if field_type not in TYPES:
        raise BadRequest(f"Invalid type - {field_type!r} (one of {', '.join(TYPES)})")
    label = str(params.get("label") or "")
    if not label:
        raise BadRequest("Missing required parameter - label")
    field: Field = {
        "type": field_type,
        "external_id": _external_id(params.get("external_id") or new_hex_id()[:16], "external_id"),
        "label": label,
        "mandatory": bool(params.get("mandatory", False)),
        "default_disabled": bool(params.get("default_disabled", False)),
        "validation": _check_validation(params.get("validation"), field_type),
    }
    datasource = _datasource(params.get("datasource"), field_type)
    if datasource:
        field["datasource"] = datasource
    if params.get("default_value") not in (None, ""):
        field["default_value"] = params["default_value"]
        check_value(field, _as_wire(params["default_value"]))
    return field


def updated_field(field: Field, params: Mapping[str, Any]) -> Field:
    """Apply an update; the type and external_id of a field never change."""
    if "type" in params and params["type"] != field["type"]:
        raise BadRequest("A metadata field's type cannot be changed")
    out = dict(field)
    for key in _UPDATABLE:
        if key in params and params[key] is not None:
            out[key] = _check_validation(params[key], field["type"]) if key == "validation" else params[key]
    if "datasource" in params and params["datasource"] is not None and field["type"] in ("enum", "set"):
        out["datasource"] = {"values": _entries(_values_of(params["datasource"]), field["datasource"]["values"])}
    if not str(out.get("label") or ""):
        raise BadRequest("label cannot be empty")
    return out


def _values_of(datasource: object) -> list[Any]:
    values = datasource.get("values") if isinstance(datasource, Mapping) else datasource
    if not isinstance(values, list):
        raise BadRequest("Missing required parameter - values")
    return values


def _needs_datasource(field: Field) -> list[dict[str, Any]]:
    if field["type"] not in ("enum", "set"):
        raise BadRequest(f"Field {field['external_id']} has no datasource (type {field['type']})")
    return list(field["datasource"]["values"])


def update_datasource(field: Field, values: object) -> Field:
    entries = _entries(_values_of({"values": values}), _needs_datasource(field))
    return {**field, "datasource": {"values": entries}}


def set_entries_state(field: Field, external_ids: list[str], state: str) -> Field:
    """Deactivate (delete) or restore datasource entries; unknown ids are a 400."""
    entries = _needs_datasource(field)
    known = {e["external_id"] for e in entries}
    missing = [i for i in external_ids if i not in known]
    if missing or not external_ids:
        raise BadRequest(f"Unknown datasource entries - {', '.join(missing) or '(none given)'}")
    changed = [{**e, "state": state} if e["external_id"] in external_ids else e for e in entries]
    if not any(e["state"] == "active" for e in changed):
        raise BadRequest("A datasource must keep at least one active entry")
    return {**field, "datasource": {"values": changed}}


def _as_wire(value: object) -> str:
    return json.dumps(value) if isinstance(value, list) else str(value)


async def checked(meta: MetadataRepository, cloud: str, values: dict[str, str] | None) -> dict[str, str] | None:
    """`metadata` of an upload or update, checked against the environment's definitions."""
    if not values:
        return values
    return check_values({f["external_id"]: f for f in await meta.metadata_fields(cloud)}, values)


def check_values(fields: Mapping[str, Field], values: Mapping[str, str]) -> dict[str, str]:
    """Check `metadata` from a request against the environment's definitions."""
    for external_id, value in values.items():
        field = fields.get(external_id)
        if field is None:
            raise BadRequest(f"Metadata field {external_id} does not exist")
        if value != "":  # an empty value clears the field
            check_value(field, value)
    return dict(values)


def check_value(field: Field, value: str) -> None:
    name, kind = field["external_id"], field["type"]
    if kind == "integer":
        try:
            number: int | str = int(value)
        except ValueError:
            raise BadRequest(f"Metadata field {name}: {value!r} is not an integer") from None
    elif kind == "date":
        try:
            number = date.fromisoformat(value).isoformat()
        except ValueError:
            raise BadRequest(f"Metadata field {name}: {value!r} is not a date (YYYY-MM-DD)") from None
    elif kind in ("enum", "set"):
        active = {e["external_id"] for e in field["datasource"]["values"] if e.get("state", "active") == "active"}
        chosen = _set_members(value) if kind == "set" else [value]
        unknown = [c for c in chosen if c not in active]
        if unknown or not chosen:
            raise BadRequest(f"Metadata field {name}: {', '.join(unknown) or value!r} is not an active datasource entry")
        return
    else:
        number = value
    if field.get("validation"):
        _validate(name, field["validation"], number)


def _set_members(value: str) -> list[str]:
    if value.startswith("["):
        try:
            members = json.loads(value)
        except ValueError:
            raise BadRequest(f"Invalid set value - {value}") from None
        if isinstance(members, list):
            return [str(m) for m in members]
    return [part for part in value.split(",") if part]


def _validate(name: str, rule: Mapping[str, Any], value: int | str) -> None:
    kind = rule["type"]
    if kind == "and":
        for inner in rule["rules"]:
            _validate(name, inner, value)
        return
    if kind == "strlen":
        size = len(str(value))
        low, high = rule.get("min"), rule.get("max")
        if (low is not None and size < int(low)) or (high is not None and size > int(high)):
            raise BadRequest(f"Metadata field {name}: length {size} is outside [{low}, {high}]")
        return
    limit = rule.get("value")
    inclusive = bool(rule.get("equals", False))
    if isinstance(value, int):
        limit = int(limit) if limit is not None else None
    bad = limit is not None and (
        (kind == "greater_than" and (value < limit if inclusive else value <= limit))
        or (kind == "less_than" and (value > limit if inclusive else value >= limit))
    )
    if bad:
        raise BadRequest(f"Metadata field {name}: {value} is not {kind.replace('_', ' ')} {limit}")
