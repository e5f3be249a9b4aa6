"""Cloudinary-shaped JSON for assets, versions and upload results (spec sections 5-7)."""

from datetime import UTC, datetime
from typing import Any

from versionstore.models import Asset, Cloud, Job, Version
from versionstore.signing import response_signature


def iso(ts: float) -> str:
    return datetime.fromtimestamp(int(ts), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _filename(asset: Asset) -> str:
    return asset.public_id.rsplit("/", 1)[-1]


def resource(asset: Asset, backup_bytes: int | None = None) -> dict[str, Any]:
    """The Admin API resource object; deleted (reserved) assets answer as placeholders."""
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
        "etag": asset.digest[:32],
        "status": "active" if asset.live else "deleted",
        "access_mode": "public",
        "placeholder": not asset.live,
        "tags": asset.tags,
    }
    if asset.format is None:
        del body["format"]
    if asset.context:
        body["context"] = {"custom": asset.context}
    if asset.metadata:
        body["metadata"] = asset.metadata
    if backup_bytes is not None:
        body["backup"] = backup_bytes > 0
        body["backup_bytes"] = backup_bytes
    return body


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
    for key in ("status", "filename", "uploaded_at", "access_mode", "etag"):
        body.pop(key, None)
    return body


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
