"""Restore drills: prove that a snapshot can be restored, byte for byte, before it is needed.

A drill (the durable job `snapshot_drill`) takes a seeded random sample of a snapshot's covered
items (the latest completed snapshot unless one is named; always the largest item and a few of
each resource type), restores each into a scratch environment made for the drill, with the
same code a point-in-time restore into another environment uses, reads every restored version
back through the download path, and compares BLAKE3, MD5 and size with the snapshot's values.
Then it removes the scratch environment and reports (items, bytes, mismatches by public_id,
duration, throughput). A failure or a mismatch raises the alarm (alerts.py).

The scratch environment is `<cloud>.drill-<job id>`: a '.' no product environment's name can
have (no collision), random credentials nobody is told, and left out of every listing. It is
emptied through the service's ordinary deletions (each blob under its deletion claim, removed
only when `digest_in_use` finds no reference), and its blobs live under its own name (blobs are
namespaced per environment), so the source is never touched. A drill resumed after a crash
continues from its cursor in the same scratch environment; one whose job ended without
cleaning up (killed, failed while removing) is swept at the next drill or scheduler tick.
"""

import asyncio
import hashlib
import heapq
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from versionstore import pitr, retention, ticks
from versionstore.alerts import DRILL, Alerts
from versionstore.blobstore import BlobNotFound, BlobStore, BlobStoreError
from versionstore.drill_records import SCRATCH_MARK, DrillScheduleRow
from versionstore.errors import ApiError, BadRequest, NotFound
from versionstore.ids import new_hex_id
from versionstore.models import Cloud, Job
from versionstore.params import as_int
from versionstore.repository import MetadataRepository
from versionstore.service import RevisionCorrupt, VersionService
from versionstore.snapshot_records import Snapshot, SnapshotItem
from versionstore.spool import Hashes
from versionstore.targets import TargetUnavailable

log = logging.getLogger(__name__)

KIND = "snapshot_drill"
DEFAULT_SAMPLE = 100
MAX_SAMPLE = 10_000
#: Items of each resource type a sample always holds (when the snapshot has them).
PER_TYPE = 2
#: Items restored and read back between two saves of the job's cursor.
PAGE = 25
#: At most this many mismatches are listed in the report (all are counted).
MAX_LISTED = 100
ITEMS_PAGE = 1000


# --- parameters --------------------------------------------------------------------------------


def parse_sample(raw: dict[str, Any]) -> dict[str, Any]:
    """{"sample_size": N} (default 100, at most 10,000) or {"sample_fraction": F} (0 < F <= 1),
    and an optional integer `seed` (the same seed picks the same sample of the same snapshot)."""
    sample: dict[str, Any] = {}
    size, fraction = raw.get("sample_size"), raw.get("sample_fraction")
    if size not in (None, "") and fraction not in (None, ""):
        raise BadRequest("Give sample_size or sample_fraction, not both")
    if fraction not in (None, ""):
        try:
            value = float(str(fraction))
        except ValueError:
            raise BadRequest(f"Invalid sample_fraction - {fraction}") from None
        if not 0 < value <= 1:
            raise BadRequest("sample_fraction must be above 0 and at most 1")
        sample["sample_fraction"] = value
    else:
        sample["sample_size"] = as_int(size, "sample_size", DEFAULT_SAMPLE, 1, MAX_SAMPLE)
    if raw.get("seed") not in (None, ""):
        sample["seed"] = as_int(raw["seed"], "seed", 0, 0, 2**62)
    return sample


def scratch_name(cloud: str, job_id: str) -> str:
    return f"{cloud}{SCRATCH_MARK}{job_id}"


# --- the sample ----------------------------------------------------------------------------------


def _rank(seed: int, item: SnapshotItem) -> int:
    """A stable pseudo-random rank per item: the sample does not depend on read order, and an
    item leaving the snapshot (irreversible deletion) changes no other item's rank."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{item.asset_pk}".encode(), digest_size=8).digest(), "big")


@dataclass
class _Bottom:
    """The `k` items of lowest rank seen so far (a bounded max-heap)."""

    k: int
    heap: list[tuple[int, int, SnapshotItem]] = field(default_factory=list)

    def offer(self, rank: int, item: SnapshotItem) -> None:
        entry = (-rank, -item.asset_pk, item)
        if len(self.heap) < self.k:
            heapq.heappush(self.heap, entry)
        elif entry > self.heap[0]:
            heapq.heapreplace(self.heap, entry)

    def items(self) -> list[SnapshotItem]:
        return [entry[2] for entry in self.heap]


async def choose_sample(meta: MetadataRepository, snapshot_id: str, sample: dict[str, Any], seed: int) -> tuple[list[SnapshotItem], int]:
    """(the sample in row order, how many covered items there were to choose from). One pass
    over the items; memory bounded by the sample size, whatever the snapshot's size."""
    fraction = sample.get("sample_fraction")
    size = MAX_SAMPLE if fraction is not None else int(sample.get("sample_size", DEFAULT_SAMPLE))
    threshold = None if fraction is None else int(float(fraction) * 2**64)
    bottom = _Bottom(size)
    per_type: dict[str, _Bottom] = {}
    largest: SnapshotItem | None = None
    covered, after = 0, 0
    while True:
        page = await meta.snapshot_items(snapshot_id, after, ITEMS_PAGE, covered=True)
        for item in page:
            covered += 1
            rank = _rank(seed, item)
            if threshold is None or rank < threshold:
                bottom.offer(rank, item)
            per_type.setdefault(item.resource_type, _Bottom(PER_TYPE)).offer(rank, item)
            if largest is None or item.bytes > largest.bytes:
                largest = item
        if len(page) < ITEMS_PAGE:
            break
        after = page[-1].asset_pk
        await asyncio.sleep(0)
    chosen = {i.asset_pk: i for i in bottom.items()}
    forced = [*([largest] if largest else []), *(i for b in per_type.values() for i in b.items())]
    for item in forced:
        if item.asset_pk not in chosen and len(chosen) >= size:
            # Make room: drop the highest-ranked item that is not itself forced.
            keep = {f.asset_pk for f in forced}
            victim = max((i for i in chosen.values() if i.asset_pk not in keep), key=lambda i: _rank(seed, i), default=None)
            if victim is not None:
                del chosen[victim.asset_pk]
        chosen[item.asset_pk] = item
    return sorted(chosen.values(), key=lambda i: i.asset_pk), covered


# --- one drill --------------------------------------------------------------------------------


def job_params(sample: dict[str, Any], *, snapshot_id: str | None, created_by: str) -> dict[str, Any]:
    seed = sample.get("seed")
    return {**sample, "seed": secrets.randbelow(2**31) if seed is None else seed, "snapshot_id": snapshot_id,
            "created_by": created_by}


async def start(meta: MetadataRepository, cloud: str, params: dict[str, Any], notification_url: str | None = None) -> Job | None:
    """Queue a drill; None while the environment has one open (one at a time)."""
    if params.get("snapshot_id"):
        snapshot = await meta.get_snapshot(cloud, params["snapshot_id"])
        if snapshot is None:
            raise NotFound(f"Snapshot not found - {params['snapshot_id']}")
        if snapshot.status != "completed":
            raise BadRequest(f"Snapshot {snapshot.id} is {snapshot.status}")
    job = Job(id=new_hex_id(), cloud=cloud, kind=KIND, status="pending", params=params, created_at=time.time(),
              notification_url=notification_url)
    return await meta.create_job(job)


async def latest_snapshot(meta: MetadataRepository, cloud: str) -> Snapshot:
    before: tuple[float, str] | None = None
    while True:
        page = await meta.list_snapshots(cloud, 100, before)
        for snapshot in page:
            if snapshot.status == "completed":
                return snapshot
        if len(page) < 100:
            raise NotFound(f"{cloud} has no completed snapshot to drill")
        before = (page[-1].created_at, page[-1].id)


def _fresh_progress() -> dict[str, Any]:
    return {"result": None, "snapshot_id": None, "scratch_environment": None, "sample_size": 0, "covered_items": 0,
            "by_resource_type": {}, "items_checked": 0, "bytes_checked": 0, "mismatch_count": 0, "mismatches": [],
            "skipped_pending": 0, "elapsed_seconds": 0.0, "assets_per_second": None, "mb_per_second": None,
            "cleaned_up": False}


class DrillJob:
    """The `snapshot_drill` job handler: resumable from its cursor (the last item row checked)."""

    def __init__(self, service: VersionService, alerts: Alerts | None = None, *, page: int = PAGE) -> None:
        self.service = service
        self.meta = service.meta
        self.alerts = alerts or Alerts(service.meta)
        self.page = page
        self.restorer = pitr.PointInTimeRestore(service)

    async def run(self, job: Job) -> None:
        try:
            await self._run(job)
        except asyncio.CancelledError:
            raise  # shutting down: the drill resumes from its cursor at the next start
        except Exception as exc:
            try:
                await remove_scratch(self.service, scratch_name(job.cloud, job.id))
            except Exception:
                log.exception("drill %s: its scratch environment stays until the next sweep", job.id)
            await self.alerts.failed(job.cloud, DRILL, f"{type(exc).__name__}: {exc}", target=job.id)
            raise  # the runner records the job as failed

    async def _run(self, job: Job) -> None:
        progress = job.progress or _fresh_progress()
        snapshot_id = job.cursor.get("snapshot_id") or job.params.get("snapshot_id")
        snapshot = await self.meta.get_snapshot(job.cloud, snapshot_id) if snapshot_id else await latest_snapshot(self.meta, job.cloud)
        if snapshot is None:
            raise NotFound(f"Snapshot not found - {snapshot_id}")
        source, scratch = await self.meta.get_cloud(job.cloud), await self._scratch(job)
        if source is None:
            raise NotFound(f"Environment not found - {job.cloud}")
        sample, covered = await choose_sample(self.meta, snapshot.id, job.params, int(job.params.get("seed") or 0))
        types: dict[str, int] = {}
        for item in sample:
            types[item.resource_type] = types.get(item.resource_type, 0) + 1
        progress.update(snapshot_id=snapshot.id, scratch_environment=scratch.name, sample_size=len(sample), covered_items=covered,
                        by_resource_type=types)
        after = int(job.cursor.get("after_pk", 0))
        todo = [item for item in sample if item.asset_pk > after]
        for begin in range(0, len(todo), self.page):
            page = todo[begin : begin + self.page]
            started = time.monotonic()
            for item in page:
                problem = await self._check(source, scratch, item)
                if problem == "backup_pending":
                    progress["skipped_pending"] += 1
                    continue
                progress["items_checked"] += 1
                progress["bytes_checked"] += item.bytes
                if problem is not None:
                    progress["mismatch_count"] += 1
                    if len(progress["mismatches"]) < MAX_LISTED:
                        progress["mismatches"].append({
                            "public_id": item.public_id, "asset_id": item.asset_id, "resource_type": item.resource_type,
                            "type": item.type, "version_id": item.version_id, "problem": problem,
                        })
            progress["elapsed_seconds"] += time.monotonic() - started
            job.cursor, job.progress = {"snapshot_id": snapshot.id, "after_pk": page[-1].asset_pk}, progress
            if not await self.meta.save_job(job):
                return  # cancelled meanwhile
        await self._finish(job, progress)

    async def _finish(self, job: Job, progress: dict[str, Any]) -> None:
        progress["cleaned_up"] = await remove_scratch(self.service, scratch_name(job.cloud, job.id))
        elapsed = progress["elapsed_seconds"]
        if elapsed > 0:
            progress["assets_per_second"] = round(progress["items_checked"] / elapsed, 2)
            progress["mb_per_second"] = round(progress["bytes_checked"] / 1e6 / elapsed, 3)
        checked = progress["items_checked"]
        progress["result"] = "mismatch" if progress["mismatch_count"] else "passed" if checked else "empty"
        job.status, job.completed_at, job.progress = "completed", time.time(), progress
        await self.meta.save_job(job)
        if progress["mismatch_count"]:
            listed = ", ".join(m["public_id"] for m in progress["mismatches"][:10])
            await self.alerts.failed(job.cloud, DRILL, f"{progress['mismatch_count']} of {checked} restored item(s) did not "
                                     f"match the snapshot: {listed}", target=job.id,
                                     detail={"drill_id": job.id, "snapshot_id": progress["snapshot_id"],
                                             "mismatches": progress["mismatches"][:10]})
        elif checked:
            await self.alerts.succeeded(job.cloud, DRILL)

    async def _scratch(self, job: Job) -> Cloud:
        """The drill's scratch environment: made at its first run, found again on a resume."""
        name = scratch_name(job.cloud, job.id)
        found = await self.meta.get_cloud(name)
        if found is not None:
            return found
        return await self.meta.create_cloud(name, f"drill-{new_hex_id()}", secrets.token_urlsafe(32), True)

    async def _check(self, source: Cloud, scratch: Cloud, item: SnapshotItem) -> str | None:
        """Restore one item into the scratch environment and read it back: None when its bytes
        match the snapshot's BLAKE3, MD5 and size, else what went wrong."""
        if await self.meta.pending_digests(source.name, [item.digest]):
            return "backup_pending"
        entry = {"asset_id": item.asset_id, "resource_type": item.resource_type, "type": item.type,
                 "public_id": item.public_id, "to_version": item.version_id, "bytes_digest": item.digest}
        try:
            error = await self.restorer.copy_into(pitr.Selection(source.name, target_cloud=scratch.name), entry)
        except RevisionCorrupt:
            return "revision_corrupt"
        except (TargetUnavailable, BlobStoreError) as exc:
            return f"backup_unavailable: {exc}"
        if error is not None:
            return error
        restored = await self.meta.get_asset(scratch.name, item.resource_type, item.type, item.public_id)
        if restored is None:
            return "restore_failed"
        try:
            _, _, store, key = await self.service.version_for_download(scratch, restored.asset_id, restored.version_id)
            size, blake3, md5 = await read_back(store, key)
        except (ApiError, BlobStoreError, BlobNotFound) as exc:
            return f"download_failed: {exc}"
        found = await self.meta.version_of(source.name, item.asset_id, item.version_id)
        expected_md5 = found[1].md5 if found is not None else None
        wrong = [name for name, ok in (("bytes", size == item.bytes), ("blake3", blake3 == item.digest),
                                       ("md5", expected_md5 is None or md5 == expected_md5)) if not ok]
        return f"{'_'.join(wrong)}_mismatch" if wrong else None


async def read_back(store: BlobStore, key: str) -> tuple[int, str, str]:
    """(size, BLAKE3, MD5) of a stored blob, streamed."""
    hashes, size = Hashes(), 0
    async for chunk in store.read(key):
        size += len(chunk)
        hashes.update_blake3(chunk)
        hashes.update_md5(chunk)
    return size, hashes.blake3, hashes.md5


# --- scratch environments -----------------------------------------------------------------------


async def remove_scratch(service: VersionService, name: str) -> bool:
    """Empty a scratch environment through the service's own deletions and drop it: True when it
    is gone (or never existed). Each revision goes under its deletion claim, and only when no
    version, snapshot or write in flight references it (`digest_in_use`)."""
    meta = service.meta
    if await meta.get_cloud(name) is None:
        return True
    assert SCRATCH_MARK in name, name  # never a product environment
    after = 0
    while True:
        rows = await meta.environment_assets(name, after, 200)
        for pk, asset_id in rows:
            asset = await meta.get_asset_by_id(name, asset_id)
            if asset is None:
                continue
            if asset.live:
                await service.delete_asset(asset)
            remaining = [v.version_id for v in await meta.versions(pk)]
            if remaining:
                await service.delete_versions(name, asset_id, remaining)
        if len(rows) < 200:
            break
        after = rows[-1][0]
    return await meta.drop_environment(name)


async def sweep_scratch(service: VersionService) -> list[str]:
    """Remove the scratch environments of drills that are no longer running (a crash, or a
    cleanup that failed): the names removed."""
    removed = []
    for name in await service.meta.drill_environments():
        cloud, _, job_id = name.rpartition(SCRATCH_MARK)
        job = await service.meta.get_job(cloud, job_id)
        if job is not None and job.open:
            continue  # still running (or resuming): its own job removes it
        try:
            if await remove_scratch(service, name):
                removed.append(name)
        except Exception:
            log.exception("scratch environment %s: removal failed; retrying at the next sweep", name)
    return removed


# --- schedules ---------------------------------------------------------------------------------


def parse_schedule(raw: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(schedule, sample): `every` daily|weekly, `at` HH:MM UTC, `weekday`, and the sample."""
    schedule = retention.parse_schedule({k: v for k, v in raw.items() if k != "prefix"})
    schedule.pop("prefix", None)
    sample = parse_sample(raw)
    sample.pop("seed", None)  # each scheduled drill draws its own sample
    return schedule, sample


def schedule_label(schedule: dict[str, Any]) -> str:
    return retention.schedule_label({**schedule, "prefix": ""})


async def set_schedule(meta: MetadataRepository, cloud: str, raw: dict[str, Any], now: float) -> DrillScheduleRow:
    schedule, sample = parse_schedule(raw)
    row = DrillScheduleRow(cloud, schedule, sample, retention.next_run(schedule, now), None)
    await meta.set_drill_schedule(row)
    return row


async def tick(service: VersionService, now: float, wake: Callable[[], None] | None = None) -> list[Job]:
    """Sweep leftover scratch environments, then queue every due scheduled drill (the clock is
    the caller's). Returns the jobs queued."""
    await sweep_scratch(service)
    queued = []
    for row in await service.meta.list_drill_schedules():
        if row.next_run_at > now:
            continue
        if not await service.meta.claim_drill_run(row.cloud, row.next_run_at, retention.next_run(row.schedule, now), now):
            continue  # another process took this run
        params = job_params(row.sample, snapshot_id=None, created_by=schedule_label(row.schedule))
        job = await start(service.meta, row.cloud, params)
        if job is None:
            log.warning("scheduled drill of %s skipped: the previous one is still running", row.cloud)
            continue
        queued.append(job)
        if wake is not None:
            wake()
    return queued


async def run_schedules(service: VersionService, interval: float, wake: Callable[[], None],
                        clock: Callable[[], float] = time.time) -> None:
    """The server's loop around `tick`; runs until cancelled."""
    await ticks.every(interval, lambda: tick(service, clock(), wake), log, "drill schedule")


def describe(job: Job) -> dict[str, Any]:
    """The API's and the CLI's view of a drill (times as unix seconds)."""
    report = {**_fresh_progress(), **job.progress}
    return {"id": job.id, "status": job.status, "error": job.error, "created_by": job.params.get("created_by"),
            "seed": job.params.get("seed"), "requested": {k: job.params[k] for k in ("sample_size", "sample_fraction",
                                                                                        "snapshot_id") if job.params.get(k)},
            **report, "created_at": job.created_at, "started_at": job.started_at, "completed_at": job.completed_at,
            "duration_seconds": None if job.completed_at is None or job.started_at is None
            else round(job.completed_at - job.started_at, 3)}
