"""`versionstore drill run|list|show|schedule`: restore drills from the command line.

`run` queues a `snapshot_drill` job and performs it in this process (claimed like any job, so a
running server does not run it twice), then prints the report; with `--queue` it only queues
it for the server. A failure or a mismatch raises the alarm as the server would (alerts.py),
including the POST to the environment's alert notification_url.
"""

import argparse
import asyncio
import functools
import time
from collections.abc import Callable
from typing import Any

from versionstore.errors import ApiError
from versionstore.snapshot_cli import Command, Service, _run, with_cloud

#: How often `run` looks at a drill another process took.
WAIT_POLL = 1.0


async def _start(snapshots: Service, args: argparse.Namespace) -> Any:
    from versionstore import drills
    from versionstore.jobs import JobRunner

    meta = snapshots.meta
    sample = drills.parse_sample({"sample_size": args.sample, "sample_fraction": args.fraction, "seed": args.seed})
    if not args.snapshot:
        await drills.latest_snapshot(meta, args.cloud)  # refused now rather than a failed drill later
    job = await drills.start(meta, args.cloud, drills.job_params(sample, snapshot_id=args.snapshot, created_by="cli"))
    if job is None:
        raise ApiError(f"a drill of {args.cloud} is already running")
    await _audit(meta, args.cloud, "drill_start", job.id, {"snapshot_id": args.snapshot, "sample": args.sample or args.fraction})
    if args.queue:
        return {"drill": job.id, "status": job.status, "note": "the running server performs it: versionstore drill show"}
    await JobRunner(meta, {drills.KIND: drills.DrillJob(snapshots.service, snapshots.alerts).run}).run_here(job)
    found = await meta.get_job(args.cloud, job.id)
    while found is not None and found.open:  # a server claimed it first: it runs there
        await asyncio.sleep(WAIT_POLL)
        found = await meta.get_job(args.cloud, job.id)
    assert found is not None
    return drills.describe(found)


async def _list(snapshots: Service, args: argparse.Namespace) -> Any:
    from versionstore import drills

    return [drills.describe(job) for job in await snapshots.meta.list_jobs(args.cloud, drills.KIND, args.limit)]


async def _show(snapshots: Service, args: argparse.Namespace) -> Any:
    from versionstore import drills

    job = await snapshots.meta.get_job(args.cloud, args.id)
    if job is None or job.kind != drills.KIND:
        raise ApiError(f"no drill {args.id} in {args.cloud}")
    return drills.describe(job)


async def _schedule(snapshots: Service, args: argparse.Namespace) -> Any:
    from versionstore import drills

    meta = snapshots.meta
    if args.off:
        await meta.delete_drill_schedule(args.cloud)
        await _audit(meta, args.cloud, "drill_schedule_delete", args.cloud)
    elif args.every:
        raw = {"every": args.every, "at": args.at, "weekday": args.weekday, "sample_size": args.sample,
               "sample_fraction": args.fraction}
        await drills.set_schedule(meta, args.cloud, raw, time.time())
        await _audit(meta, args.cloud, "drill_schedule_set", args.cloud, {"schedule": raw})
    row = await meta.get_drill_schedule(args.cloud)
    return {"schedule": None} if row is None else {"schedule": row.schedule, "sample": row.sample, "next_run_at": row.next_run_at}


async def _audit(meta: Any, cloud: str, action: str, target: str, detail: dict[str, Any] | None = None) -> None:
    """The same audit record the API writes for this change, by the actor `cli`."""
    from versionstore.console.audit import AuditLog

    await AuditLog(meta).record("cli", action, cloud=cloud, target=target, detail=detail)


def _sample_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--sample", type=int, metavar="N", help="restore N items (default 100, at most 10000)")
    group.add_argument("--fraction", type=float, metavar="F", help="restore this fraction of the items (0 < F <= 1)")


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]", command: Command,
             data_dir_option: Callable[..., None]) -> None:
    """Add `drill run|list|show|schedule` to the top-level parser."""
    on_cloud = functools.partial(with_cloud, data_dir_option=data_dir_option)

    drill = command(sub, "drill", "restore drills: restore a sample of a snapshot and verify every byte (docs/snapshots.md)")
    drill_sub = drill.add_subparsers(dest="drill_command", required=True, metavar="COMMAND")
    run = on_cloud(command(drill_sub, "run", "run a drill here and print its report (--queue: leave it to the server)",
                           _run(_start)))
    run.add_argument("--snapshot", metavar="ID", help="the snapshot to drill (default: the latest completed one)")
    _sample_options(run)
    run.add_argument("--seed", type=int, help="the sample's seed (the same seed picks the same sample)")
    run.add_argument("--queue", action="store_true", help="only queue the drill; the running server performs it")
    listing = on_cloud(command(drill_sub, "list", "drills, newest first (one JSON object per line)", _run(_list)))
    listing.add_argument("--limit", type=int, default=20, help="at most this many")
    show = on_cloud(command(drill_sub, "show", "one drill and its report", _run(_show)))
    show.add_argument("id", help="drill id")
    schedule = on_cloud(command(drill_sub, "schedule", "show, set (--every) or remove (--off) the drill schedule",
                                _run(_schedule)))
    schedule.add_argument("--every", choices=("daily", "weekly"), help="how often")
    schedule.add_argument("--at", default="03:00", help="HH:MM UTC (default 03:00)")
    schedule.add_argument("--weekday", default="sunday", help="with --every weekly (default sunday)")
    _sample_options(schedule)
    schedule.add_argument("--off", action="store_true", help="remove the schedule")
