"""Key layout: the one place that names objects in a store.

    <cloud_name>/blobs/ab/cd/<blake3 hex>      backup store: write-once revisions
    <cloud_name>/originals/ab/cd/<blake3 hex>  primary store: current originals

Blobs are namespaced per environment: no cross-tenant dedup (see docs/design.md).
"""


def _fanout(digest: str) -> str:
    return f"{digest[:2]}/{digest[2:4]}/{digest}"


def revision_key(cloud: str, digest: str) -> str:
    return f"{cloud}/blobs/{_fanout(digest)}"


def original_key(cloud: str, digest: str) -> str:
    return f"{cloud}/originals/{_fanout(digest)}"


def revision_prefix(cloud: str) -> str:
    return f"{cloud}/blobs/"


def original_prefix(cloud: str) -> str:
    return f"{cloud}/originals/"


def digest_of(key: str) -> str:
    return key.rsplit("/", 1)[-1]
