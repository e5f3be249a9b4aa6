"""Property: the point-in-time diff agrees with a model of the history, at every moment of it,
and the real run brings back exactly the model's state (real SQLite and stores, no HTTP)."""

import asyncio
import contextlib
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from versionstore import pitr
from versionstore.blobstore import open_store
from versionstore.config import Config
from versionstore.metadata import MetadataStore
from versionstore.models import Job
from versionstore.service import UploadRequest, VersionService
from versionstore.targets import BackupTargets

NAMES = ["m/a", "m/b", "m/c", "m/d"]

upload = st.tuples(st.just("upload"), st.sampled_from(NAMES), st.integers(0, 3), st.booleans())
delete = st.tuples(st.just("delete"), st.sampled_from(NAMES), st.just(0), st.just(True))
checkpoint = st.tuples(st.just("mark"), st.just(""), st.just(0), st.just(True))


@dataclass
class Model:
    """Per name: the (version_id, content, backed_up) it holds, or None once deleted."""

    state: dict[str, tuple[str, int, bool] | None] = field(default_factory=dict)
    deleted: set[str] = field(default_factory=set)


async def _service(root: Path) -> VersionService:
    config = Config(data_dir=root)
    config.spool_dir.mkdir(parents=True, exist_ok=True)
    meta = await MetadataStore.open(config.db_path)
    await meta.create_cloud("m", "k", "s", auto_backup=True)
    return VersionService(meta, open_store(config.primary_url), BackupTargets(meta, open_store(config.backup_url)),
                          config.spool_dir, 1 << 20)


async def _put(service: VersionService, name: str, content: int, backup: bool) -> str:
    spool = service.new_spool()
    await spool.write(f"content {content}".encode())
    cloud = await service.meta.get_cloud("m")
    assert cloud is not None
    result = await service.upload(UploadRequest(cloud=cloud, resource_type="image", public_id=name, backup=backup), await spool.finish())
    return result.version.version_id


def _expected(at_t: dict[str, tuple[str, int, bool] | None], now: dict[str, tuple[str, int, bool] | None]) -> dict[str, set[str]]:
    expected: dict[str, set[str]] = {"restore": set(), "did_not_exist": set(), "unchanged": set(), "unrecoverable": set()}
    for name in set(at_t) | set(now):
        then, current = at_t.get(name), now.get(name)
        if then is None:
            if current is not None:
                expected["did_not_exist"].add(name)
        elif current is not None and current[1] == then[1]:
            expected["unchanged"].add(name)
        else:
            expected["restore" if then[2] else "unrecoverable"].add(name)
    return expected


async def _scenario(ops: list[tuple[str, str, int, bool]], root: Path) -> None:
    service = await _service(root)
    try:
        model = Model()
        marks: list[tuple[float, dict[str, tuple[str, int, bool] | None]]] = []
        for kind, name, content, backup in ops:
            if kind == "mark":
                marks.append((time.time(), dict(model.state)))
            elif kind == "upload" and name not in model.deleted:  # a reservation is not uploaded to again (pitr limits)
                model.state[name] = (await _put(service, name, content, backup), content, backup)
            elif kind == "delete" and (held := model.state.get(name)) is not None and held[2]:
                asset = await service.meta.get_asset("m", "image", "upload", name)
                assert asset is not None
                await service.delete_asset(asset)
                model.state[name], _ = None, model.deleted.add(name)
        marks.append((time.time(), dict(model.state)))
        for at, then in marks:
            diff = await pitr.dry_run(service.meta, pitr.Selection("m", "m/", at))
            got = {kind: {e["public_id"] for e in diff[kind]} for kind in diff["counts"]}
            assert got == _expected(then, model.state), (at, then, model.state)
            for entry in diff["restore"]:
                held = then[entry["public_id"]]
                assert held is not None and entry["to_version"] == held[0]
        # The real run at the first mark brings back the model's state there.
        at, then = marks[0]
        job = Job(id="j" * 32, cloud="m", kind=pitr.KIND, status="active", params={"at": at, "prefix": "m/", "missing": "leave"})
        assert await service.meta.create_job(job) is not None
        await pitr.PointInTimeRestore(service).run(job)
        after = await pitr.dry_run(service.meta, pitr.Selection("m", "m/", at))
        # Left alone by default: a current version that is not backed up would become unrecoverable.
        assert all(entry.get("warning") == "overwrites_unbacked" for entry in after["restore"])
        if after["restore"]:
            forced = Job(id="f" * 32, cloud="m", kind=pitr.KIND, status="active",
                         params={"at": at, "prefix": "m/", "missing": "leave", "overwrite_unbacked": True})
            assert await service.meta.create_job(forced) is not None
            await pitr.PointInTimeRestore(service).run(forced)
            assert (await pitr.dry_run(service.meta, pitr.Selection("m", "m/", at)))["counts"]["restore"] == 0
        for name, held in then.items():
            if held is not None and held[2]:
                asset = await service.meta.get_asset("m", "image", "upload", name)
                assert asset is not None and asset.live
                versions = await service.meta.versions(asset.pk or 0)
                current = next(v for v in versions if v.version_id == asset.version_id)
                original = next(v for v in versions if v.version_id == held[0])
                assert current.digest == original.digest
    finally:
        await service.targets.close()
        await service.primary.close()
        await service.meta.close()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(upload, upload, delete, checkpoint), min_size=1, max_size=14))
def test_the_point_in_time_diff_matches_a_model_of_the_history(ops):
    with tempfile.TemporaryDirectory() as root:
        asyncio.run(_scenario(ops, Path(root)))


async def test_a_restore_job_killed_mid_run_resumes_from_its_cursor_and_restores_nothing_twice(tmp_path, monkeypatch):
    service = await _service(tmp_path)
    try:
        names = [f"m/{i}" for i in range(7)]
        first = {name: await _put(service, name, 1, True) for name in names}
        at = time.time()
        for name in names:
            await _put(service, name, 2, True)
        monkeypatch.setattr(pitr, "PAGE", 3)
        job = Job(id="k" * 32, cloud="m", kind=pitr.KIND, status="active", params={"at": at, "prefix": "m/", "missing": "leave"})
        assert await service.meta.create_job(job) is not None
        real_restore, calls = service.restore, []

        async def dies_on_the_fifth(asset, version_id):
            calls.append(asset.public_id)
            if len(calls) == 5:
                raise asyncio.CancelledError  # the process is killed mid-page
            return await real_restore(asset, version_id)

        monkeypatch.setattr(service, "restore", dies_on_the_fifth)
        with contextlib.suppress(asyncio.CancelledError):
            await pitr.PointInTimeRestore(service).run(job)
        saved = await service.meta.get_job("m", job.id)
        assert saved is not None and saved.status == "active" and saved.cursor["after_pk"] > 0  # the first page is recorded
        monkeypatch.setattr(service, "restore", real_restore)
        await pitr.PointInTimeRestore(service).run(saved)  # what the runner does after a restart
        done = await service.meta.get_job("m", job.id)
        assert done is not None and done.status == "completed"
        for name in names:
            asset = await service.meta.get_asset("m", "image", "upload", name)
            assert asset is not None
            restored = [v for v in await service.meta.versions(asset.pk or 0) if v.restored_from]
            assert [v.restored_from for v in restored] == [first[name]]  # exactly once each
    finally:
        await service.targets.close()
        await service.primary.close()
        await service.meta.close()
