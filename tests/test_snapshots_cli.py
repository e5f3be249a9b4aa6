"""`versionstore snapshot ...`, `retention simulate`, `restore`: outputs and exit codes."""

import asyncio
import json
import time

from tests.test_snapshots_pitr_model import _put, _service
from versionstore.cli import main


def _library(root) -> float:
    async def build() -> float:
        service = await _service(root)
        try:
            await _put(service, "m/a", 1, True)
            at = time.time()
            await _put(service, "m/a", 2, True)
            await _put(service, "m/b", 3, False)
        finally:
            await service.targets.close()
            await service.primary.close()
            await service.meta.close()
        return at

    return asyncio.run(build())


def test_snapshot_commands(tmp_path, capsys):
    data = str(tmp_path)
    _library(tmp_path)
    assert main(["snapshot", "create", "m", "--note", "by hand", "--prefix", "m/", "--data-dir", data]) == 0
    created = json.loads(capsys.readouterr().out)
    assert (created["asset_count"], created["uncovered_count"], created["created_by"]) == (2, 1, "cli")
    assert main(["snapshot", "list", "m", "--data-dir", data]) == 0
    assert [json.loads(line)["id"] for line in capsys.readouterr().out.splitlines()] == [created["id"]]
    assert main(["snapshot", "show", "m", created["id"], "--items", "5", "--data-dir", data]) == 0
    assert {i["public_id"] for i in json.loads(capsys.readouterr().out)["items"]} == {"m/a", "m/b"}
    assert main(["snapshot", "pin", "m", created["id"], "--data-dir", data]) == 0
    assert json.loads(capsys.readouterr().out)["pinned"] is True
    assert main(["snapshot", "delete", "m", created["id"], "--data-dir", data]) == 2
    assert "pinned" in capsys.readouterr().err
    assert main(["snapshot", "pin", "m", created["id"], "--off", "--data-dir", data]) == 0
    assert json.loads(capsys.readouterr().out)["pinned"] is False
    assert main(["snapshot", "delete", "m", created["id"], "--data-dir", data]) == 0
    assert json.loads(capsys.readouterr().out) == {"deleted": created["id"]}
    assert main(["snapshot", "show", "nope", created["id"], "--data-dir", data]) == 2


def test_retention_simulate_and_restore_dry_run(tmp_path, capsys):
    data = str(tmp_path)
    at = _library(tmp_path)
    assert main(["retention", "simulate", "m", "--data-dir", data]) == 2
    assert "no retention policy" in capsys.readouterr().err
    assert main(["retention", "simulate", "m", "--preset", "gfs", "--data-dir", data]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["keep"] == [] and report["remove"] == [] and report["bytes_unreferenced"] == 0
    assert main(["restore", "m", "--at", str(at), "--prefix", "m/", "--data-dir", data]) == 0
    diff = json.loads(capsys.readouterr().out)
    assert diff["counts"] == {"restore": 1, "did_not_exist": 1, "unchanged": 0, "unrecoverable": 0}
    assert main(["restore", "m", "--at", str(at), "--run", "--data-dir", data]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "pending"
    assert main(["restore", "m", "--data-dir", data]) == 2  # neither --at nor --snapshot
