"""Key layout: the one place that names objects in a store.

    <cloud_name>/blobs/ab/cd/<blake3 hex>      backup store: write-once revisions
    <cloud_name>/originals/ab/cd/<blake3 hex>  primary store: current originals
    <cloud_name>/pending/ab/cd/<blake3 hex>    primary store: revisions waiting for their backup target
    <cloud_name>/archives/<job id>.layout      default backup store: a prepared archive export's layout
    <cloud_name>/archives/<job id>.tar         default backup store: an archive export from before layouts
    <cloud_name>/archive-imports/<job id>.tar  default backup store: an archive waiting for its import job
    .wellknown/cloudinary/<cloud_name>         customer bucket root: the marker that allows its use

Blobs are namespaced per environment: no cross-tenant dedup (see docs/design.md).
"""


def _fanout(digest: str) -> str:
    return f"{digest[:2]}/{digest[2:4]}/{digest}"


def revision_key(cloud: str, digest: str) -> str:
    return f"{cloud}/blobs/{_fanout(digest)}"


def original_key(cloud: str, digest: str) -> str:
    return f"{cloud}/originals/{_fanout(digest)}"


def pending_key(cloud: str, digest: str) -> str:
    return f"{cloud}/pending/{_fanout(digest)}"


def pending_prefix(cloud: str) -> str:
    return f"{cloud}/pending/"


def marker_key(cloud: str) -> str:
    """At the bucket root, whatever prefix versionstore writes under."""
    return f".wellknown/cloudinary/{cloud}"


def probe_key(cloud: str, token: str) -> str:
    """Where setting a bucket proves write, read and delete access (then removes it)."""
    return f"{cloud}/probe/{token}"


def archive_layout_key(cloud: str, job_id: str) -> str:
    """Default backup store: a prepared archive export's layout (archive_compose.py)."""
    return f"{cloud}/archives/{job_id}.layout"


def archive_upload_key(cloud: str, job_id: str) -> str:
    """Default backup store: an archive sent for import, waiting for its job (never served)."""
    return f"{cloud}/archive-imports/{job_id}.tar"


def revision_prefix(cloud: str) -> str:
    return f"{cloud}/blobs/"


def original_prefix(cloud: str) -> str:
    return f"{cloud}/originals/"


def is_revision_key(key: str) -> bool:
    """Whether `key` names a revision (`<cloud>/blobs/...`): what metrics count as one."""
    parts = key.split("/", 2)
    return len(parts) == 3 and parts[1] == "blobs"


def digest_of(key: str) -> str:
    return key.rsplit("/", 1)[-1]
