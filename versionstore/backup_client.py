"""`initial-backup` (also `scripts/initial_backup.py`): back up existing assets, for operators.

`--server` starts the server's initial-backup job and follows it. `--source DIR` / `--manifest
FILE` upload an external asset set through the Upload API with `backup=true`: N workers hash
each file (BLAKE3), ask the server whether those bytes already are the asset's backed-up current
version, and stream the upload only when they are not. A state file remembers finished assets,
so a killed run resumes and a second run costs a stat per file. Usage: docs/initial-backup.md.
"""

import argparse
import asyncio
import contextlib
import csv
import functools
import itertools
import json
import os
import stat
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

import blake3

from versionstore.backup_io import (
    BACKED_UP,
    BLOCK,
    REMOTE_TYPES,
    STATE_FILE,
    TRANSIENT,
    Api,
    Item,
    Remembered,
    RequestFailed,
    StateFile,
    Target,
    hash_file,
    read_manifest,
    refuse_duplicates,
    remote_outcome,
    walk_directory,
)

OUTCOMES = ("uploaded", "skipped_unchanged", "skipped_already_backed_up", "backup_pending", "skipped_fetch", "failed")
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
READ_ERRORS = (OSError, ValueError, csv.Error)  # an unreadable manifest or directory
LISTING_MAX = 100  # public_ids per listing request (the server's limit)
#: Uploads in flight. Most of a small file's upload is the server waiting on its fsyncs (spool,
#: links, commit), not CPU: photos went ~12 % faster with 16 in flight than with 8. Large files
#: are another matter: their bytes, read by the client and written by the server, keep the disk
#: busy, and more than 8 of them at once only made each slower. So at most half of the uploads
#: in flight are files of LARGE bytes or more (docs/performance.md, "The batch client on http.client").
CONCURRENCY = 16
LARGE = 2 << 20


class Report:
    """What a run did: printed at the end, and written as JSON with `--report-json`."""

    def __init__(self, mode: str, target: str, dry_run: bool = False) -> None:
        self.mode, self.target, self.dry_run = mode, target, dry_run
        self.counts: Counter[str] = Counter({name: 0 for name in OUTCOMES[:-1] + ("would_upload",) * dry_run + OUTCOMES[-1:]})
        self.bytes_uploaded = 0
        self.failures: list[dict[str, str]] = []
        self.retries = 0
        self.started, self.finished = time.time(), 0.0
        self.interrupted = False
        self.job: dict[str, Any] | None = None

    def note_retry(self) -> None:
        self.retries += 1

    def as_dict(self) -> dict[str, Any]:
        duration = max((self.finished or time.time()) - self.started, 1e-9)
        body: dict[str, Any] = {
            "mode": self.mode, "target": self.target, "dry_run": self.dry_run, "interrupted": self.interrupted,
            "started_at": _iso(self.started), "finished_at": _iso(self.finished or time.time()), "duration_s": round(duration, 3),
        }
        if self.job is not None:
            return {**body, "job": self.job}
        return {**body, "counts": {"total": sum(self.counts.values()), **self.counts}, "bytes_uploaded": self.bytes_uploaded,
                "throughput_bytes_per_s": round(self.bytes_uploaded / duration), "retries": self.retries, "failures": self.failures}

    def render(self) -> str:
        body = self.as_dict()
        if self.job is not None:
            job = self.job
            lines = [f"initial backup job {job.get('id')} on {self.target}: {job.get('status')} after {body['duration_s']:.1f} s"]
            lines += [f"  {name:<24} {job.get(key)}" for name, key in (
                ("backed up", "processed_assets_count"), ("bytes", "bytes"), ("already backed up", "already_backed_up_count"),
                ("skipped (remote)", "skipped_assets_count"), ("backup pending", "pending_count"), ("failed", "failed_assets_count"),
                ("reason", "reason"),
            ) if job.get(key) is not None]
            failures = [{"public_id": str(f.get("public_id")), "reason": str(f.get("reason"))} for f in job.get("failures") or []]
        else:
            state = "interrupted" if self.interrupted else "dry run" if self.dry_run else "finished"
            lines = [f"initial backup to {self.target}: {state} after {body['duration_s']:.1f} s"]
            lines += [f"  {name:<26} {count}" for name, count in body["counts"].items() if count or name in ("total", "failed")]
            lines.append(f"  {'bytes uploaded':<26} {_size(self.bytes_uploaded)} ({_size(body['throughput_bytes_per_s'])}/s)")
            if self.retries:
                lines.append(f"  {'retries':<26} {self.retries}")
            failures = self.failures
        if failures:
            lines.append("failures:")
            lines += [f"  {f['public_id'] or '-'} <- {f.get('source', '')}: {f['reason']}" for f in failures[:50]]
            if len(failures) > 50:
                lines.append(f"  ... and {len(failures) - 50} more (see --report-json)")
        return "\n".join(lines)


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


class QuietBar:
    """A bar that is not drawn (no terminal): it only counts, so tqdm is never imported."""

    def __init__(self, total: float | None) -> None:
        self.total, self.n = total, 0

    def update(self, n: float = 1) -> None:
        self.n += int(n)

    def close(self) -> None:
        pass


def write_line(text: str, file: TextIO) -> None:
    """Print a line; through tqdm when bars are drawn (it was imported only then), so they are kept."""
    drawing = sys.modules.get("tqdm")
    if drawing is None:
        print(text, file=file, flush=True)
    else:
        drawing.tqdm.write(text, file=file)


class Bars:
    """Two tqdm bars (assets, bytes) with rate and ETA; counters only when not on a terminal
    (tqdm's import is ~0.1 s of an unchanged re-run's ~0.5 s, so it is imported only to draw)."""

    def __init__(self, enabled: bool, assets: int | None, size: int | None) -> None:
        self.assets: Any
        self.bytes: Any
        if not enabled:
            self.assets, self.bytes = QuietBar(assets), QuietBar(size)
            return
        from tqdm import tqdm

        try:
            width = os.get_terminal_size(sys.stderr.fileno()).columns
        except OSError:
            width = 0
        # Follow resizes; a terminal that reports no width (some `docker exec -t`) gets 100 columns.
        ncols, dynamic = (None, True) if width else (100, False)
        self.assets = tqdm(
            total=assets, desc="assets", unit=" assets", position=0, file=sys.stderr, ncols=ncols, dynamic_ncols=dynamic,
        )
        self.bytes = tqdm(
            total=size, desc="bytes ", unit="B", unit_scale=True, unit_divisor=1024, position=1, file=sys.stderr,
            ncols=ncols, dynamic_ncols=dynamic,
        )

    @staticmethod
    def note(text: str) -> None:
        write_line(text, sys.stderr)

    def close(self) -> None:
        self.bytes.close()
        self.assets.close()


class SourceRun:
    """Source/manifest mode: a producer feeds items to `concurrency` workers through a bounded queue."""

    def __init__(self, args: argparse.Namespace, api: Api, state: StateFile | None, report: Report) -> None:
        self.args, self.api, self.state, self.report = args, api, state, report
        self.known: dict[tuple[str, str], Remembered] = state.load() if state else {}
        self.bars: Bars | None = None
        self.fatal: str | None = None
        self.absent: set[str] = set()  # keys of assets the server had no live asset for when listed
        self.large = asyncio.Semaphore(max(1, args.concurrency // 2))  # uploads of LARGE bytes or more (CONCURRENCY)

    async def run(self, items: Callable[[], Iterator[Item]]) -> None:
        count = size = None  # totals only for bars that are drawn: the counting pass is a second walk
        if self.args.progress:
            Bars.note("counting the assets...")
            try:
                count, size = await asyncio.to_thread(_totals, items)
            except READ_ERRORS as exc:
                self.fatal = str(exc)
                return
        self.bars = Bars(self.args.progress, count, size)
        queue: asyncio.Queue[Item | None] = asyncio.Queue(maxsize=self.args.concurrency * 8)

        async def produce() -> None:
            source = items()
            try:
                while batch := await asyncio.to_thread(lambda: list(itertools.islice(source, 256))):
                    await self._find_new(batch)
                    for item in batch:
                        if self._listed_unchanged(item):  # no stat, no worker: what most of a re-run is
                            assert self.bars is not None and item.listed is not None
                            self._count("skipped_unchanged")
                            self.bars.bytes.update(item.listed[0])
                            self.bars.assets.update(1)
                        else:
                            await queue.put(item)
            except READ_ERRORS as exc:  # changed under us since the first pass
                self.fatal = str(exc)
            for _ in range(self.args.concurrency):
                await queue.put(None)

        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(produce())
                for _ in range(self.args.concurrency):
                    group.create_task(self._worker(queue))
        finally:
            self.bars.close()

    def _listed_unchanged(self, item: Item) -> bool:
        """Backed up by an earlier run, with the size and mtime the walk just saw (`_file`'s
        check, on the walk's stat instead of a new one)."""
        known = self.known.get((item.key, item.source)) if item.listed is not None and not self.args.verify else None
        return known is not None and (known.size, known.mtime_ns) == item.listed and known.outcome in BACKED_UP

    async def _find_new(self, batch: list[Item]) -> None:
        """Assets the server surely lacks skip their per-asset lookup: one listing by public_ids
        (live assets only, at most 100 a request) covers the batch's items that no state line
        mentions. Any trouble just leaves the per-asset lookups in place."""
        groups: dict[tuple[str, str], list[Item]] = {}
        for item in batch:
            if (item.error is None and not item.is_url and item.type not in REMOTE_TYPES and "," not in item.public_id
                    and (item.key, item.source) not in self.known):
                groups.setdefault((item.resource_type, item.type), []).append(item)
        for (resource_type, type_), group in groups.items():
            for start in range(0, len(group), LISTING_MAX):
                chunk = group[start : start + LISTING_MAX]
                query = [("max_results", str(LISTING_MAX)), *(("public_ids[]", item.public_id) for item in chunk)]
                try:
                    listing = await self.api.retrying("list", functools.partial(
                        self.api.call, "GET", ["resources", resource_type, type_], params=query))
                except RequestFailed:
                    continue
                live = {str(found.get("public_id")) for found in listing.get("resources") or []}
                self.absent.update(item.key for item in chunk if item.public_id not in live)

    async def _worker(self, queue: "asyncio.Queue[Item | None]") -> None:
        assert self.bars is not None
        while (item := await queue.get()) is not None:
            advanced = [0]
            size = await self._one(item, advanced)
            self.bars.bytes.update(size - advanced[0])
            self.bars.assets.update(1)

    async def _one(self, item: Item, advanced: list[int]) -> int:
        """Process one item and return its size. `advanced[0]` is what its upload already showed on the
        bytes bar; the worker adds the rest. An asset's trouble is counted as its failure, never raised."""
        size = 0
        try:
            if item.type in REMOTE_TYPES:
                self._count("skipped_fetch")
            elif item.error is not None:
                self._fail(item, item.error)
            elif item.is_url:
                path, size, digest = await self.api.retrying("download", lambda: self.api.download(item.source, self.args.tmp_dir))
                assert self.bars is not None
                self.bars.bytes.total = (self.bars.bytes.total or 0) + size
                try:
                    await self._sync(item, path, item.source.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1] or "file",
                                     size, None, digest, advanced)
                finally:
                    os.unlink(path)
            else:
                size = await self._file(item, advanced)
        except RequestFailed as exc:
            self._fail(item, exc.message)
        except OSError as exc:
            self._fail(item, f"{exc.strerror or exc}: {exc.filename or item.source}")
        except Exception as exc:  # a bug must cost one asset, not the run...
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise asyncio.CancelledError from exc  # ...and must never swallow a Ctrl-C
            self._fail(item, f"{type(exc).__name__}: {exc}")
        return size

    async def _file(self, item: Item, advanced: list[int]) -> int:
        info = await asyncio.to_thread(os.stat, item.source)
        if not stat.S_ISREG(info.st_mode):
            raise RequestFailed(f"not a regular file: {item.source}")
        known = self.known.get((item.key, item.source))
        unchanged = not self.args.verify and known is not None and (known.size, known.mtime_ns) == (info.st_size, info.st_mtime_ns)
        if unchanged and known is not None and known.outcome in BACKED_UP:
            self._count("skipped_unchanged")
            return info.st_size
        # Unchanged but pending last time: the recorded digest is still right, only ask the server again.
        # Otherwise the file is hashed only if the server has the asset (to compare), or while it uploads.
        digest = known.digest if unchanged and known is not None else None
        await self._sync(item, item.source, os.path.basename(item.source), info.st_size, info.st_mtime_ns, digest, advanced)
        return info.st_size

    async def _sync(
        self, item: Item, path: str, filename: str, size: int, mtime_ns: int | None, digest: str | None, advanced: list[int]
    ) -> None:
        """Look the asset up; upload unless its backed-up current version has these bytes.

        `digest` None: not hashed yet. A file is hashed before uploading only when the server has
        an asset to compare it with. A new one is not hashed by the client at all (the disk is read
        once, by sendfile): the server hashes what it receives and its digest is recorded; with
        --verify the client hashes it as it uploads and compares.
        After a transient upload error the lookup runs again before the retry: the lost answer may
        belong to an upload that landed, and uploading it twice would add a duplicate version.
        """
        assert self.bars is not None
        bar = self.bars.bytes
        attempt = 0
        while True:
            if not attempt and item.key in self.absent:  # listed as new: no lookup (a retry looks again)
                self.absent.discard(item.key)
                resource = None
            else:
                resource = await self.api.retrying("lookup", lambda: self.api.lookup(item))
            if digest is None and resource is not None:
                digest = await asyncio.to_thread(hash_file, path)
            outcome, version_id = (None, None) if digest is None else remote_outcome(resource, digest)
            if outcome is not None:
                outcome = "uploaded" if attempt and outcome == "already_backed_up" else outcome
                break
            if self.args.dry_run:
                self._count("would_upload")
                write_line(f"would upload\t{item.key}\t{item.source}\t{size}", sys.stdout)
                return

            def sent(n: int) -> None:
                advanced[0] += n
                bar.update(n)

            # A new file is not hashed here: the server hashes what it receives, and FileBody aborts
            # the request if the file changes under it. --verify also hashes it on the way, to compare.
            hasher = blake3.blake3(max_threads=blake3.blake3.AUTO if size >= BLOCK else 1) if digest is None and self.args.verify else None
            try:
                async with self.large if size >= LARGE else contextlib.nullcontext():
                    result = await self.api.upload(item, path, filename, sent, hasher)
            except TRANSIENT as exc:
                bar.update(-advanced[0])
                advanced[0] = 0
                attempt += 1
                if attempt > self.api.retries:
                    raise RequestFailed(f"upload: gave up after {self.api.retries} retries: {Api.describe(exc)}") from exc
                await self.api.pause(attempt, exc)
                continue
            digest = hasher.hexdigest() if hasher is not None else digest or str(result.get("blake3") or "") or None
            if digest is None or result.get("blake3") != digest:
                raise RequestFailed("the file changed while it was being uploaded; run again")
            if not result.get("backup"):
                raise RequestFailed("the server did not keep a backup of the upload")
            outcome, version_id = "uploaded", str(result.get("version_id"))
            break
        # Counted first: the report says what the server has even if Ctrl-C lands during the state write.
        if outcome == "uploaded":
            self.report.bytes_uploaded += size
        self._count("skipped_already_backed_up" if outcome == "already_backed_up" else outcome)
        if self.state is not None and not self.args.dry_run:
            await self.state.record(item, size=size, mtime_ns=mtime_ns, digest=digest, outcome=outcome, version_id=version_id)

    def _count(self, outcome: str) -> None:
        self.report.counts[outcome] += 1

    def _fail(self, item: Item, reason: str) -> None:
        self._count("failed")
        self.report.failures.append({"public_id": item.public_id, "resource_type": item.resource_type, "type": item.type,
                                     "source": item.source, "reason": reason})
        if self.bars is not None:
            self.bars.note(f"failed: {item.public_id or '-'} <- {item.source}: {reason}")


def _totals(items: Callable[[], Iterator[Item]]) -> tuple[int, int]:
    """A first, cheap pass for the progress bars' totals (URL sizes are added as they download)."""
    count = size = 0
    for item in items():
        count += 1
        if not item.is_url and item.error is None and item.type not in REMOTE_TYPES:
            with contextlib.suppress(OSError):
                size += os.stat(item.source).st_size
    return count, size


async def follow_server_job(args: argparse.Namespace, api: Api, report: Report) -> int:
    """Start (or join the open) server job, follow it with the bars until it ends."""
    payload = {"notification_url": args.notification_url} if args.notification_url else {}
    try:
        job_id = str((await api.retrying("start", lambda: api.call("POST", ("operations", "initial_backup"), json_body=payload)))["id"])
    except RequestFailed as exc:
        if exc.status != 409:
            print(f"error: cannot start the initial backup: {exc.message}", file=sys.stderr)
            if exc.status == 400 and "isn't enabled" in exc.message:
                print(_turn_backup_on(api.target), file=sys.stderr)
            return EXIT_USAGE if exc.status in (400, 401, 403, 404) else EXIT_FAILED
        job_id = exc.job_id() or await api.open_job_id() or ""
        if not job_id:
            print(f"error: {exc.message}, and no open job is listed", file=sys.stderr)
            return EXIT_FAILED
        print(f"following the initial backup already in progress: {job_id}", file=sys.stderr)
    bars = Bars(args.progress, None, None)
    try:
        while True:
            job = await api.retrying("poll", lambda: api.call("GET", ("operations", "initial_backup", job_id)))
            report.job = job
            _show(bars, job)
            if job.get("status") not in ("pending", "active"):
                break
            await asyncio.sleep(args.poll_interval)
    except RequestFailed as exc:
        print(f"error: lost track of job {job_id}: {exc.message}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        bars.close()
    return EXIT_OK if job.get("status") == "completed" and not job.get("failed_assets_count") else EXIT_FAILED


def _turn_backup_on(target: Target) -> str:
    """What to run when the environment's automatic backup is off (Cloudinary's 400 says only that)."""
    return (f"turn automatic backup on first, on the server: `versionstore cloud set {target.cloud} --auto-backup on` "
            f"(with its --data-dir), or over HTTP: PUT {target.base}/versionstore/settings with auto_backup=true "
            "(Basic auth with the API key and secret)")


def _show(bars: Bars, job: dict[str, Any]) -> None:
    """`total_assets` counts the live assets not backed up when the job started (remote ones too)."""
    done = sum(job.get(key) or 0 for key in ("processed_assets_count", "failed_assets_count", "skipped_assets_count"))
    for bar, total, value in ((bars.assets, job.get("total_assets"), done), (bars.bytes, job.get("total_bytes"), job.get("bytes") or 0)):
        if total is not None and bar.total != total:
            bar.total = total
        if total is not None and job.get("status") == "completed":
            value = max(value, total)
        if value > bar.n:
            bar.update(value - bar.n)


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="Back up existing assets: run the server's initial-backup job (--server), or upload an external "
        "asset set with backup=true (--source/--manifest). The target comes from CLOUDINARY_URL "
        "(cloudinary://key:secret@cloud?upload_prefix=http://host:port).",
    )
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--server", action="store_true", help="start the server's initial-backup job and follow it")
    mode.add_argument("--source", metavar="DIR", type=Path, help="upload every file under DIR (public_id = relative path)")
    mode.add_argument("--manifest", metavar="FILE", type=Path, help="upload the assets a JSON-lines or .csv manifest names")
    parser.add_argument("--concurrency", type=int, default=CONCURRENCY,
                        help=f"uploads in flight, at most half of them files of {LARGE >> 20} MiB or more (default {CONCURRENCY})")
    parser.add_argument("--state-file", type=Path, help=f"resume state (default {STATE_FILE} next to the manifest, or in the cwd)")
    parser.add_argument("--report-json", type=Path, metavar="FILE", help="also write the final report as JSON")
    parser.add_argument("--retries", type=int, default=5, help="retries per request on transient errors (default 5)")
    parser.add_argument("--verify", action="store_true", help="ignore the state file's shortcuts: hash and check every file")
    parser.add_argument("--dry-run", action="store_true", help="list what would be uploaded; upload nothing")
    parser.add_argument("--folder", default="", help="prefix for public_ids derived in --source mode (default: none)")
    parser.add_argument("--tmp-dir", help="where URL entries are downloaded (default: the system temp dir)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    parser.add_argument("--poll-interval", type=float, default=1.0, help="--server: seconds between job polls (default 1)")
    parser.add_argument("--notification-url", help="--server: passed to the job")
    return parser


async def _run(args: argparse.Namespace, target: Target, report: Report) -> int:
    # One exchange thread per worker, plus the producer's listing calls.
    api = Api(target, args.retries, report.note_retry, workers=args.concurrency + 1)
    try:
        try:
            await api.retrying("ping", api.ping)
        except RequestFailed as exc:
            print(f"error: {target.base}: {exc.message}", file=sys.stderr)
            return EXIT_USAGE
        if args.server:
            return await follow_server_job(args, api, report)
        if args.source is not None:
            state_path = args.state_file or Path.cwd() / STATE_FILE
            exclude = [p for p in (state_path, args.report_json) if p is not None]

            def items() -> Iterator[Item]:
                return refuse_duplicates(walk_directory(args.source, args.folder, exclude))
        else:
            state_path = args.state_file or args.manifest.parent / STATE_FILE

            def items() -> Iterator[Item]:
                return refuse_duplicates(read_manifest(args.manifest))

        run = SourceRun(args, api, StateFile(state_path, target.base), report)
        await run.run(items)
        if run.fatal is not None:
            print(f"error: cannot read the {'manifest' if args.manifest else 'source'}: {run.fatal}", file=sys.stderr)
            return EXIT_USAGE
        return EXIT_FAILED if report.counts["failed"] else EXIT_OK
    finally:
        api.close()


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Exit codes: 0 all done, 1 some asset (or the server job) failed, 2 usage or configuration error, 130 interrupted."""
    args = build_parser(prog).parse_args(argv)
    args.progress = args.progress and sys.stderr.isatty()
    if args.concurrency < 1 or args.retries < 0:
        print("error: --concurrency must be at least 1 and --retries at least 0", file=sys.stderr)
        return EXIT_USAGE
    if args.source is not None and not args.source.is_dir():
        print(f"error: --source {args.source} is not a directory", file=sys.stderr)
        return EXIT_USAGE
    if args.manifest is not None and not args.manifest.is_file():
        print(f"error: --manifest {args.manifest} is not a file", file=sys.stderr)
        return EXIT_USAGE
    try:
        target = Target.from_env(os.environ)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    report = Report("server" if args.server else "source" if args.source else "manifest", target.base, args.dry_run)
    try:
        code = asyncio.run(_run(args, target, report))
    except KeyboardInterrupt:
        report.interrupted, code = True, EXIT_INTERRUPTED
        print("interrupted: " + ("the job goes on on the server; run again to follow it" if args.server
                                 else "finished assets are in the state file; run again to continue"), file=sys.stderr)
    report.finished = time.time()
    if code == EXIT_USAGE and report.job is None and not sum(report.counts.values()):
        return code
    print(report.render(), flush=True)
    if args.report_json is not None:
        args.report_json.write_text(json.dumps(report.as_dict(), indent=2) + "\n")
    return code
