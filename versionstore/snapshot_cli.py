"""`versionstore snapshot create|list|show|delete|pin`, `retention simulate`, `restore --at T`.

Each command opens the service like `versionstore verify` (`bootstrap.open_service`: metadata,
stores, claims with their lease heartbeat), acts, and prints JSON (one object, or one per line
for lists). `restore` prints the dry-run diff;
with `--run` it queues the `point_in_time_restore` job that the running server performs.
"""

import argparse
import asyncio
import functools
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

from versionstore import pitr, retention
from versionstore.errors import ApiError, BadRequest

Command = Callable[..., argparse.ArgumentParser]
Service = Any  # versionstore.snapshots.Snapshots (imported lazily: keeps `--help` fast)


def _audit_name(args: argparse.Namespace) -> str | None:
    """The audit action of a command that changes something (None for reads and dry runs)."""
    command = getattr(args, "command", None)
    if command == "snapshot":
        return {"create": "snapshot_create", "delete": "snapshot_delete",
                "pin": "snapshot_unpin" if getattr(args, "off", False) else "snapshot_pin"}.get(args.snapshot_command)
    return "pitr_start" if command == "restore" and args.run else None


async def _audited(meta: Any, args: argparse.Namespace, run: Callable[[], Awaitable[Any]]) -> Any:
    """Run a command; a changing one is audited (actor `cli`) whatever its outcome."""
    from versionstore.console.audit import AuditLog

    action = _audit_name(args)
    if action is None:
        return await run()
    target = getattr(args, "id", None)
    try:
        result = await run()
    except ApiError as exc:
        await AuditLog(meta).record("cli", action, cloud=args.cloud, target=target, outcome="failed", detail={"error": exc.message})
        raise
    found = result if isinstance(result, dict) else {}
    await AuditLog(meta).record("cli", action, cloud=args.cloud, target=target or found.get("id") or found.get("job"),
                                outcome="failed" if found.get("status") == "failed" else "ok")
    return result


def _run(action: Callable[[Service, argparse.Namespace], Awaitable[Any]]) -> Callable[[argparse.Namespace], int]:
    def command(args: argparse.Namespace) -> int:
        from versionstore import bootstrap
        from versionstore.alerts import Alerts
        from versionstore.cli import store_config
        from versionstore.egress import EgressPolicy
        from versionstore.http.notify import one_shot_alert_sender
        from versionstore.snapshots import Snapshots

        config = store_config(args.data_dir, args.metadata, create=False)

        async def run() -> None:
            # With the lease heartbeat: a deletion's release journal stays this run's until it ends.
            async with bootstrap.open_service(config) as service:
                if await service.meta.get_cloud(args.cloud) is None:
                    raise ApiError(f"no product environment named {args.cloud!r}")
                # A failure raises the alarm as in the server, POST to the alert URL included.
                alerts = Alerts(service.meta, one_shot_alert_sender(EgressPolicy(config.fetch_allow), config.poll_interval))
                result = await _audited(service.meta, args, lambda: action(Snapshots(service, alerts), args))
                for line in result if isinstance(result, list) else [result]:
                    print(json.dumps(line, indent=None if isinstance(result, list) else 2, default=str))

        asyncio.run(run())
        return 0

    return command


async def _create(snapshots: Service, args: argparse.Namespace) -> Any:
    created = await snapshots.create(args.cloud, note=args.note, prefix=args.prefix or "", created_by="cli")
    return await snapshots.describe(created)


async def _list(snapshots: Service, args: argparse.Namespace) -> Any:
    found = await snapshots.meta.list_snapshots(args.cloud, args.limit)
    return [await snapshots.describe(s, unique_bytes=args.unique_bytes) for s in found]


async def _show(snapshots: Service, args: argparse.Namespace) -> Any:
    from versionstore.snapshots import item_dict

    body = await snapshots.describe(await snapshots.get(args.cloud, args.id))
    if args.items:
        body["items"] = [item_dict(i) for i in await snapshots.meta.snapshot_items(args.id, 0, args.items)]
    return body


async def _delete(snapshots: Service, args: argparse.Namespace) -> Any:
    return {"deleted": (await snapshots.delete(args.cloud, args.id)).id}


async def _pin(snapshots: Service, args: argparse.Namespace) -> Any:
    return await snapshots.describe(await snapshots.pin(args.cloud, args.id, not args.off))


def _policy(args: argparse.Namespace) -> dict[str, Any]:
    names = ("preset", "keep_last", "keep_within", "keep_daily", "keep_weekly", "keep_monthly", "keep_yearly")
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


async def _simulate(snapshots: Service, args: argparse.Namespace) -> Any:
    given = _policy(args)
    if given:
        policy = retention.parse_policy(given)
    else:
        row = await snapshots.meta.get_schedule(args.cloud)
        if row is None:
            raise BadRequest("no retention policy: give one (--preset, --keep-*) or set the environment's schedule")
        policy = row.policy
    return await retention.simulate(snapshots, args.cloud, policy, pitr.parse_time(args.at) or time.time())


async def _restore(snapshots: Service, args: argparse.Namespace) -> Any:
    selection = await pitr.check_selection(
        snapshots.meta, pitr.Selection(args.cloud, args.prefix or "", pitr.parse_time(args.at), args.snapshot, args.target_cloud)
    )
    if not args.run:
        return await pitr.dry_run(snapshots.meta, selection, args.limit)
    job = await pitr.start(snapshots.meta, selection, pitr.job_params(selection, args.missing, args.overwrite_unbacked), None)
    if job is None:
        raise ApiError(f"a point-in-time restore of {args.cloud} is already running")
    return {"job": job.id, "status": job.status, "note": "the running server performs it: versionstore cloud status / the jobs API"}


def with_cloud(parser: argparse.ArgumentParser, data_dir_option: Callable[..., None]) -> argparse.ArgumentParser:
    """A command on one environment of an existing store: CLOUD and --data-dir."""
    parser.add_argument("cloud", help="environment name")
    data_dir_option(parser, creates=False)
    return parser


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]", command: Command,
             data_dir_option: Callable[..., None]) -> None:
    """Add the snapshot, retention and restore commands to the top-level parser."""
    on_cloud = functools.partial(with_cloud, data_dir_option=data_dir_option)

    snapshot = command(sub, "snapshot", "library snapshots (docs/snapshots.md)")
    snap_sub = snapshot.add_subparsers(dest="snapshot_command", required=True, metavar="COMMAND")
    create = on_cloud(command(snap_sub, "create", "take a manual snapshot (copies no bytes)", _run(_create)))
    create.add_argument("--note", help="what this snapshot is for")
    create.add_argument("--prefix", help="only public_ids under this prefix")
    listing = on_cloud(command(snap_sub, "list", "snapshots, newest first (one JSON object per line)", _run(_list)))
    listing.add_argument("--limit", type=int, default=100, help="at most this many")
    listing.add_argument("--unique-bytes", action="store_true", help="also compute unique_bytes (reads every item)")
    show = on_cloud(command(snap_sub, "show", "one snapshot", _run(_show)))
    show.add_argument("id", help="snapshot id")
    show.add_argument("--items", type=int, default=0, metavar="N", help="also list its first N items (default: 0, none)")
    delete = on_cloud(command(snap_sub, "delete", "delete a manual, unpinned snapshot", _run(_delete)))
    delete.add_argument("id", help="snapshot id")
    pin = on_cloud(command(snap_sub, "pin", "pin a snapshot (or --off to unpin)", _run(_pin)))
    pin.add_argument("id", help="snapshot id")
    pin.add_argument("--off", action="store_true", help="unpin")

    keep = command(sub, "retention", "snapshot retention policies")
    keep_sub = keep.add_subparsers(dest="retention_command", required=True, metavar="COMMAND")
    simulate = on_cloud(command(keep_sub, "simulate", "what a policy keeps and removes, without acting", _run(_simulate)))
    simulate.add_argument("--preset", choices=sorted(retention.PRESETS), help="a preset policy (default: the environment's)")
    for name, what in (("keep_last", "the N newest"), ("keep_daily", "the newest of each of the last N days"),
                       ("keep_weekly", "... of the last N ISO weeks"), ("keep_monthly", "... of the last N months"),
                       ("keep_yearly", "... of the last N years")):
        simulate.add_argument(f"--{name.replace('_', '-')}", dest=name, type=int, metavar="N", help=f"keep {what}")
    simulate.add_argument("--keep-within", dest="keep_within", metavar="DURATION", help="e.g. 30d, 2w, 12h")
    simulate.add_argument("--at", help="evaluate at this time (unix seconds or ISO 8601; default: now)")

    restore = on_cloud(command(sub, "restore", "point-in-time restore: the dry-run diff, or --run to queue the job",
                               _run(_restore)))
    restore.add_argument("--at", help="the time to go back to (unix seconds or ISO 8601)")
    restore.add_argument("--snapshot", metavar="ID", help="restore what this snapshot lists instead of --at")
    restore.add_argument("--prefix", help="only public_ids under this prefix")
    restore.add_argument("--target-cloud", metavar="NAME", help="restore into this environment instead")
    restore.add_argument("--missing", choices=pitr.MISSING_ACTIONS, default="leave",
                         help="assets that did not exist at T: leave them, or delete them recoverably")
    restore.add_argument("--overwrite-unbacked", action="store_true", help="also replace current versions that are not backed up")
    restore.add_argument("--limit", type=int, default=1000, help="entries listed per category in the dry run")
    restore.add_argument("--run", action="store_true", help="queue the real run (the server performs it)")



