"""`versionstore purge list|undo|run` and the protection options of `cloud create|set`
(versionstore/protection.py). The operator on the box is the only one who can lower or turn
off a purge delay or issue an append-only key: no API key can (docs/threat-model.md).
"""

import argparse
import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

from versionstore.models import Cloud
from versionstore.repository import MetadataRepository

Command = Callable[..., argparse.ArgumentParser]


def add_cloud_options(parser: argparse.ArgumentParser, *, setting: bool) -> None:
    """--purge-delay-days and --append-only-key on `cloud create` and `cloud set`."""
    parser.add_argument(
        "--purge-delay-days", type=int, metavar="N",
        help="hold irreversible deletions N days as undoable scheduled purges (0: off, Cloudinary's semantics)"
        + (" (default: unchanged)" if setting else " (default: 0)"),
    )
    parser.add_argument(
        "--append-only-key", action="store_true",
        help="issue an append-only key pair (upload, restore, list, download; never delete), printed once"
        + ("; replaces an earlier one" if setting else ""),
    )


async def apply_cloud_options(meta: MetadataRepository, cloud: Cloud, args: argparse.Namespace) -> dict[str, Any]:
    """Apply the protection options given; returns what changed, for the audit record (never
    the secret). The new append-only pair goes to stdout, once."""
    from versionstore import protection

    changed: dict[str, Any] = {}
    if args.purge_delay_days is not None:
        await protection.set_purge_delay(meta, cloud, args.purge_delay_days)
        changed["purge_delay_days"] = args.purge_delay_days
    if args.append_only_key:
        key, secret = await protection.issue_append_key(meta, cloud)
        print(f"append-only key (secret shown once): api_key={key} api_secret={secret}", flush=True)
        changed["append_only_key"] = key
    return changed


def _run(action: Callable[[Any, argparse.Namespace], Any]) -> Callable[[argparse.Namespace], int]:
    def command(args: argparse.Namespace) -> int:
        from versionstore import bootstrap
        from versionstore.cli import store_config

        config = store_config(args.data_dir, args.metadata, create=False)

        async def run() -> None:
            async with bootstrap.open_service(config) as service:
                for line in await action(service, args):
                    print(json.dumps(line, default=str))

        asyncio.run(run())
        return 0

    return command


async def _list(service: Any, args: argparse.Namespace) -> list[dict[str, Any]]:
    from versionstore import protection

    state = None if args.state == "all" else args.state
    return [protection.as_json(p) for p in await service.meta.list_purges(args.cloud, state, args.limit)]


async def _undo(service: Any, args: argparse.Namespace) -> list[dict[str, Any]]:
    from versionstore import protection

    return [protection.as_json(await protection.undo(service.meta, args.purge_id, None, "cli"))]


async def _purge_now(service: Any, args: argparse.Namespace) -> list[dict[str, Any]]:
    from versionstore import protection

    return [{"purged": await protection.run_due(service, time.time(), actor="cli")}]


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]", command: Command,
             data_dir_option: Callable[..., None]) -> None:
    purge = command(sub, "purge", "deletions held back by a purge delay: list, undo, purge the due ones now")
    purge_sub = purge.add_subparsers(dest="purge_command", required=True, metavar="COMMAND")
    listing = command(purge_sub, "list", "scheduled purges, newest first (one JSON object per line)", _run(_list))
    listing.add_argument("--cloud", metavar="NAME", help="one environment (default: all)")
    listing.add_argument("--state", choices=("scheduled", "undone", "purged", "all"), default="scheduled", help="which ones")
    listing.add_argument("--limit", type=int, default=1000, help="at most this many")
    data_dir_option(listing, creates=False)
    undo = command(purge_sub, "undo", "bring a scheduled purge's versions back as they were", _run(_undo))
    undo.add_argument("purge_id", help="the purge's id (purge list)")
    data_dir_option(undo, creates=False)
    data_dir_option(command(purge_sub, "run", "purge every due one now (the server does it every tick)", _run(_purge_now)),
                    creates=False)
