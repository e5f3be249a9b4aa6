"""Snapshot schedules and retention policies, evaluated against an injectable clock.

A schedule takes a snapshot daily at HH:MM UTC or weekly on a weekday at HH:MM UTC. A policy
says which *scheduled* snapshots to keep, like restic/borg: `keep_last` N newest,
`keep_within` everything younger than a duration, and `keep_daily|weekly|monthly|yearly` N:
the newest snapshot of each of the N most recent UTC days/ISO weeks/months/years that have
one. A snapshot any rule keeps stays. Manual and pinned snapshots are never touched.

Removal is announced first: a snapshot the policy drops is marked `pending_deletion` with
`expires_at` one grace period ahead, and removed by the first run after that if the policy
still drops it. Retention removes snapshots only; a revision goes only when no version and
no other snapshot references it (`MetadataRepository.digest_referenced`).

State lives in the database (`snapshot_schedules.next_run_at`, claimed by compare-and-set), so
a restart or a second process neither loses nor doubles a run; a run missed while the service
was down is taken once at the next tick.
"""

import logging
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from versionstore import ticks
from versionstore.alerts import RETENTION
from versionstore.console.audit import AuditLog
from versionstore.errors import BadRequest
from versionstore.snapshot_records import ScheduleRow, Snapshot
from versionstore.snapshots import SCHEDULED, Snapshots, check_prefix

log = logging.getLogger(__name__)

WEEKDAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
DAY = 86400.0
#: How long a snapshot is shown as pending deletion before retention removes it.
DEFAULT_GRACE = DAY

PRESETS: dict[str, dict[str, Any]] = {
    # grandfather-father-son: two weeks of dailies, three months of weeklies, a year of monthlies
    "gfs": {"keep_daily": 14, "keep_weekly": 13, "keep_monthly": 12},
    "last_4": {"keep_last": 4},
    "month": {"keep_within": "30d"},
    "days_1": {"keep_within": "1d"},
    "days_7": {"keep_within": "7d"},
    "days_14": {"keep_within": "14d"},
    "days_30": {"keep_within": "30d"},
}
_COUNTS = ("keep_last", "keep_daily", "keep_weekly", "keep_monthly", "keep_yearly")
_DURATION = re.compile(r"^(\d{1,6})([hdw])$")
_UNIT = {"h": 3600.0, "d": DAY, "w": 7 * DAY}


# --- schedules ---------------------------------------------------------------------------------


def parse_schedule(raw: dict[str, Any]) -> dict[str, Any]:
    """{"every": "daily"|"weekly", "at": "HH:MM", "weekday": "sunday" (weekly), "prefix": ""}."""
    every = str(raw.get("every") or "daily")
    if every not in ("daily", "weekly"):
        raise BadRequest("every must be daily or weekly")
    at = str(raw.get("at") or "00:00")
    match = re.fullmatch(r"([01]\d|2[0-3]):([0-5]\d)", at)
    if match is None:
        raise BadRequest(f"Invalid at {at!r}: HH:MM in UTC")
    schedule: dict[str, Any] = {"every": every, "at": at, "prefix": check_prefix(raw.get("prefix"))}
    if every == "weekly":
        weekday = str(raw.get("weekday") or "sunday").lower()
        if weekday not in WEEKDAYS:
            raise BadRequest(f"Invalid weekday {weekday!r}")
        schedule["weekday"] = weekday
    return schedule


def schedule_label(schedule: dict[str, Any]) -> str:
    """What scheduled snapshots are named after (`created_by`)."""
    if schedule["every"] == "weekly":
        return f"schedule:weekly {schedule['weekday']} {schedule['at']} UTC"
    return f"schedule:daily {schedule['at']} UTC"


def next_run(schedule: dict[str, Any], after: float) -> float:
    """The first scheduled time strictly after `after`."""
    hour, minute = (int(part) for part in schedule["at"].split(":"))
    moment = datetime.fromtimestamp(after, UTC)
    candidate = moment.replace(hour=hour, minute=minute, second=0, microsecond=0)
    while candidate.timestamp() <= after or (
        schedule["every"] == "weekly" and candidate.weekday() != WEEKDAYS.index(schedule["weekday"])
    ):
        candidate += timedelta(days=1)
    return candidate.timestamp()


# --- policies ----------------------------------------------------------------------------------


def parse_policy(raw: dict[str, Any]) -> dict[str, Any]:
    """A preset name (`preset`) and/or explicit rules; explicit rules override the preset's."""
    policy: dict[str, Any] = {}
    if raw.get("preset"):
        preset = str(raw["preset"])
        if preset not in PRESETS:
            raise BadRequest(f"Unknown preset {preset!r} (one of {', '.join(PRESETS)})")
        policy.update(PRESETS[preset])
    for name in _COUNTS:
        if raw.get(name) not in (None, ""):
            try:
                count = int(str(raw[name]))
            except ValueError:
                raise BadRequest(f"Invalid {name} - {raw[name]}") from None
            if not 0 <= count <= 100000:
                raise BadRequest(f"{name} must be between 0 and 100000")
            policy[name] = count
    if raw.get("keep_within") not in (None, ""):
        policy["keep_within"] = str(raw["keep_within"])
    if "keep_within" in policy:
        duration_seconds(policy["keep_within"])
    if not policy:
        raise BadRequest("A retention policy needs a preset or at least one keep_* rule")
    return policy


def duration_seconds(value: str) -> float:
    match = _DURATION.fullmatch(value)
    if match is None:
        raise BadRequest(f"Invalid duration {value!r}: a number and h, d or w (e.g. 30d)")
    return int(match[1]) * _UNIT[match[2]]


def _period(rule: str, ts: float) -> tuple[int, ...]:
    moment = datetime.fromtimestamp(ts, UTC)
    if rule == "keep_daily":
        return moment.year, moment.month, moment.day
    if rule == "keep_weekly":
        year, week, _ = moment.isocalendar()
        return year, week
    if rule == "keep_monthly":
        return moment.year, moment.month
    return (moment.year,)


@dataclass
class Decision:
    keep: dict[str, list[str]] = field(default_factory=dict)  # id -> the rules that keep it
    remove: list[str] = field(default_factory=list)


def evaluate(policy: dict[str, Any], snapshots: Iterable[tuple[str, float]], now: float) -> Decision:
    """Which of these (id, created_at) snapshots the policy keeps at `now` (pure)."""
    ordered = sorted(snapshots, key=lambda s: (s[1], s[0]), reverse=True)
    decision = Decision()

    def keep(snapshot_id: str, why: str) -> None:
        decision.keep.setdefault(snapshot_id, []).append(why)

    for snapshot_id, _ in ordered[: policy.get("keep_last", 0)]:
        keep(snapshot_id, "keep_last")
    if "keep_within" in policy:
        since = now - duration_seconds(policy["keep_within"])
        for snapshot_id, created_at in ordered:
            if created_at >= since:
                keep(snapshot_id, "keep_within")
    for rule in ("keep_daily", "keep_weekly", "keep_monthly", "keep_yearly"):
        wanted, last = policy.get(rule, 0), None
        for snapshot_id, created_at in ordered:
            if wanted <= 0:
                break
            period = _period(rule, created_at)
            if period != last:
                keep(snapshot_id, rule)
                wanted, last = wanted - 1, period
    decision.remove = [s for s, _ in ordered if s not in decision.keep]
    return decision


# --- applying a policy -------------------------------------------------------------------------


def _eligible(snapshots: Sequence[Snapshot]) -> list[Snapshot]:
    """What retention decides about: scheduled, unpinned, completed snapshots."""
    return [s for s in snapshots if s.type == SCHEDULED and not s.pinned and s.status == "completed"]


@dataclass
class Outcome:
    kept: list[str] = field(default_factory=list)
    marked: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)


async def all_snapshots(snapshots: Snapshots, cloud: str) -> list[Snapshot]:
    found: list[Snapshot] = []
    while True:
        page = await snapshots.meta.list_snapshots(cloud, 500, (found[-1].created_at, found[-1].id) if found else None)
        found += page
        if len(page) < 500:
            return found


async def apply(snapshots: Snapshots, cloud: str, policy: dict[str, Any], now: float, grace: float = DEFAULT_GRACE) -> Outcome:
    """Mark what the policy drops as pending deletion; remove what was marked and has expired.
    A failed scheduled snapshot goes once a newer scheduled one completed."""
    existing = await all_snapshots(snapshots, cloud)
    eligible = _eligible(existing)
    decision = evaluate(policy, [(s.id, s.created_at) for s in eligible], now)
    outcome = Outcome(kept=list(decision.keep))
    by_id = {s.id: s for s in eligible}
    for snapshot_id in decision.remove:
        snapshot = by_id[snapshot_id]
        if snapshot.pending_deletion and snapshot.expires_at is not None and snapshot.expires_at <= now:
            await snapshots.delete(cloud, snapshot_id, by_retention=True)
            outcome.removed.append(snapshot_id)
            await _audit(snapshots, "snapshot_delete", cloud, snapshot_id, {"why": "retention policy"})
        elif not snapshot.pending_deletion:
            await snapshots.meta.update_snapshot(cloud, snapshot_id, pending_deletion=True, expires_at=now + grace)
            outcome.marked.append(snapshot_id)
            await _audit(snapshots, "snapshot_expiring", cloud, snapshot_id, {"expires_at": now + grace})
    for snapshot_id in decision.keep:
        if by_id[snapshot_id].pending_deletion:  # the policy changed: no longer due
            await snapshots.meta.update_snapshot(cloud, snapshot_id, pending_deletion=False, expires_at=None)
    newest = max((s.created_at for s in eligible), default=None)
    for failed in existing:
        if failed.type == SCHEDULED and failed.status == "failed" and newest is not None and failed.created_at < newest:
            await snapshots.delete(cloud, failed.id, by_retention=True)
            outcome.removed.append(failed.id)
            await _audit(snapshots, "snapshot_delete", cloud, failed.id, {"why": "failed, and a newer scheduled one completed"})
    return outcome


async def _audit(snapshots: Snapshots, action: str, cloud: str, target: str, detail: dict[str, Any], outcome: str = "ok") -> None:
    """What the retention job does is audited like a person's action (actor `job:retention`)."""
    await AuditLog(snapshots.meta).record("job:retention", action, cloud=cloud, target=target, outcome=outcome, detail=detail)


async def simulate(snapshots: Snapshots, cloud: str, policy: dict[str, Any], now: float) -> dict[str, Any]:
    """What `apply` would keep and remove at `now`, without acting, and what it would free."""
    existing = await all_snapshots(snapshots, cloud)
    eligible = _eligible(existing)
    decision = evaluate(policy, [(s.id, s.created_at) for s in eligible], now)
    meta = snapshots.meta
    return {
        "policy": policy,
        "keep": [{"id": s, "created_at": _created(eligible, s), "rules": rules} for s, rules in decision.keep.items()],
        "remove": [{"id": s, "created_at": _created(eligible, s)} for s in decision.remove],
        "untouched": [s.id for s in existing if s not in eligible],
        # Bytes no version and no kept snapshot would reference: what collection would delete.
        "bytes_unreferenced": await meta.snapshot_freed_bytes(cloud, decision.remove),
        # Bytes of revisions only the removed snapshots list and no live asset has as current.
        "unique_bytes_removed": await meta.snapshot_unique_bytes(cloud, decision.remove),
    }


def _created(snapshots: Sequence[Snapshot], snapshot_id: str) -> float:
    return next(s.created_at for s in snapshots if s.id == snapshot_id)


# --- the scheduler -----------------------------------------------------------------------------


async def set_schedule(snapshots: Snapshots, cloud: str, schedule: dict[str, Any], policy: dict[str, Any], now: float) -> ScheduleRow:
    row = ScheduleRow(cloud, parse_schedule(schedule), parse_policy(policy), next_run(parse_schedule(schedule), now), None)
    await snapshots.meta.set_schedule(row)
    return row


async def tick(snapshots: Snapshots, now: float, grace: float = DEFAULT_GRACE) -> list[Snapshot]:
    """Take every due scheduled snapshot and apply its environment's retention (one call of the
    durable schedule; the clock is the caller's). Returns the snapshots taken."""
    taken = []
    for row in await snapshots.meta.list_schedules():
        if row.next_run_at > now:
            continue
        if not await snapshots.meta.claim_schedule_run(row.cloud, row.next_run_at, next_run(row.schedule, now), now):
            continue  # another process took this run
        snapshot = await snapshots.create(
            row.cloud, note=None, prefix=row.schedule.get("prefix", ""), type_=SCHEDULED,
            created_by=schedule_label(row.schedule), now=now,
        )
        taken.append(snapshot)
        await _audit(snapshots, "snapshot_create", row.cloud, snapshot.id, {"created_by": snapshot.created_by},
                     outcome="failed" if snapshot.status == "failed" else "ok")
        try:
            await apply(snapshots, row.cloud, row.policy, now, grace)
        except Exception as exc:  # one environment's failure must not stop the others' runs
            await snapshots.alerts.failed(row.cloud, RETENTION, f"{type(exc).__name__}: {exc}", detail={"policy": row.policy})
        else:
            await snapshots.alerts.succeeded(row.cloud, RETENTION)
    return taken


async def run_schedules(snapshots: Snapshots, interval: float, clock: Callable[[], float] = time.time) -> None:
    """The server's loop around `tick`; runs until cancelled."""
    await ticks.every(interval, lambda: tick(snapshots, clock()), log, "snapshot schedule")
