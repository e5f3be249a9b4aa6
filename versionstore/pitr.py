"""Point-in-time restore: an environment or prefix as it was at time T, or as a snapshot lists it.

Every version carries its time, so "the state at T" is each asset's newest version created at
or before T, and an asset deleted since (a reservation) existed at T when it was deleted after
T. The diff sorts each asset into: `restore` (with from/to version), `did_not_exist` at T,
`unchanged` (same bytes now), `unrecoverable` (with the reason). It is computed in pages of
asset rows by one query each, so a dry run over 100k assets costs a few queries, not 100k.

The real run is a durable job (`KIND`) that walks the same pages: each restore appends a
version that records its source (`restored_from`), so the history stays append-only and the
destination's state before the restore stays recoverable. Re-running a page restores nothing
twice: what was restored is `unchanged` the second time. Limits (docs/snapshots.md): history
does not record renames or a deletion that a later upload undid; a version deleted
irreversibly is gone from the past too.
"""

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from versionstore import layout
from versionstore.console.audit import AuditLog
from versionstore.errors import BadRequest, NotFound
from versionstore.ids import new_hex_id
from versionstore.models import Job
from versionstore.queries import iso_seconds
from versionstore.repository import MetadataRepository
from versionstore.service import UploadRequest, VersionService
from versionstore.snapshot_records import PointInTimeRow
from versionstore.snapshots import check_prefix

KIND = "point_in_time_restore"
PAGE = 2000
MISSING_ACTIONS = ("leave", "delete")


@dataclass(frozen=True)
class Selection:
    """What to restore: `cloud` (and `prefix`) at `at`, or as snapshot `snapshot_id` lists it;
    into `target_cloud` (the same environment when None)."""

    cloud: str
    prefix: str = ""
    at: float | None = None
    snapshot_id: str | None = None
    target_cloud: str | None = None

    @property
    def target(self) -> str:
        return self.target_cloud or self.cloud


@dataclass
class Diff:
    restore: list[dict[str, Any]] = field(default_factory=list)
    did_not_exist: list[dict[str, Any]] = field(default_factory=list)
    unchanged: list[dict[str, Any]] = field(default_factory=list)
    unrecoverable: list[dict[str, Any]] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return {name: len(getattr(self, name)) for name in ("restore", "did_not_exist", "unchanged", "unrecoverable")}


async def check_selection(meta: MetadataRepository, selection: Selection) -> Selection:
    """Refuse a selection that names nothing: exactly one of `at` and `snapshot_id`, a known
    snapshot and target environment."""
    if (selection.at is None) == (selection.snapshot_id is None):
        raise BadRequest("Give exactly one of at (a time) and snapshot_id")
    check_prefix(selection.prefix)
    if selection.snapshot_id is not None:
        snapshot = await meta.get_snapshot(selection.cloud, selection.snapshot_id)
        if snapshot is None:
            raise NotFound(f"Snapshot not found - {selection.snapshot_id}")
        if snapshot.status != "completed":
            raise BadRequest(f"Snapshot {selection.snapshot_id} is {snapshot.status}")
    if selection.target_cloud is not None and await meta.get_cloud(selection.target_cloud) is None:
        raise NotFound(f"Target environment not found - {selection.target_cloud}")
    return selection


async def pages(meta: MetadataRepository, selection: Selection, after_pk: int = 0) -> AsyncIterator[tuple[int, Diff]]:
    """(last asset row of the page, its diff), page by page from `after_pk`."""
    while True:
        if selection.snapshot_id is not None:
            rows = await meta.snapshot_selection(selection.cloud, selection.snapshot_id, selection.prefix, after_pk, PAGE)
        else:
            assert selection.at is not None
            rows = await meta.point_in_time(selection.cloud, selection.prefix, selection.at, after_pk, PAGE)
        if not rows:
            return
        yield rows[-1].asset_pk, await _diff(meta, selection, rows)
        after_pk = rows[-1].asset_pk
        if len(rows) < PAGE:
            return


async def dry_run(meta: MetadataRepository, selection: Selection, limit: int = 1000) -> dict[str, Any]:
    """Counts of the whole diff and up to `limit` entries of each list."""
    total = Diff()
    counts = dict.fromkeys(total.counts(), 0)
    async for _last, diff in pages(meta, selection):
        for name, count in diff.counts().items():
            counts[name] += count
            listed = getattr(total, name)
            listed.extend(getattr(diff, name)[: max(0, limit - len(listed))])
    return {"counts": counts, **{name: getattr(total, name) for name in counts}}


def existed_at(row: PointInTimeRow, selection: Selection) -> bool:
    """Whether the row's asset was in the selection at its time (or snapshot): it had a version
    then and was not deleted before it. Shared by the restore's diff and archive exports."""
    if row.at_version_id is None:
        return False
    # Deleted before T (and not uploaded again since): not there at T.
    return selection.at is None or row.live or row.deleted_at is None or row.deleted_at > selection.at


async def _diff(meta: MetadataRepository, selection: Selection, rows: list[PointInTimeRow]) -> Diff:
    diff = Diff()
    wanted = [r.at_digest for r in rows if r.at_digest is not None]
    pending = await meta.pending_digests(selection.cloud, wanted)
    damaged = await meta.bad_revisions(selection.cloud, wanted)
    for row in rows:
        entry: dict[str, Any] = {
            "asset_id": row.asset_id, "resource_type": row.resource_type, "type": row.type, "public_id": row.public_id,
        }
        current = await _current(meta, selection, row)
        if not existed_at(row, selection):
            if current is not None and current.live:
                diff.did_not_exist.append({**entry, "version_id": current.version_id, "backed_up": current.backed_up})
            continue
        assert row.at_digest is not None
        if current is not None and current.live and current.digest == row.at_digest:
            diff.unchanged.append({**entry, "version_id": current.version_id})
            continue
        reason = _unrecoverable(row, pending, damaged)
        if reason is not None:
            diff.unrecoverable.append({**entry, "version_id": row.at_version_id, "reason": reason})
            continue
        item = {
            **entry, "from_version": current.version_id if current is not None and current.live else None,
            "to_version": row.at_version_id, "bytes_digest": row.at_digest,
        }
        if current is not None and current.live and not current.backed_up:
            item["warning"] = "overwrites_unbacked"  # the destination's current bytes are not a revision
        diff.restore.append(item)
    return diff


def _unrecoverable(row: PointInTimeRow, pending: set[str], damaged: dict[str, str]) -> str | None:
    if not row.at_backed_up:
        return "not_backed_up"
    assert row.at_digest is not None
    if row.at_digest in pending:
        return "backup_pending"
    if row.at_digest in damaged:
        return f"revision_{damaged[row.at_digest]}"
    return None


@dataclass(frozen=True)
class _Current:
    live: bool
    version_id: str
    digest: str
    backed_up: bool


async def _current(meta: MetadataRepository, selection: Selection, row: PointInTimeRow) -> _Current | None:
    """The destination's state: the row's own (no query), or the same name in the target
    environment (a point read)."""
    if selection.target_cloud is None or selection.target_cloud == selection.cloud:
        return _Current(row.live, row.current_version_id, row.current_digest, row.current_backed_up)
    asset = await meta.get_asset(selection.target_cloud, row.resource_type, row.type, row.public_id)
    if asset is None:
        return None
    found = await meta.version_of(asset.cloud, asset.asset_id, asset.version_id)
    return _Current(asset.live, asset.version_id, asset.digest, found is not None and found[1].backed_up)


# --- the real run ------------------------------------------------------------------------------


def job_params(selection: Selection, missing: str, overwrite_unbacked: bool) -> dict[str, Any]:
    if missing not in MISSING_ACTIONS:
        raise BadRequest(f"missing must be one of {', '.join(MISSING_ACTIONS)}")
    return {
        "prefix": selection.prefix, "at": selection.at, "snapshot_id": selection.snapshot_id,
        "target_cloud": selection.target_cloud, "missing": missing, "overwrite_unbacked": overwrite_unbacked,
    }


class PointInTimeRestore:
    """The durable job: resumes from its cursor (the last asset row done); idempotent."""

    def __init__(self, service: VersionService) -> None:
        self.service = service
        self.meta = service.meta

    async def run(self, job: Job) -> None:
        params = job.params
        selection = Selection(
            job.cloud, params.get("prefix") or "", params.get("at"), params.get("snapshot_id"), params.get("target_cloud")
        )
        progress = job.progress or dict.fromkeys(("restored", "deleted", "unchanged", "did_not_exist", "skipped", "failed"), 0)
        failures: list[dict[str, Any]] = progress.setdefault("failures", [])
        async for last_pk, diff in pages(self.meta, selection, int(job.cursor.get("after_pk", 0))):
            for item in diff.restore:
                if item.get("warning") and not params.get("overwrite_unbacked"):
                    progress["skipped"] += 1
                    continue
                error = await self._restore_one(selection, item, job.id)
                if error is None:
                    progress["restored"] += 1
                else:
                    progress["failed"] += 1
                    if len(failures) < 100:
                        failures.append({**item, "error": error})
            for item in diff.did_not_exist:
                if params.get("missing") == "delete" and item["backed_up"]:
                    await self._delete_recoverably(selection, item)
                    progress["deleted"] += 1
                else:
                    progress["did_not_exist"] += 1
            progress["unchanged"] += len(diff.unchanged)
            progress["failed"] += len(diff.unrecoverable)
            failures.extend({**i, "error": i["reason"]} for i in diff.unrecoverable[: max(0, 100 - len(failures))])
            job.cursor, job.progress = {"after_pk": last_pk}, progress
            if not await self.meta.save_job(job):
                return  # cancelled meanwhile
        job.status, job.completed_at, job.progress = "completed", time.time(), progress
        # Audited before the job reads as completed, so whoever sees it completed finds the record.
        counts = {k: v for k, v in progress.items() if k != "failures"}
        await AuditLog(self.meta).record(f"job:{KIND}", "pitr_finish", cloud=job.cloud, target=job.id,
                                         outcome="failed" if progress.get("failed") else "ok", detail=counts)
        await self.meta.save_job(job)

    async def _restore_one(self, selection: Selection, item: dict[str, Any], job_id: str) -> str | None:
        if selection.target == selection.cloud:
            asset = await self.meta.get_asset_by_id(selection.cloud, item["asset_id"])
            if asset is None:
                return "asset_not_found"
            outcome = await self.service.restore(asset, item["to_version"])
            return None if outcome.error is None else outcome.error.reason
        return await self.copy_into(selection, item)

    async def copy_into(self, selection: Selection, item: dict[str, Any]) -> str | None:
        """Another environment: the revision's bytes (verified) become the target's newest
        version of the same name, recording `<cloud>/<asset_id>/<version_id>` as its source."""
        source = await self.meta.get_cloud(selection.cloud)
        target = await self.meta.get_cloud(selection.target)
        if source is None or target is None:
            return "environment_not_found"
        store = await self.service.targets.usable(source)
        key = layout.revision_key(source.name, item["bytes_digest"])
        spool = self.service.new_spool()
        try:
            async with self.service.local_copy(store, key, item["bytes_digest"], verify=True) as path:
                if path is None:
                    spool.discard()
                    return "revision_missing"
                with path.open("rb") as handle:
                    while block := await asyncio.to_thread(handle.read, 1 << 20):
                        await spool.write(block)
            spooled = await spool.finish()
        except BaseException:
            spool.discard()
            raise
        request = UploadRequest(
            cloud=target, resource_type=item["resource_type"], type=item["type"], public_id=item["public_id"], backup=True,
            restored_from=f"{selection.cloud}/{item['asset_id']}/{item['to_version']}",
        )
        await self.service.upload(request, spooled)
        return None

    async def _delete_recoverably(self, selection: Selection, item: dict[str, Any]) -> None:
        """An asset that did not exist at T goes as a reservation (its backed-up current
        version stays restorable)."""
        asset = (
            await self.meta.get_asset_by_id(selection.cloud, item["asset_id"]) if selection.target == selection.cloud
            else await self.meta.get_asset(selection.target, item["resource_type"], item["type"], item["public_id"])
        )
        if asset is not None and asset.live:
            await self.service.delete_asset(asset)


def parse_time(value: object) -> float | None:
    """`at` as unix seconds or ISO 8601 (UTC when no offset is given)."""
    if value is None or value == "":
        return None
    text = str(value).strip()
    try:
        return float(text)
    except ValueError:
        pass
    moment = iso_seconds(text)
    if moment is None:
        raise BadRequest(f"Invalid at {text!r}: unix seconds or ISO 8601")
    return moment


async def start(meta: MetadataRepository, selection: Selection, params: dict[str, Any], notification_url: str | None) -> Job | None:
    """Queue the real run; None when the environment already has one open."""
    job = Job(
        id=new_hex_id(), cloud=selection.cloud, kind=KIND, status="pending", params=params, created_at=time.time(),
        notification_url=notification_url,
    )
    return await meta.create_job(job)
