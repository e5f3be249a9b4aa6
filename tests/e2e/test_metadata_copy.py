"""Upgrading an embedded installation to PostgreSQL: `versionstore metadata copy`, killed
halfway and run again, then `versionstore serve` on the copy answering the official SDK."""

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import cloudinary.api
import cloudinary.uploader

from tests.e2e.conftest import CLOUD, ServerProcess, configure_sdk, running_server
from versionstore.metadata import MetadataStore
from versionstore.models import Asset, Version

FILLER = 3000  # assets added beside the SDK's, so the copy takes long enough to be killed mid-way


def copy(source: str, target: str, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "versionstore", "metadata", "copy", "--from", source, "--to", target, "--quiet", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )


async def add_filler(url: str) -> None:
    meta = await MetadataStore.open(url)
    try:
        for i in range(FILLER):
            version = Version(f"fv{i}", 1, f"fd{i}", i, "bin", False, None, time.time())
            filler = Asset(None, CLOUD, f"fa{i}", "raw", "upload", f"filler/{i}", "live", version.digest, "bin", i, None, None, 1,
                           version.version_id, None)
            await meta.save_version(filler, version)
    finally:
        await meta.close()


def test_copy_to_postgresql_resumes_after_a_kill_and_serves_the_sdk(tmp_path: Path, postgres: Any) -> None:
    with running_server(tmp_path) as server:
        configure_sdk(server.base_url)
        first = cloudinary.uploader.upload(b"first bytes", public_id="move/me", resource_type="raw", backup=True)
        second = cloudinary.uploader.upload(b"second bytes", public_id="move/me", resource_type="raw", backup=True)
        cloudinary.uploader.upload(b"other", public_id="move/other", resource_type="raw")
    source = f"sqlite://{server.data_dir / 'metadata.sqlite3'}"
    asyncio.run(add_filler(source))
    database = postgres.new_database(migrated=False)
    target = postgres.url(database)

    killed = copy(source, target, "--batch", "5")
    deadline = time.monotonic() + 60
    copied = 0
    while time.monotonic() < deadline and killed.poll() is None:
        copied = int(postgres.sql("SELECT COUNT(*) FROM assets", database) or 0) if _has_assets(postgres, database) else 0
        if copied > 0:
            break
        time.sleep(0.01)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.communicate(timeout=30)
    partial = int(postgres.sql("SELECT COUNT(*) FROM assets", database))
    assert 0 < partial < FILLER + 2, partial  # killed half-way, not before or after

    for _run in range(2):  # resumed, then once more on a complete copy: the same answer
        done = copy(source, target)
        out, err = done.communicate(timeout=120)
        assert done.returncode == 0, err
        report = json.loads(out)
        assert report["verified"] is True and report["mismatches"] == []
        assert report["tables"]["assets"] == {"source": FILLER + 2, "destination": FILLER + 2}
        assert report["versions_checked"] == FILLER + 3

    served = ServerProcess(server.data_dir, tmp_path, env={"VERSIONSTORE_METADATA_URL": target})
    served.start()
    try:
        configure_sdk(served.base_url)
        resource = cloudinary.api.resource("move/me", resource_type="raw", versions=True)
        assert [v["version_id"] for v in resource["versions"]] == [first["version_id"], second["version_id"]]
        assert resource["bytes"] == len(b"second bytes")
        again = cloudinary.uploader.upload(b"after the move", public_id="move/new", resource_type="raw")  # row ids continue
        assert cloudinary.api.resource("move/new", resource_type="raw")["asset_id"] == again["asset_id"]
        restored = cloudinary.api.restore(["move/me"], resource_type="raw", versions=[first["version_id"]])
        assert restored["move/me"]["bytes"] == len(b"first bytes")
    finally:
        served.stop()


def _has_assets(postgres: Any, database: str) -> bool:
    return postgres.sql("SELECT to_regclass('assets') IS NOT NULL", database).strip() == "t"
