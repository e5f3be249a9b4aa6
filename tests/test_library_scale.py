"""Request cost independent of library size (issue 10): the hot queries are index ranges (their
plans are pinned here), pages continue from keyset positions that stay right while the library
changes between pages, and tags/context are matched through side tables kept in step with the
asset rows. scripts/bench_library_size.py measures the same at 10k-1M assets."""

import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Api
from tests.test_metadata_contract import tag_rows_out_of_step
from versionstore import metadata, queries
from versionstore.http.keys import META
from versionstore.ids import new_hex_id
from versionstore.models import Asset, Version
from versionstore.queries import Filter

PLAN_CLOUD = "demo"


@pytest.fixture
async def plans(tmp_path: Path) -> Any:
    """EXPLAIN QUERY PLAN of a statement on a real, migrated store."""
    store = await metadata.MetadataStore.open(tmp_path / "metadata.sqlite3")
    db = sqlite3.connect(tmp_path / "metadata.sqlite3")

    def plan(sql: str, args: list[Any]) -> list[str]:
        return [row[3] for row in db.execute("EXPLAIN QUERY PLAN " + sql, args)]

    yield plan
    db.close()
    await store.close()


def _slow(steps: list[str], *, sorts_few: bool = False) -> list[str]:
    """Plan steps whose cost grows with the library: a full scan of a table, or a sort of
    every row of an index walk (unless the rows sorted are the few a by-name query picked)."""
    return [s for s in steps if s.startswith("SCAN a") or s.startswith("SCAN assets") or s.startswith("SCAN versions")
            or ("TEMP B-TREE" in s and not sorts_few)]


HOT = {
    "search tags": queries.search_query("tags=xyz", None, 50),
    "search live by created_at": queries.search_query("", "created_at", 50),
    "search prefix by public_id": queries.search_query("public_id=f1/*", [{"public_id": "asc"}], 50),
    "search deleted by created_at": queries.search_query("status=deleted", [{"created_at": "desc"}], 50),
    "search by uploaded_at": queries.search_query("resource_type=image", [{"uploaded_at": "desc"}], 50),
    "search by bytes": queries.search_query("bytes>10", [{"bytes": "asc"}], 50),
    "search by asset_id": queries.search_query("", [{"asset_id": "asc"}], 50),
    "search default order": queries.search_query("format=jpg", None, 50),
    "listing": queries.listing_query("image", "upload", [], None, 500, by_public_id=False),
    "listing of a resource type": queries.listing_query("image", None, [], "asc", 500, by_public_id=False),
    "listing by prefix": queries.listing_query("image", "upload", [Filter("public_id", "prefix", "a/")], None, 500, by_public_id=True),
    "listing by tag": queries.listing_query("image", None, [Filter("tag", "=", "x")], None, 500, by_public_id=False),
    "listing by public_ids": queries.listing_query("image", "upload", [Filter("public_id", "in", ("a", "b"))], None, 10,
                                                   by_public_id=False),
    "by asset_ids": queries.by_asset_ids(["a" * 32, "b" * 32]),
}


def _position(query: queries.AssetQuery) -> tuple[Any, ...]:
    return tuple({str: "x", int: 7, float: 1.5}[queries.SORT_FIELDS[key.field]] for key in query.sort)


@pytest.mark.parametrize("name", list(HOT))
async def test_hot_queries_are_index_ranges(plans: Any, name: str) -> None:
    query = HOT[name]
    by_name = name in ("listing by public_ids", "by asset_ids")  # at most 100 rows, found by a unique index
    for page in (query, query.page(query.limit, _position(query))):
        steps = plans(*metadata.select_sql(PLAN_CLOUD, page))
        assert not _slow(steps, sorts_few=by_name), (name, steps)
        assert any("INDEX" in s or "PRIMARY KEY" in s for s in steps), (name, steps)
    count = plans(*metadata.count_sql(PLAN_CLOUD, query, queries.COUNT_CEILING + 1))
    assert not [s for s in _slow(count) if "SCAN matches" not in s], (name, count)


@pytest.mark.parametrize(
    "sql",
    [
        # digest_referenced, on every re-upload, destroy and restore: an index probe.
        "SELECT 1 FROM assets WHERE cloud = ? AND digest = ? AND status = 'live' LIMIT 1",
        "SELECT 1 FROM versions WHERE cloud = ? AND digest = ? AND backed_up = 1 LIMIT 1",
    ],
)
async def test_digest_reference_checks_are_index_probes(plans: Any, sql: str) -> None:
    steps = plans(sql, ["demo", "0" * 64])
    assert len(steps) == 1 and "COVERING INDEX" in steps[0], steps


async def _walk(api: Api, path: str, method: str, params: dict[str, Any], between: Any) -> list[str]:
    seen: list[str] = []
    cursor = None
    for page_number in range(100):
        args = {**params, **({"next_cursor": cursor} if cursor else {})}
        body = await (api.admin(method, path, json=args) if method == "POST" else api.admin(method, path, params=args))
        seen.extend(r["public_id"] for r in body["resources"])
        cursor = body.get("next_cursor")
        if not cursor:
            return seen
        await between(page_number, seen)
    raise AssertionError("no last page")


@pytest.mark.parametrize(
    ("path", "method", "params"),
    [
        ("resources/image/upload", "GET", {"max_results": "2"}),
        ("resources/image", "GET", {"max_results": "2", "prefix": "k/"}),
        ("resources/image/tags/walk", "GET", {"max_results": "2"}),
        ("resources/search", "POST", {"max_results": 2, "expression": "tags=walk", "sort_by": [{"created_at": "desc"}]}),
        ("resources/search", "POST", {"max_results": 2, "expression": "public_id=k/*", "sort_by": [{"public_id": "asc"}]}),
    ],
)
async def test_cursors_stay_right_when_assets_come_and_go_between_pages(
    api: Api, path: str, method: str, params: dict[str, Any]
) -> None:
    """Every asset there from the first page to the last is listed exactly once, whatever was
    added or deleted between pages (offset cursors skipped one per deletion before)."""
    names = [f"k/{i:02d}" for i in range(9)]
    for name in names:
        await api.upload(name.encode(), public_id=name, tags="walk")

    async def churn(page_number: int, seen: list[str]) -> None:
        await api.admin("DELETE", "resources/image/upload", json={"public_ids": [seen[0]]})  # already listed
        await api.upload(b"new", public_id=f"k/new{page_number}", tags="walk")  # a newcomer, anywhere

    seen = await _walk(api, path, method, params, churn)
    assert len(seen) == len(set(seen)), seen
    assert set(names) <= set(seen), sorted(set(names) - set(seen))


async def test_a_cursor_belongs_to_its_query(api: Api) -> None:
    for i in range(3):
        await api.upload(bytes([i]), public_id=f"c/{i}", tags="t")
    first = await api.admin("GET", "resources/image/upload", params={"max_results": "1"})
    cursor = first["next_cursor"]
    # the same query with another page size continues; another query or order is refused
    assert (await api.admin("GET", "resources/image/upload", params={"max_results": "5", "next_cursor": cursor}))["resources"]
    for path, params in [
        ("resources/image/upload", {"next_cursor": cursor, "direction": "asc"}),
        ("resources/image", {"next_cursor": cursor, "prefix": "c/"}),
        ("resources/image/tags/t", {"next_cursor": cursor}),
    ]:
        body = await api.admin("GET", path, expect=400, params=params)
        assert body["error"]["message"] == "Invalid next_cursor"
    found = await api.admin("POST", "resources/search", json={"expression": "tags=t", "max_results": 1})
    await api.admin("POST", "resources/search", expect=400, json={"expression": "tags=u", "next_cursor": found["next_cursor"]})
    forged = queries.encode_keyset(HOT["listing"].page(10, None), ("not a number", 1))
    await api.admin("GET", "resources/image/upload", expect=400, params={"next_cursor": forged})


async def test_total_count_is_exact_up_to_the_ceiling(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    for i in range(4):
        await api.upload(bytes([i]), public_id=f"n/{i}")
    exact = await api.admin("POST", "resources/search", json={"expression": "public_id=n/*"})
    assert exact["total_count"] == 4 and exact["total_count_exact"] is True
    monkeypatch.setattr(queries, "COUNT_CEILING", 3)
    capped = await api.admin("POST", "resources/search", json={"expression": "public_id=n/*", "max_results": 1})
    assert capped["total_count"] == 3 and capped["total_count_exact"] is False
    assert len(capped["resources"]) == 1 and capped["next_cursor"]


async def test_tag_and_context_side_rows_follow_every_write(api: Api) -> None:
    await api.upload(b"a", public_id="s/a", tags="red,blue", context="k=v|x=1")
    await api.upload(b"b", public_id="s/b", tags="blue")

    async def tagged(tag: str) -> list[str]:
        body = await api.admin("GET", f"resources/image/tags/{tag}")
        return sorted(r["public_id"] for r in body["resources"])

    async def with_context(**params: str) -> list[str]:
        body = await api.admin("GET", "resources/image/context", params=params)
        return sorted(r["public_id"] for r in body["resources"])

    assert await tagged("blue") == ["s/a", "s/b"] and await tagged("red") == ["s/a"]
    assert await with_context(key="k") == ["s/a"] and await with_context(key="k", value="v") == ["s/a"]
    assert await with_context(key="k", value="w") == []
    await api.admin("POST", "resources/image/upload/s/a", data={"tags": "green", "context": "k=w"})
    assert await tagged("red") == [] and await tagged("green") == ["s/a"] and await tagged("blue") == ["s/b"]
    assert await with_context(key="k", value="w") == ["s/a"] and await with_context(key="x") == []
    await api.upload(b"b2", public_id="s/b", overwrite="true", tags="red")  # a new version with new tags
    assert await tagged("blue") == [] and await tagged("red") == ["s/b"]
    await api.admin("DELETE", "resources/image/upload", json={"public_ids": ["s/b"]})
    assert await tagged("red") == []
    search = await api.admin("POST", "resources/search", json={"expression": "status=deleted AND tags=red"})
    assert [r["public_id"] for r in search["resources"]] == ["s/b"]  # kept as a reservation, with its tags
    assert (await api.admin("GET", "tags/image"))["tags"] == ["green"]  # of live assets only
    assert (await api.admin("GET", "tags/image", params={"prefix": "gr"}))["tags"] == ["green"]


async def test_tags_list_pages_by_keyset(api: Api) -> None:
    await api.upload(b"1", public_id="t/1", tags="a1,b1,b2,c1")
    await api.upload(b"2", public_id="t/2", tags="b2,b3", rt="raw")
    first = await api.admin("GET", "tags/image", params={"max_results": "2"})
    assert first["tags"] == ["a1", "b1"]
    second = await api.admin("GET", "tags/image", params={"max_results": "2", "next_cursor": first["next_cursor"]})
    assert second["tags"] == ["b2", "c1"] and "next_cursor" not in second
    assert (await api.admin("GET", "tags/image", params={"prefix": "b"}))["tags"] == ["b1", "b2"]
    assert (await api.admin("GET", "tags/raw", params={"prefix": "b"}))["tags"] == ["b2", "b3"]


async def test_rows_from_before_the_side_tables_are_backfilled(tmp_path: Path) -> None:
    """An installation upgraded to schema migration 9 gets the side rows of its existing assets
    at the next start, resumably (the position commits with each batch)."""
    path = tmp_path / "metadata.sqlite3"
    store = await metadata.MetadataStore.open(path)
    await store.create_cloud("demo", "k", "s", auto_backup=True)
    for i in range(7):
        now = time.time()
        version = Version(new_hex_id(), int(now), f"{i:064x}", 1, "jpg", True, None, now)
        asset = Asset(None, "demo", new_hex_id(), "image", "upload", f"b/{i}", "live", version.digest, "jpg", 1, None, None,
                      version.version, version.version_id, None, tags=[f"t{i % 2}"], context={"k": str(i)}, created_at=now,
                      uploaded_at=now)
        await store.save_version(asset, version)
    await store.close()
    db = sqlite3.connect(path)
    db.execute("DELETE FROM asset_tags")
    db.execute("DELETE FROM asset_context")
    db.execute("INSERT INTO label_backfill (after_pk) VALUES (0)")
    db.commit()
    db.close()
    store = await metadata.MetadataStore.open(path)
    try:
        await store.backfill_labels(batch=2)  # already done at open: a no-op now
        tagged = await store.find_assets("demo", queries.search_query("tags=t1", [{"public_id": "asc"}], 10))
        assert [a.public_id for a in tagged] == ["b/1", "b/3", "b/5"]
        found = await store.find_assets("demo", queries.listing_query("image", None, [Filter("context", "=", ("k", "4"))], None, 10,
                                                                      by_public_id=False))
        assert [a.public_id for a in found] == ["b/4"]
        assert (await store._one("SELECT COUNT(*) FROM label_backfill"))[0] == 0
    finally:
        await store.close()


async def test_a_tag_search_sees_each_write_of_the_asset_status(api: Api, client: Any) -> None:
    """The tag index's `live` (schema migration 19) after each kind of write the service makes
    (upload, re-upload, tags, destroy, restore, rename with overwrite, irreversible deletion):
    what `tags=x` and `status=deleted AND tags=x` find and count follows the asset rows."""
    meta = client.app[META]

    async def found(expression: str) -> tuple[list[str], int]:
        body = await api.admin("POST", "resources/search", json={"expression": expression})
        assert not await tag_rows_out_of_step(meta)
        return sorted(r["public_id"] for r in body["resources"]), body["total_count"]

    await api.upload(b"1", public_id="w/a", tags="x")
    await api.upload(b"2", public_id="w/b", tags="y")
    await api.upload(b"2b", public_id="w/b", overwrite="true", tags="y")
    assert await found("tags=x") == (["w/a"], 1)
    await api.signed("image/tags", tag="x", public_ids=["w/b"], command="add")
    assert await found("tags=x") == (["w/a", "w/b"], 2)
    await api.admin("DELETE", "resources/image/upload", json={"public_ids": ["w/a"]})
    assert await found("tags=x") == (["w/b"], 1) and await found("status=deleted AND tags=x") == (["w/a"], 1)
    await api.admin("POST", "resources/image/upload/restore", json={"public_ids": ["w/a"]})
    assert await found("tags=x") == (["w/a", "w/b"], 2) and await found("status=deleted AND tags=x") == ([], 0)
    await api.signed("image/rename", from_public_id="w/a", to_public_id="w/b", overwrite="1")  # w/b's history detached
    assert await found("tags=x") == (["w/b"], 1) and await found("status=deleted AND tags=x") == (["w/b"], 1)
    detached = await api.admin("POST", "resources/search", json={"expression": "status=deleted AND tags=x"})
    gone = detached["resources"][0]
    versions = await api.admin("GET", f"resources/{gone['asset_id']}", params={"versions": "true"})
    await api.admin("DELETE", f"resources/backup/{gone['asset_id']}", json={"version_ids": [v["version_id"] for v in versions["versions"]]})
    assert await found("status=deleted AND tags=x") == ([], 0)
    await api.admin("POST", "resources/image/upload/w/b", data={"tags": "z"})
    assert await found("tags=x") == ([], 0) and await found("tags=z") == (["w/b"], 1)


async def test_the_tag_index_status_migration_marks_the_tags_of_deleted_assets(tmp_path: Path) -> None:
    """A database from before schema migration 19: tag rows of a reserved (deleted) asset get
    `live` 0, the others 1, so a tag search stops counting the deleted one."""
    blocks = metadata._migrations()
    ours = next(n for n, block in enumerate(blocks) if "ADD COLUMN live" in block)
    path = tmp_path / "metadata.sqlite3"
    db = sqlite3.connect(path)
    for block in blocks[:ours]:
        db.executescript(block)
    db.execute(f"PRAGMA user_version = {ours}")
    db.execute("DELETE FROM label_backfill")
    db.execute("INSERT INTO clouds (name, api_key, api_secret, created_at) VALUES ('demo', 'k', 's', 0)")
    for pk, status in ((1, "live"), (2, "deleted")):
        db.execute(
            "INSERT INTO assets (pk, cloud, asset_id, resource_type, type, public_id, status, digest, format, bytes, "
            "version, version_id, tags, created_at, uploaded_at) "
            "VALUES (?, 'demo', ?, 'image', 'upload', ?, ?, 'd', 'png', 1, 1, ?, '[\"x\"]', 0, 0)",
            (pk, f"a{pk}", f"m/{pk}", status, f"v{pk}"),
        )
        db.execute("INSERT INTO asset_tags (cloud, tag, asset_pk, created_at) VALUES ('demo', 'x', ?, 0)", (pk,))
    db.commit()
    db.close()
    store = await metadata.MetadataStore.open(path)
    try:
        assert await tag_rows_out_of_step(store) == set()
        assert await store.count_assets("demo", queries.search_query("tags=x", None, 10), 100) == 1
        assert await store.count_assets("demo", queries.search_query("tags=x AND status=deleted", None, 10), 100) == 1
    finally:
        await store.close()
