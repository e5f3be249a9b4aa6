"""Customer backup buckets, in-process service against real moto_server and fake-gcs-server.

The marker, run-time marker loss and recovery, the pending queue, migrations in both
directions and two environments sharing a bucket. Outages that stop a server live in
tests/e2e/test_bucket_targets.py.
"""

import asyncio
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import CLOUD, Api, sign
from tests.test_blobstore_contract import make_gcs_bucket, make_s3_bucket
from versionstore.config import Config
from versionstore.http.keys import META


@pytest.fixture
def config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, moto_server: Any, gcs_server: Any) -> Config:
    """Endpoints and credentials come from the SDKs' environment, as in production: over the
    Admin API a tenant may not choose endpoints (see test_operator_options_are_refused...)."""
    for name, value in {**moto_server.client_env(), **gcs_server.client_env()}.items():
        monkeypatch.setenv(name, value)
    return Config(data_dir=tmp_path / "data", max_upload_bytes=64 << 20, marker_ttl=0.1, poll_interval=0.05, pending_retry_max=0.3)


class Bucket:
    """A fresh bucket on a session server, with direct access for markers and inspection."""

    def __init__(self, scheme: str, endpoint: str) -> None:
        self.scheme, self.endpoint = scheme, endpoint
        self.name = f"b-{uuid.uuid4().hex[:16]}"
        if scheme == "s3":
            import boto3

            make_s3_bucket(endpoint, self.name)
            self._s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                                    aws_access_key_id="test", aws_secret_access_key="test")
        else:
            from google.auth.credentials import AnonymousCredentials
            from google.cloud import storage

            make_gcs_bucket(endpoint, self.name)
            client = storage.Client(project="test", credentials=AnonymousCredentials(), client_options={"api_endpoint": endpoint})
            self._gcs = client.bucket(self.name)

    def url(self, prefix: str = "vs") -> str:
        """As a tenant gives it: endpoints and credentials come from the service's environment."""
        return f"{self.scheme}://{self.name}/{prefix}"

    def operator_url(self, prefix: str = "vs") -> str:
        """With the endpoint in the URL: only the operator (the CLI) may set it."""
        option = "region=us-east-1" if self.scheme == "s3" else "anonymous=true"
        return f"{self.url(prefix)}?endpoint_url={self.endpoint}&{option}"

    def put(self, key: str, data: bytes = b"") -> None:
        if self.scheme == "s3":
            self._s3.put_object(Bucket=self.name, Key=key, Body=data)
        else:
            self._gcs.blob(key).upload_from_string(data)

    def delete(self, key: str) -> None:
        if self.scheme == "s3":
            self._s3.delete_object(Bucket=self.name, Key=key)
        else:
            self._gcs.blob(key).delete()

    def keys(self, prefix: str = "") -> list[str]:
        if self.scheme == "s3":
            pages = self._s3.get_paginator("list_objects_v2").paginate(Bucket=self.name, Prefix=prefix)
            return sorted(o["Key"] for page in pages for o in page.get("Contents", []))
        return sorted(b.name for b in self._gcs.client.list_blobs(self.name, prefix=prefix))

    def mark(self, cloud: str = CLOUD) -> None:
        self.put(f".wellknown/cloudinary/{cloud}")


@pytest.fixture(params=["s3", "gcs"])
def bucket(request: pytest.FixtureRequest) -> Bucket:
    if request.param == "s3":
        return Bucket("s3", request.getfixturevalue("moto_server").url)
    return Bucket("gs", request.getfixturevalue("gcs_server").url)


async def wait_for(predicate: Any, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = await predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {predicate.__name__}")
        await asyncio.sleep(0.05)


async def set_bucket(api: Api, url: str | None, expect: int = 200) -> dict[str, Any]:
    if url is None:
        return await api.admin("DELETE", "versionstore/backup", expect=expect)
    return await api.admin("PUT", "versionstore/backup", expect=expect, json={"bucket": url})


async def migrated(api: Api, target: str) -> dict[str, Any]:
    async def done() -> dict[str, Any] | None:
        status = await api.admin("GET", "versionstore/backup")
        return status if status["target"] == target and status["migration"] is None else None

    return await wait_for(done)


async def versions(api: Api, public_id: str) -> list[dict[str, Any]]:
    body = await api.admin("GET", f"resources/image/upload/{public_id}", params={"versions": "true"})
    return list(body["versions"])


async def download(api: Api, asset_id: str, version_id: str) -> tuple[int, bytes]:
    params = sign({"asset_id": asset_id, "version_id": version_id})
    response = await api.client.get(f"/v1_1/{CLOUD}/download_backup", params=params)
    return response.status, await response.read()


async def test_a_bucket_without_its_marker_is_refused_naming_the_object(api: Api, bucket: Bucket):
    body = await set_bucket(api, bucket.url(), expect=400)
    message = body["error"]["message"]
    assert f"{bucket.scheme}://{bucket.name}/.wellknown/cloudinary/{CLOUD}" in message
    status = await api.admin("GET", "versionstore/backup")
    assert status["target"] == "default" and status["migration"] is None


async def test_operator_options_are_refused_over_the_api(api: Api, bucket: Bucket):
    bucket.mark()
    for option in ("endpoint_url=http://169.254.169.254", "profile=other", "part_concurrency=1000"):
        body = await set_bucket(api, f"{bucket.url()}?{option}", expect=400)
        assert "only be set by the operator" in body["error"]["message"]
    tenant_option = "multipart_threshold" if bucket.scheme == "s3" else "resumable_threshold"
    assert (await set_bucket(api, f"{bucket.url()}?{tenant_option}=1048576"))["migration"]


async def test_unusable_bucket_urls_are_refused(api: Api):
    for url in ("ftp://x/y", "/tmp/somewhere", "s3://", "s3://b/../x"):
        body = await set_bucket(api, url, expect=400)
        assert body["error"]["message"]


async def test_customer_bucket_keeps_new_revisions_and_serves_them(api: Api, bucket: Bucket):
    bucket.mark()
    await set_bucket(api, bucket.url())
    status = await migrated(api, bucket_target(bucket))
    assert status["state"] == "healthy"
    first = await api.upload(b"v1 in the customer's bucket", public_id="cb/a")
    second = await api.upload(b"v2 in the customer's bucket", public_id="cb/a")
    keys = bucket.keys("vs/")
    assert len([k for k in keys if k.startswith(f"vs/{CLOUD}/blobs/")]) == 2
    assert not [k for k in keys if "/probe/" in k]  # the write probe cleaned up after itself
    assert await download(api, first["asset_id"], first["version_id"]) == (200, b"v1 in the customer's bucket")
    restored = await api.admin("POST", "resources/image/upload/restore", data={"public_ids[]": "cb/a", "versions[]": first["version_id"]})
    assert "error" not in restored["cb/a"]
    assert [v["restorable"] for v in await versions(api, "cb/a")] == [True, True, True]
    # Irreversible version deletion reaches into the bucket.
    await api.admin("DELETE", f"resources/backup/{second['asset_id']}", data={"version_ids[]": second["version_id"]})
    assert len([k for k in bucket.keys("vs/") if "/blobs/" in k]) == 1


async def test_marker_removed_at_run_time_queues_then_drains(api: Api, bucket: Bucket):
    bucket.mark()
    await set_bucket(api, bucket.url())
    await migrated(api, bucket_target(bucket))
    bucket.delete(f".wellknown/cloudinary/{CLOUD}")
    await asyncio.sleep(0.2)  # past the marker cache
    uploaded = await api.upload(b"acknowledged while the marker is gone", public_id="cb/pending")
    assert uploaded["backup"] is True
    [item] = await versions(api, "cb/pending")
    assert item["restorable"] is False and item["backup_pending"] is True
    status = await api.admin("GET", "versionstore/backup")
    assert status["state"] == "marker_missing" and status["pending"]["count"] == 1
    assert ".wellknown/cloudinary/demo" in status["last_error"]
    assert (await download(api, uploaded["asset_id"], uploaded["version_id"]))[0] == 404
    assert not [k for k in bucket.keys("vs/") if "/blobs/" in k]  # nothing written without the marker

    bucket.mark()

    async def drained() -> bool:
        return (await api.admin("GET", "versionstore/backup"))["pending"]["count"] == 0

    await wait_for(drained)
    [item] = await versions(api, "cb/pending")
    assert item["restorable"] is True and "backup_pending" not in item
    assert (await api.admin("GET", "versionstore/backup"))["state"] == "healthy"
    assert await download(api, uploaded["asset_id"], uploaded["version_id"]) == (200, b"acknowledged while the marker is gone")


def bucket_target(bucket: Bucket) -> str:
    from versionstore.blobstore import parse_store_url

    return str(parse_store_url(bucket.url()))


async def test_switching_copies_the_history_then_back_to_default(api: Api, bucket: Bucket, config: Config):
    history = [await api.upload(f"history {i}".encode(), public_id="mig/a") for i in range(3)]
    other = await api.upload(b"another asset", public_id="mig/b")
    await api.admin("DELETE", "resources/image/upload", params={"public_ids[]": "mig/b"})  # deleted, still reserved
    bucket.mark()
    body = await set_bucket(api, bucket.url())
    assert body["migration"]["kind"] == "backup_migration"
    status = await migrated(api, bucket_target(bucket))
    assert status["target"] == bucket_target(bucket)
    assert len([k for k in bucket.keys("vs/") if "/blobs/" in k]) == 4
    default_blobs = [p for p in (config.data_dir / "backup").rglob("*") if p.is_file()]
    assert default_blobs == []  # moved, not copied: the default store is the operator's
    for item in [*history, other]:
        assert (await download(api, item["asset_id"], item["version_id"]))[0] == 200
    restored = await api.admin("POST", "resources/image/upload/restore", data={"public_ids[]": "mig/b"})
    assert "error" not in restored["mig/b"]

    await set_bucket(api, None)
    await migrated(api, "default")
    assert len([p for p in (config.data_dir / "backup").rglob("*") if p.is_file()]) == 4
    assert len([k for k in bucket.keys("vs/") if "/blobs/" in k]) == 4  # the customer's copies stay theirs
    assert (await download(api, history[0]["asset_id"], history[0]["version_id"])) == (200, b"history 0")


async def test_two_environments_share_a_bucket_without_seeing_each_other(api: Api, bucket: Bucket, client: Any):
    meta = client.app[META]
    await meta.create_cloud("other", "key999", "secret999", auto_backup=True)
    bucket.mark(CLOUD)
    bucket.mark("other")
    await set_bucket(api, bucket.url())
    other_api = OtherApi(client)
    await other_api.admin("PUT", "versionstore/backup", json={"bucket": bucket.url()})
    await migrated(api, bucket_target(bucket))
    await migrated(other_api, bucket_target(bucket))
    mine = await api.upload(b"same bytes in two environments", public_id="shared/x")
    theirs = await other_api.upload(b"same bytes in two environments", public_id="shared/x")
    keys = [k for k in bucket.keys("vs/") if "/blobs/" in k]
    assert {k.split("/")[1] for k in keys} == {CLOUD, "other"} and len(keys) == 2  # no cross-tenant dedup
    # One environment cannot reach the other's version, even knowing its ids.
    assert (await download(api, theirs["asset_id"], theirs["version_id"]))[0] == 404
    await api.admin("DELETE", f"resources/backup/{mine['asset_id']}", data={"version_ids[]": mine["version_id"]}, expect=200)
    # Removing the marker of one environment leaves the other one healthy.
    bucket.delete(".wellknown/cloudinary/other")
    await asyncio.sleep(0.2)
    await api.upload(b"mine, still backed up", public_id="shared/y")
    assert (await api.admin("GET", "versionstore/backup"))["pending"]["count"] == 0


class OtherApi(Api):
    """The second environment of the shared-bucket test, with its own credentials."""

    async def admin(self, method: str, path: str, expect: int = 200, **kwargs: Any) -> dict[str, Any]:
        import base64

        headers = {"Authorization": "Basic " + base64.b64encode(b"key999:secret999").decode()}
        response = await self.client.request(method, f"/v1_1/other/{path}", headers=headers, **kwargs)
        body = await response.json()
        assert response.status == expect, body
        return body

    async def upload(self, data: bytes, rt: str = "image", expect: int = 200, filename: str = "file.bin", **params: Any) -> dict[str, Any]:
        import aiohttp

        form = aiohttp.FormData()
        for key, value in sign(params, secret="secret999").items():
            form.add_field(key, "key999" if key == "api_key" else value)
        form.add_field("file", data, filename=filename)
        response = await self.client.post(f"/v1_1/other/{rt}/upload", data=form)
        body = await response.json()
        assert response.status == expect, body
        return body


async def test_a_migration_is_exclusive_and_can_be_cancelled(api: Api, bucket: Bucket, client: Any):
    from versionstore import migration
    from versionstore.models import Job

    await api.upload(b"x", public_id="cancel/a")
    # A migration that cannot progress: its destination lost its marker after it was queued.
    stuck = Job(id="f" * 32, cloud=CLOUD, kind=migration.KIND, status="pending", params={"from": None, "to": bucket_target(bucket)},
                progress={"phase": "copy"}, created_at=time.time())
    await client.app[META].create_job(stuck)

    async def retrying() -> bool:
        job = await api.admin("GET", f"versionstore/jobs/{stuck.id}")
        return job["status"] == "active" and ".wellknown/cloudinary/demo" in (job["progress"].get("last_error") or "")

    await wait_for(retrying)
    refused = await set_bucket(api, bucket.url("elsewhere"), expect=400)
    assert stuck.id in refused["error"]["message"]
    status = await set_bucket(api, "default")  # back to the current target: cancels the copy
    assert status["target"] == "default" and status["migration"] is None
    job = await api.admin("GET", f"versionstore/jobs/{stuck.id}")
    assert job["status"] == "failed" and "cancelled" in job["error"]
    await api.admin("GET", f"versionstore/jobs/{'0' * 32}", expect=404)


async def test_default_store_in_an_object_lock_bucket(
    tmp_path: Path, moto_server: Any, aiohttp_client: Any, monkeypatch: pytest.MonkeyPatch
):
    """The operator's default store on S3 with Object Lock (governance): revisions carry a
    retention, and irreversible version deletion still removes every object version."""
    import boto3

    from tests.conftest import API_KEY, API_SECRET
    from versionstore.http.app import create_app

    for name, value in moto_server.client_env().items():
        monkeypatch.setenv(name, value)
    name = f"lock-{uuid.uuid4().hex[:12]}"
    make_s3_bucket(moto_server.url, name, ObjectLockEnabledForBucket=True)
    config = Config(data_dir=tmp_path / "data", backup_store=f"s3://{name}/vs?object_lock_days=1")
    app = create_app(config)
    api = Api(await aiohttp_client(app))
    await app[META].create_cloud(CLOUD, API_KEY, API_SECRET, auto_backup=True)
    first = await api.upload(b"locked revision one", public_id="lock/a")
    await api.upload(b"locked revision two", public_id="lock/a")
    s3 = boto3.client("s3", endpoint_url=moto_server.url, region_name="us-east-1")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=name, Prefix="vs/")["Contents"]]
    assert len(keys) == 2
    head = s3.head_object(Bucket=name, Key=keys[0])
    assert head["ObjectLockMode"] == "GOVERNANCE" and head["ObjectLockRetainUntilDate"].timestamp() > time.time() + 3600
    assert await download(api, first["asset_id"], first["version_id"]) == (200, b"locked revision one")
    await api.admin("DELETE", f"resources/backup/{first['asset_id']}", data={"version_ids[]": first["version_id"]})
    remaining = s3.list_object_versions(Bucket=name, Prefix="vs/")
    assert len(remaining.get("Versions", [])) == 1 and not remaining.get("DeleteMarkers")


async def test_a_cancel_is_final_even_if_the_runner_saves_a_stale_copy_afterwards(client: Any):
    """The runner holds the job in memory while it copies a batch; a cancel committed meanwhile
    must survive the runner's next save, and a cancelled migration must never switch."""
    from versionstore.models import Job

    meta = client.app[META]
    job = Job(id="c" * 32, cloud=CLOUD, kind="test_only", status="active", params={"from": None, "to": "s3://x/y"},
              progress={"phase": "copy"}, created_at=time.time())
    await meta.create_job(job)
    stale = await meta.get_job(CLOUD, job.id)
    cloud = await meta.get_cloud(CLOUD)
    cancelled = await meta.get_job(CLOUD, job.id)  # what change_target loads and cancels
    cancelled.status, cancelled.error = "failed", "cancelled"
    assert await meta.save_job(cancelled)
    stale.progress["revisions_done"] = 64
    assert await meta.save_job(stale, backup_target=(CLOUD, "s3://x/y")) is False
    assert (await meta.get_job(CLOUD, job.id)).status == "failed"
    assert (await meta.get_cloud(CLOUD)).backup_target == cloud.backup_target is None
