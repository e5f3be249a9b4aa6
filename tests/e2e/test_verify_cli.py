"""`versionstore verify` as operators run it: beside a live server, exit codes, repair, status."""

import json
import os
import shutil

import blake3
import cloudinary.api
import cloudinary.uploader
import pytest

from tests.e2e.conftest import CLOUD, cli, configure_sdk, running_server
from tests.test_blobstore_contract import other_filesystem_dir


def blob(root, kind: str, data: bytes):
    digest = blake3.blake3(data).hexdigest()
    return root / CLOUD / kind / digest[:2] / digest[2:4] / digest


def flip(path) -> None:
    os.chmod(path, 0o644)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))


@pytest.fixture
def separate(tmp_path):
    """A server whose backup store is on another filesystem: two independent copies."""
    other = other_filesystem_dir(tmp_path)
    try:
        with running_server(tmp_path, {"VERSIONSTORE_BACKUP_STORE": str(other / "backup")}) as server:
            configure_sdk(server.base_url)
            yield server, other / "backup"
    finally:
        shutil.rmtree(other, ignore_errors=True)


def verify(server, *args: str, env=None):
    env = {"VERSIONSTORE_BACKUP_STORE": env} if env else None
    result = cli("verify", "--quiet", *args, data_dir=server.data_dir, check=False, env=env)
    return result.returncode, [json.loads(chunk) for chunk in _json_objects(result.stdout)], result


def _json_objects(text: str) -> list[str]:
    objects, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "{":
            depth, start = depth + 1, i if depth == 0 else start
        elif ch == "}":
            depth -= 1
            if depth == 0:
                objects.append(text[start : i + 1])
    return objects


def test_verify_repairs_from_the_intact_copy_and_reports_what_it_cannot(separate):
    server, backup_root = separate
    kept, lost = os.urandom(300_000), os.urandom(5000)
    cloudinary.uploader.upload(kept, public_id="cli/kept", resource_type="raw")
    up = cloudinary.uploader.upload(lost, public_id="cli/lost", resource_type="raw")
    cloudinary.uploader.upload(os.urandom(10), public_id="cli/lost", resource_type="raw")  # `lost` leaves the primary store
    env = str(backup_root)

    code, reports, result = verify(server, "--cloud", CLOUD, env=env)
    assert code == 0, result.stderr
    assert reports[0]["problems"] == 0 and reports[0]["backup_ok"] == 3

    flip(blob(backup_root, "blobs", kept))  # the primary copy is intact: repairable
    blob(backup_root, "blobs", lost).unlink()  # no other copy: not repairable
    code, reports, result = verify(server, "--rate", "100", env=env)
    assert code == 1, result.stderr
    assert reports[0]["backup_repaired"] == 1 and reports[0]["backup_missing"] == 1 and reports[0]["problems"] == 2
    assert blob(backup_root, "blobs", kept).read_bytes() == kept

    history = cloudinary.api.resource("cli/lost", resource_type="raw", versions=True)["versions"]
    assert {v["version_id"]: v["restorable"] for v in history}[up["version_id"]] is False
    kept_history = cloudinary.api.resource("cli/kept", resource_type="raw", versions=True)["versions"]
    assert kept_history[0]["restorable"] is True

    status = json.loads(cli("cloud", "status", CLOUD, data_dir=server.data_dir, env={"VERSIONSTORE_BACKUP_STORE": env}).stdout)
    assert status["backup_shares_storage_with_primary"] is False
    assert status["verify"]["not_restorable"] == 1 and status["verify"]["backup"]["repaired"] == 1


def test_default_storage_is_reported_as_shared_and_sampling_checks_a_share(tmp_path):
    with running_server(tmp_path) as server:
        configure_sdk(server.base_url)
        for n in range(20):
            cloudinary.uploader.upload(os.urandom(1000 + n), public_id=f"cli/s{n}", resource_type="raw")
        status = json.loads(cli("cloud", "status", CLOUD, data_dir=server.data_dir).stdout)
        assert status["backup_shares_storage_with_primary"] is True
        code, reports, _ = verify(server, "--sample", "0.3")
        assert code == 0 and 0 < reports[0]["revisions"] < 20
        bad = cli("verify", "--sample", "2", data_dir=server.data_dir, check=False)
        assert bad.returncode == 2 and "--sample" in bad.stderr
