"""Where the suite's time goes: `pytest --file-times[=PATH]` sums each test file's setup, call
and teardown seconds (fixtures that start servers or apps show up as setup/teardown, the test's
own work as call) and prints the files by total; with PATH it also writes every test's phases
as JSON, so two runs can be compared file by file (`scripts/test_times.py`)."""

import json
from collections import defaultdict
from pathlib import Path

import pytest

PHASES = ("setup", "call", "teardown")


class FileTimes:
    def __init__(self, path: str | None) -> None:
        self.path = Path(path) if path else None
        self.tests: dict[str, dict[str, float]] = defaultdict(dict)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self.tests[report.nodeid][report.when] = report.duration

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        terminalreporter.write_sep("=", "seconds per test file (--file-times)")
        for line in table(summarize(self.tests)):
            terminalreporter.write_line(line)
        if self.path is not None:
            self.path.write_text(json.dumps(self.tests, indent=0, sort_keys=True))
            terminalreporter.write_line(f"per-test phases written to {self.path}")


def summarize(tests: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """{file: {setup, call, teardown, total, tests}} from {nodeid: {phase: seconds}}."""
    files: dict[str, dict[str, float]] = defaultdict(lambda: dict.fromkeys((*PHASES, "total", "tests"), 0.0))
    for nodeid, phases in tests.items():
        row = files[nodeid.split("::", 1)[0]]
        for phase in PHASES:
            row[phase] += phases.get(phase, 0.0)
            row["total"] += phases.get(phase, 0.0)
        row["tests"] += 1
    return dict(files)


def table(files: dict[str, dict[str, float]]) -> list[str]:
    grand = {key: sum(row[key] for row in files.values()) for key in (*PHASES, "total", "tests")}
    rows = [*sorted(files.items(), key=lambda item: -item[1]["total"]), ("(all)", grand)]
    return [f"{'total s':>8} {'setup':>7} {'call':>7} {'teardown':>8} {'tests':>5}  file"] + [
        f"{row['total']:8.1f} {row['setup']:7.1f} {row['call']:7.1f} {row['teardown']:8.1f} {int(row['tests']):5d}  {name}"
        for name, row in rows
    ]
