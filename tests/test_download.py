"""download_backup: signed, one hour, Content-Type/Disposition, Range on small and large blobs."""

import os

import pytest

from tests.conftest import CLOUD, sign
from versionstore.http.download import SMALL_BLOB


async def download(client, asset_id: str, version_id: str, **headers: str):
    params = sign({"asset_id": asset_id, "version_id": version_id})
    return await client.get(f"/v1_1/{CLOUD}/download_backup", params=params, headers=headers)


@pytest.mark.parametrize("size", [1000, SMALL_BLOB + 12345])
async def test_full_and_ranged_downloads(api, client, size):
    data = os.urandom(size)
    up = await api.upload(data, rt="raw", filename="report.pdf", public_id="dl/report.pdf")
    response = await download(client, up["asset_id"], up["version_id"])
    assert response.status == 200 and await response.read() == data
    assert response.headers["Content-Type"] == "application/pdf"
    assert 'filename="report.pdf"' in response.headers["Content-Disposition"]
    ranged = await download(client, up["asset_id"], up["version_id"], Range="bytes=10-19")
    assert ranged.status == 206 and await ranged.read() == data[10:20]
    assert ranged.headers["Content-Range"] == f"bytes 10-19/{size}"
    suffix = await download(client, up["asset_id"], up["version_id"], Range="bytes=-7")
    assert suffix.status == 206 and await suffix.read() == data[-7:]
    beyond = await download(client, up["asset_id"], up["version_id"], Range=f"bytes={size + 5}-")
    assert beyond.status == 416


async def test_unknown_version_of_a_known_asset_is_404(api, client):
    up = await api.upload(b"x", public_id="dl/a")
    response = await download(client, up["asset_id"], "0" * 32)
    assert response.status == 404
    assert (await response.json())["error"]["message"] == f"Version not found - {'0' * 32}"
