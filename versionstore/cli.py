"""Command line: `versionstore serve`, `cloud create|list|set|status`, `verify`, `gc`, `migrate`,
`metadata copy`, `initial-backup`, `staff add|list|disable|enable|reset-password`, `audit verify|export`, `purge list|undo|run`,
and (snapshot_cli.py) `snapshot create|list|show|delete|pin`, `retention simulate` and `restore`.

`initial-backup` is versionstore/backup_client.py (also scripts/initial_backup.py), which
parses its own options.

Every command that opens the metadata takes `--metadata URL` (else VERSIONSTORE_METADATA_URL,
else the SQLite file in the data directory). The cloud commands write the metadata directly; a running service reads environment
settings on every request, so changes apply without a restart. Changing the backup bucket
checks the bucket from this process (its marker, and write/read/delete access with this
process's credentials) and queues the migration job that the server runs.

Subcommands are registered in `parser()` with `_command()`, which gives every one the same
help formatter (each option's default is shown) and its `func(args) -> exit code`. Commands
that work on an existing store wrap an `async (meta, args)` action with `_on_store()`; only
`serve` and `cloud create` may create a data directory. Exit codes: 0 done, 1 the service could
not start, 2 usage or configuration error (one line on stderr, no traceback), 130 interrupted.
"""

import argparse
import asyncio
import json
import secrets
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

from versionstore import bootstrap, gclog, ids, logs, migration, protection_cli, stall_log
from versionstore.config import DATA_DIR_VARIABLE, METADATA_URL_VARIABLE, Config, ConfigError, StartupError, data_dir_from
from versionstore.errors import ApiError
from versionstore.metadata import sqlite_path
from versionstore.models import Cloud
from versionstore.repository import MetadataRepository

DEFAULT_URL = "http://127.0.0.1:8765"
EXIT_START_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

Action = Callable[[MetadataRepository, argparse.Namespace], Awaitable[None]]


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows `(default: X)` after every option that has a default worth showing."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False, argparse.SUPPRESS) or "default" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action) or ""


def cloudinary_url(cloud: Cloud, base_url: str) -> str:
    return f"cloudinary://{cloud.api_key}:{cloud.api_secret}@{cloud.name}?upload_prefix={base_url}"


def backup_state(cloud: Cloud) -> str:
    """One line a newcomer can act on: is every upload kept as a revision, and how to change it."""
    if cloud.auto_backup:
        return (f"{cloud.name}: automatic backup is on (every upload keeps a restorable revision; "
                f"turn off: versionstore cloud set {cloud.name} --auto-backup off)")
    return (f"{cloud.name}: automatic backup is off (only uploads with backup=true keep a revision; "
            f"turn on: versionstore cloud set {cloud.name} --auto-backup on)")


async def create_cloud(meta: MetadataRepository, name: str, api_key: str | None, api_secret: str | None, auto_backup: bool = True) -> Cloud:
    ids.check_cloud_name(name)
    if await meta.get_cloud(name) is not None:
        raise ApiError(f"product environment {name!r} already exists")
    key = api_key or str(secrets.randbelow(9 * 10**14) + 10**14)
    secret = api_secret or secrets.token_urlsafe(21)
    return await meta.create_cloud(name, key, secret, auto_backup)


async def _existing(meta: MetadataRepository, name: str) -> Cloud:
    cloud = await meta.get_cloud(name)
    if cloud is None:
        raise ApiError(f"no product environment named {name!r}")
    return cloud


def store_config(data_dir: Path | None, metadata: str | None, *, create: bool, **overrides: object) -> Config:
    """The configuration of a command: VERSIONSTORE_* variables and these flags. Unless
    `create`, SQLite metadata must already exist, so a mistyped path is reported instead of
    filled (a PostgreSQL database is checked by opening it)."""
    config = Config.from_env(data_dir_from(data_dir), metadata_url=metadata, **overrides)
    config.check_metadata()
    path = sqlite_path(config.metadata_location)
    if not create and path is not None and not path.is_file():
        where = config.data_dir if config.metadata_url is None else path
        raise ConfigError(
            f"no versionstore data in {where} (check --data-dir or {DATA_DIR_VARIABLE}, --metadata or {METADATA_URL_VARIABLE}; "
            "`versionstore serve` or `versionstore cloud create` makes a new one)"
        )
    return config


def _on_store(action: Action, *, create: bool = False) -> Callable[[argparse.Namespace], int]:
    """A command that opens the metadata of the data directory, runs `action`, and closes it."""

    async def run(config: Config, args: argparse.Namespace) -> None:
        config.data_dir.mkdir(parents=True, exist_ok=True)
        meta = await bootstrap.open_metadata(config)
        try:
            await action(meta, args)
        finally:
            await meta.close()

    def command(args: argparse.Namespace) -> int:
        asyncio.run(run(store_config(args.data_dir, args.metadata, create=create), args))
        return 0

    return command


# --- serve -------------------------------------------------------------------------------------


def _say(line: str) -> None:
    print(line, flush=True)


def _serve(args: argparse.Namespace) -> int:
    from versionstore.http.server import run, serve, serve_workers

    config = store_config(
        args.data_dir, args.metadata, create=True, host=args.host, port=args.port, workers=args.workers,
        log_format=args.log_format, metrics_dir=args.metrics_dir, metrics_token=args.metrics_token,
    )
    if config.workers < 1:
        raise ConfigError("--workers must be at least 1")
    config.check()
    gclog.threshold_from_env()  # a bad VERSIONSTORE_GC_LOG_MS stops here, before any worker starts
    stall_log.threshold_from_env()  # and a bad VERSIONSTORE_STALL_LOG_MS
    logs.configure(config.log_format)
    if config.metrics_dir is not None and config.workers == 1:  # serve_workers prepares its own
        from versionstore.http.metrics import prepare_multiprocess

        prepare_multiprocess(config.metrics_dir)

    async def ready(meta: MetadataRepository, base_url: str) -> None:
        _say(f"versionstore listening on {base_url} (data in {config.data_dir})")
        demo = (await meta.get_cloud("demo") or await create_cloud(meta, "demo", None, None)) if args.demo else None
        clouds = await meta.list_clouds()
        for cloud in clouds[:10]:
            _say(backup_state(cloud))
        if len(clouds) > 10:
            _say(f"... and {len(clouds) - 10} more product environments (versionstore cloud list)")
        if not clouds:
            _say("no product environments yet: create one with `versionstore cloud create NAME`")
        if demo is not None:
            _say("Demo product environment ready. Point the Cloudinary SDKs at it with:")
            _say(f"  export CLOUDINARY_URL='{cloudinary_url(demo, base_url)}'")

    if config.workers > 1:
        serve_workers(config, config.workers, access_log=args.access_log, ready=ready)
    else:
        run(serve(config, access_log=args.access_log, ready=ready))
    return 0


# --- cloud -------------------------------------------------------------------------------------


async def _cloud_create(meta: MetadataRepository, args: argparse.Namespace) -> None:
    cloud = await create_cloud(meta, args.name, args.api_key, args.api_secret, args.auto_backup == "on")
    print(cloudinary_url(cloud, args.url), flush=True)
    if protection := await protection_cli.apply_cloud_options(meta, cloud, args):
        from versionstore.console.audit import AuditLog

        await AuditLog(meta).record("cli", "settings", cloud=cloud.name, target=cloud.name, detail=protection)
    print(backup_state(cloud), file=sys.stderr)  # stdout stays the URL alone, for scripts


async def _cloud_list(meta: MetadataRepository, args: argparse.Namespace) -> None:
    for cloud in await meta.list_clouds():
        print(
            f"{cloud.name}\tapi_key={cloud.api_key}\tauto_backup={'on' if cloud.auto_backup else 'off'}"
            f"\tbackup_target={migration.target_name(cloud.backup_target)}"
        )


async def _cloud_set(meta: MetadataRepository, args: argparse.Namespace) -> None:
    from versionstore import archive_removal

    cloud = await _existing(meta, args.name)
    keeping = args.archive_keep_days is not None
    keep = archive_removal.default_keep_days_value(args.archive_keep_days) if keeping else None  # checked before any change
    if args.auto_backup is not None:
        await meta.set_auto_backup(args.name, args.auto_backup == "on")
    if args.backup_bucket is not None:
        job = await migration.change_target(meta, cloud, args.backup_bucket, operator=True)
        if job is not None and job.open:
            print(f"backup migration {job.id} queued: {migration.target_name(job.params['from'])} -> "
                  f"{migration.target_name(job.params['to'])}; the running server copies the history, then switches")
        elif job is not None:
            print(f"backup migration {job.id} cancelled")
    protection = await protection_cli.apply_cloud_options(meta, cloud, args)
    if keeping:
        await meta.set_archive_keep_days(args.name, keep)
    updated = await _existing(meta, args.name)
    from versionstore.console.audit import AuditLog

    bucket = args.backup_bucket.split("?", 1)[0] if args.backup_bucket else None  # without store options
    await AuditLog(meta).record("cli", "settings", cloud=args.name, target=args.name,
                                detail={"auto_backup": args.auto_backup, "backup_bucket": bucket, **protection,
                                        **({"archive_keep_days": keep} if keeping else {})})
    print(f"{updated.name}\tauto_backup={'on' if updated.auto_backup else 'off'}"
          f"\tbackup_target={migration.target_name(updated.backup_target)}\tpurge_delay_days={updated.purge_delay_days}")


async def _cloud_status(meta: MetadataRepository, args: argparse.Namespace) -> None:
    from versionstore import archive_removal, protection
    from versionstore.disk_space import space_report
    from versionstore.http.backup_views import backup_status

    config = Config.from_env(data_dir_from(args.data_dir), metadata_url=args.metadata)
    space = space_report(config.data_dir, config.min_free_bytes)
    cloud = await _existing(meta, args.name)
    status = await backup_status(meta, cloud, space, (config.primary_url, config.backup_url))
    status["auto_backup"] = cloud.auto_backup
    status["protection"] = await protection.status(meta, cloud)
    status.update(await archive_removal.settings(meta, cloud.name, config.archive_keep_days))
    print(json.dumps(status, indent=2))


# --- verify ------------------------------------------------------------------------------------


def _verify(args: argparse.Namespace) -> int:
    """`versionstore verify`: exit 0 when every copy checked was intact, 1 when any was missing
    or corrupt (repaired or not), 2 on a usage error."""
    from tqdm import tqdm

    from versionstore import verify

    if not 0 < args.sample <= 1 or args.rate < 0:
        raise ConfigError("--sample must be in (0, 1] and --rate >= 0")
    config = store_config(args.data_dir, args.metadata, create=False)

    async def run() -> int:
        problems = 0
        async with bootstrap.open_service(config) as service:  # repairs write: leases renewed throughout
            meta = service.meta
            clouds = [await _existing(meta, args.cloud)] if args.cloud else await meta.list_clouds()
            for cloud in clouds:
                total = (await meta.revision_totals(cloud.name))[1] * args.sample
                with tqdm(total=int(total), unit="B", unit_scale=True, desc=cloud.name, disable=args.quiet or None) as bar:
                    scrubber = verify.Scrubber(service, rate=args.rate * 1e6 or None, sample=args.sample, progress=bar.update)
                    report = await scrubber.run(cloud)
                print(json.dumps({"cloud_name": cloud.name, **report.as_dict()}, indent=2))
                problems += report.problem_count
        return 1 if problems else 0

    return asyncio.run(run())


# --- staff and audit (support console) ---------------------------------------------------------


def _new_password(args: argparse.Namespace) -> str:
    """--generate: a random password, printed once; else prompted twice (never an argument)."""
    from versionstore.console import passwords

    if args.generate:
        password = passwords.generate()
        print(f"password (shown once): {password}", flush=True)
        return password
    import getpass

    password = getpass.getpass("password: ")
    if getpass.getpass("again: ") != password:
        raise ConfigError("the passwords differ")
    return password


async def _staff_action(meta: MetadataRepository, args: argparse.Namespace) -> None:
    from versionstore.console.audit import AuditLog
    from versionstore.console.staff import StaffAccounts, StaffError

    staff, audit = StaffAccounts(meta), AuditLog(meta)
    try:
        if args.staff_command == "add":
            await staff.check_new(args.email, args.role, args.cloud or [])  # before a password is asked or shown
            member = await staff.add(args.email, args.role, args.cloud or [], _new_password(args))
            print(f"{member.email}\trole={member.role}\tclouds={','.join(member.clouds)}")
            detail = {"role": member.role, "clouds": list(member.clouds)}
        elif args.staff_command == "list":
            for m in await meta.list_staff():
                print(f"{m.email}\trole={m.role}\tclouds={','.join(m.clouds)}\t{'disabled' if m.disabled else 'enabled'}")
            return
        elif args.staff_command == "reset-password":
            await staff.reset_password(args.email, _new_password(args))
            detail = {}
        else:
            await staff.set_disabled(args.email, args.staff_command == "disable")
            detail = {}
    except StaffError as exc:
        raise ConfigError(str(exc)) from None
    await audit.record("cli", f"staff_{args.staff_command.replace('-', '_')}", target=args.email.lower(), detail=detail)


def _audit(args: argparse.Namespace) -> int:
    """`audit verify` exits 1 naming every broken record; `audit export` prints JSON lines."""
    from versionstore.console.audit import AuditLog, as_json

    async def run(meta: MetadataRepository) -> int:
        log = AuditLog(meta)
        if args.audit_command == "export":
            filters = {"cloud": args.cloud} if args.cloud else {}
            async for record in log.records(**filters):
                print(json.dumps(as_json(record), sort_keys=True))
            return 0
        report = await log.verify()
        for problem in report.problems:
            print(f"BROKEN: {problem}", file=sys.stderr)
        print(json.dumps({"records": report.records, "head": report.head, "intact": not report.problems}))
        return 1 if report.problems else 0

    async def opened() -> int:
        meta = await bootstrap.open_metadata(store_config(args.data_dir, args.metadata, create=False))
        try:
            return await run(meta)
        finally:
            await meta.close()

    return asyncio.run(opened())


# --- gc --------------------------------------------------------------------------------------


def _gc(args: argparse.Namespace) -> int:
    """`versionstore gc`: settle the write journal's expired rows now (what every server does
    every few seconds); with `--full`, also walk every blob of the stores, paced, and remove
    those no metadata references. Safe while servers run: it takes the same claims."""
    if args.rate < 0:
        raise ConfigError("--rate must be >= 0")
    config = store_config(args.data_dir, args.metadata, create=False)

    async def run() -> None:
        async with bootstrap.open_service(config) as service:
            await service.claims.expire_dead_owners()
            print(f"journal: {await service.collect_expired_writes()} expired blob write(s) settled", flush=True)
            if args.full:
                clouds = [await _existing(service.meta, args.cloud)] if args.cloud else await service.meta.list_clouds()
                for cloud in clouds:
                    removed = await service.collect_orphans(cloud, rate=args.rate or None)
                    print(f"{cloud.name}: {removed} unreferenced blob(s) removed", flush=True)

    asyncio.run(run())
    return 0


# --- migrate and metadata copy -----------------------------------------------------------------


async def _migrate(meta: MetadataRepository, args: argparse.Namespace) -> None:
    applied = meta.applied_migrations
    print(f"applied migrations {', '.join(map(str, applied))}" if applied else "schema is current: nothing to apply")


def _metadata_copy(args: argparse.Namespace) -> int:
    """`versionstore metadata copy`: exit 0 when the copy verified, 1 when it did not."""
    from versionstore.metadata_copy import copy_metadata

    report = asyncio.run(copy_metadata(args.source, args.target, batch=args.batch, progress=not args.quiet))
    print(json.dumps(report.as_dict(), indent=2))
    return 0 if report.verified else 1


# --- the parser --------------------------------------------------------------------------------


def _command(
    sub: "argparse._SubParsersAction[argparse.ArgumentParser]", name: str, summary: str,
    func: Callable[[argparse.Namespace], int] | None = None,
) -> argparse.ArgumentParser:
    command = sub.add_parser(name, help=summary, description=summary, formatter_class=HelpFormatter)
    if func is not None:
        command.set_defaults(func=func)
    return command


def _data_dir_option(command: argparse.ArgumentParser, *, creates: bool) -> None:
    what = "created if missing" if creates else "must already hold a store"
    command.add_argument(
        "--data-dir", type=Path, metavar="DIR",
        help=f"data directory (SQLite metadata, spool, local stores), {what}; relative paths are taken from the "
        f"current directory (default: ${DATA_DIR_VARIABLE})",
    )
    command.add_argument(
        "--metadata", metavar="URL",
        help=f"metadata database: sqlite:///PATH or postgresql://USER@HOST:PORT/DB "
        f"(default: ${METADATA_URL_VARIABLE}, else sqlite://DIR/metadata.sqlite3)",
    )


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="versionstore", description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = _command(sub, "serve", "run the HTTP service", _serve)
    _data_dir_option(serve, creates=True)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve.add_argument("--port", type=int, default=8765, help="port to listen on (0: any free port)")
    serve.add_argument("--demo", action="store_true", help="create the 'demo' environment if missing and print its CLOUDINARY_URL")
    serve.add_argument("--access-log", action="store_true", help="log one line per request to stderr")
    serve.add_argument("--log-format", choices=logs.FORMATS, help="log lines for people (text) or one JSON object per line "
                       "with the request id (json) (default: $VERSIONSTORE_LOG_FORMAT, else text)")
    serve.add_argument("--metrics-dir", type=Path, metavar="DIR", help="keep metrics in files under DIR so /metrics sums "
                       "several processes (default: $VERSIONSTORE_METRICS_DIR or $PROMETHEUS_MULTIPROC_DIR; unset: in memory)")
    serve.add_argument("--metrics-token", metavar="TOKEN", help="serve /metrics to any client sending 'Authorization: Bearer "
                       "TOKEN' (default: $VERSIONSTORE_METRICS_TOKEN; unset: local clients only)")
    serve.add_argument(
        "--workers", type=int, metavar="N",
        help="service processes sharing the port, supervised by this one (default: $VERSIONSTORE_WORKERS, else 1)",
    )

    cloud = _command(sub, "cloud", "manage product environments")
    cloud_sub = cloud.add_subparsers(dest="cloud_command", required=True, metavar="COMMAND")
    create = _command(cloud_sub, "create", "create an environment and print its CLOUDINARY_URL",
                      _on_store(_cloud_create, create=True))
    create.add_argument("name", help="environment name: the cloud_name in CLOUDINARY_URL")
    create.add_argument("--api-key", metavar="KEY", help="API key (default: 15 random digits)")
    create.add_argument("--api-secret", metavar="SECRET", help="API secret (default: a random token)")
    create.add_argument(
        "--auto-backup", choices=("on", "off"), default="on",
        help="keep a restorable revision of every upload (an upload's own backup parameter wins)",
    )
    create.add_argument("--url", default=DEFAULT_URL, help="service URL for the printed CLOUDINARY_URL")
    protection_cli.add_cloud_options(create, setting=False)
    _data_dir_option(create, creates=True)
    listing = _command(cloud_sub, "list", "list environments: name, API key, automatic backup, backup target",
                       _on_store(_cloud_list))
    _data_dir_option(listing, creates=False)
    setting = _command(cloud_sub, "set", "change an environment's settings", _on_store(_cloud_set))
    setting.add_argument("name", help="environment name")
    setting.add_argument("--auto-backup", choices=("on", "off"), help="turn automatic backup on or off (default: unchanged)")
    setting.add_argument(
        "--backup-bucket", metavar="URL",
        help="keep backups in s3://bucket[/prefix] or gs://bucket[/prefix] (needs the marker object), or 'default' "
        "(default: unchanged)",
    )
    protection_cli.add_cloud_options(setting, setting=True)
    setting.add_argument(
        "--archive-keep-days", metavar="N",
        help="days a prepared archive export is kept when its export does not say (1-3650), or 'default' for the "
        "server's VERSIONSTORE_ARCHIVE_KEEP_DAYS (default: unchanged)",
    )
    _data_dir_option(setting, creates=False)
    status = _command(cloud_sub, "status", "backup on/off, target, health, pending revisions, migration and deletion "
                      "protection, as JSON",
                      _on_store(_cloud_status))
    status.add_argument("name", help="environment name")
    _data_dir_option(status, creates=False)

    check = _command(
        sub, "verify", "re-read every revision from every store it lives in, check its BLAKE3, repair from an intact copy",
        _verify,
    )
    check.add_argument("--cloud", metavar="NAME", help="one environment (default: all)")
    check.add_argument("--sample", type=float, default=1.0, metavar="FRACTION", help="check this random share of the revisions")
    check.add_argument("--rate", type=float, default=0.0, metavar="MB/s", help="read at most this fast (default: 0, unlimited)")
    check.add_argument("--quiet", action="store_true", help="no progress bar")
    _data_dir_option(check, creates=False)

    staff = _command(sub, "staff", "support console staff accounts (docs/console.md)")
    staff_sub = staff.add_subparsers(dest="staff_command", required=True, metavar="COMMAND")
    add = _command(staff_sub, "add", "add a staff member (password prompted, or --generate)", _on_store(_staff_action))
    add.add_argument("email", help="the member's email address (their sign-in name)")
    add.add_argument("--role", required=True, choices=("viewer", "restorer", "admin"),
                     help="viewer: read; restorer: + restore, download; admin: + irreversible deletion")
    add.add_argument("--cloud", action="append", metavar="NAME", help="an environment this member may see (repeat; default: all)")
    for name, summary in (("reset-password", "set a new password (ends the member's sessions)"),
                          ("disable", "refuse the member's sign-ins and end their sessions"), ("enable", "allow sign-ins again")):
        command = _command(staff_sub, name, summary, _on_store(_staff_action))
        command.add_argument("email", help="the member's email address")
        _data_dir_option(command, creates=False)
    for command in (add, staff_sub.choices["reset-password"]):
        command.add_argument("--generate", action="store_true", help="generate a random password and print it once")
    _data_dir_option(add, creates=False)
    _data_dir_option(_command(staff_sub, "list", "list staff members", _on_store(_staff_action)), creates=False)

    audit = _command(sub, "audit", "the audit log: verify its hash chain, export it")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True, metavar="COMMAND")
    _data_dir_option(_command(audit_sub, "verify", "check the hash chain; exit 1 naming any edited or removed record", _audit),
                     creates=False)
    export = _command(audit_sub, "export", "print every record as JSON lines", _audit)
    export.add_argument("--cloud", metavar="NAME", help="one environment's records (default: all)")
    _data_dir_option(export, creates=False)
    collect = _command(sub, "gc", "remove blobs of crashed writes (the journal); --full: every unreferenced blob", _gc)
    collect.add_argument("--full", action="store_true", help="walk every blob of the stores (cost grows with the library)")
    collect.add_argument("--cloud", metavar="NAME", help="with --full: one environment (default: all)")
    collect.add_argument(
        "--rate", type=float, default=200.0, metavar="BLOBS/s", help="with --full: examine at most this many blobs a second (0: unpaced)"
    )
    _data_dir_option(collect, creates=False)
    from versionstore import archive_cli, drill_cli, snapshot_cli

    snapshot_cli.register(sub, _command, _data_dir_option)
    archive_cli.register(sub, _command, _data_dir_option)
    drill_cli.register(sub, _command, _data_dir_option)
    protection_cli.register(sub, _command, _data_dir_option)


    migrate = _command(sub, "migrate", "apply the schema migrations the metadata database lacks (serve does it too)",
                       _on_store(_migrate, create=True))
    _data_dir_option(migrate, creates=True)

    metadata = _command(sub, "metadata", "move the metadata between databases")
    metadata_sub = metadata.add_subparsers(dest="metadata_command", required=True, metavar="COMMAND")
    copy = _command(metadata_sub, "copy", "copy every row from one database to another, verify it; safe to run again after "
                    "an interruption (stop the service first)", _metadata_copy)
    copy.add_argument("--from", dest="source", required=True, metavar="URL", help="source: sqlite:///PATH")
    copy.add_argument("--to", dest="target", required=True, metavar="URL", help="destination: postgresql://USER@HOST:PORT/DB")
    copy.add_argument("--batch", type=int, default=2000, help="rows per transaction")
    copy.add_argument("--quiet", action="store_true", help="no progress bar")

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
    try:
        return int(args.func(args))
    except (ApiError, ConfigError) as exc:
        print(f"error: {exc.message if isinstance(exc, ApiError) else exc}", file=sys.stderr)
        return EXIT_USAGE
    except StartupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_START_FAILED
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
