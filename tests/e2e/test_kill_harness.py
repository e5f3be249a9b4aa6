"""The random-kill harness (scripts/kill_harness.py) in a bounded form: a handful of SIGKILLs
under the mixed SDK workload, then one assertion per invariant so a failure names the one
that broke (docs/testing.md). `scripts/kill_harness.py --kills 100` is the long form.
"""

from pathlib import Path
from typing import Any

import pytest

from scripts.kill_harness import INVARIANTS, Ledger, Options, Report, run

KILLS = 6


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> tuple[Report, Ledger]:
    root: Path = tmp_path_factory.mktemp("kill-harness")
    return run(root, Options(kills=KILLS, seed=8, workers=4, min_delay=0.5, max_delay=2.5, chunked_every=12))


def test_the_workload_ran_and_survived_every_kill(harness: Any) -> None:
    report, ledger = harness
    assert report.kills == report.cycles == KILLS
    assert ledger.acked["upload"] > 0 and report.versions_verified > 0
    assert ledger.acked["chunk"] + ledger.acked["upload_large"] > 0, "no chunked upload was acknowledged"


# I4 can fail on today's code (it depends on timing; the long form found it): a tags update
# (`update`, `add_tag`) racing an upload of the same asset rewrites the asset row from a stale
# read (issue 8, item 8), so the current version rolls back and the next upload reuses a
# version number. Expected to hold after that fix.
@pytest.mark.parametrize("invariant", sorted(INVARIANTS))
def test_invariant_holds_after_every_kill(harness: Any, invariant: str) -> None:
    report, _ = harness
    assert report.checks[invariant] > 0, f"{invariant} was never checked"
    assert report.violated(invariant) == []
