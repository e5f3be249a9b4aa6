"""Deletion protection (versionstore/protection.py, docs/threat-model.md): the purge delay that
holds irreversible deletions back, and the append-only key pair that can never delete."""

import base64
import re
import time

import aiohttp

from tests.conftest import API_KEY, CLOUD, sign
from tests.test_semantics import blob_files, versions
from versionstore import protection
from versionstore.console.audit import AuditLog
from versionstore.http import append_only
from versionstore.http.keys import META, SERVICE
from versionstore.http.routes import ROUTES, canonical

SNAPS = "versionstore/snapshots"
DAY = 86400.0


async def _actions(meta, **filters) -> list[tuple[str, str, str]]:
    return [(r.actor, r.action, r.outcome) async for r in AuditLog(meta).records(**filters)]


async def _two_versions(api, public_id: str) -> tuple[dict, dict]:
    old = await api.upload(b"old bytes of " + public_id.encode(), public_id=public_id)
    new = await api.upload(b"new bytes of " + public_id.encode(), public_id=public_id)
    return old, new


# --- purge delay -----------------------------------------------------------------------------


async def test_under_a_purge_delay_a_version_deletion_answers_as_today_but_keeps_rows_and_bytes(api, client, config):
    meta, service = client.app[META], client.app[SERVICE]
    await meta.set_protection(CLOUD, purge_delay_days=7)
    old = await api.upload(b"old", public_id="p/a")
    snap = await api.admin("POST", SNAPS, json={})  # lists `old`
    await api.upload(b"new", public_id="p/a")
    before = await versions(api, "p/a")
    files = blob_files(config, "backup")
    body = await api.admin("DELETE", f"resources/backup/{old['asset_id']}", json={"version_ids": [old["version_id"]]})
    # The wire answers exactly as without the delay...
    assert body == {"asset_id": old["asset_id"], "deleted_version_ids": [old["version_id"]]}
    # ...the version is gone from the history, not restorable nor downloadable...
    remaining = [v["version_id"] for v in before if v["version_id"] != old["version_id"]]
    assert [v["version_id"] for v in await versions(api, "p/a")] == remaining
    restored = await api.admin("POST", "resources/image/upload/restore", json={"public_ids": ["p/a"], "versions": [old["version_id"]]})
    assert restored["p/a"]["reason"] == "version_not_found"
    download = sign({"asset_id": old["asset_id"], "version_id": old["version_id"]})
    response = await client.get(f"/v1_1/{CLOUD}/download_backup", params=download)
    assert response.status == 404
    items = (await api.admin("GET", f"{SNAPS}/{snap['id']}/items"))["items"]
    assert items == []  # like an irreversible deletion, it left the snapshot
    # ...but the bytes stay, whatever collection runs.
    cloud = await meta.get_cloud(CLOUD)
    assert await service.collect_orphans(cloud) == 0
    await service.release_revision(CLOUD, (await meta.list_purges(CLOUD, "scheduled", 10))[0].versions[0]["digest"])
    assert blob_files(config, "backup") == files
    listed = await api.admin("GET", "versionstore/purges")
    assert listed["purge_delay_days"] == 7
    [purge] = listed["purges"]
    assert (purge["asset_id"], purge["public_id"], purge["version_ids"], purge["state"]) == (
        old["asset_id"], "p/a", [old["version_id"]], "scheduled")
    assert abs(purge["purge_at"] - purge["scheduled_at"] - 7 * DAY) < 1e-3
    # Undo brings it back exactly as it was, snapshot item included.
    await protection.undo(meta, purge["id"], CLOUD, "staff:admin@example.com")
    assert await versions(api, "p/a") == before
    items = (await api.admin("GET", f"{SNAPS}/{snap['id']}/items"))["items"]
    assert [i["version_id"] for i in items] == [old["version_id"]]
    after = await api.admin("GET", f"{SNAPS}/{snap['id']}")
    assert (after["asset_count"], after["removed_items"]) == (1, 0)
    restored = await api.admin("POST", "resources/image/upload/restore", json={"public_ids": ["p/a"], "versions": [old["version_id"]]})
    assert restored["p/a"]["version_id"] != old["version_id"]
    actions = await _actions(meta, cloud=CLOUD)
    assert (f"api_key:{API_KEY}", "purge_scheduled", "ok") in actions
    assert ("staff:admin@example.com", "purge_undone", "ok") in actions
    assert (await api.admin("GET", "versionstore/purges", params={"state": "undone"}))["purges"][0]["id"] == purge["id"]


async def test_the_purge_job_makes_due_deletions_final_once_and_audits_them(api, client, config):
    meta, service = client.app[META], client.app[SERVICE]
    await meta.set_protection(CLOUD, purge_delay_days=1)
    old, _new = await _two_versions(api, "j/a")
    gone = await api.upload(b"deleted asset", public_id="j/b")
    await api.admin("DELETE", "resources/image/upload", params={"public_ids[]": "j/b"})
    await api.admin("DELETE", f"resources/backup/{old['asset_id']}", json={"version_ids": [old["version_id"]]})
    await api.admin("DELETE", f"resources/backup/{gone['asset_id']}", json={"version_ids": [gone["version_id"]]})
    assert len(blob_files(config, "backup")) == 3
    assert await protection.run_due(service, time.time()) == 0  # not due yet
    assert len(blob_files(config, "backup")) == 3
    assert await protection.run_due(service, time.time() + 2 * DAY) == 2
    assert len(blob_files(config, "backup")) == 1  # final now: only the current version of j/a
    assert await protection.run_due(service, time.time() + 2 * DAY) == 0  # done once
    assert (await api.admin("GET", f"resources/{gone['asset_id']}", expect=404))["error"]["message"]
    [purged, *_] = await meta.list_purges(CLOUD, "purged", 10)
    try:
        await protection.undo(meta, purged.id, CLOUD, "cli")
    except Exception as exc:  # an ApiError: 400
        assert "no longer scheduled" in str(exc)
    else:
        raise AssertionError("a purged deletion cannot be undone")
    actions = await _actions(meta, cloud=CLOUD)
    assert actions.count(("job:purge", "purged", "ok")) == 2
    assert ("cli", "purge_undone", "failed") in actions


async def test_without_a_purge_delay_deletion_is_final_at_once(api, client, config):
    old, _new = await _two_versions(api, "z/a")
    await api.admin("DELETE", f"resources/backup/{old['asset_id']}", json={"version_ids": [old["version_id"]]})
    assert len(blob_files(config, "backup")) == 1
    assert await client.app[META].list_purges(CLOUD, None, 10) == []


async def test_no_api_key_can_change_protection(api, client):
    await client.app[META].set_protection(CLOUD, purge_delay_days=30)
    body = await api.admin("PUT", "versionstore/settings", json={"purge_delay_days": 0}, expect=403)
    assert "operator" in body["error"]["message"]
    await api.admin("PUT", "versionstore/settings", json={"append_only_key": "true"}, expect=403)
    settings = await api.admin("GET", "versionstore/settings")
    assert (settings["purge_delay_days"], settings["append_only_key"], settings["scheduled_purges"]) == (30, False, 0)


# --- append-only key ---------------------------------------------------------------------------


SAMPLES = {"rt": "image", "type": "upload", "asset_id": "ab" * 16, "public_id": "x", "tag": "t", "field": "f",
           "date": "2026-01-01", "job_id": "cd" * 16, "snapshot_id": "ef" * 16, "drill_id": "12" * 16,
           "archive_id": "34" * 16}


def _path(pattern: str) -> str:
    return re.sub(r"\(\?P<(\w+)>[^)]*\)", lambda m: SAMPLES[m[1]], pattern)


def _every_route() -> list[tuple[str, str, str]]:
    """(method, canonical route, a concrete path) of every method of every route."""
    return [(method, canonical(pattern), _path(pattern)) for methods, pattern, _h in ROUTES for method in methods.split("|")]


def test_every_route_and_method_has_an_append_only_policy_and_no_deleting_one_is_allowed():
    table = {f"{method} {route.removeprefix(append_only.PREFIX)}" for method, route, _p in _every_route()}
    assert set(append_only.POLICIES) == table, "classify every route in http/append_only.py (and drop stale ones)"
    for entry, policy in append_only.POLICIES.items():
        if entry.startswith("DELETE ") or "destroy" in entry:
            assert policy == append_only.REFUSE, entry
    assert append_only.policy("DELETE", "/v1_1/{cloud_name}/some/new/route") == append_only.REFUSE  # unlisted: refused


async def _append_key(client) -> tuple[str, str]:
    meta = client.app[META]
    return await protection.issue_append_key(meta, await meta.get_cloud(CLOUD))


def _basic(key: str, secret: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{key}:{secret}".encode()).decode()}


async def test_the_append_only_key_is_refused_on_every_refused_route_and_each_refusal_is_audited(api, client, config):
    key, secret = await _append_key(client)
    kept = await api.upload(b"keep me", public_id="keep")
    refused = [(m, r, p) for m, r, p in _every_route() if append_only.policy(m, r) == append_only.REFUSE]
    assert len(refused) >= 15
    for method, route, path in refused:
        response = await client.request(method, f"/v1_1/{CLOUD}/{path}", headers=_basic(key, secret),
                                        data={"public_id": "keep", "public_ids[]": "keep", "version_ids[]": kept["version_id"]})
        body = await response.json()
        assert response.status == 403, (method, route, body)
        assert "append-only" in body["error"]["message"]
    records = [r async for r in AuditLog(client.app[META]).records(action="append_only_refused")]
    assert len(records) == len(refused) and {r.actor for r in records} == {f"api_key:{key}"}
    assert {r.outcome for r in records} == {"refused"}
    # Nothing changed.
    assert (await api.admin("GET", "resources/image/upload/keep"))["version_id"] == kept["version_id"]


async def _signed_with(client, path: str, key: str, secret: str, **params) -> tuple[int, dict]:
    form = aiohttp.FormData()
    for name, value in {**sign(params, secret), "api_key": key}.items():
        form.add_field(name, value)
    response = await client.post(f"/v1_1/{CLOUD}/{path}", data=form)
    return response.status, await response.json()


async def test_the_append_only_key_uploads_restores_lists_and_downloads_but_never_destroys(api, client):
    key, secret = await _append_key(client)
    first = await api.upload(b"first", public_id="a/one")
    await api.upload(b"second", public_id="a/one")
    status, body = await _signed_with(client, "image/destroy", key, secret, public_id="a/one")
    assert status == 403 and "append-only" in body["error"]["message"]
    # Signed upload with the append-only key: a new version; the old one stays a revision.
    form = aiohttp.FormData()
    for name, value in {**sign({"public_id": "a/one"}, secret), "api_key": key}.items():
        form.add_field(name, value)
    form.add_field("file", b"third", filename="f.bin")
    response = await client.post(f"/v1_1/{CLOUD}/image/upload", data=form)
    assert response.status == 200, await response.json()
    headers = _basic(key, secret)
    response = await client.post(f"/v1_1/{CLOUD}/resources/image/upload/restore", headers=headers,
                                 json={"public_ids": ["a/one"], "versions": [first["version_id"]]})
    assert response.status == 200 and (await response.json())["a/one"]["bytes"] == 5
    response = await client.get(f"/v1_1/{CLOUD}/resources/image", headers=headers)
    assert response.status == 200
    params = {**sign({"asset_id": first["asset_id"], "version_id": first["version_id"]}, secret), "api_key": key}
    response = await client.get(f"/v1_1/{CLOUD}/download_backup", params=params)
    assert response.status == 200 and await response.read() == b"first"
    status, _body = await _signed_with(client, "image/rename", key, secret, from_public_id="a/one", to_public_id="a/two")
    assert status == 200
    status, body = await _signed_with(client, "image/rename", key, secret, from_public_id="a/two", to_public_id="a/x",
                                      overwrite="true")
    assert status == 403 and "overwrite" in body["error"]["message"]
    actors = {r.actor async for r in AuditLog(client.app[META]).records(action="restore")}
    assert actors == {f"api_key:{key}"}


async def test_an_append_only_upload_may_not_replace_a_current_version_nobody_backed_up(api, client):
    key, secret = await _append_key(client)
    unbacked = await api.upload(b"only copy", public_id="u/a", backup="false")

    async def upload(public_id: str, **params) -> tuple[int, dict]:
        form = aiohttp.FormData()
        for name, value in {**sign({"public_id": public_id, **params}, secret), "api_key": key}.items():
            form.add_field(name, value)
        form.add_field("file", b"replacement", filename="f.bin")
        response = await client.post(f"/v1_1/{CLOUD}/image/upload", data=form)
        return response.status, await response.json()

    status, body = await upload("u/a")
    assert status == 403 and "not backed up" in body["error"]["message"]
    assert (await api.admin("GET", "resources/image/upload/u/a"))["version_id"] == unbacked["version_id"]
    status, body = await upload("u/a", overwrite="false")  # answers the existing asset, replaces nothing
    assert status == 200 and body["version_id"] == unbacked["version_id"]
    await api.upload(b"backed", public_id="u/b")
    status, _body = await upload("u/b", backup="false")  # the replaced version is a revision: fine
    assert status == 200
    refusals = await _actions(client.app[META], action="append_only_refused")
    assert refusals == [(f"api_key:{key}", "append_only_refused", "refused")]


async def test_a_point_in_time_restore_that_deletes_is_refused_to_the_append_only_key(api, client):
    key, secret = await _append_key(client)
    await api.upload(b"x", public_id="r/a")
    headers = _basic(key, secret)
    for extra in ({"missing": "delete"}, {"overwrite_unbacked": "true"}):
        response = await client.post(f"/v1_1/{CLOUD}/versionstore/point_in_time_restore", headers=headers,
                                     json={"at": int(time.time()), **extra})
        assert response.status == 403, await response.json()


# --- the operator's CLI ------------------------------------------------------------------------


def test_cli_sets_protection_shows_it_in_status_and_lists_undoes_and_runs_purges(tmp_path, capsys):
    import asyncio
    import json

    from tests.test_snapshots_pitr_model import _put, _service
    from versionstore.cli import main

    data = str(tmp_path)
    assert main(["cloud", "create", "p", "--purge-delay-days", "3", "--append-only-key", "--data-dir", data]) == 0
    out = capsys.readouterr().out
    assert "append-only key (secret shown once): api_key=" in out
    assert main(["cloud", "status", "p", "--data-dir", data]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["auto_backup"] is True and status["target"]
    assert status["protection"] == {"purge_delay_days": 3, "append_only_key": True, "scheduled_purges": 0}
    assert main(["cloud", "set", "p", "--purge-delay-days", "400", "--data-dir", data]) == 2  # bounded
    capsys.readouterr()

    async def delete_a_version() -> str:
        service = await _service(tmp_path)  # environment "m"
        try:
            old = await _put(service, "c/a", 1, True)
            await _put(service, "c/a", 2, True)
            await service.meta.set_protection("m", purge_delay_days=2)
            asset = await service.meta.get_asset("m", "image", "upload", "c/a")
            assert asset is not None
            outcome = await service.delete_versions("m", asset.asset_id, [old], actor="test")
            assert outcome.deleted == [old] and outcome.scheduled_purge is not None
            return outcome.scheduled_purge.id
        finally:
            await service.targets.close()
            await service.primary.close()
            await service.meta.close()

    purge_id = asyncio.run(delete_a_version())
    assert main(["purge", "list", "--cloud", "m", "--data-dir", data]) == 0
    [listed] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert (listed["id"], listed["state"], listed["actor"]) == (purge_id, "scheduled", "test")
    assert main(["cloud", "status", "m", "--data-dir", data]) == 0
    assert json.loads(capsys.readouterr().out)["protection"]["scheduled_purges"] == 1
    assert main(["purge", "undo", purge_id, "--data-dir", data]) == 0
    assert json.loads(capsys.readouterr().out)["state"] == "undone"
    assert main(["purge", "undo", purge_id, "--data-dir", data]) == 2  # once
    assert main(["purge", "run", "--data-dir", data]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1]) == {"purged": 0}
    assert main(["audit", "export", "--data-dir", data]) == 0
    actions = [(r["actor"], r["action"]) for r in map(json.loads, capsys.readouterr().out.splitlines())]
    assert ("cli", "settings") in actions and ("cli", "purge_undone") in actions
