"""Restore drills and failure alerts over the real app: sample, restore into a scratch
environment, verify every byte, clean up; damaged backups, failed snapshots and retention runs
raise the alarm (log, counter, state, audit, console, a POST to a real local receiver)."""

import asyncio
import json
import logging
import os
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from tests.conftest import BASIC_HEADERS, CLOUD, Api
from tests.test_console import add_staff, sign_in
from versionstore import drills, layout, pitr, retention
from versionstore.config import Config
from versionstore.console.audit import AuditLog
from versionstore.http.keys import ALERTS, JOBS, META, SERVICE
from versionstore.models import Job
from versionstore.snapshot_records import ScheduleRow
from versionstore.snapshots import Snapshots
from versionstore.spool import Hashes

#: Scheduled runs are simulated in 2030: the server's own schedule loops (real clock) never
#: find them due.
START = datetime(2030, 1, 1, tzinfo=UTC).timestamp()
HOUR, DAY = 3600.0, 86400.0


@pytest.fixture
def config(tmp_path: Path, metadata_url: str | None) -> Config:
    # The receiver listens on loopback, which the egress policy denies by default. The job
    # runner is woken by the API calls that queue work; tests that call the domain directly
    # run the drill themselves, so a long poll keeps the runner out of their way.
    return Config(data_dir=tmp_path / "data", max_upload_bytes=64 << 20, poll_interval=3600.0, fetch_allow=("127.0.0.1",),
                  metadata_url=metadata_url)


def digest_of(data: bytes) -> str:
    hashes = Hashes()
    hashes.update_blake3(data)
    return hashes.blake3


class Receiver:
    """A real HTTP endpoint that records the alerts POSTed to it."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.received.append(json.loads(await request.text()))
        return web.Response(text="ok")

    async def wait(self, count: int = 1) -> list[dict[str, Any]]:
        for _ in range(400):
            if len(self.received) >= count:
                break
            await asyncio.sleep(0.025)
        return self.received


@pytest.fixture
async def receiver(aiohttp_server: Any, api: Api) -> Receiver:
    found = Receiver()
    app = web.Application()
    app.router.add_post("/alerts", found.handle)
    server = await aiohttp_server(app)
    found.url = str(server.make_url("/alerts"))
    await api.admin("PUT", "versionstore/alerts", json={"notification_url": found.url})
    return found


async def library(api: Api) -> dict[str, bytes]:
    """Images and raw files, one with two versions, one large; all backed up."""
    files = {f"drill/img{i}": os.urandom(200 + i) for i in range(6)}
    files |= {f"drill/raw{i}": os.urandom(300 + i) for i in range(6)}
    files["drill/big"] = os.urandom(256 << 10)
    for public_id, data in files.items():
        await api.upload(data, rt="raw" if "raw" in public_id or "big" in public_id else "image", public_id=public_id)
    files["drill/img0"] = os.urandom(210)
    await api.upload(files["drill/img0"], public_id="drill/img0")  # a second version: the snapshot lists this one
    return files


async def wait_drill(api: Api, drill_id: str) -> dict[str, Any]:
    for _ in range(600):
        body = await api.admin("GET", f"versionstore/drills/{drill_id}")
        if body["status"] in ("completed", "failed"):
            return body
        await asyncio.sleep(0.05)
    raise AssertionError(body)


async def stored_keys(client: Any, prefix: str) -> list[str]:
    service = client.server.app[SERVICE]
    return [k for store in (service.primary, service.targets.default) async for k in store.list(prefix)]


async def metric(client: Any, name: str) -> float:
    text = await (await client.get("/metrics")).text()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def damage(client: Any, data: bytes) -> None:
    """Bit rot in the backup copy only: the revision's file is replaced (a primary copy that
    shares its inode stays intact)."""
    store = client.server.app[SERVICE].targets.default
    path = Path(store.local_path(layout.revision_key(CLOUD, digest_of(data))))
    path.unlink()
    path.write_bytes(bytes([data[0] ^ 0xFF]) + data[1:])


# --- the sample -------------------------------------------------------------------------------


async def test_the_sample_is_seeded_stable_and_holds_the_largest_and_each_type(api: Api, client: Any) -> None:
    await library(api)
    meta = client.server.app[META]
    snapshot = await Snapshots(client.server.app[SERVICE]).create(CLOUD, note=None)
    first, covered = await drills.choose_sample(meta, snapshot.id, {"sample_size": 3}, seed=7)
    again, _ = await drills.choose_sample(meta, snapshot.id, {"sample_size": 3}, seed=7)
    assert covered == 13 and first == again
    assert "drill/big" in {i.public_id for i in first}  # the largest, always
    types = [i.resource_type for i in first]
    assert types.count("image") >= 2 and types.count("raw") >= 2  # some of each resource type
    assert [i.asset_pk for i in first] == sorted(i.asset_pk for i in first)
    others = {tuple(i.public_id for i in (await drills.choose_sample(meta, snapshot.id, {"sample_size": 3}, seed=s))[0])
              for s in range(8)}
    assert len(others) > 1  # the seed decides
    everything, _ = await drills.choose_sample(meta, snapshot.id, {"sample_fraction": 1.0}, seed=1)
    assert len(everything) == 13


# --- a drill end to end -------------------------------------------------------------------------


async def test_a_drill_restores_a_sample_verifies_every_byte_reports_and_cleans_up(api: Api, client: Any) -> None:
    files = await library(api)
    await api.upload(b"not backed up", rt="raw", public_id="drill/unbacked", backup="false")
    snapshot = await api.admin("POST", "versionstore/snapshots", json={"note": "drill me"})
    started = await api.admin("POST", "versionstore/drills", json={"sample_fraction": 1, "seed": 3})
    assert started["status"] == "pending" and started["created_by"] == "api"
    done = await wait_drill(api, started["id"])
    assert done["status"] == "completed" and done["result"] == "passed", done
    assert done["snapshot_id"] == snapshot["id"]
    assert done["items_checked"] == 13 and done["covered_items"] == 13  # the unbacked asset is not covered
    assert done["bytes_checked"] == sum(len(v) for v in files.values())
    assert done["mismatch_count"] == 0 and done["mismatches"] == []
    assert done["assets_per_second"] > 0 and done["mb_per_second"] > 0 and done["duration_seconds"] >= 0
    assert done["by_resource_type"] == {"image": 6, "raw": 7}
    scratch = done["scratch_environment"]
    assert scratch == drills.scratch_name(CLOUD, started["id"]) and done["cleaned_up"] is True
    meta = client.server.app[META]
    assert await meta.get_cloud(scratch) is None and await stored_keys(client, f"{scratch}/") == []
    # The source is untouched: every version still downloads from its own revisions.
    for public_id, data in files.items():
        key = layout.revision_key(CLOUD, digest_of(data))
        assert await client.server.app[SERVICE].targets.default.stat(key) is not None, public_id
    listed = await api.admin("GET", "versionstore/drills")
    assert [d["id"] for d in listed["drills"]] == [started["id"]]
    alerts = await api.admin("GET", "versionstore/alerts")
    [state] = [s for s in alerts["operations"] if s["operation"] == "drill"]
    assert state["failing"] is False and state["last_success_at"] is not None


async def test_a_drill_that_finds_damaged_backups_alerts_every_way(api: Api, client: Any, receiver: Receiver,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    files = await library(api)
    await api.admin("POST", "versionstore/snapshots", json={})
    damage(client, files["drill/raw1"])
    store = client.server.app[SERVICE].targets.default
    os.unlink(store.local_path(layout.revision_key(CLOUD, digest_of(files["drill/img2"]))))
    before = await metric(client, f'versionstore_drill_failures_total{{cloud="{CLOUD}"}}')
    with caplog.at_level(logging.ERROR, logger="versionstore.alerts"):
        started = await api.admin("POST", "versionstore/drills", json={"sample_fraction": 1})
        done = await wait_drill(api, started["id"])
        [alert] = await receiver.wait()
    assert done["status"] == "completed" and done["result"] == "mismatch" and done["mismatch_count"] == 2
    problems = {m["public_id"]: m["problem"] for m in done["mismatches"]}
    assert problems == {"drill/raw1": "revision_corrupt", "drill/img2": "revision_missing"}
    assert done["items_checked"] == 13 and done["cleaned_up"] is True
    # the POST
    assert alert["notification_type"] == "alert" and alert["alert"] == "drill_failed" and alert["cloud_name"] == CLOUD
    assert alert["target"] == started["id"] and "drill/raw1" in alert["error"] and "drill/img2" in alert["error"]
    # the log line at ERROR, the counter and the state gauge
    assert any(r.levelno == logging.ERROR and "drill of demo failed" in r.getMessage() for r in caplog.records)
    assert await metric(client, f'versionstore_drill_failures_total{{cloud="{CLOUD}"}}') == before + 1
    assert await metric(client, f'versionstore_operation_failing{{cloud="{CLOUD}",operation="drill"}}') == 1
    # the audit record
    records = [r async for r in AuditLog(client.server.app[META]).records()]
    [audited] = [r for r in records if r.action == "drill_failed"]
    assert audited.actor == "system:drill" and audited.outcome == "failed" and audited.target == started["id"]
    # the console's operations page
    await add_staff(client, "ops@example.com", "viewer")
    await sign_in(client, "ops@example.com")
    page = await (await client.get(f"/console/{CLOUD}/operations")).text()
    assert 'id="failing-drill"' in page and "drill/raw1" in page and f"job-{started['id']}" in page


async def test_a_drill_resumes_from_its_cursor_and_cleans_up_what_it_made_before(api: Api, client: Any) -> None:
    files = await library(api)
    service, meta = client.server.app[SERVICE], client.server.app[META]
    snapshot = await Snapshots(service).create(CLOUD, note=None)
    params = drills.job_params({"sample_fraction": 1.0}, snapshot_id=snapshot.id, created_by="test")
    job = await drills.start(meta, CLOUD, params)
    assert job is not None
    sample, _ = await drills.choose_sample(meta, snapshot.id, params, params["seed"])
    # What a first run left when its process died after one page of 4 items.
    drill = drills.DrillJob(service, client.server.app[ALERTS], page=4)
    scratch = await drill._scratch(job)
    for item in sample[:4]:
        assert await drill._check(await meta.get_cloud(CLOUD), scratch, item) is None
    job.status, job.cursor = "active", {"snapshot_id": snapshot.id, "after_pk": sample[3].asset_pk}
    job.progress = {**drills._fresh_progress(), "items_checked": 4, "bytes_checked": sum(i.bytes for i in sample[:4])}
    assert await meta.save_job(job)
    await drill.run(job)
    done = drills.describe(await meta.get_job(CLOUD, job.id))
    assert done["status"] == "completed" and done["result"] == "passed"
    assert done["items_checked"] == len(sample) == 13 and done["bytes_checked"] == sum(len(v) for v in files.values())
    assert await meta.get_cloud(scratch.name) is None and await stored_keys(client, f"{scratch.name}/") == []


async def test_leftover_scratch_environments_are_swept_and_never_visible(api: Api, client: Any) -> None:
    files = await library(api)
    service, meta = client.server.app[SERVICE], client.server.app[META]
    snapshot = await Snapshots(service).create(CLOUD, note=None)
    [item] = (await drills.choose_sample(meta, snapshot.id, {"sample_size": 1}, 1))[0][:1]
    # A drill killed mid-way whose job was then failed: its scratch environment stays behind.
    dead = Job(id="d" * 32, cloud=CLOUD, kind=drills.KIND, status="failed", created_at=time.time())
    running = Job(id="e" * 32, cloud=CLOUD, kind=drills.KIND, status="active", created_at=time.time())
    for job in (dead, running):
        assert await meta.create_job(job) is not None
    names = []
    for job in (dead, running):
        scratch = await drills.DrillJob(service)._scratch(job)
        entry = {"asset_id": item.asset_id, "resource_type": item.resource_type, "type": item.type,
                 "public_id": item.public_id, "to_version": item.version_id, "bytes_digest": item.digest}
        assert await pitr.PointInTimeRestore(service).copy_into(pitr.Selection(CLOUD, target_cloud=scratch.name), entry) is None
        names.append(scratch.name)
    assert [c.name for c in await meta.list_clouds()] == [CLOUD]  # never listed as a product environment
    assert sorted(await meta.drill_environments()) == sorted(names)
    # Unreachable with any credentials the user has.
    response = await client.get(f"/v1_1/{names[0]}/resources/raw", headers=BASIC_HEADERS)
    assert response.status == 401
    assert await stored_keys(client, f"{names[0]}/") != []
    assert await drills.sweep_scratch(service) == [names[0]]  # the running drill's stays
    assert await meta.get_cloud(names[0]) is None and await stored_keys(client, f"{names[0]}/") == []
    assert await meta.get_cloud(names[1]) is not None
    for public_id, data in files.items():  # the source keeps every byte
        assert await service.targets.default.stat(layout.revision_key(CLOUD, digest_of(data))) is not None, public_id


# --- schedules -----------------------------------------------------------------------------------


async def test_the_drill_schedule_queues_one_drill_per_due_run_with_an_injected_clock(api: Api, client: Any) -> None:
    await library(api)
    service, meta = client.server.app[SERVICE], client.server.app[META]
    await Snapshots(service).create(CLOUD, note=None)
    body = await api.admin("PUT", "versionstore/drill_schedule", json={"every": "weekly", "weekday": "friday", "at": "03:00",
                                                                       "sample_size": 2})
    assert body["schedule"] == {"every": "weekly", "at": "03:00", "weekday": "friday"} and body["sample"] == {"sample_size": 2}
    row = await drills.set_schedule(meta, CLOUD, {"every": "daily", "at": "03:00", "sample_size": 2}, START)
    assert row.next_run_at == START + 3 * HOUR
    assert await drills.tick(service, START + HOUR) == []  # not due yet
    [job] = await drills.tick(service, START + 3 * HOUR + 60)
    assert await drills.tick(service, START + 3 * HOUR + 60) == []  # claimed: never twice
    assert job.params["created_by"] == "schedule:daily 03:00 UTC" and job.params["sample_size"] == 2
    assert await drills.tick(service, START + DAY + 3 * HOUR + 60) == []  # the previous one still runs: skipped
    await drills.DrillJob(service, client.server.app[ALERTS]).run(job)
    done = drills.describe(await meta.get_job(CLOUD, job.id))
    assert done["result"] == "passed" and done["sample_size"] >= 2
    [next_one] = await drills.tick(service, START + 2 * DAY + 3 * HOUR)
    assert next_one.id != job.id
    await api.admin("DELETE", "versionstore/drill_schedule")
    assert (await api.admin("GET", "versionstore/drill_schedule"))["schedule"] is None


async def test_a_scheduled_drill_that_cannot_run_fails_and_alerts(api: Api, client: Any, receiver: Receiver) -> None:
    await api.upload(b"a", public_id="s/a")  # but no snapshot: nothing to drill
    service, meta = client.server.app[SERVICE], client.server.app[META]
    await drills.set_schedule(meta, CLOUD, {"every": "daily", "at": "04:00"}, START)
    [job] = await drills.tick(service, START + 4 * HOUR, wake=client.server.app[JOBS].wake.set)  # the runner takes it
    for _ in range(400):
        found = await meta.get_job(CLOUD, job.id)
        if found is not None and not found.open:
            break
        await asyncio.sleep(0.025)
    assert found is not None and found.status == "failed" and "no completed snapshot" in (found.error or "")
    [alert] = await receiver.wait()
    assert alert["alert"] == "drill_failed" and alert["target"] == job.id and "no completed snapshot" in alert["error"]
    assert await metric(client, f'versionstore_operation_failing{{cloud="{CLOUD}",operation="drill"}}') == 1
    assert await meta.drill_environments() == []  # its scratch environment went with it


# --- snapshot and retention failures ------------------------------------------------------------


async def test_a_failed_snapshot_alerts_and_the_next_success_clears_it(api: Api, client: Any, receiver: Receiver) -> None:
    await api.upload(b"a", public_id="s/a")
    meta = client.server.app[META]
    before = await metric(client, f'versionstore_snapshot_failures_total{{cloud="{CLOUD}",operation="snapshot"}}')
    async with meta.transaction() as db:  # the fault: the items table is gone (a broken database)
        await db.execute("ALTER TABLE snapshot_items RENAME TO snapshot_items_away")
    try:
        failed = await api.admin("POST", "versionstore/snapshots", json={"note": "doomed"})
    finally:
        async with meta.transaction() as db:
            await db.execute("ALTER TABLE snapshot_items_away RENAME TO snapshot_items")
    assert failed["status"] == "failed" and failed["error"]
    [alert] = await receiver.wait()
    assert alert["alert"] == "snapshot_failed" and alert["target"] == failed["id"] and alert["created_by"] == "api"
    assert await metric(client, f'versionstore_snapshot_failures_total{{cloud="{CLOUD}",operation="snapshot"}}') == before + 1
    assert await metric(client, f'versionstore_operation_failing{{cloud="{CLOUD}",operation="snapshot"}}') == 1
    assert "snapshot_failed" in [r.action async for r in AuditLog(meta).records()]
    ok = await api.admin("POST", "versionstore/snapshots", json={})
    assert ok["status"] == "completed"
    assert await metric(client, f'versionstore_operation_failing{{cloud="{CLOUD}",operation="snapshot"}}') == 0
    assert await metric(client, f'versionstore_operation_last_success_timestamp_seconds{{cloud="{CLOUD}",operation="snapshot"}}') > 0


async def test_a_failed_retention_run_alerts_without_stopping_the_schedule(api: Api, client: Any, receiver: Receiver) -> None:
    await api.upload(b"a", public_id="s/a")
    meta = client.server.app[META]
    snapshots = Snapshots(client.server.app[SERVICE], client.server.app[ALERTS])
    # A stored policy this version cannot read (written by hand, or by a newer version).
    schedule = retention.parse_schedule({"every": "daily", "at": "02:00"})
    await meta.set_schedule(ScheduleRow(CLOUD, schedule, {"keep_within": "forever"}, START + 2 * HOUR, None))
    await meta.create_cloud("zz", "key-zz", "secret-zz", True)  # scheduled after demo, in the same tick
    await retention.set_schedule(snapshots, "zz", {"every": "daily", "at": "02:00"}, {"preset": "last_4"}, START)
    before = await metric(client, f'versionstore_snapshot_failures_total{{cloud="{CLOUD}",operation="retention"}}')
    taken = await retention.tick(snapshots, START + 2 * HOUR + 60)
    assert sorted(s.cloud for s in taken) == [CLOUD, "zz"]  # demo's failure did not stop zz's run
    assert all(s.status == "completed" for s in taken)  # the snapshot itself was taken
    [alert] = await receiver.wait()
    assert alert["alert"] == "retention_failed" and "forever" in alert["error"]
    assert await metric(client, f'versionstore_snapshot_failures_total{{cloud="{CLOUD}",operation="retention"}}') == before + 1
    states = {s["operation"]: s for s in (await api.admin("GET", "versionstore/alerts"))["operations"]}
    assert states["retention"]["failing"] is True and states["snapshot"]["failing"] is False
    await retention.set_schedule(snapshots, CLOUD, {"every": "daily", "at": "02:00"}, {"preset": "last_4"}, START + DAY)
    assert len(await retention.tick(snapshots, START + DAY + 2 * HOUR + 60)) == 2
    states = {s["operation"]: s for s in (await api.admin("GET", "versionstore/alerts"))["operations"]}
    assert states["retention"]["failing"] is False and states["retention"]["failures"] == 1


# --- bad input ------------------------------------------------------------------------------------


async def test_bad_input_is_refused_and_changes_nothing(api: Api, client: Any) -> None:
    await api.admin("POST", "versionstore/drills", json={}, expect=404)  # no snapshot to drill yet
    await api.upload(b"a", public_id="s/a")
    await api.admin("POST", "versionstore/snapshots", json={})
    for bad in ({"sample_size": 0}, {"sample_size": 10001}, {"sample_fraction": 2}, {"sample_fraction": "x"},
                {"sample_size": 2, "sample_fraction": 0.5}, {"seed": -1}, {"notification_url": "ftp://x"}):
        body = await api.admin("POST", "versionstore/drills", json=bad, expect=400)
        assert body["error"]["message"]
    await api.admin("POST", "versionstore/drills", json={"snapshot_id": "0" * 32}, expect=404)
    await api.admin("GET", f"versionstore/drills/{'0' * 32}", expect=404)
    await api.admin("PUT", "versionstore/drill_schedule", json={"every": "hourly"}, expect=400)
    await api.admin("PUT", "versionstore/drill_schedule", json={"at": "25:00"}, expect=400)
    await api.admin("PUT", "versionstore/alerts", json={}, expect=400)
    await api.admin("PUT", "versionstore/alerts", json={"notification_url": "file:///etc/passwd"}, expect=400)
    assert (await api.admin("GET", "versionstore/drills"))["drills"] == []
    assert (await api.admin("GET", "versionstore/drill_schedule"))["schedule"] is None
    assert (await api.admin("GET", "versionstore/alerts"))["notification_url"] is None


# --- the CLI --------------------------------------------------------------------------------------


def test_drill_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.test_snapshots_cli import _library
    from versionstore.cli import main

    data = str(tmp_path)
    _library(tmp_path)
    assert main(["drill", "run", "m", "--data-dir", data]) == 2  # nothing to drill yet
    assert "no completed snapshot" in capsys.readouterr().err
    assert main(["snapshot", "create", "m", "--data-dir", data]) == 0
    capsys.readouterr()
    assert main(["drill", "run", "m", "--sample", "5", "--seed", "9", "--data-dir", data]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["status"] == "completed" and report["result"] == "passed" and report["created_by"] == "cli"
    assert report["items_checked"] == 1 and report["seed"] == 9 and report["cleaned_up"] is True  # m/b is not covered
    assert main(["drill", "list", "m", "--data-dir", data]) == 0
    assert [json.loads(line)["id"] for line in capsys.readouterr().out.splitlines()] == [report["id"]]
    assert main(["drill", "show", "m", report["id"], "--data-dir", data]) == 0
    assert json.loads(capsys.readouterr().out)["result"] == "passed"
    assert main(["drill", "schedule", "m", "--every", "weekly", "--weekday", "monday", "--sample", "3", "--data-dir", data]) == 0
    assert json.loads(capsys.readouterr().out)["schedule"] == {"every": "weekly", "at": "03:00", "weekday": "monday"}
    assert main(["drill", "schedule", "m", "--off", "--data-dir", data]) == 0
    assert json.loads(capsys.readouterr().out) == {"schedule": None}
    assert main(["drill", "run", "m", "--fraction", "2", "--data-dir", data]) == 2
