"""Command line: `versionstore serve`, `cloud create|list|set|status`, `verify` and `initial-backup`.

`initial-backup` is versionstore/backup_client.py (also scripts/initial_backup.py), which
parses its own options.

The cloud commands write the metadata database directly; a running service reads environment
settings on every request, so changes apply without a restart. Changing the backup bucket
checks the bucket from this process (its marker, and write/read/delete access with this
process's credentials) and queues the migration job that the server runs.
"""

import argparse
import asyncio
import json
import logging
import secrets
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from versionstore import ids, migration
from versionstore.config import Config
from versionstore.errors import ApiError
from versionstore.metadata import MetadataStore
from versionstore.models import Cloud

DEFAULT_URL = "http://127.0.0.1:8765"


def cloudinary_url(cloud: Cloud, base_url: str) -> str:
    return f"cloudinary://{cloud.api_key}:{cloud.api_secret}@{cloud.name}?upload_prefix={base_url}"


T = TypeVar("T")


async def _with_meta(data_dir: Path, action: Callable[[MetadataStore], Awaitable[T]]) -> T:
    data_dir.mkdir(parents=True, exist_ok=True)
    meta = await MetadataStore.open(Config(data_dir=data_dir).db_path)
    try:
        return await action(meta)
    finally:
        await meta.close()


async def create_cloud(meta: MetadataStore, name: str, api_key: str | None, api_secret: str | None, auto_backup: bool = True) -> Cloud:
    ids.check_cloud_name(name)
    if await meta.get_cloud(name) is not None:
        raise ApiError(f"product environment {name!r} already exists")
    key = api_key or str(secrets.randbelow(9 * 10**14) + 10**14)
    secret = api_secret or secrets.token_urlsafe(21)
    return await meta.create_cloud(name, key, secret, auto_backup)


def _serve(args: argparse.Namespace) -> int:
    from aiohttp import web

    from versionstore.http.app import create_app

    config = Config.from_env(args.data_dir, host=args.host, port=args.port)
    base_url = f"http://{args.host}:{args.port}"
    if args.demo:
        async def ensure_demo(meta: MetadataStore) -> Cloud:
            return await meta.get_cloud("demo") or await create_cloud(meta, "demo", None, None)

        demo = asyncio.run(_with_meta(args.data_dir, ensure_demo))
        print("Demo product environment ready. Point the Cloudinary SDKs at it with:", flush=True)
        print(f"  export CLOUDINARY_URL='{cloudinary_url(demo, base_url)}'", flush=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    print(f"versionstore listening on {base_url} (data in {args.data_dir})", flush=True)
    access_log = logging.getLogger("aiohttp.access") if args.access_log else None
    web.run_app(create_app(config), host=args.host, port=args.port, print=None, access_log=access_log)
    return 0


def _cloud(args: argparse.Namespace) -> int:
    async def run(meta: MetadataStore) -> int:
        if args.cloud_command == "create":
            cloud = await create_cloud(meta, args.name, args.api_key, args.api_secret, args.auto_backup == "on")
            print(cloudinary_url(cloud, args.url))
        elif args.cloud_command == "list":
            for cloud in await meta.list_clouds():
                print(
                    f"{cloud.name}\tapi_key={cloud.api_key}\tauto_backup={'on' if cloud.auto_backup else 'off'}"
                    f"\tbackup_target={migration.target_name(cloud.backup_target)}"
                )
        elif args.cloud_command == "set":
            cloud = await _existing(meta, args.name)
            if args.auto_backup is not None:
                await meta.set_auto_backup(args.name, args.auto_backup == "on")
            if args.backup_bucket is not None:
                job = await migration.change_target(meta, cloud, args.backup_bucket, operator=True)
                if job is not None and job.open:
                    print(f"backup migration {job.id} queued: {migration.target_name(job.params['from'])} -> "
                          f"{migration.target_name(job.params['to'])}; the running server copies the history, then switches")
                elif job is not None:
                    print(f"backup migration {job.id} cancelled")
            updated = await _existing(meta, args.name)
            print(f"{updated.name}\tauto_backup={'on' if updated.auto_backup else 'off'}"
                  f"\tbackup_target={migration.target_name(updated.backup_target)}")
        elif args.cloud_command == "status":
            from versionstore.http.backup_views import backup_status

            config = Config.from_env(args.data_dir)
            status = await backup_status(meta, await _existing(meta, args.name), (config.primary_url, config.backup_url))
            print(json.dumps(status, indent=2))
        return 0

    try:
        return asyncio.run(_with_meta(args.data_dir, run))
    except ApiError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2


async def _existing(meta: MetadataStore, name: str) -> Cloud:
    cloud = await meta.get_cloud(name)
    if cloud is None:
        raise ApiError(f"no product environment named {name!r}")
    return cloud


def _verify(args: argparse.Namespace) -> int:
    """`versionstore verify`: exit 0 when every copy checked was intact, 1 when any was missing
    or corrupt (repaired or not), 2 on a usage error."""
    from tqdm import tqdm

    from versionstore import verify
    from versionstore.blobstore import open_store
    from versionstore.blobstore.resilient import resilient
    from versionstore.service import VersionService
    from versionstore.targets import BackupTargets

    if not 0 < args.sample <= 1 or args.rate < 0:
        print("error: --sample must be in (0, 1] and --rate >= 0", file=sys.stderr)
        return 2
    config = Config.from_env(args.data_dir)

    async def run(meta: MetadataStore) -> int:
        clouds = [await _existing(meta, args.cloud)] if args.cloud else await meta.list_clouds()
        primary = resilient(open_store(config.primary_url))
        targets = BackupTargets(meta, resilient(open_store(config.backup_url)))
        service = VersionService(meta, primary, targets, config.spool_dir, config.max_upload_bytes)
        config.spool_dir.mkdir(parents=True, exist_ok=True)
        problems = 0
        try:
            for cloud in clouds:
                total = (await meta.revision_totals(cloud.name))[1] * args.sample
                with tqdm(total=int(total), unit="B", unit_scale=True, desc=cloud.name, disable=args.quiet or None) as bar:
                    scrubber = verify.Scrubber(service, rate=args.rate * 1e6 or None, sample=args.sample, progress=bar.update)
                    report = await scrubber.run(cloud)
                print(json.dumps({"cloud_name": cloud.name, **report.as_dict()}, indent=2))
                problems += report.problem_count
        finally:
            await targets.close()
            await primary.close()
        return 1 if problems else 0

    try:
        return asyncio.run(_with_meta(args.data_dir, run))
    except ApiError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2


def _add_verify_parser(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    check = sub.add_parser(
        "verify", help="re-read every revision from every store it lives in, check its BLAKE3, repair from an intact copy",
    )
    check.add_argument("--cloud", metavar="NAME", help="one environment (default: all)")
    check.add_argument("--sample", type=float, default=1.0, metavar="FRACTION", help="check this random share (default 1)")
    check.add_argument("--rate", type=float, default=0.0, metavar="MB/s", help="read at most this fast (default 0: unlimited)")
    check.add_argument("--quiet", action="store_true", help="no progress bar")
    check.add_argument("--data-dir", type=Path, required=True)
    check.set_defaults(func=_verify)


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="versionstore", description=__doc__.splitlines()[0])
    sub = top.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the HTTP service")
    serve.add_argument("--data-dir", type=Path, required=True)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8765)
    serve.add_argument("--demo", action="store_true", help="create the 'demo' environment if missing and print its CLOUDINARY_URL")
    serve.add_argument("--access-log", action="store_true", help="log one line per request to stderr")
    serve.set_defaults(func=_serve)

    cloud = sub.add_parser("cloud", help="manage product environments")
    cloud_sub = cloud.add_subparsers(dest="cloud_command", required=True)
    create = cloud_sub.add_parser("create", help="create an environment (credentials generated when omitted)")
    create.add_argument("name")
    create.add_argument("--api-key")
    create.add_argument("--api-secret")
    create.add_argument("--auto-backup", choices=("on", "off"), default="on")
    create.add_argument("--url", default=DEFAULT_URL, help="service URL for the printed CLOUDINARY_URL")
    create.add_argument("--data-dir", type=Path, required=True)
    listing = cloud_sub.add_parser("list", help="list environments")
    listing.add_argument("--data-dir", type=Path, required=True)
    setting = cloud_sub.add_parser("set", help="change an environment's settings")
    setting.add_argument("name")
    setting.add_argument("--auto-backup", choices=("on", "off"))
    setting.add_argument(
        "--backup-bucket", metavar="URL",
        help="keep backups in s3://bucket[/prefix] or gs://bucket[/prefix] (needs the marker object), or 'default'",
    )
    setting.add_argument("--data-dir", type=Path, required=True)
    status = cloud_sub.add_parser("status", help="backup target, health, pending revisions and migration, as JSON")
    status.add_argument("name")
    status.add_argument("--data-dir", type=Path, required=True)
    cloud.set_defaults(func=_cloud)
    _add_verify_parser(sub)
    sub.add_parser(  # listed for --help; main() hands its arguments to backup_client untouched
        "initial-backup", add_help=False, help="back up existing assets: the server's job (--server) or an asset set "
        "(--source DIR, --manifest FILE); see `versionstore initial-backup --help`",
    )
    return top


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["initial-backup"]:  # argparse.REMAINDER cannot pass `--option`s through a subparser
        from versionstore.backup_client import main as initial_backup

        return initial_backup(argv[1:], prog="versionstore initial-backup")
    args = parser().parse_args(argv)
    return int(args.func(args))
