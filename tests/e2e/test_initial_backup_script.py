"""`scripts/initial_backup.py` / `versionstore initial-backup` run as real processes against
`versionstore serve`: source and manifest uploads, resume after SIGKILL, digests not names,
server-side errors, and following the server's initial-backup job."""

import csv
import fcntl
import hashlib
import json
import os
import pty
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import blake3
import cloudinary
import cloudinary.api
import cloudinary.uploader
import pytest

from tests.e2e.conftest import API_KEY, API_SECRET, CLOUD, FileServer, ServerProcess, cli, configure_sdk

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "initial_backup.py"


def cloudinary_url(server: ServerProcess) -> str:
    return f"cloudinary://{API_KEY}:{API_SECRET}@{CLOUD}?upload_prefix={server.base_url}"


def run_script(server: ServerProcess, *args: str, cwd: Path, tty: bool = False, module: bool = False) -> subprocess.CompletedProcess[str]:
    """The script as operators run it; `tty=True` gives it a terminal on stderr (progress bars on)."""
    command = [sys.executable, "-m", "versionstore", "initial-backup"] if module else [sys.executable, str(SCRIPT)]
    env = {**os.environ, "CLOUDINARY_URL": cloudinary_url(server)}
    if not tty:
        return subprocess.run([*command, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60)
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # rows, columns
    chunks: list[bytes] = []
    reader = threading.Thread(target=_drain, args=(leader, chunks), daemon=True)
    reader.start()
    try:
        done = subprocess.run([*command, *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=follower, text=True, timeout=60)
    finally:
        os.close(follower)
        reader.join(timeout=5)
        os.close(leader)
    return subprocess.CompletedProcess(done.args, done.returncode, done.stdout, b"".join(chunks).decode(errors="replace"))


def _drain(fd: int, into: list[bytes]) -> None:
    while True:
        try:
            data = os.read(fd, 65536)
        except OSError:
            return
        if not data:
            return
        into.append(data)


def report(path: Path) -> dict[str, Any]:
    return dict(json.loads(path.read_text()))


def resource(public_id: str, resource_type: str, type_: str = "upload") -> dict[str, Any]:
    return dict(cloudinary.api.resource(public_id, resource_type=resource_type, type=type_, versions=True))


def assert_backed_up(public_id: str, resource_type: str, data: bytes, versions: int = 1) -> None:
    found = resource(public_id, resource_type)
    assert found["blake3"] == blake3.blake3(data).hexdigest(), public_id
    assert found["etag"] == hashlib.md5(data).hexdigest(), public_id
    assert len(found["versions"]) == versions, (public_id, found["versions"])
    current = [v for v in found["versions"] if v["version_id"] == found["version_id"]]
    assert current and current[0]["restorable"] is True, found["versions"]


def listed(prefix: str) -> set[tuple[str, str]]:
    out = set()
    for rt in ("image", "video", "raw"):
        page = cloudinary.api.resources(resource_type=rt, type="upload", prefix=prefix, max_results=500)
        out |= {(rt, r["public_id"]) for r in page["resources"]}
    return out


def write(path: Path, data: bytes) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return data


# relative path -> (resource_type, public_id under the folder): the documented derivation
TREE = {
    "top.png": ("image", "top"),
    "a/b/deep.JPG": ("image", "a/b/deep"),
    "a/b/photo.final.webp": ("image", "a/b/photo.final"),
    "with space/ünï.gif": ("image", "with space/ünï"),
    "a/clip.mp4": ("video", "a/clip"),
    "a/sound.mp3": ("video", "a/sound"),
    "a/b/c/movie.MOV": ("video", "a/b/c/movie"),
    "docs/readme.txt": ("raw", "docs/readme.txt"),
    "docs/archive.tar.gz": ("raw", "docs/archive.tar.gz"),
    "noext": ("raw", "noext"),
    **{f"img/{i:02}.png": ("image", f"img/{i:02}") for i in range(8)},
    **{f"vid/sub/{i}.webm": ("video", f"vid/sub/{i}") for i in range(6)},
    **{f"data/{i}.bin": ("raw", f"data/{i}.bin") for i in range(6)},
}


@pytest.fixture
def tree(tmp_path: Path) -> dict[str, bytes]:
    contents = {rel: write(tmp_path / "src" / rel, os.urandom(300 + i * 7)) for i, rel in enumerate(TREE)}
    write(tmp_path / "src" / ".hidden", b"dotfiles are skipped")
    write(tmp_path / "src" / ".git" / "config", b"so are dot-directories")
    return contents


def test_source_dir_uploads_every_file_under_its_derived_public_id(sdk: ServerProcess, tmp_path: Path, tree: dict[str, bytes]) -> None:
    result = run_script(sdk, "--source", "src", "--folder", "srcdir", "--report-json", "r.json", cwd=tmp_path, tty=True)
    assert result.returncode == 0, result.stdout + result.stderr
    body = report(tmp_path / "r.json")
    assert body["counts"] == {"total": 30, "uploaded": 30, "skipped_unchanged": 0, "skipped_already_backed_up": 0,
                              "backup_pending": 0, "skipped_fetch": 0, "failed": 0}
    assert body["bytes_uploaded"] == sum(map(len, tree.values())) and body["failures"] == []
    assert "uploaded" in result.stdout and "assets" in result.stderr and "100%" in result.stderr  # report; progress bars
    assert listed("srcdir/") == {(rt, f"srcdir/{pid}") for rt, pid in TREE.values()}
    for rel, (rt, pid) in TREE.items():
        assert_backed_up(f"srcdir/{pid}", rt, tree[rel])
    state = [json.loads(line) for line in (tmp_path / ".initial-backup-state.jsonl").read_text().splitlines()]
    assert len(state) == 30 and {s["outcome"] for s in state} == {"uploaded"}


def test_rerun_skips_unchanged_files_uploads_a_changed_one_and_verify_compares_digests(
    sdk: ServerProcess, tmp_path: Path, tree: dict[str, bytes]
) -> None:
    args = ("--source", "src", "--folder", "rerun", "--report-json", "r.json")
    assert run_script(sdk, *args, cwd=tmp_path).returncode == 0
    started = time.monotonic()
    second = run_script(sdk, *args, cwd=tmp_path)
    elapsed = time.monotonic() - started
    assert second.returncode == 0, second.stderr
    counts = report(tmp_path / "r.json")["counts"]
    assert counts["skipped_unchanged"] == 30 and counts["uploaded"] == 0, counts
    assert report(tmp_path / "r.json")["duration_s"] < 1.0 and elapsed < 5, elapsed

    changed = write(tmp_path / "src" / "a" / "clip.mp4", b"new content of the clip")
    dry = run_script(sdk, *args, "--dry-run", cwd=tmp_path)
    assert dry.returncode == 0 and dry.stdout.count("would upload\t") == 1, dry.stdout
    assert "would upload\tvideo/upload/rerun/a/clip\t" in dry.stdout and report(tmp_path / "r.json")["counts"]["would_upload"] == 1
    assert len(resource("rerun/a/clip", "video")["versions"]) == 1
    assert run_script(sdk, *args, cwd=tmp_path).returncode == 0
    counts = report(tmp_path / "r.json")["counts"]
    assert (counts["uploaded"], counts["skipped_unchanged"]) == (1, 29), counts
    assert_backed_up("rerun/a/clip", "video", changed, versions=2)

    # No state file: every file is hashed and compared with the server's etag; nothing uploads.
    verify = run_script(sdk, *args, "--verify", "--state-file", str(tmp_path / "fresh.jsonl"), cwd=tmp_path)
    assert verify.returncode == 0, verify.stderr
    counts = report(tmp_path / "r.json")["counts"]
    assert (counts["uploaded"], counts["skipped_already_backed_up"]) == (0, 30), counts
    # Same names, other bytes: the digest decides, not the name.
    write(tmp_path / "src" / "top.png", b"other bytes, same name")
    assert run_script(sdk, *args, "--verify", cwd=tmp_path).returncode == 0
    assert report(tmp_path / "r.json")["counts"]["uploaded"] == 1


def test_a_killed_run_resumes_without_duplicate_versions(sdk: ServerProcess, tmp_path: Path) -> None:
    files = {f"f{i:02}.bin": write(tmp_path / "src" / f"f{i:02}.bin", os.urandom(1 << 20)) for i in range(40)}
    state = tmp_path / "state.jsonl"
    env = {**os.environ, "CLOUDINARY_URL": cloudinary_url(sdk)}
    args = [sys.executable, str(SCRIPT), "--source", "src", "--folder", "resume", "--concurrency", "1", "--state-file", str(state)]
    proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (not state.exists() or state.read_bytes().count(b"\n") < 3):
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=10)
    recorded = state.read_bytes().count(b"\n")
    assert 3 <= recorded < 40, f"the run was not interrupted mid-way ({recorded} recorded)"

    resumed = run_script(sdk, *args[2:], "--report-json", "r.json", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    counts = report(tmp_path / "r.json")["counts"]
    assert counts["skipped_unchanged"] >= recorded and counts["failed"] == 0, counts
    assert counts["skipped_unchanged"] + counts["skipped_already_backed_up"] + counts["uploaded"] == 40, counts
    assert counts["uploaded"] <= 40 - recorded
    for name, data in files.items():
        assert_backed_up(f"resume/{name}", "raw", data, versions=1)


def test_ctrl_c_stops_with_exit_130_and_a_partial_report(sdk: ServerProcess, tmp_path: Path) -> None:
    for i in range(40):
        write(tmp_path / "src" / f"f{i:02}.bin", os.urandom(1 << 20))
    state = tmp_path / ".initial-backup-state.jsonl"
    env = {**os.environ, "CLOUDINARY_URL": cloudinary_url(sdk)}
    args = [sys.executable, str(SCRIPT), "--source", "src", "--folder", "sigint", "--concurrency", "1", "--report-json", "r.json"]
    # A terminal's Ctrl-C: when the suite itself runs in the background (`cmd &` in a script), the
    # shell ignores SIGINT and the child would inherit that; a handler here is reset to the default.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    finally:
        signal.signal(signal.SIGINT, previous)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (not state.exists() or state.read_bytes().count(b"\n") < 3):
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, out + err
    assert "run again to continue" in err and "interrupted" in out
    body = report(tmp_path / "r.json")
    assert body["interrupted"] is True and 3 <= body["counts"]["uploaded"] < 40, body["counts"]
    recorded = state.read_bytes().count(b"\n")  # an upload is counted, then recorded: Ctrl-C may land in between
    assert body["counts"]["uploaded"] - 1 <= recorded <= body["counts"]["uploaded"], (recorded, body["counts"])


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_manifest_with_path_url_fetch_and_missing_entries(
    sdk: ServerProcess, tmp_path: Path, file_server: FileServer, fmt: str
) -> None:
    local = write(tmp_path / "assets" / "local.png", os.urandom(2048))
    remote = os.urandom(4096)
    url = file_server.add(f"manifest-{fmt}/remote.jpg", remote)
    entries = [
        {"public_id": f"man-{fmt}/local", "path": "assets/local.png"},
        {"public_id": f"man-{fmt}/remote", "url": url, "resource_type": "image"},
        {"public_id": f"man-{fmt}/fetched", "url": "https://example.com/x.png", "type": "fetch"},
        {"public_id": f"man-{fmt}/notes.txt", "path": str(tmp_path / "assets" / "missing.txt"), "resource_type": "raw"},
    ]
    manifest = tmp_path / f"manifest.{fmt}"
    if fmt == "csv":
        with open(manifest, "w", newline="") as handle:
            writer = csv.DictWriter(handle, ["public_id", "path", "url", "resource_type", "type"])
            writer.writeheader()
            writer.writerows(entries)
    else:
        manifest.write_text("".join(json.dumps(e) + "\n" for e in entries))
    result = run_script(sdk, "--manifest", manifest.name, "--report-json", "r.json", "--concurrency", "3", cwd=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    body = report(tmp_path / "r.json")
    counts = body["counts"]
    assert (counts["uploaded"], counts["skipped_fetch"], counts["failed"], counts["total"]) == (2, 1, 1, 4), counts
    [failure] = body["failures"]
    assert failure["public_id"] == f"man-{fmt}/notes.txt" and "No such file" in failure["reason"]
    assert "missing.txt" in failure["reason"] and "missing.txt" in result.stdout
    assert_backed_up(f"man-{fmt}/local", "image", local)
    assert_backed_up(f"man-{fmt}/remote", "image", remote)
    assert (tmp_path / ".initial-backup-state.jsonl").exists()  # next to the manifest by default

    again = run_script(sdk, "--manifest", manifest.name, "--report-json", "r.json", cwd=tmp_path)
    counts = report(tmp_path / "r.json")["counts"]
    assert again.returncode == 1 and counts["skipped_unchanged"] == 1, counts  # the path entry
    assert counts["skipped_already_backed_up"] == 1 and counts["uploaded"] == 0, counts  # the URL: re-downloaded, compared


def test_server_errors_are_reported_with_the_servers_message(sdk: ServerProcess, tmp_path: Path) -> None:
    write(tmp_path / "x.txt", b"hostile")
    write(tmp_path / "ok.txt", b"fine")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"public_id": "../x", "path": "x.txt"}) + "\n"
                        + json.dumps({"public_id": "errors/ok.txt", "path": "ok.txt"}) + "\n"
                        + json.dumps({"public_id": "errors/dup.txt", "path": "ok.txt"}) + "\n"
                        + json.dumps({"public_id": "errors/dup.txt", "path": "x.txt"}) + "\n"
                        + "{not json\n")
    result = run_script(sdk, "--manifest", "m.jsonl", "--report-json", "r.json", cwd=tmp_path, module=True)
    assert result.returncode == 1, result.stdout + result.stderr
    body = report(tmp_path / "r.json")
    assert (body["counts"]["uploaded"], body["counts"]["failed"]) == (2, 3), body
    hostile = next(f for f in body["failures"] if f["public_id"] == "../x")
    assert hostile["reason"] == "Invalid public_id - '../x'" and "Invalid public_id - '../x'" in result.stdout
    duplicate = next(f for f in body["failures"] if f["public_id"] == "errors/dup.txt")
    assert duplicate["source"].endswith("x.txt") and duplicate["reason"].endswith("is also used for " + str(tmp_path / "ok.txt"))
    broken = next(f for f in body["failures"] if f["public_id"] == "")
    assert broken["source"] == "m.jsonl:5" and broken["reason"].startswith("not JSON")


def test_missing_or_bad_configuration_exits_2(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLOUDINARY_")}
    missing = subprocess.run([sys.executable, str(SCRIPT), "--source", str(tmp_path)], env=env, capture_output=True, text=True,
                             timeout=30)
    assert missing.returncode == 2 and "CLOUDINARY_URL" in missing.stderr
    env["CLOUDINARY_URL"] = "cloudinary://key@demo"
    bad = subprocess.run([sys.executable, str(SCRIPT), "--server"], env=env, capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "api_secret" in bad.stderr
    # A quote pasted along with the printed URL, a port out of range, no host: a clear line, no traceback.
    for prefix in ("http://127.0.0.1:8765'", "http://127.0.0.1:99999", "http://:8765"):
        env["CLOUDINARY_URL"] = f"cloudinary://key:secret@demo?upload_prefix={prefix}"
        bad = subprocess.run([sys.executable, str(SCRIPT), "--source", str(tmp_path)], env=env, capture_output=True, text=True,
                             timeout=30)
        assert bad.returncode == 2 and "upload_prefix" in bad.stderr and "Traceback" not in bad.stderr, bad.stderr


@pytest.fixture
def backup_off_server(tmp_path: Path) -> Iterator[ServerProcess]:
    data_dir = tmp_path / "data"
    cli("cloud", "create", CLOUD, "--api-key", API_KEY, "--api-secret", API_SECRET, "--auto-backup", "off", data_dir=data_dir)
    server = ServerProcess(data_dir, tmp_path)
    server.start()
    configure_sdk(server.base_url)
    try:
        yield server
    finally:
        cloudinary.reset_config()
        server.stop()


def test_server_mode_runs_the_job_and_follows_it(backup_off_server: ServerProcess, tmp_path: Path) -> None:
    server = backup_off_server
    uploads = {f"lib/{i}": os.urandom(1000 + i) for i in range(5)}
    for public_id, data in uploads.items():
        assert cloudinary.uploader.upload(data, public_id=public_id, resource_type="raw")["backup"] is False
    refused = run_script(server, "--server", cwd=tmp_path)
    assert refused.returncode == 2 and "isn't enabled" in refused.stderr, refused.stderr

    cli("cloud", "set", CLOUD, "--auto-backup", "on", data_dir=server.data_dir)
    result = run_script(server, "--server", "--poll-interval", "0.1", "--report-json", "r.json", cwd=tmp_path, module=True)
    assert result.returncode == 0, result.stdout + result.stderr
    job = report(tmp_path / "r.json")["job"]
    assert job["status"] == "completed" and job["processed_assets_count"] == 5 and job["failed_assets_count"] == 0, job
    assert "completed" in result.stdout
    for public_id, data in uploads.items():
        assert_backed_up(public_id, "raw", data)
