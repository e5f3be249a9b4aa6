"""The CLI import (`archives.import_file`) into an environment whose backup target is a
customer bucket that cannot take revisions now (its marker gone): every entry is imported
with its revision waiting in the primary store's pending area (none lost, none linked into the
bucket), and the drainer moves them once the marker is back. Real moto_server and
fake-gcs-server, as tests/test_buckets.py."""

import asyncio
from pathlib import Path
from typing import Any

from tests import test_buckets as buckets
from tests.test_archives import OTHER, OTHER_HEADERS, exported_for_other
from tests.test_buckets import Bucket, bucket_target, wait_for
from versionstore import archives, layout
from versionstore.http.keys import META, SERVICE

config, bucket = buckets.config, buckets.bucket  # the buckets' fixtures: endpoints from the SDKs' environment


async def other_backup(api: Any, method: str = "GET", **kwargs: Any) -> dict[str, Any]:
    response = await api.client.request(method, f"/v1_1/{OTHER}/versionstore/backup", headers=OTHER_HEADERS, **kwargs)
    body = await response.json()
    assert response.status == 200, body
    return dict(body)


async def test_an_import_into_a_bucket_that_cannot_take_revisions_queues_them_all(api, client, tmp_path, bucket: Bucket):
    path, other = await exported_for_other(api, client, tmp_path, "pend", 4, 3000)
    service, meta = client.app[SERVICE], client.app[META]
    bucket.mark(OTHER)
    await other_backup(api, "PUT", json={"bucket": bucket.url()})

    async def migrated() -> bool:
        status = await other_backup(api)
        return status["target"] == bucket_target(bucket) and status["migration"] is None

    await wait_for(migrated)
    bucket.delete(f".wellknown/cloudinary/{OTHER}")
    await asyncio.sleep(0.2)  # past the marker cache
    other = await meta.get_cloud(OTHER)
    _, counts = await archives.import_file(service, other, path)
    assert counts == {"imported": 4, "unchanged": 0}
    manifest = await archives.verify_file(path)
    assert not [k for k in bucket.keys("vs/") if "/blobs/" in k]  # nothing written without the marker
    assert (await other_backup(api))["pending"]["count"] == 4
    for entry in manifest.entries:
        assert Path(service.primary.local_path(layout.pending_key(OTHER, entry["blake3"]))).exists()

    bucket.mark(OTHER)

    async def drained() -> bool:
        return (await other_backup(api))["pending"]["count"] == 0

    await wait_for(drained)
    assert len([k for k in bucket.keys("vs/") if f"/{OTHER}/blobs/" in k]) == 4
