"""Cloudinary-shaped JSON for assets, versions and upload results (spec sections 5-7)."""

import json
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

import orjson

from versionstore.errors import BadRequest
from versionstore.models import ASSET_ROW_COLUMNS, Asset, AssetRow, Cloud, Job, RestoreFailure, Version
from versionstore.signing import response_signature


def iso(ts: float) -> str:
    # strftime per call was a visible share of a `versions=true` request and of a 500-item
    # page (where every asset has a second of its own): the date is made once per day and the
    # time of day is two table look-ups (an f-string of three divmods was still ~2 us a date).
    day, second = divmod(int(ts), 86400)
    hour, rest = divmod(second, 3600)
    return _iso_day(day) + _HOURS[hour] + _MINUTES_SECONDS[rest]


@lru_cache(maxsize=8192)
def _iso_day(day: int) -> str:
    return datetime.fromtimestamp(day * 86400, UTC).strftime("%Y-%m-%dT")


_HOURS = tuple(f"{hour:02d}:" for hour in range(24))
_MINUTES_SECONDS = tuple(f"{minute:02d}:{second:02d}Z" for minute in range(60) for second in range(60))


def dumps(body: object) -> bytes:
    """Compact UTF-8 JSON: orjson (several times faster than json on the read path), and the
    standard encoder for what orjson refuses (integers beyond 64 bits in user metadata)."""
    try:
        return orjson.dumps(body)
    except TypeError:
        return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()


def encode_items(items: list[dict[str, Any]]) -> list[bytes]:
    """Each item's JSON, as `dumps(item)` would make it, from one orjson call over the list:
    an orjson call per item cost 3-10x more than one per page (page500). The list's JSON is
    split where the next item begins, `,{"<first key>":` (a quote inside a string is always
    escaped, so only structure matches); when that does not cut it into exactly one piece
    per item (that pattern nested in metadata, or what orjson refuses), each item is encoded
    on its own. The split is sound only when every item begins with the same key: then each
    boundary matches once, and any nested match makes one piece too many."""
    if len(items) > 1 and items[0]:
        key = next(iter(items[0]))
        if any(not item or next(iter(item)) != key for item in items):
            return [dumps(item) for item in items]
        head = b"{" + orjson.dumps(key) + b":"
        try:
            first, *rest = orjson.dumps(items)[1:-1].split(b"," + head)
        except TypeError:
            rest = []
        if len(rest) == len(items) - 1:
            return [first, *[head + piece for piece in rest]]
    return [dumps(item) for item in items]


def json_array(items: list[bytes]) -> orjson.Fragment:
    """Encoded items as one JSON array, for a body `dumps` encodes (orjson copies it as is)."""
    return orjson.Fragment(b"[" + b",".join(items) + b"]")


def _filename(asset: Asset) -> str:
    return asset.public_id.rsplit("/", 1)[-1]


def etag(asset: Asset) -> str:
    """Cloudinary's etag: the hex MD5 of the original bytes. Versions stored before MD5 was
    kept (migration 6) keep the etag they always showed: the first 32 hex digits of BLAKE3."""
    return asset.md5 or asset.digest[:32]


def resource(asset: Asset, backup_bytes: int | None = None, *, flat_context: bool = False) -> dict[str, Any]:
    """The Admin API resource object; deleted (reserved) assets answer as placeholders.

    Tags are sorted and left out when there are none, as on Cloudinary. Context is
    `{"custom": {...}}` in the Admin API and flat (`flat_context`) in Search API results."""
    body: dict[str, Any] = {
        "asset_id": asset.asset_id,
        "public_id": asset.public_id,
        "format": asset.format,
        "version": asset.version,
        "version_id": asset.version_id,
        "resource_type": asset.resource_type,
        "type": asset.type,
        "created_at": iso(asset.created_at),
        "uploaded_at": iso(asset.uploaded_at),
        "bytes": asset.bytes if asset.live else 0,
        "width": asset.width,
        "height": asset.height,
        "asset_folder": "",
        "display_name": _filename(asset),
        "filename": _filename(asset),
        "original_filename": asset.original_filename,
        "etag": etag(asset),
        "blake3": asset.digest,
        "status": "active" if asset.live else "deleted",
        "access_mode": "public",
        "placeholder": not asset.live,
    }
    if asset.format is None:
        del body["format"]
    if asset.tags:
        body["tags"] = sorted(asset.tags)
    if asset.context:
        body["context"] = dict(asset.context) if flat_context else {"custom": asset.context}
    if asset.metadata:
        body["metadata"] = asset.metadata
    if backup_bytes is not None:
        body["backup"] = backup_bytes > 0
        body["backup_bytes"] = backup_bytes
    return body


#: The AssetRow layout resource_of_row unpacks (checked at import against the store's).
_ROW_LAYOUT = (
    "pk", "cloud", "asset_id", "resource_type", "type", "public_id", "status", "digest", "format", "bytes", "width",
    "height", "version", "version_id", "original_filename", "tags", "context", "metadata", "created_at", "uploaded_at",
    "deleted_at", "generation", "md5", "detached_from",
)
if ASSET_ROW_COLUMNS != _ROW_LAYOUT:
    raise ImportError(f"render.resource_of_row unpacks {_ROW_LAYOUT}, rows are {ASSET_ROW_COLUMNS}")


def resource_of_row(row: AssetRow, flat_context: bool = False) -> dict[str, Any]:
    """resource(asset_of_row(row)) in one pass over the row's values: the same keys in the
    same order and the same values (tests/test_listing_shape.py compares them on varied rows).
    A 500-item page renders each row it has not seen; decoding into an Asset first, then
    reading it back, was a third of that."""
    (_, _, asset_id, resource_type, type_, public_id, status, digest, format_, size, width, height, version_, version_id,
     original_filename, tags, context, metadata, created_at, uploaded_at, _, _, md5, detached_from) = row
    if detached_from is not None:
        public_id = detached_from
    live = status == "live"
    filename = public_id.rpartition("/")[2]
    body: dict[str, Any] = {
        "asset_id": asset_id,
        "public_id": public_id,
        "format": format_,
        "version": version_,
        "version_id": version_id,
        "resource_type": resource_type,
        "type": type_,
        "created_at": (created := iso(created_at)),
        "uploaded_at": created if uploaded_at == created_at else iso(uploaded_at),
        "bytes": size if live else 0,
        "width": width,
        "height": height,
        "asset_folder": "",
        "display_name": filename,
        "filename": filename,
        "original_filename": original_filename,
        "etag": md5 or digest[:32],
        "blake3": digest,
        "status": "active" if live else "deleted",
        "access_mode": "public",
        "placeholder": not live,
    }
    if format_ is None:
        del body["format"]
    if tags != "[]" and (tag_list := _json_text(tags)):
        body["tags"] = sorted(tag_list)
    if context != "{}" and (entries := _json_text(context)):
        body["context"] = entries if flat_context else {"custom": entries}
    if metadata != "{}" and (values := json.loads(metadata)):
        body["metadata"] = values
    return body


def row_weight(row: AssetRow) -> int:
    """Bytes a kept listing item and its row hold, estimated (versionstore/http/resource_rows.py):
    a fixed part for the tuple, the dict and the values of bounded length (ids, digests,
    dates), and three times the text of the columns a client sets the length of."""
    (_, _, _, _, _, public_id, _, _, _, _, _, _, _, _, original_filename, tags, context, metadata, *_, detached_from) = row
    return 1500 + 3 * (len(public_id) + len(original_filename or "") + len(tags) + len(context) + len(metadata)
                       + len(detached_from or ""))


def _json_text(text: str) -> Any:
    """A tags or context column (strings only, so orjson reads it as json would; it refuses
    lone surrogates, which json reads)."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return json.loads(text)


#: Always in a response that asks for `fields` (as on Cloudinary).
ALWAYS_FIELDS = ("public_id", "asset_id", "asset_folder", "created_at", "display_name", "format", "resource_type", "type")
#: What `fields` may name: the keys a resource can carry.
KNOWN_FIELDS = frozenset(ALWAYS_FIELDS) | {
    "version", "version_id", "uploaded_at", "bytes", "width", "height", "filename", "original_filename",
    "etag", "blake3", "status", "access_mode", "placeholder", "tags", "context", "metadata", "backup",
    "backup_bytes",
}


def parse_fields(value: object) -> frozenset[str] | None:
    """The `fields` parameter (a comma string or a list); None when absent. Unknown names are
    a 400 naming them, not silently dropped."""
    if value in (None, "", []):
        return None
    names = value if isinstance(value, (list, tuple)) else str(value).split(",")
    wanted = frozenset(str(n).strip() for n in names if str(n).strip())
    unknown = sorted(wanted - KNOWN_FIELDS)
    if unknown:
        raise BadRequest(f"Unsupported fields - {', '.join(unknown)}")
    return wanted


def select(body: dict[str, Any], fields: frozenset[str] | None) -> dict[str, Any]:
    """A selective response: the always-present keys plus the requested ones that are set."""
    if fields is None:
        return body
    return {k: v for k, v in body.items() if k in fields or k in ALWAYS_FIELDS}


def version(v: Version, pending: bool = False, damaged: str | None = None) -> dict[str, Any]:
    """A `versions[]` item: `version` is a string on the wire; `restorable` means the bytes are
    in backup storage (docs/design.md): not while the revision's backup is pending, nor once a
    check found its backup copy `damaged` ("missing" or "corrupt", versionstore/verify.py)."""
    item: dict[str, Any] = {
        "version_id": v.version_id,
        "version": str(v.version),
        "format": v.format,
        "size": v.bytes,
        "time": datetime.fromtimestamp(v.created_at, UTC).isoformat(timespec="seconds"),
        "restorable": v.backed_up and not pending and damaged is None,
    }
    if v.backed_up and damaged is not None:
        item["backup_integrity"] = damaged
    if v.backed_up and pending:
        item["backup_pending"] = True
    if v.restored_from:
        item["restored_from"] = v.restored_from
    return item


def upload_result(cloud: Cloud, asset: Asset, v: Version, *, existing: bool = False, overwritten: bool = False) -> dict[str, Any]:
    body = resource(asset)
    body.update(
        version=v.version,
        version_id=v.version_id,
        bytes=v.bytes,
        signature=response_signature(asset.public_id, v.version, cloud.api_secret),
        api_key=cloud.api_key,
        backup=v.backed_up,
        tags=sorted(asset.tags),  # the upload result always carries `tags`, [] when none
    )
    for key in ("status", "filename", "uploaded_at"):
        body.pop(key, None)
    if existing:
        body["existing"] = True
    if overwritten:
        body["overwritten"] = True
    return body


def restored(asset: Asset) -> dict[str, Any]:
    body = resource(asset)
    for key in ("status", "filename", "uploaded_at", "access_mode", "etag", "blake3"):
        body.pop(key, None)
    return body


def restore_failure(failure: RestoreFailure) -> dict[str, str]:
    """A failed restore item: Cloudinary's `error` code (a string, so the SDKs do not raise),
    our stable `reason` and a `message` that says why (docs/api.md)."""
    return {"error": failure.error, "reason": failure.reason, "message": failure.message}


def job(j: Job) -> dict[str, Any]:
    """A durable job as the extension API shows it (docs/api.md)."""
    return {
        "id": j.id,
        "kind": j.kind,
        "status": j.status,
        "params": j.params,
        "progress": j.progress,
        "error": j.error,
        "created_at": iso(j.created_at),
        "started_at": iso(j.started_at) if j.started_at else None,
        "completed_at": iso(j.completed_at) if j.completed_at else None,
    }
