"""Audit completeness: every snapshot, retention, schedule and point-in-time-restore action,
over the API, the CLI and the jobs, lands in the audit log with who did it and the outcome."""

import json
import time

from tests.conftest import API_KEY, CLOUD
from tests.test_snapshots_cli import _library
from tests.test_snapshots_pitr import wait_for
from tests.test_snapshots_retention import DAY, START
from versionstore import retention
from versionstore.cli import main
from versionstore.console.audit import AuditLog
from versionstore.http.keys import META, SERVICE
from versionstore.snapshots import Snapshots

SNAPS = "versionstore/snapshots"
API = f"api_key:{API_KEY}"


async def _log(meta) -> list[tuple[str, str, str | None, str]]:
    return [(r.actor, r.action, r.target, r.outcome) async for r in AuditLog(meta).records(cloud=CLOUD)]


async def test_every_snapshot_schedule_and_restore_action_over_the_api_is_audited(api, client):
    await api.upload(b"a", public_id="s/a")
    snap = await api.admin("POST", SNAPS, json={"note": "n"})
    await api.admin("POST", f"{SNAPS}/{snap['id']}/pin")
    await api.admin("DELETE", f"{SNAPS}/{snap['id']}", expect=403)  # pinned: refused, and audited as such
    await api.admin("DELETE", f"{SNAPS}/{snap['id']}/pin")
    await api.admin("DELETE", f"{SNAPS}/{snap['id']}")
    await api.admin("PUT", "versionstore/snapshot_schedule", json={"every": "daily", "at": "02:00", "preset": "last_4"})
    await api.admin("DELETE", "versionstore/snapshot_schedule")
    job = await api.admin("POST", "versionstore/point_in_time_restore", json={"at": time.time(), "prefix": "s/"})
    assert (await wait_for(api, job["id"]))["status"] == "completed"
    log = await _log(client.app[META])
    for entry in [
        (API, "snapshot_create", snap["id"], "ok"), (API, "snapshot_pin", snap["id"], "ok"),
        (API, "snapshot_delete", snap["id"], "failed"), (API, "snapshot_unpin", snap["id"], "ok"),
        (API, "snapshot_delete", snap["id"], "ok"), (API, "schedule_set", CLOUD, "ok"), (API, "schedule_delete", CLOUD, "ok"),
        (API, "pitr_start", job["id"], "ok"), ("job:point_in_time_restore", "pitr_finish", job["id"], "ok"),
    ]:
        assert entry in log, entry


async def test_the_schedule_and_retention_jobs_audit_what_they_take_and_remove(api, client):
    await api.upload(b"a", public_id="s/a")
    snapshots = Snapshots(client.app[SERVICE])
    await retention.set_schedule(snapshots, CLOUD, {"every": "daily", "at": "02:00"}, {"keep_last": 1}, START)
    for day in range(4):
        await retention.tick(snapshots, START + 2 * 3600 + day * DAY + 60)
    log = await _log(client.app[META])
    actions = [(actor, action) for actor, action, _t, _o in log]
    assert actions.count(("job:retention", "snapshot_create")) == 4
    assert ("job:retention", "snapshot_expiring") in actions
    assert ("job:retention", "snapshot_delete") in actions
    removed = {t for actor, action, t, _o in log if action == "snapshot_delete"}
    remaining = {s.id for s in await retention.all_snapshots(snapshots, CLOUD)}
    assert removed and not removed & remaining


def test_snapshot_and_restore_commands_are_audited_as_cli(tmp_path, capsys):
    data = str(tmp_path)
    _library(tmp_path)
    assert main(["snapshot", "create", "m", "--data-dir", data]) == 0
    created = json.loads(capsys.readouterr().out)
    assert main(["snapshot", "pin", "m", created["id"], "--data-dir", data]) == 0
    assert main(["snapshot", "delete", "m", created["id"], "--data-dir", data]) == 2
    assert main(["snapshot", "pin", "m", created["id"], "--off", "--data-dir", data]) == 0
    assert main(["snapshot", "delete", "m", created["id"], "--data-dir", data]) == 0
    assert main(["restore", "m", "--at", str(time.time()), "--run", "--data-dir", data]) == 0
    capsys.readouterr()
    assert main(["audit", "export", "--cloud", "m", "--data-dir", data]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    got = [(r["actor"], r["action"], r["outcome"]) for r in records]
    assert got == [("cli", "snapshot_create", "ok"), ("cli", "snapshot_pin", "ok"), ("cli", "snapshot_delete", "failed"),
                   ("cli", "snapshot_unpin", "ok"), ("cli", "snapshot_delete", "ok"), ("cli", "pitr_start", "ok")]
    assert {r["target"] for r in records[:5]} == {created["id"]}


async def test_drill_and_alert_settings_over_the_api_are_audited(api, client):
    await api.upload(b"d", public_id="d/a")
    await api.admin("POST", SNAPS, json={"note": "for the drill"})
    drill = await api.admin("POST", "versionstore/drills", json={"sample_size": 1})
    await api.admin("PUT", "versionstore/drill_schedule", json={"every": "daily", "at": "04:00", "sample_size": 1})
    await api.admin("DELETE", "versionstore/drill_schedule")
    await api.admin("PUT", "versionstore/alerts", json={"notification_url": "https://ops.example/hook"})
    await api.admin("DELETE", "versionstore/alerts")
    log = await _log(client.app[META])
    for entry in [
        (API, "drill_start", drill["id"], "ok"), (API, "drill_schedule_set", CLOUD, "ok"), (API, "drill_schedule_delete", CLOUD, "ok"),
        (API, "alert_url_set", CLOUD, "ok"), (API, "alert_url_delete", CLOUD, "ok"),
    ]:
        assert entry in log, entry


def test_drill_commands_are_audited_as_cli(tmp_path, capsys):
    data = str(tmp_path)
    _library(tmp_path)
    assert main(["snapshot", "create", "m", "--data-dir", data]) == 0
    capsys.readouterr()
    assert main(["drill", "run", "m", "--sample", "1", "--queue", "--data-dir", data]) == 0
    drill = json.loads(capsys.readouterr().out)
    assert main(["drill", "schedule", "m", "--every", "daily", "--data-dir", data]) == 0
    assert main(["drill", "schedule", "m", "--off", "--data-dir", data]) == 0
    capsys.readouterr()
    assert main(["audit", "export", "--cloud", "m", "--data-dir", data]) == 0
    got = [(r["actor"], r["action"], r["target"]) for r in map(json.loads, capsys.readouterr().out.splitlines())]
    assert got[1:] == [("cli", "drill_start", drill["drill"]), ("cli", "drill_schedule_set", "m"),
                       ("cli", "drill_schedule_delete", "m")]
