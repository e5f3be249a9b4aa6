"""Schedules and retention over simulated years, with an injected clock (no sleeping)."""

from datetime import UTC, datetime

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import CLOUD
from versionstore import retention
from versionstore.http.keys import SERVICE
from versionstore.snapshots import SCHEDULED, Snapshots

DAY = 86400.0
START = datetime(2026, 1, 1, tzinfo=UTC).timestamp()
#: Durable schedules are simulated in 2030: the server's own schedule loop (the real clock) never
#: finds their runs due, so it cannot claim one between two simulated ticks.
FUTURE = datetime(2030, 1, 1, tzinfo=UTC).timestamp()


def ts(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


def test_next_run_daily_and_weekly():
    daily = retention.parse_schedule({"every": "daily", "at": "02:30"})
    assert retention.next_run(daily, ts("2026-03-01T01:00:00")) == ts("2026-03-01T02:30:00")
    assert retention.next_run(daily, ts("2026-03-01T02:30:00")) == ts("2026-03-02T02:30:00")  # strictly after
    weekly = retention.parse_schedule({"every": "weekly", "at": "23:59", "weekday": "Sunday"})
    assert retention.next_run(weekly, ts("2026-03-02T00:00:00")) == ts("2026-03-08T23:59:00")  # 2026-03-08 is a Sunday
    assert retention.schedule_label(weekly) == "schedule:weekly sunday 23:59 UTC"


def test_policy_parsing_refuses_nonsense():
    import pytest

    from versionstore.errors import BadRequest

    for bad in ({}, {"preset": "nope"}, {"keep_last": "x"}, {"keep_daily": -1}, {"keep_within": "3 days"}):
        with pytest.raises(BadRequest):
            retention.parse_policy(bad)
    assert retention.parse_policy({"preset": "gfs", "keep_daily": "7"}) == {"keep_daily": 7, "keep_weekly": 13, "keep_monthly": 12}


def _run(policy: dict, times: list[float], *, check_full: bool = True) -> dict[str, float]:
    """Apply the policy after every snapshot, removing at once; the kept set must always equal
    what the policy keeps of the full, never-pruned history (pruning loses nothing the policy
    would want later)."""
    kept: dict[str, float] = {}
    history: dict[str, float] = {}
    for index, now in enumerate(times):
        kept[f"s{index}"] = history[f"s{index}"] = now
        decision = retention.evaluate(policy, kept.items(), now)
        for gone in decision.remove:
            del kept[gone]
        if check_full:
            assert set(kept) == set(retention.evaluate(policy, history.items(), now).keep)
    return kept


def _days(moment: float) -> str:
    return datetime.fromtimestamp(moment, UTC).strftime("%Y-%m-%d")


def test_every_preset_over_three_years_of_daily_snapshots():
    times = [START + 2 * 3600 + day * DAY for day in range(3 * 365)]
    now = times[-1]
    for name, policy in retention.PRESETS.items():
        kept = sorted(_run(policy, times, check_full=name == "gfs").values())
        if "keep_within" in policy:
            span = retention.duration_seconds(policy["keep_within"])
            assert kept == [t for t in times if t >= now - span], name
        elif name == "last_4":
            assert kept == times[-4:]
        else:  # gfs: the last 14 days, then one per ISO week back 13 weeks, one per month back 12 months
            days = {_days(t) for t in kept}
            assert {_days(t) for t in times[-14:]} <= days
            weeks = {datetime.fromtimestamp(t, UTC).isocalendar()[:2] for t in kept}
            assert len(weeks) >= 13
            months = {datetime.fromtimestamp(t, UTC).strftime("%Y-%m") for t in kept}
            assert len(months) == 12
            assert len(kept) <= 14 + 13 + 12
            # older than the dailies, each kept snapshot is the last of its ISO week or month (newest wins)
            for t in kept:
                if t < now - 14 * DAY:
                    this, after = datetime.fromtimestamp(t, UTC), datetime.fromtimestamp(t + DAY, UTC)
                    assert this.isocalendar()[:2] != after.isocalendar()[:2] or this.month != after.month


@settings(max_examples=20, deadline=None)
@given(
    preset=st.sampled_from(sorted(retention.PRESETS)),
    weekly=st.booleans(),
    skipped=st.sets(st.integers(0, 399), max_size=80),
    hour=st.integers(0, 23),
)
def test_pruning_as_you_go_equals_the_policy_over_the_whole_history(preset, weekly, skipped, hour):
    """Over a simulated year and more, with runs missed (the service was down), for every
    preset and both schedules: the kept set is exactly what the policy keeps of all history."""
    step = 7 * DAY if weekly else DAY
    times = [START + hour * 3600 + i * step for i in range(400 if not weekly else 120) if i not in skipped]
    if times:
        _run(retention.PRESETS[preset], times)


async def test_the_durable_schedule_takes_snapshots_and_announces_removals_before_making_them(api, client):
    await api.upload(b"a", public_id="s/a")
    snapshots = Snapshots(client.app[SERVICE])
    manual = await snapshots.create(CLOUD, note="keep me", now=FUTURE)
    row = await retention.set_schedule(snapshots, CLOUD, {"every": "daily", "at": "02:00"}, {"preset": "last_4"}, FUTURE)
    assert row.next_run_at == FUTURE + 2 * 3600
    assert await retention.tick(snapshots, FUTURE + 3600) == []  # not due yet
    pending_seen: dict[str, float] = {}
    now = FUTURE
    for day in range(12):
        now = FUTURE + 2 * 3600 + day * DAY + 60  # the tick runs a minute late
        taken = await retention.tick(snapshots, now)
        assert len(taken) == 1 and taken[0].type == SCHEDULED and taken[0].created_by == "schedule:daily 02:00 UTC"
        assert await retention.tick(snapshots, now) == []  # the run is claimed: never twice
        current = await retention.all_snapshots(snapshots, CLOUD)
        for s in current:
            if s.pending_deletion:
                pending_seen.setdefault(s.id, now)
        removed = set(pending_seen) - {s.id for s in current}
        for gone in removed:
            assert pending_seen[gone] < now  # shown as pending deletion at an earlier run
    scheduled = [s for s in current if s.type == SCHEDULED]
    assert len([s for s in scheduled if not s.pending_deletion]) == 4
    assert len(scheduled) == 5  # plus yesterday's drop, pending until its grace ends
    assert manual.id in {s.id for s in current}
    # A missed week is caught up with one snapshot, not seven.
    taken = await retention.tick(snapshots, now + 7 * DAY)
    assert len(taken) == 1
    # Pinning takes a snapshot out of retention's hands, even one pending deletion.
    doomed = [s for s in await retention.all_snapshots(snapshots, CLOUD) if s.pending_deletion]
    oldest = min(doomed, key=lambda s: s.created_at)
    await snapshots.pin(CLOUD, oldest.id, True)
    for day in range(1, 4):
        await retention.tick(snapshots, now + (7 + day) * DAY)
    survivor = await snapshots.get(CLOUD, oldest.id)
    assert survivor.pinned and not survivor.pending_deletion and survivor.expires_at is None


async def test_simulate_shows_keeps_removes_and_freed_bytes_without_acting(api, client):
    await api.upload(b"one", public_id="m/a")
    snapshots = Snapshots(client.app[SERVICE])
    for day in range(6):
        await snapshots.create(CLOUD, note=None, type_=SCHEDULED, created_by="schedule:daily 02:00 UTC", now=START + day * DAY)
    report = await api.admin("GET", "versionstore/retention/simulate", params={"keep_last": "2", "at": str(START + 6 * DAY)})
    assert len(report["keep"]) == 2 and len(report["remove"]) == 4
    assert report["bytes_unreferenced"] == 0  # every revision is still a version's
    assert len(await retention.all_snapshots(snapshots, CLOUD)) == 6  # nothing acted on
    await api.admin("GET", "versionstore/retention/simulate", expect=400)  # no policy anywhere
    body = await api.admin("PUT", "versionstore/snapshot_schedule", json={"every": "weekly", "weekday": "monday", "at": "03:15",
                                                                         "preset": "gfs"})
    assert body["policy"] == retention.PRESETS["gfs"] and body["created_by"] == "schedule:weekly monday 03:15 UTC"
    report = await api.admin("GET", "versionstore/retention/simulate")
    assert report["policy"] == retention.PRESETS["gfs"]
    await api.admin("PUT", "versionstore/snapshot_schedule", json={"every": "hourly", "preset": "gfs"}, expect=400)
    assert (await api.admin("GET", "versionstore/snapshot_schedule"))["schedule"]["every"] == "weekly"
    assert (await api.admin("DELETE", "versionstore/snapshot_schedule"))["schedule"] is None
