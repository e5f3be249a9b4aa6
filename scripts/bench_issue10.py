#!/usr/bin/env python3
"""Issue 10's whole table in one run: the four benchmarks in sequence, one table at the end.

Runs, each as its own subprocess with its own `--json` file (their CLIs unchanged):

- `core`: scripts/bench_core.py (1 GiB upload vs the limit, CPU per GiB beyond MD5, RSS, the
  read path vs bare aiohttp);
- `initial`: scripts/bench_initial_backup.py --scale 0.2 (the batch client vs restic);
- `s3`: scripts/bench_buckets.py --backend s3 (S3 upload with backup vs a plain SDK upload);
- `libsize`: scripts/bench_library_size.py (request cost at 10k/100k/1M assets, the restart
  with blob files at the largest size only: writing 2 M blob files costs ~400 s);

then prints every row of the issue's two tables with the measured figure, the target and
MET / MISSED / NOT JUDGED (load) / FAILED, and the machine line (CPUs, CPU model, load before
and after, each benchmark's outside load, git commit, start and end UTC). A benchmark that
reported outside load above benchlib's limit is printed, never judged; one that crashed (no
JSON, or none of the figures a row needs) shows FAILED and makes the exit status 2.

    .venv/bin/python scripts/bench_issue10.py                         # full (~35 min on 2 CPUs)
    .venv/bin/python scripts/bench_issue10.py --quick --allow-load    # smoke run (~5 min)
    .venv/bin/python scripts/bench_issue10.py --only core,libsize --sizes 10000,100000
    .venv/bin/python scripts/bench_issue10.py --markdown table.md --json all.json

Exit status: 0 every judged row met, 1 a row missed or not judged, 2 a benchmark failed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from statistics import median
from typing import Any

HERE = Path(__file__).resolve().parent
MiB = 1 << 20
COMPONENTS = ("core", "initial", "s3", "libsize")
FULL_SIZES = (10_000, 100_000, 1_000_000)

MET, MISSED, NOT_JUDGED, FAILED, NOT_RUN = "met", "missed", "NOT JUDGED (load)", "FAILED", "not run"

#: bench_core marks an upload NOT JUDGED when other processes used more than this share of the
#: CPUs during it (its TARGETS["others_share_max"]); the same rule applies here.
UPLOAD_OTHERS_MAX = 0.10
LIBSIZE_P50_MS = 20.0
LIBSIZE_STALL_MS = 50.0  # "nothing blocks the event loop for more than ~50 ms"
RESTART_S = 5.0


# --- what each component run returns ---------------------------------------------------------


@dataclass
class Outcome:
    """One component's run: its exit status, seconds, and the JSON it wrote (None: none)."""

    name: str
    returncode: int | None = None  # None: not run (--only)
    seconds: float = 0.0
    data: dict[str, Any] | None = None
    error: str = ""

    @property
    def ran(self) -> bool:
        return self.returncode is not None

    @property
    def crashed(self) -> bool:
        """No results, or an exit status other than 0 (met) / 1 (missed or refused for load)."""
        return self.ran and (self.data is None or self.returncode not in (0, 1))

    @property
    def heavy_load(self) -> bool:
        return bool(self.data and self.data.get("load", {}).get("heavy"))

    def load_text(self) -> str:
        if not self.ran:
            return "not run"
        load = (self.data or {}).get("load")
        if not load:
            return "no load record"
        return (f"outside {load['outside_cores']:.2f} CPUs (worst {load['worst_outside_cores']:.2f}, limit "
                f"{load['limit_cores']:.2f}){' HEAVY' if load['heavy'] else ''}, {load['seconds']:.0f} s")


@dataclass
class Cell:
    value: str
    status: str

    def text(self) -> str:
        return f"{self.value}: **{self.status}**" if self.value else f"**{self.status}**"


def judge(outcome: Outcome, figure: Callable[[dict[str, Any]], tuple[str, bool]], busy: bool = False) -> Cell:
    """A row's cell from its component's outcome: `figure(data)` gives the measured text and
    whether the target is met; outside load (the component's record, or `busy`) means NOT
    JUDGED, with the figure still printed; missing figures or a crash mean FAILED."""
    if not outcome.ran:
        return Cell("", NOT_RUN)
    if outcome.data is None:
        return Cell(outcome.error or f"exit status {outcome.returncode}, no results", FAILED)
    try:
        value, met = figure(outcome.data)
    except (KeyError, IndexError, TypeError, ValueError, ZeroDivisionError) as exc:
        return Cell(f"no figure ({type(exc).__name__}: {exc})", FAILED)
    if outcome.crashed:
        return Cell(value, FAILED)
    if outcome.heavy_load or busy:
        return Cell(f"{value} (would be {MET if met else MISSED})", NOT_JUDGED)
    return Cell(value, MET if met else MISSED)


# --- the figures of the first table ----------------------------------------------------------


def core_upload(d: dict[str, Any]) -> tuple[str, bool]:
    r, size_mb = d["results"], d["args"]["size_mib"] * MiB / 1e6
    limit_best = max(min(r["cp_seconds"]), min(r["md5_seconds"]))
    limit_median = max(median(r["cp_seconds"]), median(r["md5_seconds"]))
    up_best, up_median = min(r["upload_seconds"]), median(r["upload_seconds"])
    ratio = limit_best / up_best
    return (f"{ratio:.3f}x best of {len(r['upload_seconds'])} ({d['args']['size_mib']} MiB at {size_mb / up_best:.0f} MB/s; cp + sync "
            f"{size_mb / min(r['cp_seconds']):.0f} MB/s, MD5 {size_mb / min(r['md5_seconds']):.0f} MB/s); median "
            f"{limit_median / up_median:.2f}x ({size_mb / up_median:.0f} MB/s)", ratio >= 0.8)


def core_upload_busy(d: dict[str, Any] | None) -> bool:
    return bool(d and max(d["results"].get("others_share") or [0.0]) > UPLOAD_OTHERS_MAX)


def core_cpu(d: dict[str, Any]) -> tuple[str, bool]:
    r, gib = d["results"], d["args"]["size_mib"] / 1024
    total, md5 = median(r["upload_server_cpu"]) / gib, median(r["md5_cpu"]) / gib
    beyond = total - md5
    return f"{beyond:.2f} s/GiB beyond MD5 ({total:.2f} s/GiB in all; MD5 alone {md5:.2f} s/GiB)", beyond <= 1.0


def core_rss(d: dict[str, Any]) -> tuple[str, bool]:
    growth = [g / MiB for g in d["results"]["rss_growth"]]
    return f"max {max(growth):.0f} MiB (median {median(growth):.0f} MiB)", max(growth) < 100


def core_read(case: str) -> Callable[[dict[str, Any]], tuple[str, bool]]:
    def figure(d: dict[str, Any]) -> tuple[str, bool]:
        wrk = d["results"]["wrk"]
        bare = median([run["rps"] for run in wrk["bare"]])
        rps = median([run["rps"] for run in wrk[case]])
        p99 = median([run["p99_us"] / 1000 for run in wrk[case]])
        return (f"{rps / bare:.2f}x, p99 {p99:.1f} ms ({rps:,.0f} req/s; bare {bare:,.0f} req/s)",
                rps / bare >= 0.3 and p99 < 20.0)

    return figure


def initial_first(d: dict[str, Any]) -> tuple[str, bool]:
    runs, mb = d["runs"], d["library_bytes"] / 1e6
    ours, restic = runs["script"]["first"]["seconds"], runs["restic"]["first"]["seconds"]
    cp = runs.get("cp", {}).get("first", {}).get("seconds")
    stretch = "" if cp is None else f", {cp / ours:.2f}x `cp -r` ({mb / cp:.0f} MB/s; stretch 0.9x)"
    count = len(d.get("samples", {}).get("script", {}).get("first", [])) or 1  # medians of that many first runs
    medians = f"; medians of {count} first runs" if count > 1 else ""
    return (f"{restic / ours:.2f}x ({mb / ours:.0f} MB/s; restic {mb / restic:.0f} MB/s{stretch}{medians})",
            restic / ours >= 2.0)


def s3_upload(d: dict[str, Any]) -> tuple[str, bool]:
    r, label = d["results"]["s3"], d["targets"]["s3"]
    plain, ours = r["plain_up"][label], r["ours_up"]
    ratio = median([p / o for p, o in zip(plain, ours, strict=True)])
    size_mb = d["args"]["size"] / 1e6
    return (f"{ratio:.2f}x ({size_mb / median(ours):.0f} MB/s; plain {size_mb / median(plain):.0f} MB/s; "
            f"{d['args']['size'] // MiB} MiB x {len(ours)})", ratio >= d.get("target_ratio", 0.9))


#: The issue's first table: (measurement, target, component, figure).
FIRST_TABLE: tuple[tuple[str, str, str, Callable[[dict[str, Any]], tuple[str, bool]]], ...] = (
    ("1 GiB upload with backup vs the limit (slower of `cp + sync` and one core's MD5), best of 3 vs best of 3",
     ">= 0.8x (stretch 0.95x)", "core", core_upload),
    ("server CPU per GiB uploaded, beyond the MD5 the `etag` needs", "<= 1.0 s", "core", core_cpu),
    ("service RSS growth during that upload", "< 100 MiB", "core", core_rss),
    ("`versions=true` (10) vs bare aiohttp handler", ">= 0.3x, p99 < 20 ms", "core", core_read("versions_10")),
    ("`download_backup` (small) vs bare", ">= 0.3x, p99 < 20 ms", "core", core_read("download_backup")),
    ("batch client `initial-backup --source`, first run vs restic", ">= 2x (stretch >= 0.9x `cp -r`)", "initial",
     initial_first),
    ("S3 upload with backup vs a plain SDK upload", ">= 0.9x", "s3", s3_upload),
)

#: The issue's second table (request cost against library size): row keys of
#: bench_library_size.py's --json, and their names in the issue.
SECOND_TABLE = (
    ("upload", "upload of a new version of an existing asset"),
    ("destroy", "`destroy` of a live asset with backup"),
    ("restart", "restart with blob files: first `/healthz`; worst stall after"),
    ("search_tags", "search `tags=xyz`"),
    ("search_sorted", "search all live, `sort_by created_at desc`"),
    ("search_prefix", "search `public_id` prefix"),
    ("search_deleted", "search `status=deleted`, `created_at desc`"),
    ("listing", "listing, 500 per page, deep pages (keyset cursor)"),
    ("versions", "`versions=true`"),
)


def libsize_cell(outcome: Outcome, size: int, key: str) -> Cell:
    """A cell of the second table; a size the benchmark was asked for but has no rows of is FAILED."""
    data = outcome.data
    if data is not None and str(size) in data.get("errors", {}):
        return Cell(data["errors"][str(size)][:120], FAILED)
    if data is not None and key == "restart" and size not in data.get("args", {}).get("blob_sizes", []):
        return Cell("no blob files at this size", NOT_RUN)

    def figure(d: dict[str, Any]) -> tuple[str, bool]:
        rows = d["sizes"][str(size)]
        row = next((r for r in rows if r["key"] == key), None)
        if row is None:
            raise KeyError(f"no {key} row at {size}")
        if key == "restart":
            seconds = row["p50_ms"] / 1000
            return (f"{seconds:.2f} s; {row['stall_ms']:.0f} ms",
                    seconds < RESTART_S and row["stall_ms"] < LIBSIZE_STALL_MS)
        return (f"{row['p50_ms']:.1f} ({row['p99_ms']:.1f}); {row['stall_ms']:.0f}",
                row["p50_ms"] < LIBSIZE_P50_MS and row["stall_ms"] < LIBSIZE_STALL_MS)

    return judge(outcome, figure)


# --- the report ------------------------------------------------------------------------------


@dataclass
class Report:
    outcomes: dict[str, Outcome]
    sizes: list[int]
    machine: dict[str, Any] = field(default_factory=dict)

    def first_rows(self) -> list[tuple[str, str, Cell]]:
        rows = []
        for label, target, component, figure in FIRST_TABLE:
            outcome = self.outcomes[component]
            # bench_core's own rule: the wall-clock upload ratio is not judged beside other processes' load.
            busy = figure is core_upload and core_upload_busy(outcome.data)
            rows.append((label, target, judge(outcome, figure, busy=busy)))
        return rows

    def second_rows(self) -> list[tuple[str, list[Cell]]]:
        outcome = self.outcomes["libsize"]
        return [(name, [libsize_cell(outcome, size, key) for size in self.sizes]) for key, name in SECOND_TABLE]

    def cells(self) -> list[Cell]:
        return [cell for _, _, cell in self.first_rows()] + [cell for _, cells in self.second_rows() for cell in cells]

    def exit_status(self) -> int:
        statuses = {cell.status for cell in self.cells()}
        if FAILED in statuses or any(o.crashed for o in self.outcomes.values()):
            return 2
        return 1 if statuses & {MISSED, NOT_JUDGED} else 0

    def markdown(self) -> str:
        m = self.machine
        lines = [
            f"### Issue 10's table in one run ({m.get('start', '?')} – {m.get('end', '?')} UTC)",
            "",
            f"Measured {m.get('start', '?')} – {m.get('end', '?')} UTC at `{m.get('commit', '?')}` by "
            f"`{m.get('command', 'scripts/bench_issue10.py')}`.",
            "",
            f"Machine: {m.get('nproc', '?')} CPUs ({m.get('cpu_model', '?')}), {m.get('memory_gib', 0):.1f} GiB RAM; "
            f"1-min load average {m.get('load_before', '?')} before, {m.get('load_after', '?')} after. "
            "Outside load per benchmark: "
            + "; ".join(f"{name} {o.load_text()}" for name, o in self.outcomes.items()) + ".",
            "",
            "| measurement | measured | target | verdict |",
            "|---|---|---|---|",
        ]
        for label, target, cell in self.first_rows():
            lines.append(f"| {label} | {cell.value or '–'} | {target} | {cell.status} |")
        lines += [
            "",
            f"Request cost against library size: p50 (p99) ms; worst `/healthz` ms while the row ran. Target: p50 < "
            f"{LIBSIZE_P50_MS:.0f} ms and no stall over {LIBSIZE_STALL_MS:.0f} ms; the restart at the largest size with blob "
            f"files answers in under {RESTART_S:.0f} s with no stall.",
            "",
            "| | " + " | ".join(f"{size:,} assets" for size in self.sizes) + " |",
            "|---|" + "---|" * len(self.sizes),
        ]
        for name, cells in self.second_rows():
            lines.append(f"| {name} | " + " | ".join(cell.text() for cell in cells) + " |")
        lines += ["", "Benchmarks: " + "; ".join(
            f"{name} {'not run' if not o.ran else f'exit {o.returncode}, {o.seconds:.0f} s'}"
            + (f" (FAILED: {o.error})" if o.crashed and o.error else " (FAILED)" if o.crashed else "")
            for name, o in self.outcomes.items()) + "."]
        return "\n".join(lines) + "\n"

    def combined(self) -> dict[str, Any]:
        return {"machine": self.machine, "sizes": self.sizes, "exit_status": self.exit_status(),
                "first_table": [{"measurement": label, "target": target, "measured": cell.value, "status": cell.status}
                                for label, target, cell in self.first_rows()],
                "second_table": [{"row": name, **{str(size): {"measured": cell.value, "status": cell.status}
                                                  for size, cell in zip(self.sizes, cells, strict=True)}}
                                 for name, cells in self.second_rows()],
                "components": {name: {"returncode": o.returncode, "seconds": o.seconds, "error": o.error, "data": o.data}
                               for name, o in self.outcomes.items()}}


# --- running the components ------------------------------------------------------------------


@dataclass
class Plan:
    name: str
    argv: list[str]
    estimate: float  # seconds, on the 2-CPU reference machine


def libsize_estimate(sizes: list[int], blob_sizes: list[int], requests: int) -> float:
    """Per size: rows generated, loaded and served ~200 s per 1M assets (load alone ~105 s), ~30 s
    of requests at 50 per row; with blob files ~450 s per 1M to write them (401-483 s measured at
    1M), ~200 s per 1M to remove them at the end (a guess: 20k took ~60 s on a busy disk) and the
    restart's 30 s watch."""
    return sum(25 + size * 2e-4 + 30 * requests / 50 + (size * 6.5e-4 + 35 if size in blob_sizes else 0) for size in sizes)


def plans(args: argparse.Namespace, json_dir: Path) -> list[Plan]:
    python, load = sys.executable, ["--allow-load"] if args.allow_load else []

    def script(name: str) -> list[str]:
        return [python, str(HERE / name)]

    out = {
        "core": Plan("core", [*script("bench_core.py"), "--timeline", *(["--quick"] if args.quick else [])], 90 if args.quick else 240),
        "initial": Plan("initial", [*script("bench_initial_backup.py"), "--scale", "0.01" if args.quick else "0.2"],
                        60 if args.quick else 300),
        "s3": Plan("s3", [*script("bench_buckets.py"), "--backend", "s3", *(["--quick"] if args.quick else [])],
                   60 if args.quick else 300),
        "libsize": Plan("libsize", [*script("bench_library_size.py"), "--sizes", ",".join(map(str, args.sizes)),
                                    *(["--blob-sizes", ",".join(map(str, args.blob_sizes))] if args.blob_sizes else ["--no-blobs"]),
                                    *(["--quick"] if args.quick else []), "--gc-probe"],  # slow collections per row
                        libsize_estimate(args.sizes, args.blob_sizes, 10 if args.quick else 50)),
    }
    chosen = [out[name] for name in COMPONENTS if name in args.only]
    for plan in chosen:
        plan.argv += [*load, "--json", str(json_dir / f"{plan.name}.json")]
    return chosen


def run_component(plan: Plan, json_path: Path, timeout: float) -> Outcome:
    """Run one benchmark (its output goes straight through); stop it with SIGTERM (it cleans up),
    then kill its process group, if it runs past `timeout`."""
    print(f"\n##### {plan.name}: {' '.join(plan.argv)}  (expected ~{plan.estimate / 60:.1f} min)", flush=True)
    started = time.monotonic()
    proc = subprocess.Popen(plan.argv, start_new_session=True)
    error = ""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        error = f"timed out after {timeout:.0f} s"
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
        raise
    seconds = time.monotonic() - started
    data: dict[str, Any] | None = None
    try:
        data = json.loads(json_path.read_text())
    except (OSError, ValueError) as exc:
        error = error or f"no results ({type(exc).__name__})"
    returncode = proc.returncode if not error.startswith("timed out") else 124
    print(f"##### {plan.name}: exit status {returncode} after {seconds:.0f} s{'; ' + error if error else ''}", flush=True)
    return Outcome(plan.name, returncode, seconds, data, error)


def machine_facts() -> dict[str, Any]:
    model = "unknown CPU"
    with contextlib.suppress(OSError, StopIteration):
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))
    commit = subprocess.run(["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            check=False).stdout.strip() or "unknown"
    dirty = subprocess.run(["git", "-C", str(HERE), "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                           text=True, check=False).stdout.strip()
    pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return {"nproc": os.cpu_count(), "cpu_model": model, "memory_gib": pages / (1 << 30), "python": platform.python_version(),
            "commit": commit + (" (with local changes)" if dirty else "")}


def utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the smallest form of each benchmark (a smoke run, ~5 min)")
    parser.add_argument("--only", default=",".join(COMPONENTS), help=f"comma-separated subset of {','.join(COMPONENTS)}")
    parser.add_argument("--sizes", default=None,
                        help="library sizes for libsize (default 10000,100000,1000000; --quick 10000)")
    parser.add_argument("--blob-sizes", default=None,
                        help="libsize sizes with blob files and the restart row (default: the largest size; '' for none)")
    parser.add_argument("--allow-load", action="store_true",
                        help="passed to each benchmark (they then print their ratios); rows measured under outside "
                             "load are still NOT JUDGED here")
    parser.add_argument("--markdown", metavar="FILE", help="write the table as a markdown fragment for docs/performance.md")
    parser.add_argument("--json", metavar="FILE", help="write the combined results (every component's JSON) to FILE")
    parser.add_argument("--timeout-factor", type=float, default=3.0,
                        help="stop a benchmark after this many times its expected duration (at least 10 min)")
    args = parser.parse_args(argv)
    args.only = [name.strip() for name in args.only.split(",") if name.strip()]
    if unknown := set(args.only) - set(COMPONENTS):
        parser.error(f"--only: unknown {', '.join(sorted(unknown))} (choose from {','.join(COMPONENTS)})")
    try:
        args.sizes = [int(s) for s in (args.sizes or ("10000" if args.quick else ",".join(map(str, FULL_SIZES)))).split(",")]
        args.blob_sizes = ([max(args.sizes)] if args.blob_sizes is None
                           else [int(s) for s in args.blob_sizes.split(",") if s.strip()])
    except ValueError:
        parser.error("--sizes / --blob-sizes take comma-separated numbers")
    if not set(args.blob_sizes) <= set(args.sizes):
        parser.error("--blob-sizes: each must be one of --sizes")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    machine = {**machine_facts(), "start": utc_now(), "load_before": f"{os.getloadavg()[0]:.2f}",
               "command": "scripts/bench_issue10.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    outcomes = {name: Outcome(name) for name in COMPONENTS}
    with tempfile.TemporaryDirectory(prefix="bench-issue10-") as tmp:
        chosen = plans(args, Path(tmp))
        total = sum(plan.estimate for plan in chosen)
        print(f"bench_issue10: {len(chosen)} benchmark(s), expected ~{total / 60:.0f} min on 2 CPUs: "
              + ", ".join(f"{plan.name} ~{plan.estimate / 60:.1f} min" for plan in chosen), flush=True)
        for plan in chosen:
            outcomes[plan.name] = run_component(plan, Path(tmp) / f"{plan.name}.json",
                                                max(600.0, args.timeout_factor * plan.estimate))
    machine.update(end=utc_now(), load_after=f"{os.getloadavg()[0]:.2f}")
    report = Report(outcomes, args.sizes, machine)
    text = report.markdown()
    print("\n" + "=" * 100 + "\nISSUE 10 TABLE\n" + "=" * 100 + "\n" + text, flush=True)
    if args.markdown:
        Path(args.markdown).write_text(text)
        print(f"markdown written to {args.markdown}")
    if args.json:
        Path(args.json).write_text(json.dumps(report.combined(), indent=2, default=str))
        print(f"combined results written to {args.json}")
    return report.exit_status()


if __name__ == "__main__":
    sys.exit(main())
