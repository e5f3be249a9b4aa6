"""A listing or search page renders each row straight from its values (render.resource_of_row)
and encodes the page in one pass. Its bytes must be what the renderer of single resources
(render.resource of the decoded asset) gave before, item by item and key by key, on rows of
every kind: tags, context (Admin and Search API forms), metadata, deleted with backup, folders,
unicode public_ids, a detached history (rename with overwrite), a re-upload (created_at
differs from uploaded_at), `fields`; on both backends."""

import json
from typing import Any

import orjson
from aiohttp.test_utils import TestClient

from tests.conftest import BASIC_HEADERS, CLOUD, Api
from versionstore import queries
from versionstore.http import render
from versionstore.http.keys import META
from versionstore.models import ASSET_ROW_COLUMNS, AssetRow

UNICODE = "dossier/été/naïve ☃ \"quoted\" 日本"


async def _library(api: Api) -> None:
    await api.admin("POST", "metadata_fields", json={"type": "string", "external_id": "f", "label": "F"})
    await api.admin("POST", "metadata_fields", json={"type": "integer", "external_id": "n", "label": "N"})
    await api.upload(b"plain", public_id="plain")
    await api.upload(b"tagged", public_id="f1/tagged", tags="zeta,alpha,é")
    await api.upload(b"ctx", public_id="f1/f2/ctx", context="alt=a \"b\"|caption=ü=1", tags="t")
    await api.upload(b"uni", public_id=UNICODE, context="k=☃")
    await api.upload(b"meta", public_id="f1/meta")
    await api.admin("POST", "resources/image/upload/f1/meta", json={"metadata": "f=set|n=12"})
    await api.upload(b"first", public_id="f1/again")
    await api.upload(b"second", public_id="f1/again")  # a re-upload: created_at is the first's
    await api.upload(b"gone", public_id="f3/gone", tags="t")
    await api.admin("DELETE", "resources/image/upload", json={"public_ids": ["f3/gone"]})  # deleted with backup
    await api.upload(b"old name", public_id="n/a")
    await api.upload(b"taken", public_id="n/b")
    await api.signed("image/rename", from_public_id="n/a", to_public_id="n/b", overwrite="1")  # n/b's history detaches


async def _rows(client: TestClient) -> list[AssetRow]:
    meta = client.app[META]
    return [tuple(row) for row in await meta._all(f"SELECT {', '.join(ASSET_ROW_COLUMNS)} FROM assets ORDER BY pk")]


async def test_every_row_renders_as_the_decoded_asset_does(api: Api, client: TestClient) -> None:
    await _library(api)
    rows = await _rows(client)
    meta = client.app[META]
    assert any(row[-1] is not None for row in rows), "a detached history"
    assert any(row[6] == "deleted" for row in rows) and any(row[18] != row[19] for row in rows)
    for row in rows:
        for flat in (False, True):
            fast = render.resource_of_row(row, flat)
            slow = render.resource(meta.asset_of_row(row), flat_context=flat)
            assert render.dumps(fast) == render.dumps(slow), row  # same keys, same order, same values


async def _pages(api: Api, path: str, params: dict[str, Any]) -> list[bytes]:
    """Every page of a listing or search, followed by cursor, as the raw bytes the app sent."""
    bodies, cursor = [], None
    while True:
        step = {**params, **({"next_cursor": cursor} if cursor else {})}
        if path == "resources/search":
            response = await api.client.post(f"/v1_1/{CLOUD}/{path}", json=step, headers=BASIC_HEADERS)
        else:
            response = await api.client.get(f"/v1_1/{CLOUD}/{path}", params=step, headers=BASIC_HEADERS)
        assert response.status == 200, await response.text()
        bodies.append(await response.read())
        cursor = orjson.loads(bodies[-1]).get("next_cursor")
        if not cursor:
            return bodies


def _old_page(meta: Any, rows: list[AssetRow], flat: bool, fields: frozenset[str] | None, cursor: str | None) -> bytes:
    """A page as the renderer before resource_of_row made it: each item decoded into an Asset,
    rendered by render.resource and encoded on its own, then embedded in the page."""
    items = [orjson.Fragment(render.dumps(render.select(render.resource(meta.asset_of_row(r), flat_context=flat), fields)))
             for r in rows]
    return render.dumps({"resources": items, **({"next_cursor": cursor} if cursor else {})})


async def test_pages_are_byte_for_byte_what_the_old_renderer_made(api: Api, client: TestClient) -> None:
    await _library(api)
    meta = client.app[META]
    for params, fields in (({"max_results": "3"}, None), ({"max_results": "500", "fields": "tags,context,metadata"},
                                                          frozenset({"tags", "context", "metadata"}))):
        for walk in range(2):  # the first walk renders, the second reuses the kept items
            bodies = await _pages(api, "resources/image/upload", params)
            query = queries.listing_query("image", "upload", [], None, int(params["max_results"]), by_public_id=False)
            after = None
            for body in bodies:
                found = await meta.find_asset_rows(CLOUD, query.page(query.limit + 1, after))
                shown = found[: query.limit]
                cursor = orjson.loads(body).get("next_cursor")
                assert body == _old_page(meta, shown, False, fields, cursor), (params, walk)
                after = queries.decode_keyset(query, cursor) if cursor else None
    for expression in ("status=deleted", ""):  # placeholders (deleted, detached) and every live asset
        (body,) = await _pages(api, "resources/search", {"expression": expression, "max_results": 500})
        rows = await meta.find_asset_rows(CLOUD, queries.search_query(expression, None, 500).page(501, None))
        assert body.startswith(_old_page(meta, rows, True, None, None)[:-1] + b","), expression  # then total_count, time
        if expression:
            assert [item["public_id"] for item in orjson.loads(body)["resources"]] == ["n/b", "f3/gone"]
    listed = json.loads((await _pages(api, "resources/image/upload", {"max_results": "500"}))[0])["resources"]
    assert {item["public_id"] for item in listed} >= {UNICODE, "f1/tagged", "f1/f2/ctx", "f1/meta", "n/b"}
    assert [item["metadata"] for item in listed if item["public_id"] == "f1/meta"] == [{"f": "set", "n": "12"}]
