"""The metadata repository contract, on both backends (SQLite and a real PostgreSQL).

Every test takes `repo_url` (parametrized by tests/conftest.py's `metadata_url`): the same
calls, the same answers. Two stores opened on one database stand in for two processes.
"""

import asyncio
import inspect
import json
import re
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from versionstore import queries
from versionstore.gateway import IntegrityError, migrations
from versionstore.metadata import AssetChanged, MetadataStore, WriteExpired, count_sql
from versionstore.models import Asset, BackupHealth, Job, SessionState, UploadPart, UploadSession, Version
from versionstore.repository import MetadataRepository

CLOUD = "demo"


@pytest.fixture
def repo_url(tmp_path: Path, metadata_url: str | None) -> str:
    return metadata_url or f"sqlite://{tmp_path / 'metadata.sqlite3'}"


@pytest.fixture
async def repo(repo_url: str) -> AsyncIterator[MetadataStore]:
    store = await MetadataStore.open(repo_url)
    await store.create_cloud(CLOUD, "key", "secret", True)
    yield store
    await store.close()


def asset(public_id: str, n: int = 1, **overrides: Any) -> tuple[Asset, Version]:
    version = Version(f"v-{public_id}-{n}", n, f"digest-{n}", 10 * n, "png", True, None, time.time(), 4, 5, "f.png", "md5")
    values: dict[str, Any] = dict(
        pk=None, cloud=CLOUD, asset_id=f"a-{public_id}", resource_type="image", type="upload", public_id=public_id,
        status="live", digest=version.digest, format="png", bytes=version.bytes, width=4, height=5, version=n,
        version_id=version.version_id, original_filename="f.png", tags=["t"], context={"k": "v"}, created_at=1.5,
        uploaded_at=2.5,
    )
    return Asset(**{**values, **overrides}), version


def next_version(current: Asset, n: int) -> tuple[Asset, Version]:
    new, version = asset(current.public_id, n)
    new.pk, new.asset_id, new.generation = current.pk, current.asset_id, current.generation
    return new, version


def test_the_protocol_lists_every_public_method_of_the_store() -> None:
    """A method added to MetadataStore must be added to the port (views type against it)."""
    public = {n for n, _ in inspect.getmembers(MetadataStore, inspect.isfunction) if not n.startswith("_")}
    port = {n for n, _ in inspect.getmembers(MetadataRepository, inspect.isfunction) if not n.startswith("_")}
    assert public - port == set(), "add these to versionstore/repository.py"
    assert port - public == set()


async def test_environments(repo: MetadataStore, repo_url: str) -> None:
    assert (await repo.get_cloud(CLOUD)).api_key == "key"  # type: ignore[union-attr]
    assert await repo.get_cloud("nope") is None
    await repo.set_auto_backup(CLOUD, False)
    assert (await repo.get_cloud(CLOUD)).auto_backup is False  # type: ignore[union-attr]
    with pytest.raises(IntegrityError):
        await repo.create_cloud("other", "key", "s", True)  # api_key is unique
    other = await MetadataStore.open(repo_url)
    try:  # another process's new environment is found at once (a miss is not cached stale)
        await other.create_cloud("second", "key2", "s", True)
        assert (await repo.get_cloud("second")) is not None
        assert [c.name for c in await repo.list_clouds()] == [CLOUD, "second"]
    finally:
        await other.close()


async def test_assets_and_versions_round_trip(repo: MetadataStore) -> None:
    first, v1 = asset("a/b")
    saved = await repo.save_version(first, v1)
    assert saved.pk is not None and saved.generation == 0
    read = await repo.get_asset(CLOUD, "image", "upload", "a/b")
    assert read == saved
    assert await repo.get_asset_by_id(CLOUD, saved.asset_id) == saved
    second, v2 = next_version(saved, 2)
    second = await repo.save_version(second, v2, pending=True)
    assert second.generation == 1
    assert [v.version_id for v in await repo.versions(saved.pk)] == [v1.version_id, v2.version_id]
    assert await repo.versions_signature(saved.pk) == (2, (await repo.versions_signature(saved.pk))[1])
    found = await repo.version_of(CLOUD, saved.asset_id, v1.version_id)
    assert found is not None and found[0] == "a/b" and found[1] == v1
    assert await repo.backup_bytes(saved.pk) == v1.bytes + v2.bytes
    assert await repo.usage_totals(CLOUD) == (1, v2.bytes, v1.bytes + v2.bytes)
    assert await repo.pending_digests(CLOUD, [v1.digest, v2.digest]) == {v2.digest}
    assert await repo.digest_referenced(CLOUD, v1.digest, backup=True)
    assert not await repo.digest_referenced(CLOUD, v1.digest, backup=False)
    by_name = (queries.SortKey("public_id", False), queries.SortKey("pk", False))
    live = queries.AssetQuery((queries.Filter("status", "=", "live"),), by_name, 10)
    assert [a.public_id for a in await repo.find_assets(CLOUD, live)] == ["a/b"]
    assert await repo.count_assets(CLOUD, live, 100) == 1
    updated = await repo.update_fields(second, tags=["x", "y"])
    assert (await repo.get_asset(CLOUD, "image", "upload", "a/b")).tags == ["x", "y"]  # type: ignore[union-attr]
    with pytest.raises(AssetChanged):
        await repo.update_fields(second, tags=["stale"])
    assert await repo.delete_versions(saved.pk, [v1.version_id, v2.version_id]) == [v1.version_id]  # not the current
    renamed = await repo.rename_asset(updated, "upload", "c/d")
    assert renamed.public_id == "c/d" and await repo.get_asset(CLOUD, "image", "upload", "a/b") is None
    assert await repo.delete_asset(renamed, time.time()) is True  # a revision keeps it as a reservation
    assert (await repo.get_asset(CLOUD, "image", "upload", "c/d")).status == "deleted"  # type: ignore[union-attr]


async def test_a_name_taken_meanwhile_and_a_stale_generation_are_refused(repo: MetadataStore) -> None:
    one, v1 = asset("same")
    await repo.save_version(one, v1)
    twin, v2 = asset("same", 2, asset_id="another")
    with pytest.raises(AssetChanged):
        await repo.save_version(twin, v2)
    current = await repo.get_asset(CLOUD, "image", "upload", "same")
    assert current is not None
    stale, v3 = next_version(current, 3)
    stale.generation -= 1
    with pytest.raises(AssetChanged):
        await repo.save_version(stale, v3)
    assert len(await repo.versions(current.pk)) == 1  # type: ignore[arg-type]


async def test_two_stores_racing_on_one_asset_lose_no_update(repo: MetadataStore, repo_url: str) -> None:
    """Two pools (two processes' view) write from the same read at once: exactly one write
    wins, the others get AssetChanged and wrote nothing (the migration-4 compare-and-set)."""
    base, v1 = asset("race")
    base = await repo.save_version(base, v1)
    other = await MetadataStore.open(repo_url)
    try:
        for round_ in range(3):
            read = await repo.get_asset(CLOUD, "image", "upload", "race")
            assert read is not None

            async def write(store: MetadataStore, n: int, read: Asset = read) -> bool:
                new, version = next_version(read, n)
                try:
                    await store.save_version(new, version)
                except AssetChanged:
                    return False
                return True

            stores = [repo, other] * 4
            wins = await asyncio.gather(*(write(s, 100 * (round_ + 1) + i) for i, s in enumerate(stores)))
            assert sum(wins) == 1, wins
        final = await other.get_asset(CLOUD, "image", "upload", "race")
        assert final is not None and final.generation == 3
        assert len(await other.versions(final.pk)) == 4  # type: ignore[arg-type]
    finally:
        await other.close()


async def test_pending_queue_and_health(repo: MetadataStore) -> None:
    one, v1 = asset("p")
    await repo.save_version(one, v1, pending=True)
    await repo.save_version(*asset("q", 1, asset_id="q"), pending=True)  # same digest queued once
    claimed = await repo.claim_pending(time.time() + 1, 10, "tester", time.time() + 30)
    assert [p.digest for p in claimed] == [v1.digest]
    assert await repo.claim_pending(time.time() + 1, 10, "other", time.time() + 30) == []  # held by its claim
    await repo.release_pending(CLOUD, v1.digest, "tester")
    await repo.reschedule_pending(CLOUD, v1.digest, time.time() + 60, "boom")
    assert await repo.claim_pending(time.time(), 10, "tester", time.time() + 30) == []
    assert (await repo.get_pending(CLOUD, v1.digest)).attempts == 1  # type: ignore[union-attr]
    await repo.retry_pending_now(CLOUD)
    assert (await repo.pending_summary(CLOUD))[:2] == (1, v1.bytes)
    await repo.clear_pending(CLOUD, v1.digest)
    assert await repo.pending_summary(CLOUD) == (0, 0, None)
    for state in ("failing", "healthy"):
        await repo.save_health(BackupHealth(CLOUD, state, None, None, time.time()))
    assert (await repo.get_health(CLOUD)).state == "healthy"  # type: ignore[union-attr]


async def test_jobs(repo: MetadataStore) -> None:
    job = Job("j1", CLOUD, "initial_backup", "pending", params={"a": 1}, created_at=1.0)
    assert await repo.create_job(job) == job
    assert await repo.create_job(Job("j2", CLOUD, "initial_backup", "pending")) is None  # one open job per kind
    job.status, job.progress = "completed", {"done": 3}
    assert await repo.save_job(job) is True
    assert await repo.save_job(job) is False  # final rows stay final
    assert (await repo.get_job(CLOUD, "j1")).progress == {"done": 3}  # type: ignore[union-attr]
    assert await repo.open_jobs() == []
    assert [j.id for j in await repo.list_jobs(CLOUD, "initial_backup", 10)] == ["j1"]


async def test_upload_sessions(repo: MetadataStore) -> None:
    def decide(existing: UploadSession | None, others: int, claimed: int) -> UploadSession:
        now = time.time()
        return existing or UploadSession(CLOUD, "u1", "image", "pid", 20, 20, SessionState.OPEN, now, now)

    session, added, parts = await repo.add_upload_part(CLOUD, "u1", UploadPart(0, 10, "f0"), decide)
    assert added and parts == [UploadPart(0, 10, "f0")]
    _, added, _ = await repo.add_upload_part(CLOUD, "u1", UploadPart(0, 10, "f0"), decide)
    assert not added
    await repo.add_upload_part(CLOUD, "u1", UploadPart(10, 20, "f1"), decide)
    assert await repo.claim_upload_session(CLOUD, "u1", "tok") == [UploadPart(0, 10, "f0"), UploadPart(10, 20, "f1")]
    assert await repo.claim_upload_session(CLOUD, "u1", "other") is None
    assert await repo.renew_upload_claim(CLOUD, "u1", "tok")
    assert sorted(await repo.finish_upload_session(CLOUD, "u1", "tok")) == ["f0", "f1"]
    assert (await repo.get_upload_session(CLOUD, "u1")).state == SessionState.FINISHED  # type: ignore[union-attr]
    assert await repo.expire_upload_sessions(time.time() + 1, 0) == []
    assert await repo.get_upload_session(CLOUD, "u1") is None


async def test_checks_and_field_definitions(repo: MetadataStore) -> None:
    one, v1 = asset("c")
    await repo.save_version(one, v1)
    before = await repo.verify_generation()
    assert await repo.record_checks(CLOUD, v1.digest, {"backup": ("missing", "gone"), "primary": ("ok", None)})
    assert await repo.verify_generation() > before
    assert await repo.bad_revisions(CLOUD, [v1.digest]) == {v1.digest: "missing"}
    assert not await repo.record_checks(CLOUD, v1.digest, {"backup": ("corrupt", "bad")})  # still bad: no flip
    summary = await repo.check_summary(CLOUD)
    assert summary["backup"] == {"corrupt": 1} and summary["primary"] == {"ok": 1}
    await repo.forget_checks(CLOUD, v1.digest)
    assert await repo.bad_revisions(CLOUD, [v1.digest]) == {}
    assert await repo.add_metadata_field(CLOUD, {"external_id": "f1", "label": "x"})
    assert not await repo.add_metadata_field(CLOUD, {"external_id": "f1", "label": "y"})
    assert await repo.add_metadata_field(CLOUD, {"external_id": "f2"})
    assert [f["external_id"] for f in await repo.metadata_fields(CLOUD)] == ["f1", "f2"]
    assert await repo.delete_metadata_field(CLOUD, "f1") and not await repo.delete_metadata_field(CLOUD, "f1")


async def test_initial_backup_queries(repo: MetadataStore) -> None:
    one, v1 = asset("i")
    v1 = Version(**{**v1.__dict__, "backed_up": False})
    saved = await repo.save_version(one, v1)
    assert await repo.unbacked_totals(CLOUD) == (1, v1.bytes)
    [(listed, version_pk, backed_up, job)] = await repo.live_assets_after(CLOUD, 0, 10)
    assert listed.pk == saved.pk and not backed_up and job is None
    assert await repo.mark_backed_up(CLOUD, version_pk, v1, pending=True, job_id="j")
    assert not await repo.mark_backed_up(CLOUD, version_pk, v1, pending=True, job_id="j")
    assert await repo.job_backups("j") == (1, v1.bytes)
    assert await repo.revision_totals(CLOUD) == (1, v1.bytes)
    assert [r[1] for r in await repo.revisions_after(CLOUD, 0, 10)] == [v1.digest]


async def test_several_processes_opening_at_once_apply_each_migration_once(tmp_path: Path, request: pytest.FixtureRequest,
                                                                           metadata_url: str | None) -> None:
    """4 opens of an empty database at once: each block applied by exactly one of them."""
    if metadata_url is None:
        url = f"sqlite://{tmp_path / 'fresh.sqlite3'}"
    else:
        postgres = request.getfixturevalue("postgres")
        name = postgres.new_database(migrated=False)
        request.addfinalizer(lambda: postgres.drop_database(name))
        url = postgres.url(name)
    stores = await asyncio.gather(*(MetadataStore.open(url) for _ in range(4)))
    try:
        applied = [n for s in stores for n in s.applied_migrations]
        assert sorted(applied) == list(range(1, len(migrations()) + 1))
        again = await MetadataStore.open(url)
        assert again.applied_migrations == []
        await again.close()
        await stores[0].create_cloud("x", "k", "s", True)  # the schema works
    finally:
        for store in stores:
            await store.close()


async def test_drill_schedules_alert_state_and_scratch_environments(repo: MetadataStore, repo_url: str) -> None:
    from versionstore.drill_records import DrillScheduleRow

    row = DrillScheduleRow(CLOUD, {"every": "daily", "at": "03:00"}, {"sample_size": 5}, 100.0, None)
    await repo.set_drill_schedule(row)
    assert await repo.get_drill_schedule(CLOUD) == row and await repo.list_drill_schedules() == [row]
    other = await MetadataStore.open(repo_url)  # a second process
    try:
        assert await repo.claim_drill_run(CLOUD, 100.0, 200.0, 101.0)
        assert not await other.claim_drill_run(CLOUD, 100.0, 200.0, 101.0)  # that run is taken
    finally:
        await other.close()
    assert (await repo.get_drill_schedule(CLOUD)) == DrillScheduleRow(CLOUD, row.schedule, row.sample, 200.0, 101.0)
    assert await repo.delete_drill_schedule(CLOUD) and await repo.get_drill_schedule(CLOUD) is None
    await repo.set_alert_url(CLOUD, "https://ops.example/hook")
    assert await repo.get_alert_url(CLOUD) == "https://ops.example/hook"
    await repo.record_outcome(CLOUD, "drill", 10.0, "broken")
    await repo.record_outcome(CLOUD, "drill", 11.0, "still broken")
    [state] = await repo.alert_states(CLOUD)
    assert (state.failing, state.failures, state.last_error, state.last_failure_at, state.last_success_at) == (
        True, 2, "still broken", 11.0, None)
    await repo.record_outcome(CLOUD, "drill", 12.0, None)
    [state] = await repo.alert_states()
    assert (state.failing, state.failures, state.last_error, state.last_success_at) == (False, 2, "still broken", 12.0)
    scratch = f"{CLOUD}.drill-{'a' * 32}"
    await repo.create_cloud(scratch, "scratch-key", "s", True)
    assert [c.name for c in await repo.list_clouds()] == [CLOUD] and await repo.drill_environments() == [scratch]
    saved = await repo.save_version(*asset("x", cloud=scratch))
    assert await repo.environment_assets(scratch, 0, 10) == [(saved.pk, saved.asset_id)]
    assert not await repo.drop_environment(scratch)  # an asset is left
    async with repo.transaction() as db:
        await db.execute("DELETE FROM versions WHERE asset_pk = ?", (saved.pk,))
        await db.execute("DELETE FROM assets WHERE pk = ?", (saved.pk,))
    assert await repo.drop_environment(scratch) and await repo.get_cloud(scratch) is None
    assert await repo.drill_environments() == []


async def test_the_read_path_statements_answer_what_their_parts_do(repo: MetadataStore, repo_url: str) -> None:
    """downloadable and the keyed asset reads (one statement each, issue 11) agree with
    version_of, pending_digests, bad_revisions, the generations and versions_signature."""
    saved = await repo.save_version(*asset("r"))
    second, v2 = next_version(saved, 2)
    await repo.save_version(second, v2, pending=True)
    assert saved.pk is not None
    assert await repo.downloadable(CLOUD, saved.asset_id, "no-such-version") is None
    assert await repo.downloadable("other-cloud", saved.asset_id, saved.version_id) is None
    first = await repo.downloadable(CLOUD, saved.asset_id, saved.version_id)
    assert first is not None and (first.public_id, first.version) == await repo.version_of(CLOUD, saved.asset_id, saved.version_id)
    assert (first.pending, first.bad, first.target_generation) == (False, None, 0)
    pending = await repo.downloadable(CLOUD, saved.asset_id, v2.version_id)
    assert pending is not None and pending.pending and pending.version == v2
    await repo.record_checks(CLOUD, first.version.digest, {"backup": ("corrupt", "flipped bits"), "primary": ("missing", None)})
    await repo.save_health(BackupHealth(CLOUD, "failing", "down", time.time(), time.time()))
    bad = await repo.downloadable(CLOUD, saved.asset_id, saved.version_id)
    assert bad is not None and bad.bad == "corrupt" and bad.target_generation == await repo.generation(f"targets:{CLOUD}") > 0
    key = (*await repo.versions_signature(saved.pk), await repo.revisions_generation(), await repo.verify_generation())
    current = await repo.get_asset(CLOUD, "image", "upload", "r")
    assert await repo.get_asset_keyed(CLOUD, "image", "upload", "r") == (current, key)
    assert await repo.get_asset_by_id_keyed(CLOUD, saved.asset_id) == (current, key)
    assert await repo.get_asset_keyed(CLOUD, "image", "upload", "none") is None
    assert await repo.get_asset_by_id_keyed("other-cloud", saved.asset_id) is None


def test_no_sql_calls_json_each() -> None:
    """PostgreSQL has no `json_each` since its compatibility function was removed (issue 11):
    SQL calling it would run on SQLite and fail on PostgreSQL."""
    package = Path(MetadataStore.__module__.replace(".", "/")).parent
    root = Path(__file__).resolve().parent.parent / package
    sources = [*root.rglob("*.py"), root / "schema.sql"]
    assert len(sources) > 20
    assert [str(p) for p in sources if "json_each(" in p.read_text()] == []


async def test_journal_ids_name_their_rows_and_expired_ones_refuse_the_commit(repo: MetadataStore) -> None:
    """`begin_writes_many` inserts many rows per statement: each id must still name the row of
    its (digest, role, target), in order; `_finish_writes` deletes them in one statement and
    refuses when any lease ran out."""
    roles = [("original", None), ("revision", "b1"), ("pending", None)]
    digests = ["d" * 64, "e" * 64]
    ids = await repo.begin_writes_many("c", digests, roles, "owner", time.time() + 60)
    for digest, row_ids in zip(digests, ids, strict=True):
        for (role, target), write_id in zip(roles, row_ids, strict=True):
            row = await repo._one("SELECT digest, role, target FROM inflight_writes WHERE id = ?", (write_id,))
            assert tuple(row) == (digest, role, target)
    async with repo.transaction() as db:
        await MetadataStore._finish_writes(db, ids[0])
    assert await repo._all("SELECT id FROM inflight_writes WHERE id IN (?, ?, ?)", ids[0]) == []
    expired = (await repo.begin_writes_many("c", ["f" * 64], roles, "owner", time.time() - 1))[0]
    with pytest.raises(WriteExpired):
        async with repo.transaction() as db:
            await MetadataStore._finish_writes(db, [*ids[1], *expired])
    assert len(await repo._all("SELECT id FROM inflight_writes")) == 6  # rolled back: nothing removed


# --- the tag index's status (schema migration 19) ---------------------------------------------


async def tag_rows_out_of_step(repo: MetadataStore) -> set[tuple[Any, ...]]:
    """The difference between asset_tags and what the asset rows say it holds: a row per tag
    of each asset, with its environment, creation time and `live` as its status. Empty after
    every write, whatever the write."""
    assets = await repo._all("SELECT pk, cloud, tags, status, created_at FROM assets", ())
    wanted = {(pk, cloud, tag, int(status == "live"), created) for pk, cloud, tags, status, created in assets for tag in json.loads(tags)}
    held = {tuple(r) for r in await repo._all("SELECT asset_pk, cloud, tag, live, created_at FROM asset_tags", ())}
    return wanted ^ held


async def test_the_tag_index_follows_the_asset_status_through_every_write(repo: MetadataStore) -> None:
    tagged = await repo.save_version(*asset("g/a", tags=["x", "y"]))  # new
    assert await tag_rows_out_of_step(repo) == set()
    again, v2 = next_version(tagged, 2)
    tagged = await repo.save_version(replace(again, tags=["x"]), v2)  # a new version
    tagged = await repo.update_fields(tagged, tags=["x", "z"])  # tags only
    batch = [(asset(f"g/b{i}", tags=["x"])[0], asset(f"g/b{i}")[1], False) for i in range(3)]
    await repo.save_versions(batch)  # a batched import
    assert await tag_rows_out_of_step(repo) == set()
    assert await repo.delete_asset(tagged, time.time()) is True  # kept as a reservation: not live
    assert await tag_rows_out_of_step(repo) == set()
    reserved = await repo.get_asset(CLOUD, "image", "upload", "g/a")
    assert reserved is not None and reserved.status == "deleted"
    restored, v3 = next_version(reserved, 3)
    restored = await repo.save_version(replace(restored, tags=reserved.tags), v3)  # a restore: live again
    assert await tag_rows_out_of_step(repo) == set()
    holder = await repo.save_version(*asset("g/holder", tags=["x"]))
    mover = await repo.get_asset(CLOUD, "image", "upload", "g/b0")
    assert mover is not None
    await repo.rename_asset(mover, "upload", "g/holder", replacing=holder, now=time.time())  # detaches the holder
    assert await tag_rows_out_of_step(repo) == set()
    detached = await repo.get_asset_by_id(CLOUD, holder.asset_id)
    assert detached is not None and detached.status == "deleted"
    assert await repo.delete_versions(detached.pk or 0, [v.version_id for v in await repo.versions(detached.pk or 0)])
    assert await repo.get_asset_by_id(CLOUD, holder.asset_id) is None  # irreversible: the row and its tags go
    unsaved, v4 = asset("g/c", tags=["x"])
    forgotten = await repo.save_version(unsaved, replace(v4, backed_up=False))
    assert await repo.delete_asset(forgotten, time.time()) is False  # nothing backed up: the row goes
    assert await tag_rows_out_of_step(repo) == set()

    def search(expression: str) -> queries.AssetQuery:
        return queries.search_query(expression, None, 50)

    live, deleted = search("tags=x"), search("tags=x AND status=deleted")
    assert sorted(a.public_id for a in await repo.find_assets(CLOUD, live)) == ["g/a", "g/b1", "g/b2", "g/holder"]
    assert await repo.count_assets(CLOUD, live, 100) == 4
    await repo.delete_asset(restored, time.time())
    assert await repo.count_assets(CLOUD, live, 100) == 3 and await repo.count_assets(CLOUD, deleted, 100) == 1
    assert [a.public_id for a in await repo.find_assets(CLOUD, deleted)] == ["g/a"]
    assert await tag_rows_out_of_step(repo) == set()


async def test_backfilled_tag_rows_carry_the_asset_status(repo: MetadataStore) -> None:
    """Rows written by the backfill of assets from before the side tables (schema migration 9)."""
    kept = await repo.save_version(*asset("h/a", tags=["x"]))
    await repo.save_version(*asset("h/b", tags=["x"]))
    await repo.delete_asset(kept, time.time())
    async with repo.transaction() as db:
        await db.execute("DELETE FROM asset_tags", ())
        await db.execute("INSERT INTO label_backfill (after_pk) VALUES (0)", ())
    await repo.backfill_labels(batch=1)
    assert await tag_rows_out_of_step(repo) == set()
    assert await repo.count_assets(CLOUD, queries.search_query("tags=x", None, 50), 100) == 1


async def test_a_tag_search_counts_from_the_tag_index_alone(repo: MetadataStore, repo_url: str) -> None:
    """The bounded count of `tags=x` (live or deleted) reads no asset row per match: its plan
    names the tag index only, on both backends (docs/design.md, "Tag index")."""
    for expression in ("tags=x", "tags=x AND status=deleted", "tags=x AND created_at>1"):
        sql, args = count_sql(CLOUD, queries.search_query(expression, None, 50), queries.COUNT_CEILING + 1)
        explain = "EXPLAIN " if repo_url.startswith("postgresql") else "EXPLAIN QUERY PLAN "
        plan = " ".join(str(value) for row in await repo._all(explain + sql, tuple(args)) for value in row)
        assert "asset_tags" in plan and not re.search(r"\bassets\b|\bassets_\w+|\bSEARCH a\b", plan), (expression, plan)


async def test_processes_opening_a_new_sqlite_file_at_once_never_see_it_locked(tmp_path: Path) -> None:
    """Switching a new file to WAL can answer "database is locked" at once, without the busy
    timeout, while another opener holds it (3 of 40 rounds of 4 opens failed before the retry)."""
    for round_ in range(25):
        url = f"sqlite://{tmp_path / f'fresh{round_}.sqlite3'}"
        stores = await asyncio.gather(*(MetadataStore.open(url) for _ in range(4)))
        for store in stores:
            await store.close()
