#!/usr/bin/env python3
"""Random-kill harness: SIGKILL `versionstore serve` under a mixed SDK workload, then prove the
invariants after every restart (issue 8, "Fault harness"; docs/testing.md).

Each cycle: start worker threads that drive the official `cloudinary` SDK (uploads with and
without backup, chunked uploads with retried and late chunks, restores, deletions, version
deletions, renames, tag updates) against one small pool of public ids, so that operations
race on the same assets; SIGKILL the server's process group after a random delay; restart it
on the same data dir; then check:

  I1 listed-versions-download  every restorable version of every asset (live and deleted)
                               downloads through the SDK's `download_backedup_asset` URL with
                               its size and the BLAKE3 of the bytes that were sent for it
  I2 no-missing-bytes          every backed-up version's revision and every live asset's
                               original exist on disk, and every blob's BLAKE3 equals its name
  I3 acked-not-lost            every acknowledged backed-up version is still listed, unless a
                               version deletion of it was attempted
  I4 current-is-latest         a live asset's current version is its newest version, is no
                               older than any acknowledged version of it, and its original is
                               the one the database names (no roll-back)
  I5 api-matches-db            search (live + deleted) lists exactly the assets in the database
  I6 no-orphans                after start-up orphan collection every blob file is referenced
  I7 no-server-errors          no traceback in the server log, no 5xx answer to the workload

An operation that failed because the server died is unacknowledged: its effect may or may not
be there. Only what was acknowledged (a response received) is held against the service.

    scripts/kill_harness.py --kills 100 [--seed N] [--workers 4] [--keep]

prints the counts and exits 1 on any violation. The suite runs a bounded form
(tests/e2e/test_kill_harness.py).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import re
import sqlite3
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import blake3
import cloudinary
import cloudinary.api
import cloudinary.exceptions
import cloudinary.uploader
import cloudinary.utils

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.e2e.conftest import API_KEY, API_SECRET, CLOUD, ServerProcess, cli, configure_sdk, download_digest  # noqa: E402

MiB = 1 << 20
CHUNK = 5 * MiB  # every chunk but the last is >= 5 MB (the chunk rule another helper adds)
PREFIX = "kh/"
SMALL_IDS = [f"{PREFIX}a{i}" for i in range(8)]
BIG_IDS = [f"{PREFIX}big{i}" for i in range(2)]
RT = "raw"
INVARIANTS = {
    "I1": "listed-versions-download",
    "I2": "no-missing-bytes",
    "I3": "acked-not-lost",
    "I4": "current-is-latest",
    "I5": "api-matches-db",
    "I6": "no-orphans",
    "I7": "no-server-errors",
}


def b3(data: bytes) -> str:
    return blake3.blake3(data).hexdigest()


# --- what the workers learned -----------------------------------------------------------------


@dataclass
class Sent:
    """One version we caused, as far as an acknowledgement tells."""

    asset_id: str
    version_id: str
    version: int
    digest: str | None  # BLAKE3 of the bytes (None: a restore of a version we did not name)
    size: int | None
    md5: str | None
    backed_up: bool
    kind: str


@dataclass
class Ledger:
    """Everything acknowledged, and everything attempted that could remove or add something."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    versions: dict[str, Sent] = field(default_factory=dict)  # version_id -> what was sent
    sent_digests: dict[str, int] = field(default_factory=dict)  # every digest ever sent (acked or not) -> size
    deletion_attempted: set[str] = field(default_factory=set)  # version ids a version deletion named
    asset_ids: set[str] = field(default_factory=set)
    acked: Counter[str] = field(default_factory=Counter)
    unacked: Counter[str] = field(default_factory=Counter)
    refused: Counter[str] = field(default_factory=Counter)
    #: The most frequent refusal messages per kind (numbers and ids folded), for the report.
    refusal_reasons: Counter[str] = field(default_factory=Counter)
    server_errors: list[str] = field(default_factory=list)

    def attempt(self, data: bytes) -> str:
        with self.lock:
            return self.attempt_unlocked(data)

    def attempt_unlocked(self, data: bytes) -> str:
        digest = b3(data)
        self.sent_digests[digest] = len(data)
        return digest

    def ack(self, kind: str, sent: Sent | None = None) -> None:
        with self.lock:
            self.acked[kind] += 1
            if sent is not None:
                self.versions[sent.version_id] = sent
                self.asset_ids.add(sent.asset_id)

    def known_versions(self, asset_id: str | None = None) -> list[Sent]:
        with self.lock:
            return [s for s in self.versions.values() if asset_id is None or s.asset_id == asset_id]


# --- the workload -----------------------------------------------------------------------------


class ServerGone(Exception):
    """The request did not get an answer (the server died under it): unacknowledged."""


def call(ledger: Ledger, kind: str, fn: Callable[[], Any]) -> Any:
    """Run one SDK call: an answer is acknowledged (or refused with a 4xx); a transport
    failure is unacknowledged; a 5xx is a server error."""
    try:
        return fn()
    except cloudinary.exceptions.Error as exc:
        text = str(exc)
        with ledger.lock:
            if _transport_failure(text):
                ledger.unacked[kind] += 1
            elif isinstance(exc, cloudinary.exceptions.GeneralError):  # 500 or 503
                ledger.server_errors.append(f"{kind}: {text}")
            else:
                ledger.refused[kind] += 1
                ledger.refusal_reasons[f"{kind}: {re.sub(r'[0-9a-f]{8,}|[0-9]+', '#', text)[:120]}"] += 1
                return None
        raise ServerGone(kind) from exc
    except Exception as exc:  # urllib3 errors, connection resets
        with ledger.lock:
            ledger.unacked[kind] += 1
        raise ServerGone(kind) from exc


def _transport_failure(text: str) -> bool:
    """The SDKs' wording for a request that got no (complete) answer."""
    return text.startswith(("Unexpected error", "Socket error", "Socket Error", "Error parsing server response"))


class Worker(threading.Thread):
    """One client: random operations on the shared pool until told to stop."""

    def __init__(self, n: int, seed: int, ledger: Ledger, stop: threading.Event, chunked_every: int,
                 ids: list[str] | None = None) -> None:
        super().__init__(daemon=True, name=f"kh-worker-{n}")
        self.ids = ids or SMALL_IDS
        self.n = n
        self.rng = random.Random(seed)
        self.ledger = ledger
        self.stop_event = stop
        self.chunked_every = chunked_every
        self.ops = 0

    def run(self) -> None:
        ops: list[tuple[int, Callable[[], None]]] = [
            (30, self.upload_small), (8, self.restore), (6, self.tags), (5, self.destroy),
            (3, self.delete_resources), (6, self.delete_versions), (5, self.rename),
        ]
        weights = [w for w, _ in ops]
        while not self.stop_event.is_set():
            self.ops += 1
            try:
                if self.chunked_every and self.ops % self.chunked_every == 0:
                    self.chunked()
                else:
                    self.rng.choices([op for _, op in ops], weights)[0]()
            except ServerGone:
                if self.stop_event.wait(0.05):
                    return

    # helpers

    def _backup_option(self) -> dict[str, Any]:
        choice = self.rng.choice([True, False, None])
        return {} if choice is None else {"backup": choice}

    def _record_upload(self, kind: str, result: dict[str, Any], digest: str, size: int, md5: str) -> None:
        if result.get("existing"):  # overwrite=false found the id taken: nothing changed
            self.ledger.ack(kind)
            return
        if (result.get("etag"), result.get("blake3")) != (md5, digest):
            with self.ledger.lock:
                self.ledger.server_errors.append(
                    f"{kind}: etag/blake3 {result.get('etag')}/{result.get('blake3')} "
                    f"are not the MD5/BLAKE3 {md5}/{digest} of what was sent"
                )
        self.ledger.ack(kind, Sent(
            asset_id=result["asset_id"], version_id=result["version_id"], version=int(result["version"]), digest=digest,
            size=size, md5=md5, backed_up=bool(result.get("backup")), kind=kind,
        ))

    def _some_asset(self) -> Sent | None:
        known = self.ledger.known_versions()
        return self.rng.choice(known) if known else None

    # operations

    def upload_small(self) -> None:
        data = os.urandom(self.rng.randint(1, 200_000))
        digest = self.ledger.attempt(data)
        options = {"public_id": self.rng.choice(self.ids), "resource_type": RT, **self._backup_option()}
        if self.rng.random() < 0.1:
            options["overwrite"] = False
        result = call(self.ledger, "upload", lambda: cloudinary.uploader.upload(data, **options))
        if result is not None:
            self._record_upload("upload", result, digest, len(data), hashlib.md5(data).hexdigest())

    def chunked(self, mode: str | None = None) -> None:
        """6-11 MiB in 5 MiB chunks (`mode`, else at random): through the SDK's `upload_large`
        ("sdk"); chunk by chunk with a retried chunk and a late duplicate after completion
        ("retry"); or with a stalled second copy of chunk 0 ("stalled")."""
        mode = mode or self.rng.choices(["sdk", "retry", "stalled"], [4, 3, 3])[0]
        data = os.urandom(self.rng.randint(6 * MiB, 11 * MiB))
        digest = self.ledger.attempt(data)
        options = {"public_id": self.rng.choice(BIG_IDS), "resource_type": RT, **self._backup_option()}
        md5 = hashlib.md5(data).hexdigest()
        if mode == "sdk":
            result = call(self.ledger, "upload_large", lambda: cloudinary.uploader.upload_large(
                _Named(data, "big.bin"), chunk_size=CHUNK, **options))
            if result is not None:
                self._record_upload("upload_large", result, digest, len(data), md5)
            return
        upload_id = cloudinary.utils.random_public_id()
        pieces = [(start, data[start:start + CHUNK]) for start in range(0, len(data), CHUNK)]
        # A client retry of chunk 0 (same bytes, same X-Unique-Upload-Id), sent in turn; or a
        # second copy of chunk 0 that stalls mid-body until the upload has completed, its
        # second half differing (issue 8 item 3): that half must never reach published bytes.
        stalled = StalledChunk(upload_id, pieces[0][1], len(data), options) if mode == "stalled" else None
        result = None
        try:
            for i, (start, piece) in enumerate(pieces):
                if i == len(pieces) - 1 and stalled is not None:
                    stalled.begin()
                sends = 2 if i == 0 and self.rng.random() < 0.7 else 1
                for _ in range(sends):
                    result = self._chunk(upload_id, start, piece, len(data), options)
        finally:
            if stalled is not None:
                stalled.release()
        if result is not None and result.get("asset_id"):
            self._record_upload("chunked_retried", result, digest, len(data), md5)
            if stalled is not None:
                with self.ledger.lock:
                    self.ledger.attempt_unlocked(stalled.data)
                    self.ledger.acked[f"stalled_chunk_{stalled.status}"] += 1
                    if stalled.status >= 500:
                        self.ledger.server_errors.append(f"stalled chunk of {upload_id}: {stalled.status}")
            elif self.rng.random() < 0.5:  # a late duplicate of chunk 0 after completion
                self._chunk(upload_id, 0, pieces[0][1], len(data), options, kind="late_chunk")

    def _chunk(self, upload_id: str, start: int, piece: bytes, total: int, options: dict[str, Any],
               kind: str = "chunk") -> dict[str, Any] | None:
        headers = {"Content-Range": f"bytes {start}-{start + len(piece) - 1}/{total}", "X-Unique-Upload-Id": upload_id}
        result: dict[str, Any] | None = call(self.ledger, kind, lambda: cloudinary.uploader.upload_large_part(
            ("big.bin", piece), http_headers=headers, **options))
        if result is not None:
            self.ledger.ack(kind)
        return result

    def restore(self) -> None:
        target = self._some_asset()
        pick = self.rng.random()
        if target is None or pick < 0.3:  # a deleted asset's latest revision, by public id
            public_id = self.rng.choice(SMALL_IDS)
            result = call(self.ledger, "restore", lambda: cloudinary.api.restore([public_id], resource_type=RT))
            self._record_restore("restore", result, public_id, None)
            return
        source = target if target.backed_up else None
        if source is None:
            return
        if pick < 0.65:
            result = call(self.ledger, "restore_by_asset_id", lambda: cloudinary.api.restore_by_asset_ids(
                [source.asset_id], versions=[source.version_id]))
            self._record_restore("restore_by_asset_id", result, source.asset_id, source)
        else:
            try:
                info = call(self.ledger, "resource", lambda: cloudinary.api.resource_by_asset_id(source.asset_id))
            except ServerGone:
                raise
            if not info:
                return
            public_id = info["public_id"]
            result = call(self.ledger, "restore", lambda: cloudinary.api.restore(
                [public_id], resource_type=RT, versions=[source.version_id]))
            self._record_restore("restore", result, public_id, source)

    def _record_restore(self, kind: str, result: dict[str, Any] | None, key: str, source: Sent | None) -> None:
        if result is None:
            return
        item = result.get(key) or {}
        if "error" in item or not item.get("version_id"):
            self.ledger.ack(kind)
            return
        self.ledger.ack(kind, Sent(
            asset_id=item["asset_id"], version_id=item["version_id"], version=int(item["version"]),
            digest=source.digest if source else None, size=source.size if source else None,
            md5=source.md5 if source else None, backed_up=True, kind=kind,
        ))

    def tags(self) -> None:
        public_id = self.rng.choice(self.ids)
        tag = f"t{self.rng.randint(0, 5)}"
        pick = self.rng.random()
        if pick < 0.4:
            result = call(self.ledger, "add_tag", lambda: cloudinary.uploader.add_tag(tag, [public_id], resource_type=RT))
        elif pick < 0.7:
            result = call(self.ledger, "update_tags", lambda: cloudinary.api.update(public_id, resource_type=RT, tags=[tag, "kh"]))
        else:
            result = call(self.ledger, "replace_tag", lambda: cloudinary.uploader.replace_tag(tag, [public_id], resource_type=RT))
        if result is not None:
            self.ledger.ack("tags")

    def destroy(self) -> None:
        public_id = self.rng.choice(SMALL_IDS + BIG_IDS)
        if call(self.ledger, "destroy", lambda: cloudinary.uploader.destroy(public_id, resource_type=RT)) is not None:
            self.ledger.ack("destroy")

    def delete_resources(self) -> None:
        ids = self.rng.sample(SMALL_IDS, 2)
        if call(self.ledger, "delete_resources", lambda: cloudinary.api.delete_resources(ids, resource_type=RT)) is not None:
            self.ledger.ack("delete_resources")

    def delete_versions(self) -> None:
        """Delete the older half of an asset's backed-up versions (keeps the store small)."""
        target = self._some_asset()
        if target is None:
            return
        info = call(self.ledger, "resource", lambda: cloudinary.api.resource_by_asset_id(target.asset_id, versions=True))
        if not info:
            return
        versions = [v["version_id"] for v in info.get("versions", []) if v.get("restorable")]
        doomed = versions[: max(1, len(versions) // 2)] if len(versions) > 1 or info.get("placeholder") else []
        if not doomed:
            return
        with self.ledger.lock:
            self.ledger.deletion_attempted.update(doomed)
        result = call(self.ledger, "delete_backed_up_assets", lambda: cloudinary.api.delete_backed_up_assets(target.asset_id, doomed))
        if result is not None:
            self.ledger.ack("delete_backed_up_assets")

    def rename(self) -> None:
        source, dest = self.rng.sample(SMALL_IDS, 2)
        overwrite = self.rng.random() < 0.5
        result = call(self.ledger, "rename", lambda: cloudinary.uploader.rename(source, dest, resource_type=RT, overwrite=overwrite))
        if result is not None:
            self.ledger.ack("rename")


class StalledChunk(threading.Thread):
    """A second copy of chunk 0 of an upload session, over raw HTTP: the fields and the first
    half of the file part (chunk 0's own bytes) go out at `begin`, the second half (other
    bytes) only at `release`, after the session's last chunk was answered. `status` is the
    answer's status (0: none)."""

    def __init__(self, upload_id: str, first_chunk: bytes, total: int, options: dict[str, Any]) -> None:
        super().__init__(daemon=True, name=f"kh-stalled-{upload_id}")
        self.upload_id = upload_id
        self.total = total
        half = len(first_chunk) // 2
        self.data = first_chunk[:half] + os.urandom(len(first_chunk) - half)
        self.options = options
        self.status = 0
        self._sent_half = threading.Event()
        self._go = threading.Event()

    def begin(self) -> None:
        self.start()
        self._sent_half.wait(10)
        time.sleep(0.2)  # let the server open the chunk file and take the first half

    def release(self) -> None:
        self._go.set()
        if self.is_alive():
            self.join(30)

    def run(self) -> None:
        import http.client
        import urllib.parse

        params = {"public_id": self.options["public_id"], "timestamp": str(cloudinary.utils.now())}
        if "backup" in self.options:
            params["backup"] = "1" if self.options["backup"] else "0"
        fields = cloudinary.utils.sign_request(params, {})
        boundary = "khstalled" + self.upload_id
        head = b"".join(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
                        for k, v in fields.items())
        head += (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.bin"\r\n'
                 f"Content-Type: application/octet-stream\r\n\r\n").encode()
        tail = f"\r\n--{boundary}--\r\n".encode()
        half = len(self.data) // 2
        url = urllib.parse.urlsplit(cloudinary.config().upload_prefix)
        conn = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port, timeout=60)
        try:
            conn.putrequest("POST", f"/v1_1/{CLOUD}/{RT}/upload")
            for key, value in {
                "Content-Type": f"multipart/form-data; boundary={boundary}",
                "Content-Length": str(len(head) + len(self.data) + len(tail)),
                "Content-Range": f"bytes 0-{len(self.data) - 1}/{self.total}",
                "X-Unique-Upload-Id": self.upload_id,
            }.items():
                conn.putheader(key, value)
            conn.endheaders(head + self.data[:half])
            self._sent_half.set()
            self._go.wait(60)
            conn.send(self.data[half:] + tail)
            response = conn.getresponse()
            response.read()
            self.status = response.status
        except (OSError, http.client.HTTPException):
            self.status = 0
        finally:
            self._sent_half.set()
            conn.close()


class _Named:
    """A file-like over bytes with a name, for `upload_large` (it reads by chunk)."""

    def __init__(self, data: bytes, name: str) -> None:
        self._data = data
        self._pos = 0
        self.name = name

    def read(self, n: int = -1) -> bytes:
        end = len(self._data) if n < 0 else self._pos + n
        piece = self._data[self._pos:end]
        self._pos += len(piece)
        return piece

    def seek(self, offset: int, whence: int = 0) -> int:
        self._pos = {0: offset, 1: self._pos + offset, 2: len(self._data) + offset}[whence]
        return self._pos

    def tell(self) -> int:
        return self._pos

    def __enter__(self) -> _Named:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


# --- the checker ------------------------------------------------------------------------------


@dataclass
class Report:
    kills: int = 0
    cycles: int = 0
    checks: Counter[str] = field(default_factory=Counter)  # invariant -> individual checks made
    versions_verified: int = 0
    bytes_verified: int = 0
    blobs_hashed: int = 0
    violations: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def violate(self, invariant: str, message: str) -> None:
        """Record a violation once (a lasting one is found again after every later restart)."""
        line = f"{invariant} {INVARIANTS[invariant]}: {message}"
        if line not in self.violations:
            self.violations.append(line)

    def violated(self, invariant: str) -> list[str]:
        return [v for v in self.violations if v.startswith(invariant + " ")]


class Checker:
    """Proves the invariants against a restarted, idle server: through the API and on disk."""

    def __init__(self, server: ServerProcess, ledger: Ledger, report: Report) -> None:
        self.server = server
        self.ledger = ledger
        self.report = report
        self._hashed: dict[Path, tuple[int, int, int]] = {}  # blobs whose name was verified, by stat
        self._log_offsets: dict[Path, int] = {}

    def run(self) -> None:
        self.check_orphans()  # first: it waits for the start-up collection
        assets = self.list_assets()
        db = self.read_db()
        self.check_api_matches_db(assets, db)
        listed = self.check_versions(assets)
        self.check_acked(listed)
        self.check_disk(db)
        self.check_log()

    # I5
    def list_assets(self) -> dict[str, dict[str, Any]]:
        found: dict[str, dict[str, Any]] = {}
        for expression in (f"public_id={PREFIX}*", f"public_id={PREFIX}* AND status=deleted"):
            cursor = None
            while True:
                search = cloudinary.Search().expression(expression).max_results(500)
                if cursor:
                    search = search.next_cursor(cursor)
                page = search.execute()
                for item in page["resources"]:
                    found[item["asset_id"]] = item
                cursor = page.get("next_cursor")
                if not cursor:
                    break
        return found

    def read_db(self) -> dict[str, Any]:
        uri = f"file:{self.server.data_dir / 'metadata.sqlite3'}?mode=ro"
        with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=30)) as conn:
            rows = conn.execute("SELECT asset_id, status, digest, version_id, public_id FROM assets WHERE cloud = ?", (CLOUD,))
            assets = {row[0]: {"status": row[1], "digest": row[2], "version_id": row[3], "public_id": row[4]} for row in rows}
            versions = [dict(zip(("asset_id", "version_id", "digest", "bytes", "backed_up"), row, strict=True)) for row in conn.execute(
                "SELECT a.asset_id, v.version_id, v.digest, v.bytes, v.backed_up FROM versions v JOIN assets a ON a.pk = v.asset_pk "
                "WHERE v.cloud = ?", (CLOUD,))]
        return {"assets": assets, "versions": versions}

    def check_api_matches_db(self, assets: dict[str, dict[str, Any]], db: dict[str, Any]) -> None:
        self.report.checks["I5"] += 1
        in_db = set(db["assets"])
        if set(assets) != in_db:
            self.report.violate("I5", f"search lists {sorted(set(assets) - in_db)} not in the db, misses {sorted(in_db - set(assets))}")

    # I1, I4
    def check_versions(self, assets: dict[str, dict[str, Any]]) -> dict[str, set[str]]:
        listed: dict[str, set[str]] = {}
        for asset_id in sorted(set(assets) | self.ledger.asset_ids):
            try:
                full = cloudinary.api.resource_by_asset_id(asset_id, versions=True)
            except cloudinary.exceptions.NotFound:
                if asset_id in assets:
                    self.report.violate("I5", f"{asset_id} is listed by search but resource_by_asset_id answers 404")
                continue
            versions = full.get("versions") or []
            listed[asset_id] = {v["version_id"] for v in versions}
            for v in versions:
                self.check_version_download(asset_id, full["public_id"], v)
            self.check_current(asset_id, full, versions)
        return listed

    def check_version_download(self, asset_id: str, public_id: str, v: dict[str, Any]) -> None:
        if not v.get("restorable"):
            return
        self.report.checks["I1"] += 1
        url = cloudinary.utils.download_backedup_asset(asset_id, v["version_id"])
        status, size, digest = download_digest(url)
        where = f"{public_id} ({asset_id}) version {v['version_id']}"
        if status != 200:
            self.report.violate("I1", f"{where} is restorable but download_backup answers {status}")
            return
        self.report.versions_verified += 1
        self.report.bytes_verified += size
        if size != v["size"]:
            self.report.violate("I1", f"{where}: downloaded {size} bytes, listed size {v['size']}")
        sent = self.ledger.versions.get(v["version_id"])
        if sent is not None and sent.digest is not None:
            if digest != sent.digest:
                self.report.violate("I1", f"{where}: BLAKE3 {digest} but the acknowledged upload sent {sent.digest} ({sent.kind})")
        elif digest not in self.ledger.sent_digests:
            self.report.violate("I1", f"{where}: BLAKE3 {digest} is none of the bytes any worker sent")

    def check_current(self, asset_id: str, full: dict[str, Any], versions: list[dict[str, Any]]) -> None:
        self.report.checks["I4"] += 1
        if full.get("placeholder") or full.get("status") == "deleted" or not versions:
            return
        numbers = [int(v["version"]) for v in versions]
        repeats = sorted({f"{a}>={b}" for a, b in zip(numbers, numbers[1:], strict=False) if a >= b})
        if repeats:  # the pairs only, so a lasting violation reads the same after every restart
            self.report.violate("I4", f"{full['public_id']} ({asset_id}) version numbers are not strictly increasing: {repeats}")
        newest = versions[-1]  # history is listed oldest first
        if full["version_id"] != newest["version_id"]:
            self.report.violate("I4", f"{full['public_id']} ({asset_id}) is at version {full['version_id']} ({full['version']}) "
                                      f"but its newest version is {newest['version_id']} ({newest['version']}): rolled back")
        acked = [s for s in self.ledger.known_versions(asset_id) if s.version_id in {v["version_id"] for v in versions}]
        if acked and int(full["version"]) < max(s.version for s in acked):
            self.report.violate("I4", f"{full['public_id']} ({asset_id}) current version {full['version']} is older than the "
                                      f"acknowledged {max(s.version for s in acked)}")

    # I3
    def check_acked(self, listed: dict[str, set[str]]) -> None:
        for sent in self.ledger.known_versions():
            if not sent.backed_up or sent.version_id in self.ledger.deletion_attempted:
                continue
            self.report.checks["I3"] += 1
            if sent.version_id not in listed.get(sent.asset_id, set()):
                self.report.violate("I3", f"acknowledged backed-up version {sent.version_id} of {sent.asset_id} ({sent.kind}) "
                                          f"is not listed and no deletion named it")

    # I2, I4 (on disk)
    def check_disk(self, db: dict[str, Any]) -> None:
        data = self.server.data_dir
        for v in db["versions"]:
            if not v["backed_up"]:
                continue
            self.report.checks["I2"] += 1
            path = data / "backup" / CLOUD / "blobs" / fanout(v["digest"])
            self.verify_blob(path, f"revision of version {v['version_id']} ({v['asset_id']})", v["bytes"])
        by_version = {v["version_id"]: v for v in db["versions"]}
        for asset_id, asset in db["assets"].items():
            if asset["status"] != "live":
                continue
            self.report.checks["I2"] += 1
            path = data / "primary" / CLOUD / "originals" / fanout(asset["digest"])
            current = by_version.get(asset["version_id"])
            self.verify_blob(path, f"original of live {asset['public_id']} ({asset_id})", current["bytes"] if current else None)
            self.report.checks["I4"] += 1
            if current is None or current["digest"] != asset["digest"]:
                self.report.violate("I4", f"live {asset['public_id']} ({asset_id}): its row names digest {asset['digest']} but its "
                                          f"current version {asset['version_id']} has {current and current['digest']}")

    def verify_blob(self, path: Path, what: str, size: int | None) -> None:
        try:
            st = path.stat()
        except FileNotFoundError:
            self.report.violate("I2", f"{what} points at missing bytes: {path.relative_to(self.server.data_dir)}")
            return
        if size is not None and st.st_size != size:
            self.report.violate("I2", f"{what}: {path.name} holds {st.st_size} bytes, metadata says {size}")
        key = (st.st_ino, st.st_size, st.st_mtime_ns)
        if self._hashed.get(path) == key:
            return
        with open(path, "rb") as handle:
            digest = blake3.blake3(max_threads=blake3.blake3.AUTO).update(handle.read()).hexdigest()
        self.report.blobs_hashed += 1
        self.report.bytes_verified += st.st_size
        if digest != path.name:
            self.report.violate("I2", f"{what}: the blob {path.relative_to(self.server.data_dir)} hashes to {digest}: "
                                      f"published bytes changed")
            return
        self._hashed[path] = key

    # I6
    def check_orphans(self, timeout: float = 15.0) -> None:
        """Start-up collection runs in the background: wait until it has removed what it will."""
        deadline = time.monotonic() + timeout
        while True:
            orphans = self.orphans()
            if not orphans or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        self.report.checks["I6"] += 1
        for path in orphans:
            self.report.violate("I6", f"{path.relative_to(self.server.data_dir)} is referenced by no metadata after collection")

    def orphans(self) -> list[Path]:
        db = self.read_db()
        revisions = {v["digest"] for v in db["versions"] if v["backed_up"]}
        originals = {a["digest"] for a in db["assets"].values() if a["status"] == "live"}
        found = []
        for root, wanted in ((self.server.data_dir / "backup" / CLOUD / "blobs", revisions),
                             (self.server.data_dir / "primary" / CLOUD / "originals", originals)):
            if root.exists():
                found += [p for p in root.rglob("*") if p.is_file() and p.name not in wanted]
        pending = self.server.data_dir / "primary" / CLOUD / "pending"
        if pending.exists():
            found += [p for p in pending.rglob("*") if p.is_file()]
        return found

    # I7
    def check_log(self) -> None:
        self.report.checks["I7"] += 1
        for path in sorted(self.server.log_dir.glob("serve-*.log")):
            text = path.read_text(errors="replace")
            start = self._log_offsets.get(path, 0)
            self._log_offsets[path] = len(text)
            for match in re.finditer(r"Traceback \(most recent call last\):", text[start:]):
                tail = text[start + match.start(): start + match.start() + 1500]
                self.report.violate("I7", f"traceback in {path.name}:\n{tail}")
        with self.ledger.lock:
            errors, self.ledger.server_errors[:] = list(self.ledger.server_errors), []
        for error in errors:
            self.report.violate("I7", f"5xx under the workload: {error}")


def fanout(digest: str) -> str:
    return f"{digest[:2]}/{digest[2:4]}/{digest}"


# --- the run ----------------------------------------------------------------------------------


@dataclass
class Options:
    kills: int = 5
    seed: int = 1
    workers: int = 4
    min_delay: float = 0.3
    max_delay: float = 4.0
    chunked_every: int = 10  # every Nth operation of a worker is a chunked upload
    progress: Callable[[str], None] | None = None


@contextlib.contextmanager
def temp_root(keep: bool, root: Path | None = None) -> Iterator[Path]:
    if root is not None:
        root.mkdir(parents=True, exist_ok=True)
        yield root
        return
    path = Path(tempfile.mkdtemp(prefix="kill-harness-"))
    try:
        yield path
    finally:
        if keep:
            print(f"kept {path}")
        else:
            import shutil

            shutil.rmtree(path, ignore_errors=True)


def run(root: Path, options: Options) -> tuple[Report, Ledger]:
    """Kill the server `options.kills` times under the workload; check after every restart."""
    started = time.monotonic()
    rng = random.Random(options.seed)
    data_dir = root / "data"
    cli("cloud", "create", CLOUD, "--api-key", API_KEY, "--api-secret", API_SECRET, data_dir=data_dir)
    server = ServerProcess(data_dir, root)
    ledger, report = Ledger(), Report()
    checker = Checker(server, ledger, report)
    server.start()
    configure_sdk(server.base_url)
    try:
        for cycle in range(options.kills):
            stop = threading.Event()
            workers = [Worker(n, rng.randrange(1 << 30), ledger, stop, options.chunked_every) for n in range(options.workers)]
            for worker in workers:
                worker.start()
            time.sleep(rng.uniform(options.min_delay, options.max_delay))
            server.kill()
            stop.set()
            for worker in workers:
                worker.join(timeout=120)
                if worker.is_alive():
                    report.violate("I7", f"worker {worker.name} hung after the kill")
            report.kills += 1
            server.start()
            configure_sdk(server.base_url)
            checker.run()
            report.cycles += 1
            if options.progress:
                options.progress(f"kill {cycle + 1}/{options.kills}: acked {sum(ledger.acked.values())}, "
                                 f"versions verified {report.versions_verified}, violations {len(report.violations)}")
        server.stop()
    finally:
        if server.proc is not None:
            server.stop()
        report.seconds = time.monotonic() - started
    return report, ledger


def summary(report: Report, ledger: Ledger) -> dict[str, Any]:
    return {
        "kills_survived": report.kills,
        "seconds": round(report.seconds, 1),
        "operations_acknowledged": dict(sorted(ledger.acked.items())),
        "operations_unacknowledged": dict(sorted(ledger.unacked.items())),
        "operations_refused_4xx": dict(sorted(ledger.refused.items())),
        "refusal_reasons": dict(ledger.refusal_reasons.most_common(12)),
        "invariants_checked": {f"{k} {INVARIANTS[k]}": report.checks[k] for k in INVARIANTS},
        "versions_verified": report.versions_verified,
        "blobs_hashed": report.blobs_hashed,
        "bytes_verified": report.bytes_verified,
        "violations": len(report.violations),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=100)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--min-delay", type=float, default=0.3)
    parser.add_argument("--max-delay", type=float, default=4.0)
    parser.add_argument("--chunked-every", type=int, default=10)
    parser.add_argument("--dir", type=Path, help="work directory (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the data dir and server logs")
    args = parser.parse_args(argv)
    opts = Options(kills=args.kills, seed=args.seed, workers=args.workers, min_delay=args.min_delay, max_delay=args.max_delay,
                   chunked_every=args.chunked_every, progress=lambda line: print(line, flush=True))
    with temp_root(args.keep or args.dir is not None, args.dir) as root:
        report, ledger = run(root, opts)
    for violation in report.violations:
        print("VIOLATION", violation)
    print(json.dumps(summary(report, ledger), indent=2))
    return 1 if report.violations else 0


if __name__ == "__main__":
    sys.exit(main())
