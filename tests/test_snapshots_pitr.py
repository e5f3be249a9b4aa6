"""Point-in-time restore over HTTP: the dry-run diff, the real run as a job (idempotent),
from a snapshot, into another environment."""

import asyncio
import time
from pathlib import Path

import pytest

from tests.conftest import CLOUD
from versionstore.config import Config
from versionstore.http.keys import META

PITR = "versionstore/point_in_time_restore"


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return Config(data_dir=tmp_path / "data", max_upload_bytes=64 << 20, poll_interval=0.05)


async def history(api) -> tuple[float, dict[str, dict]]:
    made = {
        "a": await api.upload(b"a-old", public_id="lib/a"),
        "b": await api.upload(b"b-same", public_id="lib/b"),
        "d": await api.upload(b"d-deleted-later", public_id="lib/d"),
        "e": await api.upload(b"e-unbacked", public_id="lib/e", backup="false"),
        "f": await api.upload(b"f-deleted-before", public_id="lib/f"),
        "x": await api.upload(b"outside", public_id="elsewhere/x"),
    }
    await api.admin("DELETE", "resources/image/upload", params={"public_ids[]": "lib/f"})
    at = time.time()
    await api.upload(b"a-new", public_id="lib/a")
    await api.upload(b"e-new", public_id="lib/e")
    await api.admin("DELETE", "resources/image/upload", params={"public_ids[]": "lib/d"})
    made["c"] = await api.upload(b"c-created-after", public_id="lib/c")
    await api.upload(b"outside-new", public_id="elsewhere/x")
    return at, made


def ids(entries: list[dict]) -> set[str]:
    return {e["public_id"] for e in entries}


async def wait_for(api, job_id: str) -> dict:
    for _ in range(400):
        job = await api.admin("GET", f"versionstore/jobs/{job_id}")
        if job["status"] not in ("pending", "active"):
            return job
        await asyncio.sleep(0.05)
    raise AssertionError("job did not finish")


async def test_dry_run_diff_at_a_time_then_the_real_run_is_idempotent(api):
    at, made = await history(api)
    diff = await api.admin("POST", f"{PITR}/preview", json={"at": at, "prefix": "lib/"})
    assert diff["counts"] == {"restore": 2, "did_not_exist": 1, "unchanged": 1, "unrecoverable": 1}
    restore = {e["public_id"]: e for e in diff["restore"]}
    assert restore["lib/a"]["to_version"] == made["a"]["version_id"] and restore["lib/a"]["from_version"] is not None
    assert restore["lib/d"]["to_version"] == made["d"]["version_id"] and restore["lib/d"]["from_version"] is None
    assert ids(diff["did_not_exist"]) == {"lib/c"} and ids(diff["unchanged"]) == {"lib/b"}
    assert diff["unrecoverable"] == [{"asset_id": made["e"]["asset_id"], "resource_type": "image", "type": "upload",
                                      "public_id": "lib/e", "version_id": made["e"]["version_id"], "reason": "not_backed_up"}]
    # an ISO time means the same
    iso = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(at)) + f".{int(at % 1 * 1e6):06d}Z"
    assert (await api.admin("POST", f"{PITR}/preview", json={"at": iso, "prefix": "lib/"}))["counts"] == diff["counts"]

    job = await api.admin("POST", PITR, json={"at": at, "prefix": "lib/"})
    done = await wait_for(api, job["id"])
    assert done["status"] == "completed", done
    assert (done["progress"]["restored"], done["progress"]["did_not_exist"], done["progress"]["failed"]) == (2, 1, 1)
    a = await api.admin("GET", "resources/image/upload/lib/a", params={"versions": "true"})
    assert a["versions"][-1]["restored_from"] == made["a"]["version_id"] and a["bytes"] == len(b"a-old")
    d = await api.admin("GET", "resources/image/upload/lib/d")
    assert d["bytes"] == len(b"d-deleted-later") and d.get("placeholder") is not True
    await api.admin("GET", "resources/image/upload/lib/c")  # left alone (missing=leave)
    again = await api.admin("POST", f"{PITR}/preview", json={"at": at, "prefix": "lib/"})
    assert again["counts"]["restore"] == 0 and again["counts"]["unchanged"] == 3
    second = await wait_for(api, (await api.admin("POST", PITR, json={"at": at, "prefix": "lib/"}))["id"])
    assert second["progress"]["restored"] == 0 and second["progress"]["unchanged"] == 3
    x = await api.admin("GET", "resources/image/upload/elsewhere/x")
    assert x["bytes"] == len(b"outside-new")  # outside the prefix: untouched


async def test_missing_delete_removes_recoverably_and_a_snapshot_is_a_source(api):
    await api.upload(b"one", public_id="s/one")
    snap = await api.admin("POST", "versionstore/snapshots", json={"prefix": "s/"})
    await api.upload(b"one-changed", public_id="s/one")
    await api.upload(b"two", public_id="s/two")
    diff = await api.admin("POST", f"{PITR}/preview", json={"snapshot_id": snap["id"]})
    assert diff["counts"] == {"restore": 1, "did_not_exist": 1, "unchanged": 0, "unrecoverable": 0}
    done = await wait_for(api, (await api.admin("POST", PITR, json={"snapshot_id": snap["id"], "missing": "delete"}))["id"])
    assert done["progress"]["deleted"] == 1 and done["progress"]["restored"] == 1
    two = await api.admin("GET", "resources/image/upload/s/two")
    assert two["placeholder"] is True  # a reservation: its history is restorable
    assert (await api.admin("GET", "resources/image/upload/s/one"))["bytes"] == 3


async def test_restore_into_another_environment_records_the_source(api, client):
    await client.app[META].create_cloud("stage", "k2", "s2", auto_backup=True)
    at, made = await history(api)
    body = {"at": at, "prefix": "lib/", "target_cloud": "stage"}
    refused = await api.admin("POST", f"{PITR}/preview", json=body, expect=401)
    assert "target_api_key" in refused["error"]["message"]
    body.update(target_api_key="k2", target_api_secret="s2")
    diff = await api.admin("POST", f"{PITR}/preview", json=body)
    # nothing of lib/ exists in stage: everything that existed at T and is recoverable is restored
    assert ids(diff["restore"]) == {"lib/a", "lib/b", "lib/d"} and ids(diff["unrecoverable"]) == {"lib/e"}
    done = await wait_for(api, (await api.admin("POST", PITR, json=body))["id"])
    assert done["status"] == "completed" and done["progress"]["restored"] == 3, done
    import base64

    headers = {"Authorization": "Basic " + base64.b64encode(b"k2:s2").decode()}
    response = await client.get("/v1_1/stage/resources/image/upload/lib/a", params={"versions": "true"}, headers=headers)
    a = await response.json()
    assert a["bytes"] == len(b"a-old")
    assert a["versions"][-1]["restored_from"] == f"{CLOUD}/{made['a']['asset_id']}/{made['a']['version_id']}"
    # the source is untouched
    assert (await api.admin("GET", "resources/image/upload/lib/a"))["bytes"] == len(b"a-new")


async def test_bad_selections_are_refused(api):
    await api.admin("POST", f"{PITR}/preview", json={}, expect=400)
    await api.admin("POST", f"{PITR}/preview", json={"at": 1, "snapshot_id": "0" * 32}, expect=400)
    await api.admin("POST", f"{PITR}/preview", json={"at": "yesterday"}, expect=400)
    await api.admin("POST", f"{PITR}/preview", json={"snapshot_id": "0" * 32}, expect=404)
    await api.admin("POST", PITR, json={"at": 1, "missing": "explode"}, expect=400)
    await api.admin("POST", PITR, json={"at": 1, "notification_url": "ftp://x"}, expect=400)
    await api.admin("POST", f"{PITR}/preview", json={"at": 1, "target_cloud": "nope"}, expect=404)
