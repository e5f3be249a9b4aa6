async def test_ping(api):
    assert await api.admin("GET", "ping") == {"status": "ok"}


async def test_upload_then_versions(api):
    first = await api.upload(b"one", public_id="docs/a", backup="1")
    await api.upload(b"two", public_id="docs/a", backup="1")
    body = await api.admin("GET", "resources/image/upload/docs/a", params={"versions": "true"})
    assert [v["size"] for v in body["versions"]] == [3, 3]
    assert body["asset_id"] == first["asset_id"]
