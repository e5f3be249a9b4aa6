"""The download path's two shortcuts (issue 10, fifth round) never serve stale or unauthorised bytes.

- A signed query string that passed `check_signed` is remembered per (string, purpose,
  environment, key pairs) (versionstore/http/signed_queries.py): a rotated secret or append-only
  key pair, another or an unknown environment, another purpose's parameters and the link's
  expiry (to the second) still refuse the very next request.
- Small revisions' proven bytes are kept until anything commits (VERIFIED_BLOBS in
  versionstore/http/download.py): an irreversibly deleted version, a revision verify found
  corrupt, and damage on disk after any commit still refuse the next download.
Both backends; the rotation also across two apps on one database (two processes).
"""

import asyncio
import hashlib
import os
import time
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from tests.conftest import API_KEY, API_SECRET, CLOUD, Api, sign
from tests.test_read_path_cost import _shows
from versionstore import layout, protection, verify
from versionstore.config import Config
from versionstore.http.app import create_app
from versionstore.http.auth import MAX_AGE
from versionstore.http.keys import META, SERVICE


async def _get(client: TestClient, params: dict[str, Any]) -> tuple[int, bytes]:
    response = await client.get(f"/v1_1/{CLOUD}/download_backup", params=params)
    return response.status, await response.read()


def _signed(up: dict[str, Any], secret: str = API_SECRET, key: str = API_KEY, **extra: Any) -> dict[str, Any]:
    return {**sign({"asset_id": up["asset_id"], "version_id": up["version_id"], **extra}, secret), "api_key": key}


async def _set_secret(client: TestClient, secret: str) -> None:
    """The operator rotates the environment's secret (in the database, as any process would)."""
    async with client.app[META].transaction() as db:
        await db.execute("UPDATE clouds SET api_secret = ? WHERE name = ?", (secret, CLOUD))


async def test_a_rotated_secret_refuses_a_link_already_served(api: Api, client: TestClient) -> None:
    up = await api.upload(b"rotation", public_id="short/rot")
    link = _signed(up)
    for _ in range(2):  # the second one is answered from the remembered check
        assert (await _get(client, link))[0] == 200
    await _set_secret(client, "a-new-secret")
    status, body = await _get(client, link)
    assert status == 401 and b"Invalid Signature" in body
    assert (await _get(client, _signed(up, "a-new-secret")))[0] == 200
    await _set_secret(client, API_SECRET)  # back: the old link is good again (its check is a pure function)
    assert (await _get(client, link))[0] == 200


async def test_a_reissued_append_only_key_refuses_a_link_of_the_old_one(api: Api, client: TestClient) -> None:
    up = await api.upload(b"append-only", public_id="short/ao")
    meta = client.app[META]
    cloud = await meta.get_cloud(CLOUD)
    assert cloud is not None
    key, secret = await protection.issue_append_key(meta, cloud)
    link = _signed(up, secret, key)
    for _ in range(2):
        assert (await _get(client, link))[0] == 200  # download_backup is allowed to the append-only key
    await protection.issue_append_key(meta, cloud)
    status, body = await _get(client, link)
    assert status == 401 and b"Invalid api_key" in body


async def test_a_link_served_for_one_environment_is_checked_afresh_on_another(api: Api, client: TestClient) -> None:
    """A deleted environment is refused before any handler (Invalid cloud_name); what the
    remembered check must not do is carry a verdict to another environment's credentials."""
    up = await api.upload(b"elsewhere", public_id="short/env")
    link = _signed(up)
    for _ in range(2):
        assert (await _get(client, link))[0] == 200
    await client.app[META].create_cloud("other", "otherkey", "othersecret", auto_backup=True)
    response = await client.get("/v1_1/other/download_backup", params=link)
    assert response.status == 401 and b"Invalid api_key" in await response.read()
    response = await client.get("/v1_1/nowhere/download_backup", params=link)
    assert response.status == 401 and b"Invalid cloud_name" in await response.read()


async def test_a_link_expires_on_the_same_second_after_it_was_served(api: Api, client: TestClient) -> None:
    up = await api.upload(b"expiring", public_id="short/exp")
    stamp = int(time.time()) - MAX_AGE + 1  # good for one or two more seconds
    link = _signed(up, timestamp=str(stamp))
    for _ in range(2):
        assert (await _get(client, link))[0] == 200
    await asyncio.sleep(stamp + MAX_AGE - time.time() + 0.05)  # just past the boundary: `stamp < now - MAX_AGE`
    assert time.time() > stamp + MAX_AGE
    status, body = await _get(client, link)
    assert status == 400 and b"Stale request" in body


async def test_a_served_link_with_another_purposes_parameter_is_refused(api: Api, client: TestClient) -> None:
    up = await api.upload(b"purpose", public_id="short/purpose")
    assert (await _get(client, _signed(up)))[0] == 200
    lifted = _signed(up, public_id="short/purpose")  # an upload's parameter, signed with the right secret
    status, body = await _get(client, lifted)
    assert status == 400 and b"belongs to another request" in body


async def test_a_link_with_a_wrong_signature_is_refused_every_time(api: Api, client: TestClient) -> None:
    up = await api.upload(b"forged", public_id="short/forged")
    good = _signed(up)
    forged = {**good, "signature": hashlib.sha1(b"not it").hexdigest()}
    for _ in range(3):
        assert (await _get(client, good))[0] == 200
        assert (await _get(client, forged))[0] == 401


def _damage(client: TestClient, data: bytes, digest: str) -> None:
    path = client.app[SERVICE].targets.default.local_path(layout.revision_key(CLOUD, digest))
    assert path is not None
    os.chmod(path, 0o644)  # the bad block of the story; the service never opens blobs for writing
    with open(path, "r+b") as handle:
        handle.seek(len(data) // 2)
        handle.write(bytes([data[len(data) // 2] ^ 0xFF]))


async def test_an_irreversibly_deleted_version_is_not_served_from_memory(api: Api, client: TestClient) -> None:
    data = os.urandom(3000)
    first = await api.upload(data, rt="raw", public_id="short/del")
    await api.upload(b"second", rt="raw", public_id="short/del")
    link = _signed(first)
    for _ in range(2):
        assert await _get(client, link) == (200, data)
    await api.admin("DELETE", f"resources/backup/{first['asset_id']}", json={"version_ids": [first["version_id"]]})
    assert (await _get(client, link))[0] == 404


async def test_a_revision_verify_found_corrupt_is_not_served_from_memory(api: Api, client: TestClient) -> None:
    data = os.urandom(3000)
    up = await api.upload(data, rt="raw", public_id="short/rot-on-disk")
    link = _signed(up)
    assert await _get(client, link) == (200, data)
    _damage(client, data, up["blake3"])
    # Until something commits, a download sends the bytes already proven to be the digest's
    # (never the damaged ones); the scrub finds the damage and marks the revision.
    assert await _get(client, link) == (200, data)
    service = client.app[SERVICE]
    cloud = await service.meta.get_cloud(CLOUD)
    assert cloud is not None
    report = await verify.Scrubber(service).run(cloud)
    assert report.counts.get("backup_corrupt"), report
    status, body = await _get(client, link)
    assert status == 404 and b"corrupt" in body


async def test_damage_on_disk_shows_in_the_first_download_after_any_commit(api: Api, client: TestClient) -> None:
    data = os.urandom(3000)
    up = await api.upload(data, rt="raw", public_id="short/after-commit")
    link = _signed(up)
    assert await _get(client, link) == (200, data)
    _damage(client, data, up["blake3"])
    await api.upload(b"anything", rt="raw", public_id="short/other")  # a commit: what was proven is read again
    status, body = await _get(client, link)
    assert status == 500 and b"failed verification" in body


async def test_another_process_rotating_the_secret_refuses_the_link(
    aiohttp_client: Any, client: TestClient, config: Config
) -> None:
    """Two apps on one database: `client` rotates, `other` (which served the link) refuses it
    (SQLite: at once; PostgreSQL: as the commit's notification arrives)."""
    other: TestClient = await aiohttp_client(create_app(config))
    up = await Api(client).upload(b"two apps", public_id="short/two")
    link = _signed(up)

    async def status() -> int:
        return (await _get(other, link))[0]

    for _ in range(2):
        assert await status() == 200
    await _set_secret(client, "rotated-elsewhere")
    await _shows(status, 401)
    await _set_secret(client, API_SECRET)
    await _shows(status, 200)


@pytest.mark.parametrize("metadata_url", ["sqlite"], indirect=True)
async def test_on_sqlite_the_rotation_shows_in_the_very_next_request(aiohttp_client: Any, client: TestClient, config: Config) -> None:
    other: TestClient = await aiohttp_client(create_app(config))
    up = await Api(client).upload(b"next request", public_id="short/next")
    link = _signed(up)
    for _ in range(2):
        assert (await _get(other, link))[0] == 200
    await _set_secret(client, "rotated-elsewhere")
    assert (await _get(other, link))[0] == 401
