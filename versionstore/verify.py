"""Verify and scrub: re-read stored revisions, prove they still hash to their names, repair.

A revision's name is the BLAKE3 of its bytes, so checking it needs no other record: read the
bytes back from each store that should hold them (the environment's backup target, and the
primary store's original where one exists), hash them, compare. Each check is recorded per
revision and store (`blob_checks`, with `last_verified_at`); a revision whose backup copy is
missing or corrupt answers `restorable: false` and is counted in the backup status.

Repair takes another intact copy with the same digest (verified first), removes the bad object,
and writes the good bytes create-only under the same name: never into the bad object.

Runs as `versionstore verify` (CLI) and as the durable `verify` job (scheduled by the server,
VERSIONSTORE_VERIFY_INTERVAL). Both are rate limited so uploads keep their share of the disk.
"""

import asyncio
import logging
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import blake3

from versionstore import layout
from versionstore.blobstore import BlobNotFound, BlobStore, BlobStoreError
from versionstore.claims import ORIGINAL, REVISION
from versionstore.ids import new_hex_id
from versionstore.models import Cloud, Job
from versionstore.repository import MetadataRepository
from versionstore.targets import TargetUnavailable

if TYPE_CHECKING:
    from versionstore.service import VersionService

log = logging.getLogger(__name__)

KIND = "verify"
OK, MISSING, CORRUPT, REPAIRED = "ok", "missing", "corrupt", "repaired"
BAD = (MISSING, CORRUPT)
BACKUP, PRIMARY = "backup", "primary"
BATCH = 1000  # revisions per step: one commit of their outcomes, one cursor save
PIECE = 8 << 20  # a throttled local read, or a hashing step in a worker thread
#: Chunks below this are hashed in the event loop; larger ones in a thread (the GIL is released).
INLINE_HASH = 64 << 10


class Throttle:
    """Keep a byte stream at or below `rate` bytes/s (None: as fast as the store allows),
    yielding to the event loop at every step so uploads are not starved."""

    def __init__(self, rate: float | None) -> None:
        self.rate = rate
        self._started = time.monotonic()
        self._bytes = 0

    async def spent(self, size: int) -> None:
        self._bytes += size
        if self.rate is None:
            await asyncio.sleep(0)
            return
        ahead = self._bytes / self.rate - (time.monotonic() - self._started)
        await asyncio.sleep(max(0.0, ahead))


Progress = Callable[[int], object]


async def blob_digest(store: BlobStore, key: str, throttle: Throttle | None = None, progress: Progress | None = None) -> str | None:
    """The BLAKE3 of a stored blob's bytes, streamed; None when the blob is missing."""
    local = store.local_path(key)
    if local is not None:
        return await _file_digest(Path(local), throttle, progress)
    hasher = blake3.blake3()
    try:
        async for chunk in store.read(key):
            if len(chunk) >= INLINE_HASH:
                await asyncio.to_thread(hasher.update, chunk)
            else:
                hasher.update(chunk)
            if progress is not None:
                progress(len(chunk))
            if throttle is not None:
                await throttle.spent(len(chunk))
    except BlobNotFound:
        return None
    return str(hasher.hexdigest())


async def _file_digest(path: Path, throttle: Throttle | None, progress: Progress | None) -> str | None:
    if throttle is None or throttle.rate is None:
        # Unthrottled: one mmap'd, multi-threaded hash, as fast as the disk and the cores allow.
        def whole() -> str | None:
            try:
                size = os.stat(path).st_size
                hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
                if size:
                    hasher.update_mmap(str(path))
            except FileNotFoundError:
                return None
            if progress is not None:
                progress(size)
            return str(hasher.hexdigest())

        return await asyncio.to_thread(whole)
    try:
        handle = await asyncio.to_thread(open, path, "rb")
    except FileNotFoundError:
        return None
    try:
        hasher = blake3.blake3()

        def step() -> int:
            data = handle.read(PIECE)
            hasher.update(data)
            return len(data)

        while size := await asyncio.to_thread(step):
            if progress is not None:
                progress(size)
            await throttle.spent(size)
    finally:
        handle.close()
    return str(hasher.hexdigest())


async def check_blob(store: BlobStore, key: str, digest: str, throttle: Throttle | None = None,
                     progress: Progress | None = None) -> tuple[str, str | None]:
    """(outcome, detail) of one stored copy: ok, missing or corrupt."""
    actual = await blob_digest(store, key, throttle, progress)
    if actual is None:
        return MISSING, f"{store.name}/{key} is missing"
    if actual != digest:
        return CORRUPT, f"{store.name}/{key} hashes to {actual}"
    return OK, None


def _local_outcome(path: str, digest: str) -> tuple[str, str | None]:
    try:
        hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
        if os.stat(path).st_size:
            hasher.update_mmap(path)
    except FileNotFoundError:
        return MISSING, f"{path} is missing"
    actual = hasher.hexdigest()
    return (OK, None) if actual == digest else (CORRUPT, f"{path} hashes to {actual}")


def _check_local_pair(backup_path: str, primary_path: str, digest: str) -> dict[str, tuple[str, str | None]]:
    """Both local copies of a revision, in a worker thread; the primary's only when it exists."""
    outcomes = {BACKUP: _local_outcome(backup_path, digest)}
    if os.path.exists(primary_path):
        try:
            shared = os.path.samefile(backup_path, primary_path)
        except OSError:
            shared = False
        outcomes[PRIMARY] = outcomes[BACKUP] if shared else _local_outcome(primary_path, digest)
    return outcomes


def _check_local_pairs(pairs: dict[str, tuple[str, str]]) -> dict[str, dict[str, tuple[str, str | None]]]:
    return {digest: _check_local_pair(backup_path, primary_path, digest) for digest, (backup_path, primary_path) in pairs.items()}


def same_file(a: BlobStore, a_key: str, b: BlobStore, b_key: str) -> bool:
    """Do two local copies share one inode (the embedded default's hard link)?"""
    pa, pb = a.local_path(a_key), b.local_path(b_key)
    if pa is None or pb is None:
        return False
    try:
        return os.path.samefile(pa, pb)
    except OSError:
        return False


@dataclass
class Report:
    """What a verify run found; `problems` counts copies found missing or corrupt (repaired or not)."""

    revisions: int = 0
    bytes: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    problems: list[dict[str, str]] = field(default_factory=list)
    skipped: int = 0

    def add(self, store: str, outcome: str, digest: str, detail: str | None) -> None:
        name = f"{store}_{outcome}"
        self.counts[name] = self.counts.get(name, 0) + 1
        if outcome != OK and len(self.problems) < 100:
            self.problems.append({"digest": digest, "store": store, "outcome": outcome, "detail": detail or ""})

    @property
    def problem_count(self) -> int:
        return sum(n for name, n in self.counts.items() if not name.endswith(f"_{OK}"))

    def as_dict(self) -> dict[str, Any]:
        return {"revisions": self.revisions, "bytes": self.bytes, "skipped": self.skipped, **self.counts,
                "problems": self.problem_count, "details": self.problems}


def _groups(sizes: dict[str, int], limit: int) -> list[list[str]]:
    """Digests in groups of at most `limit` bytes (a single larger blob is a group of its own)."""
    groups: list[list[str]] = [[]]
    total = 0
    for digest, size in sizes.items():
        if groups[-1] and total + size > limit:
            groups.append([])
            total = 0
        groups[-1].append(digest)
        total += size
    return groups


def _all_ok(outcomes: dict[str, tuple[str, str | None]]) -> bool:
    return all(outcome == OK for outcome, _ in outcomes.values())


class Scrubber:
    """Checks revisions of an environment in each store they live in and repairs what it can."""

    def __init__(self, service: "VersionService", *, rate: float | None = None, sample: float = 1.0,
                 progress: Progress | None = None, rng: random.Random | None = None, concurrency: int = 4) -> None:
        self.service = service
        self.concurrency = concurrency
        self.meta: MetadataRepository = service.meta
        self.throttle = Throttle(rate)
        self.sample = sample
        self.progress = progress
        self.rng = rng or random.Random()

    async def run(self, cloud: Cloud, report: Report | None = None, after_pk: int = 0,
                  since: float | None = None, on_batch: Callable[[int], Any] | None = None) -> Report:
        """Walk the environment's revisions in commit order from `after_pk`; a digest checked
        at or after `since` (this run, before a restart) is not read again."""
        report = report or Report()
        started = time.time() if since is None else since
        while rows := await self.meta.revisions_after(cloud.name, after_pk, BATCH):
            wanted: dict[str, int] = {}
            for _, digest, size in rows:
                if digest not in wanted and (self.sample >= 1.0 or self.rng.random() < self.sample):
                    wanted[digest] = size
            for digest in await self.meta.checked_since(cloud.name, list(wanted), started):
                del wanted[digest]  # the same bytes as an earlier version, checked earlier in this run
            await self._check_batch(cloud, wanted, report)
            after_pk = rows[-1][0]
            if on_batch is not None:
                await on_batch(after_pk)
        return report

    async def _check_batch(self, cloud: Cloud, wanted: dict[str, int], report: Report) -> None:
        pending = await self.meta.pending_digests(cloud.name, list(wanted))
        report.skipped += len(pending)  # still waiting for their target: the primary's pending copy is all there is
        wanted = {d: n for d, n in wanted.items() if d not in pending}
        if not wanted:
            return
        try:
            backup = await self.service.targets.usable(cloud)
        except (TargetUnavailable, BlobStoreError) as exc:
            log.warning("verify %s: backup target unavailable, %d revision(s) skipped: %s", cloud.name, len(wanted), exc)
            report.skipped += len(wanted)
            return
        found: dict[str, dict[str, tuple[str, str | None]]] = {}
        if self.throttle.rate is None and self._local_pair(cloud, backup, next(iter(wanted))) is not None:
            # Local and unthrottled: hash many small blobs per worker-thread hop (hops dominated them).
            for group in _groups(wanted, PIECE * 8):
                pairs = {d: pair for d in group if (pair := self._local_pair(cloud, backup, d)) is not None}
                found.update(await asyncio.to_thread(_check_local_pairs, pairs))
        else:
            slots = asyncio.Semaphore(self.concurrency)

            async def one(digest: str) -> None:
                async with slots:
                    found[digest] = await self._check_copies(cloud, backup, digest)

            await asyncio.gather(*(one(digest) for digest in wanted))
        intact = []
        for digest, outcomes in found.items():
            outcomes = await self._settle(cloud, backup, digest, outcomes)
            if not outcomes:
                report.skipped += 1
                continue
            report.revisions += 1
            report.bytes += wanted[digest]
            for store, (outcome, detail) in outcomes.items():
                report.add(store, outcome, digest, detail)
            if _all_ok(outcomes):
                intact.append((digest, outcomes))
            if self.progress is not None:
                self.progress(wanted[digest])
        await self.meta.record_checks_many(cloud.name, intact)  # one commit per batch; damage is recorded at once

    def _local_pair(self, cloud: Cloud, backup: BlobStore, digest: str) -> tuple[str, str] | None:
        paths = (backup.local_path(layout.revision_key(cloud.name, digest)),
                 self.service.primary.local_path(layout.original_key(cloud.name, digest)))
        return (paths[0], paths[1]) if paths[0] is not None and paths[1] is not None else None

    async def _check_copies(self, cloud: Cloud, backup: BlobStore, digest: str) -> dict[str, tuple[str, str | None]]:
        """Any stores, throttled: the backup copy, and the primary copy when it exists."""
        revision_key, original_key = layout.revision_key(cloud.name, digest), layout.original_key(cloud.name, digest)
        primary = self.service.primary
        outcomes = {BACKUP: await check_blob(backup, revision_key, digest, self.throttle)}
        if await primary.stat(original_key) is not None:
            if same_file(backup, revision_key, primary, original_key):
                outcomes[PRIMARY] = outcomes[BACKUP]  # one inode: reading it twice proves nothing more
            else:
                outcomes[PRIMARY] = await check_blob(primary, original_key, digest, self.throttle)
        return outcomes

    async def _settle(self, cloud: Cloud, backup: BlobStore, digest: str,
                      outcomes: dict[str, tuple[str, str | None]]) -> dict[str, tuple[str, str | None]]:
        """A missing original of a live asset counts; damage is repaired where it can be, and recorded."""
        if PRIMARY not in outcomes and await self.meta.digest_referenced(cloud.name, digest, backup=False):
            outcomes[PRIMARY] = (MISSING, f"{self.service.primary.name}/{layout.original_key(cloud.name, digest)} is missing")
        if _all_ok(outcomes):
            return outcomes
        if not await self.meta.digest_referenced(cloud.name, digest, backup=True):
            return {}  # deleted meanwhile (version deletion): nothing to repair or record
        outcomes = await self._repair(cloud, digest, backup, self.service.primary, outcomes)
        await self.meta.record_checks(cloud.name, digest, outcomes)
        for store, (outcome, detail) in outcomes.items():
            if outcome != OK:
                log.warning("verify %s: %s copy of %s %s: %s", cloud.name, store, digest, outcome, detail)
        return outcomes

    async def _repair(self, cloud: Cloud, digest: str, backup: BlobStore, primary: BlobStore,
                      outcomes: dict[str, tuple[str, str | None]]) -> dict[str, tuple[str, str | None]]:
        """Replace a bad copy from the other store's intact one. The write is journaled, so a
        deletion of the digest (in any process) waits for it or leaves it to orphan collection."""
        copies = {BACKUP: (backup, layout.revision_key(cloud.name, digest)),
                  PRIMARY: (primary, layout.original_key(cloud.name, digest))}
        for bad, good in ((BACKUP, PRIMARY), (PRIMARY, BACKUP)):
            if outcomes.get(bad, (OK,))[0] not in BAD or outcomes.get(good, (MISSING,))[0] != OK:
                continue
            (target, target_key), (source, source_key) = copies[bad], copies[good]
            if bad == PRIMARY and not await self.meta.digest_referenced(cloud.name, digest, backup=False):
                if outcomes[bad][0] == CORRUPT:
                    async with self.service.claims.deleting(cloud.name, digest, ORIGINAL) as free:
                        if free:
                            await target.delete(target_key)  # a corrupt copy nothing needs: remove it
                continue
            role = (ORIGINAL, None) if bad == PRIMARY else (REVISION, cloud.backup_target)
            async with self.service.claims.writing(cloud.name, digest, [role]):
                outcomes[bad] = await repair_copy(self.service, source, source_key, target, target_key, digest, outcomes[bad])
        return outcomes


async def repair_copy(service: "VersionService", source: BlobStore, source_key: str, target: BlobStore, target_key: str,
                      digest: str, found: tuple[str, str | None]) -> tuple[str, str | None]:
    """Remove the bad object, then publish verified bytes create-only under its name."""
    try:
        await target.delete(target_key)
        await service.copy_blob(source, source_key, target, target_key, digest)  # hashes the source copy first
        outcome, detail = await check_blob(target, target_key, digest)
    except Exception as exc:  # the bad copy stays recorded as bad; the run goes on
        log.warning("repair of %s/%s failed: %r", target.name, target_key, exc)
        return found[0], f"{found[1]}; repair failed: {type(exc).__name__}: {exc}"
    if outcome != OK:
        return outcome, f"{found[1]}; repaired copy reads back {outcome}: {detail}"
    return REPAIRED, f"{found[0]} copy replaced from {source.name}"


async def record_read_failure(meta: MetadataRepository, cloud: str, digest: str, outcome: str, detail: str) -> None:
    """A download found the backup copy missing or corrupt: mark it (restorable: false)."""
    log.error("download of %s in %s: backup copy %s: %s", digest, cloud, outcome, detail)
    await meta.record_checks(cloud, digest, {BACKUP: (outcome, detail)})


# --- the durable job -------------------------------------------------------------------------


class VerifyJob:
    """The `verify` job: a scrub of one environment, resumed from its cursor after a restart."""

    def __init__(self, service: "VersionService", *, rate: float | None) -> None:
        self.service = service
        self.rate = rate

    async def run(self, job: Job) -> None:
        meta = self.service.meta
        cloud = await meta.get_cloud(job.cloud)
        if cloud is None:
            job.status, job.error, job.completed_at = "failed", "environment not found", time.time()
            await meta.save_job(job)
            return
        rate = job.params.get("rate_mb_s")
        scrubber = Scrubber(self.service, rate=float(rate) * 1e6 if rate else self.rate, sample=float(job.params.get("sample", 1.0)))
        report = Report(**{k: v for k, v in job.progress.items() if k in ("revisions", "bytes", "skipped")})
        report.counts = dict(job.progress.get("counts", {}))

        async def saved(after_pk: int) -> None:
            job.cursor = {"after_pk": after_pk}
            job.progress = {"revisions": report.revisions, "bytes": report.bytes, "skipped": report.skipped,
                            "counts": report.counts, "problems": report.problem_count}
            await meta.save_job(job)

        await scrubber.run(cloud, report, int(job.cursor.get("after_pk", 0)), since=job.started_at, on_batch=saved)
        await saved(int(job.cursor.get("after_pk", 0)))
        job.status, job.completed_at = "completed", time.time()
        job.error = f"{report.problem_count} stored copies were missing or corrupt" if report.problem_count else None
        await meta.save_job(job)


async def schedule(meta: MetadataRepository, wake: Callable[[], None], interval: float, *, rate_mb_s: float | None,
                   check_every: float = 60.0) -> None:
    """Queue a `verify` job per environment every `interval` seconds (counted from the last
    one's completion, or from this start when there was none). Runs until cancelled."""
    started = time.time()
    while True:
        try:
            for cloud in await meta.list_clouds():
                last = await meta.list_jobs(cloud.name, KIND, 1)
                since = (last[0].completed_at or last[0].created_at) if last else started
                if last and last[0].open or time.time() < since + interval:
                    continue
                params: dict[str, Any] = {"scheduled": True}
                if rate_mb_s:
                    params["rate_mb_s"] = rate_mb_s
                job = Job(id=new_hex_id(), cloud=cloud.name, kind=KIND, status="pending", params=params, created_at=time.time())
                if await meta.create_job(job) is not None:
                    log.info("verify of %s scheduled (job %s)", cloud.name, job.id)
                    wake()
        except Exception:
            log.exception("verify scheduling failed; trying again later")
        await asyncio.sleep(min(check_every, interval))


# --- status ------------------------------------------------------------------------------------


async def status_fields(meta: MetadataRepository, cloud: Cloud, primary_url: str | None, backup_url: str | None) -> dict[str, Any]:
    """The verify part of the backup status (API and `cloud status`)."""
    summary = await meta.check_summary(cloud.name)
    backup, primary = summary.get(BACKUP, {}), summary.get(PRIMARY, {})
    last = summary["last_verified_at"]
    return {
        "backup_shares_storage_with_primary": cloud.backup_target is None and shares_storage(primary_url, backup_url),
        "verify": {
            "last_verified_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(last)) if last else None,
            "backup": {"ok": backup.get(OK, 0) + backup.get(REPAIRED, 0), "missing": backup.get(MISSING, 0),
                       "corrupt": backup.get(CORRUPT, 0), "repaired": backup.get(REPAIRED, 0)},
            "primary": {"ok": primary.get(OK, 0) + primary.get(REPAIRED, 0), "missing": primary.get(MISSING, 0),
                        "corrupt": primary.get(CORRUPT, 0), "repaired": primary.get(REPAIRED, 0)},
            "not_restorable": backup.get(MISSING, 0) + backup.get(CORRUPT, 0),
        },
    }


def shares_storage(primary_url: str | None, backup_url: str | None) -> bool:
    """True when primary and backup are local directories on one filesystem: uploads then hard
    link one inode into both (as fast as `cp`), so one bad block damages both copies."""
    paths = []
    for url in (primary_url, backup_url):
        if url is None or not url.startswith(("/", ".", "file://")):
            return False
        paths.append(url.removeprefix("file://"))
    return _device(Path(paths[0])) == _device(Path(paths[1]))


def _device(path: Path) -> int:
    """The filesystem a store directory is (or will be, once created) on."""
    for candidate in (path, *path.resolve().parents):
        if candidate.exists():
            return candidate.stat().st_dev
    return -1
