"""What each signed request may carry, so a signature made for one purpose does no other.

A Cloudinary signature covers a set of parameters, not the endpoint it was made for. Without
these vocabularies a download link's signature over {asset_id, version_id, timestamp} was also a
valid upload signature. A signed request is refused when it carries a parameter that belongs to
another purpose and not to its own: the signature was then lifted from that other request.
`download_backup` is closed (only its own parameters); the others accept parameters no purpose
claims, because Cloudinary keeps adding harmless upload options. What stays possible by the
protocol itself is listed in docs/threat-model.md.
"""

from collections.abc import Mapping

from versionstore.errors import BadRequest

#: Transport and credential fields, never a purpose of their own.
COMMON = frozenset({"timestamp", "signature", "api_key", "resource_type", "cloud_name"})

#: Everything the official SDKs send to `upload` (Python `utils.upload_params`, Node
#: `build_upload_params` + `updateable_resource_params`), plus the file itself.
UPLOAD = frozenset(
    {
        "file", "public_id", "public_id_prefix", "callback", "format", "type", "backup", "faces", "image_metadata",
        "media_metadata", "exif", "colors", "use_filename", "unique_filename", "display_name",
        "use_filename_as_display_name", "discard_original_filename", "filename_override", "invalidate",
        "notification_url", "eager_notification_url", "eager_async", "eval", "on_success", "proxy", "folder",
        "asset_folder", "use_asset_folder_as_public_id_prefix", "unique_display_name", "overwrite", "moderation",
        "raw_convert", "quality_override", "quality_analysis", "ocr", "categorization", "detection",
        "similarity_search", "visual_search", "background_removal", "upload_preset", "phash", "return_delete_token",
        "auto_tagging", "async", "cinemagraph_analysis", "accessibility_analysis", "auto_chaptering", "batch_id",
        "transformation", "headers", "eager", "tags", "allowed_formats", "face_coordinates", "custom_coordinates",
        "regions", "context", "responsive_breakpoints", "access_control", "metadata", "auto_transcription",
        "access_mode", "clear_invalid"
    }
)
_NOTIFY = frozenset({"notification_url", "batch_id", "callback"})

VOCABULARY: dict[str, frozenset[str]] = {
    "upload": UPLOAD,
    "explicit": UPLOAD,
    "destroy": frozenset({"public_id", "type", "invalidate"}) | _NOTIFY,
    "rename": frozenset({"from_public_id", "to_public_id", "to_type", "type", "overwrite", "invalidate", "context", "metadata"})
    | _NOTIFY,
    "tags": frozenset({"tag", "public_ids", "command", "type"}) | _NOTIFY,
    "context": frozenset({"context", "public_ids", "command", "type"}) | _NOTIFY,
    "metadata": frozenset({"metadata", "public_ids", "type", "clear_invalid"}) | _NOTIFY,
    "download_backup": frozenset({"asset_id", "version_id"}),
    "download_archive": frozenset({"archive_id"}),
}
#: Purposes that accept nothing outside their vocabulary.
CLOSED = frozenset({"download_backup", "download_archive"})
_CLAIMED = frozenset().union(*VOCABULARY.values())


_OWN = {purpose: names | COMMON for purpose, names in VOCABULARY.items()}


def foreign_parameter(purpose: str, params: Mapping[str, object]) -> str | None:
    """The first parameter (sorted) this purpose must not carry, or None."""
    own = _OWN[purpose]
    if own.issuperset(params):  # the usual case: nothing foreign, nothing to sort
        return None
    for name in sorted(params):
        if name in own:
            continue
        if purpose in CLOSED or name in _CLAIMED:
            return name
    return None


def check_purpose(purpose: str, params: Mapping[str, object]) -> None:
    name = foreign_parameter(purpose, params)
    if name is not None:
        raise BadRequest(f"Invalid parameter {name} for {purpose}: it belongs to another request")
