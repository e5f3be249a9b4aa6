"""Listing and search pages reuse each row's rendered JSON while the row reads the same
(versionstore/http/resource_rows.py). What a page shows must always be what a fresh rendering
of the asset as it is stored shows, byte for byte in each item (key order included): after a
tag, context or metadata change, a new version, a delete and a restore, made through this app
or through another app on the same database (a second `serve` process), on both backends."""

import json
from collections.abc import Sequence
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from tests.conftest import CLOUD, Api
from versionstore.config import Config
from versionstore.http import render
from versionstore.http.app import create_app
from versionstore.http.keys import META, RENDERED_ROWS
from versionstore.http.resource_rows import RENDER_ON_LOOP, RenderedRows

#: (path, query or JSON body, Search API context, `fields`): the pages the tests read.
PAGES: list[tuple[str, dict[str, Any], bool, frozenset[str] | None]] = [
    ("resources/image/upload", {"max_results": "500"}, False, None),
    ("resources/image/tags/t", {"max_results": "500"}, False, None),
    ("resources/image", {"max_results": "500", "fields": "tags,context,metadata,bytes"}, False,
     frozenset({"tags", "context", "metadata", "bytes"})),
    ("resources/search", {"max_results": 500, "sort_by": [{"public_id": "asc"}]}, True, None),
    ("resources/search", {"expression": "status=deleted", "max_results": 500}, True, None),
]


async def _page(api: Api, path: str, params: dict[str, Any]) -> list[dict[str, Any]]:
    if path == "resources/search":
        body = await api.admin("POST", path, json=params)
    else:
        body = await api.admin("GET", path, params=params)
    items: list[dict[str, Any]] = body["resources"]
    return items


async def _fresh(client: TestClient, items: list[dict[str, Any]], flat_context: bool, fields: frozenset[str] | None) -> list[Any]:
    """The items as the single-resource renderer shows the stored assets now (not cached)."""
    meta = client.app[META]
    assets = [await meta.get_asset_by_id(CLOUD, item["asset_id"]) for item in items]
    assert all(a is not None for a in assets)
    rendered = [render.select(render.resource(a, flat_context=flat_context), fields) for a in assets if a]
    expected: list[Any] = json.loads(render.dumps(rendered))
    return expected


async def _check_pages(readers: list[Api], client: TestClient) -> dict[str, list[str]]:
    """Each page through each app twice (the second from reused rows) against a fresh
    rendering; returns the public_ids each page listed."""
    listed: dict[str, list[str]] = {}
    for api in readers:
        for path, params, flat, fields in PAGES:
            for _ in range(2):
                shown = await _page(api, path, params)
                fresh = await _fresh(client, shown, flat, fields)
                assert shown == fresh, (path, params)
                assert [list(item) for item in shown] == [list(item) for item in fresh]  # key order
            listed[f"{path} {params}"] = [item["public_id"] for item in shown]
    return listed


async def _library(api: Api) -> dict[str, dict[str, Any]]:
    await api.admin("POST", "metadata_fields", json={"type": "string", "external_id": "f", "label": "F"})
    made = {}
    for n in range(4):
        labels = {"tags": "t,u" if n % 2 else "t", **({"context": f"alt=a{n}"} if n < 3 else {})}
        made[f"rows/{n}"] = await api.upload(f"bytes {n}".encode(), public_id=f"rows/{n}", **labels)
    await api.admin("DELETE", "resources/image/upload", json={"public_ids": ["rows/3"]})  # a placeholder for status=deleted
    return made


@pytest.mark.parametrize("through", ["same app", "other app"])
async def test_a_page_shows_every_change_at_once_on_either_app(
    aiohttp_client: Any, client: TestClient, config: Config, through: str
) -> None:
    other: TestClient = await aiohttp_client(create_app(config))
    writer = Api(client) if through == "same app" else Api(other)
    readers = [Api(client), Api(other)]
    await _library(writer)
    before = await _check_pages(readers, client)
    assert before["resources/image/upload {'max_results': '500'}"] == ["rows/2", "rows/1", "rows/0"]

    await writer.admin("POST", "resources/image/upload/rows/1", data={"tags": "t,v"})
    await _check_pages(readers, client)
    await writer.signed("image/context", context="alt=changed|k=v", public_ids=["rows/0"], command="add")
    await _check_pages(readers, client)
    await writer.admin("POST", "resources/image/upload/rows/2", json={"metadata": "f=set"})
    await _check_pages(readers, client)
    newer = await writer.upload(b"a new version", public_id="rows/0")
    await _check_pages(readers, client)
    await writer.admin("DELETE", "resources/image/upload", json={"public_ids": ["rows/1"]})
    gone = await _check_pages(readers, client)
    assert "rows/1" not in gone["resources/image/upload {'max_results': '500'}"]
    assert "rows/1" in gone["resources/search {'expression': 'status=deleted', 'max_results': 500}"]
    await writer.admin("POST", "resources/image/upload/restore", json={"public_ids": ["rows/1", "rows/3"]})
    back = await _check_pages(readers, client)
    assert back["resources/search {'expression': 'status=deleted', 'max_results': 500}"] == []
    shown = {item["public_id"]: item for item in await _page(Api(other), "resources/image/upload", {"max_results": "500"})}
    assert shown["rows/0"]["version_id"] == newer["version_id"] and shown["rows/0"]["context"]["custom"]["alt"] == "changed"
    assert shown["rows/1"]["tags"] == ["t", "v"]


async def test_a_long_page_rendered_off_the_loop_equals_a_fresh_rendering(api: Api, client: TestClient) -> None:
    """More misses than RENDER_ON_LOOP go to a worker thread; a second read reuses them all."""
    count = RENDER_ON_LOOP + 10
    for n in range(count):
        await api.upload(f"long {n}".encode(), public_id=f"long/{n:03}", tags=f"t{n % 3}", context=f"n={n}")
    held = client.app[RENDERED_ROWS]._entries
    for _ in range(2):
        shown = await _page(api, "resources/image/upload", {"max_results": "500", "prefix": "long/"})
        assert [item["public_id"] for item in shown] == [f"long/{n:03}" for n in range(count)]
        assert shown == await _fresh(client, shown, False, None)
        assert len(held) == count


async def test_the_budget_drops_the_least_recently_used_and_refuses_huge_rows() -> None:
    rows = RenderedRows(max_bytes=8000)
    made: list[tuple[Any, ...]] = []

    def make(page: Sequence[tuple[Any, ...]]) -> list[bytes]:
        made.extend(page)
        return [json.dumps({"n": row[0], "s": row[1]}).encode() for row in page]

    async def render(*keys: int) -> list[Any]:
        page = await rows.render([(k, "x" * 100) for k in keys], None, make)
        return [json.loads(item)["n"] for item in page]

    assert await render(1, 2, 3) == [1, 2, 3]
    assert await render(1, 2, 3) == [1, 2, 3]
    assert len(made) == 3  # the second page reused all three
    await render(*range(4, 40))  # more than the budget holds: the least recently used go
    assert rows._used <= rows.max_bytes
    made.clear()
    assert await render(39, 1) == [39, 1]
    assert made == [(1, "x" * 100)]
    made.clear()
    assert [json.loads(item)["s"] for item in await rows.render([(39, "changed")], None, make)] == ["changed"]
    assert made == [(39, "changed")]  # the same id, a different row: rendered afresh
    await rows.render([(99, "y" * 4000)], None, make)  # over a quarter of the budget: not kept
    assert all(key[1] != 99 for key in rows._entries)
