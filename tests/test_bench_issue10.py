"""scripts/bench_issue10.py's table from canned component results: every verdict (met, missed,
NOT JUDGED for outside load, FAILED, not run), the exit status, and the component commands.
No servers, no benchmarks: the figures are made up, the arithmetic and the verdicts are not."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import bench_issue10 as b10  # noqa: E402

QUIET = {"seconds": 100.0, "outside_cores": 0.05, "worst_outside_cores": 0.2, "own_cores": 1.0, "load_average_max": 1.0,
         "cpus": 2, "limit_cores": 0.5, "heavy": False}
HEAVY = {**QUIET, "outside_cores": 1.4, "heavy": True}


def core(others: float = 0.0) -> dict[str, Any]:
    def wrk(rps: float, p99_ms: float) -> list[dict[str, float]]:
        return [{"rps": rps, "p99_us": p99_ms * 1000}] * 3

    return {"args": {"size_mib": 1024}, "load": QUIET, "results": {
        "cp_seconds": [1.0, 0.9, 1.1], "md5_seconds": [2.0, 2.1, 2.2], "upload_seconds": [2.4, 2.5, 2.6],  # 2.0/2.4 = 0.83x: met
        "upload_server_cpu": [4.0, 4.1, 3.9], "md5_cpu": [2.0, 2.0, 2.0],  # 2.0 s/GiB beyond MD5: missed
        "rss_growth": [50 * b10.MiB, 60 * b10.MiB, 40 * b10.MiB], "others_share": [others, 0.0, 0.0],
        "wrk": {"bare": wrk(10000, 10), "versions_10": wrk(4000, 15), "download_backup": wrk(2000, 15)}}}


def initial() -> dict[str, Any]:
    return {"load": HEAVY, "library_bytes": 2_000_000_000,
            "runs": {"script": {"first": {"seconds": 4.0}}, "restic": {"first": {"seconds": 10.0}}, "cp": {"first": {"seconds": 3.0}}}}


def libsize() -> dict[str, Any]:
    def rows(p50: float, stall: float, restart: bool) -> list[dict[str, Any]]:
        out = [{"key": key, "p50_ms": p50, "p99_ms": p50 * 2, "stall_ms": stall} for key, _ in b10.SECOND_TABLE if key != "restart"]
        return out + ([{"key": "restart", "p50_ms": 1400.0, "p99_ms": 1400.0, "stall_ms": 80.0}] if restart else [])

    return {"load": QUIET, "args": {"sizes": [10000, 100000, 1000000], "blob_sizes": [100000, 1000000]},
            "sizes": {"10000": rows(5.0, 10.0, False), "100000": rows(25.0, 10.0, True)},
            "errors": {"1000000": "RuntimeError: versionstore exited early"}}


def report(**outcomes: b10.Outcome) -> b10.Report:
    return b10.Report({name: outcomes.get(name, b10.Outcome(name)) for name in b10.COMPONENTS}, [10000, 100000, 1000000],
                      {"start": "2026-11-27 08:00", "end": "2026-11-27 08:35", "commit": "abc1234", "nproc": 2,
                       "cpu_model": "Test CPU", "memory_gib": 23.0, "load_before": "0.10", "load_after": "0.20"})


def first(rep: b10.Report) -> dict[str, b10.Cell]:
    return {label: cell for label, _, cell in rep.first_rows()}


def second(rep: b10.Report) -> dict[str, list[b10.Cell]]:
    return {name: cells for name, cells in rep.second_rows()}


def test_every_verdict_and_the_exit_status() -> None:
    rep = report(core=b10.Outcome("core", 1, 200.0, core()), initial=b10.Outcome("initial", 1, 300.0, initial()),
                 s3=b10.Outcome("s3", 1, 5.0, None, "no results (FileNotFoundError)"),
                 libsize=b10.Outcome("libsize", 1, 900.0, libsize()))
    rows = first(rep)
    upload, cpu, rss, versions, download, batch, s3 = rows.values()
    assert upload.status == b10.MET and upload.value.startswith("0.833x best of 3 (1024 MiB at ")
    assert cpu.status == b10.MISSED and cpu.value.startswith("2.00 s/GiB beyond MD5") and "MD5 alone 2.00 s/GiB" in cpu.value
    assert rss.status == b10.MET
    assert versions.status == b10.MET and versions.value.startswith("0.40x, p99 15.0 ms")
    assert download.status == b10.MISSED  # 0.20x
    # outside load: printed, not judged (and what it would have been)
    assert batch.status == b10.NOT_JUDGED and batch.value.startswith("2.50x") and "would be met" in batch.value
    assert s3.status == b10.FAILED and "no results" in s3.value
    table = second(rep)
    assert [c.status for c in table["upload of a new version of an existing asset"]] == [b10.MET, b10.MISSED, b10.FAILED]
    restart = table["restart with blob files: first `/healthz`; worst stall after"]
    assert [c.status for c in restart] == [b10.NOT_RUN, b10.MISSED, b10.FAILED]  # no blob files at 10k; an 80 ms stall
    assert restart[1].value == "1.40 s; 80 ms"
    assert rep.exit_status() == 2
    text = rep.markdown()
    assert text.startswith("### Issue 10's table in one run (2026-11-27 08:00 – 2026-11-27 08:35 UTC)\n")
    assert "| S3 upload with backup vs a plain SDK upload | no results (FileNotFoundError) | >= 0.9x | FAILED |" in text
    assert "| 10,000 assets | 100,000 assets | 1,000,000 assets |" in text
    assert "5.0 (10.0); 10: **met**" in text and "25.0 (50.0); 10: **missed**" in text
    assert "initial outside 1.40 CPUs" in text and "HEAVY" in text and "`abc1234`" in text and "Test CPU" in text
    assert "s3 exit 1, 5 s (FAILED: no results (FileNotFoundError))" in text
    combined = json.loads(json.dumps(rep.combined(), default=str))
    assert combined["exit_status"] == 2 and combined["first_table"][6]["status"] == b10.FAILED
    assert combined["second_table"][0]["1000000"]["status"] == b10.FAILED


def test_statuses_without_failures() -> None:
    """Missed or not judged: exit 1; every judged row met (the rest not run): exit 0."""
    met_core = core()
    met_core["results"]["upload_server_cpu"] = [2.5, 2.5, 2.5]
    met_core["results"]["wrk"]["download_backup"] = met_core["results"]["wrk"]["versions_10"]
    assert report(core=b10.Outcome("core", 0, 1.0, met_core)).exit_status() == 0
    assert report(core=b10.Outcome("core", 1, 1.0, core())).exit_status() == 1
    assert report(initial=b10.Outcome("initial", 1, 1.0, initial())).exit_status() == 1


def test_other_load_during_the_upload_is_not_judged() -> None:
    """bench_core's own rule: other processes above 10 % of the CPUs during an upload leave its
    wall-clock ratio unjudged, even when the run's average outside load was under the limit."""
    rows = first(report(core=b10.Outcome("core", 1, 1.0, core(others=0.3))))
    assert rows[b10.FIRST_TABLE[0][0]].status == b10.NOT_JUDGED
    assert rows[b10.FIRST_TABLE[1][0]].status == b10.MISSED  # the CPU per GiB is still judged


def test_a_crash_with_results_and_missing_figures_fail() -> None:
    crashed = report(core=b10.Outcome("core", 130, 1.0, core()))  # interrupted after writing its JSON
    assert {cell.status for cell in first(crashed).values()} == {b10.FAILED, b10.NOT_RUN}
    partial = core()
    del partial["results"]["wrk"]["download_backup"]
    cell = first(report(core=b10.Outcome("core", 0, 1.0, partial)))[b10.FIRST_TABLE[4][0]]
    assert cell.status == b10.FAILED and "KeyError" in cell.value


def test_component_commands(tmp_path: Path) -> None:
    quick = b10.plans(b10.parse_args(["--quick", "--allow-load"]), tmp_path)
    argv = {plan.name: plan.argv[1:] for plan in quick}
    assert [Path(a).name if i == 0 else a for i, a in enumerate(argv["libsize"])] == [
        "bench_library_size.py", "--sizes", "10000", "--blob-sizes", "10000", "--quick", "--gc-probe", "--allow-load",
        "--json", str(tmp_path / "libsize.json")]
    assert argv["initial"][1:3] == ["--scale", "0.01"] and argv["s3"][1:4] == ["--backend", "s3", "--quick"]
    full = b10.plans(b10.parse_args(["--only", "libsize,initial"]), tmp_path)
    assert [plan.name for plan in full] == ["initial", "libsize"]
    assert full[1].argv[2:6] == ["--sizes", "10000,100000,1000000", "--blob-sizes", "1000000"]
    assert full[0].argv[2:4] == ["--scale", "0.2"]
    assert sum(plan.estimate for plan in b10.plans(b10.parse_args([]), tmp_path)) < 40 * 60
    none = b10.plans(b10.parse_args(["--only", "libsize", "--sizes", "10000", "--blob-sizes", ""]), tmp_path)
    assert "--no-blobs" in none[0].argv and "--blob-sizes" not in none[0].argv
    with pytest.raises(SystemExit):
        b10.parse_args(["--only", "core,disk"])


def test_a_component_that_crashes_is_failed(tmp_path: Path) -> None:
    plan = b10.Plan("core", [sys.executable, "-c", "raise SystemExit('boom')"], 1.0)
    outcome = b10.run_component(plan, tmp_path / "core.json", timeout=60)
    assert outcome.returncode == 1 and outcome.data is None and outcome.crashed
    rep = report(core=outcome)
    assert first(rep)[b10.FIRST_TABLE[0][0]].status == b10.FAILED and rep.exit_status() == 2


def test_write_json_records_the_load(tmp_path: Path) -> None:
    """The components' --json carries the load record bench_issue10 judges by."""
    import benchlib

    benchlib.write_json(str(tmp_path / "out.json"), {"results": [1]})
    data = json.loads((tmp_path / "out.json").read_text())
    assert data["results"] == [1]
    assert set(data["load"]) >= {"outside_cores", "worst_outside_cores", "limit_cores", "heavy", "seconds"}
    benchlib.write_json(None, {"results": [2]})  # no --json: nothing written, no error
