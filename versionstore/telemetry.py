"""Prometheus metrics of this process: counters and histograms the service updates as it works.

The metric objects are made on first use, not at import, so that `use_multiprocess()` can
switch prometheus-client to its file-backed values (one file per process in a shared
directory) before any value exists: that is what lets `/metrics` of any one worker of
`serve --workers N` report the sum over all of them. Labels are bounded by construction:
routes are canonical route paths, stores are configured store names, never a request's URL
or an asset's id. What is read from the database at scrape time (queue depth, job progress,
verify outcomes) is not here: `versionstore/http/metrics.py` collects it per scrape.
"""

import os
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, disable_created_metrics, values

#: Request latency buckets (seconds): the read path's targets are in milliseconds. The HTTP
#: request series themselves are versionstore/http/metrics.py's (counted per request there).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
MULTIPROC_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"


@dataclass(frozen=True)
class Metrics:
    registry: CollectorRegistry
    store_operations: Counter  # store, operation, outcome
    store_errors: Counter  # store, operation, final
    revisions_written: Counter  # store
    dedup_hits: Counter  # store
    snapshot_failures: Counter  # cloud, operation (snapshot, retention)
    drill_failures: Counter  # cloud
    upload_bodies: Counter  # reader: small (read whole, http/small_body.py) or stream


_current: Metrics | None = None


def metrics() -> Metrics:
    """This process's metric objects (made on the first call)."""
    global _current
    if _current is None:
        _current = _build()
    return _current


def _build() -> Metrics:
    disable_created_metrics()  # type: ignore[no-untyped-call]  # no `_created` twin per series: half the exposition
    registry = CollectorRegistry(auto_describe=True)
    return Metrics(
        registry=registry,
        store_operations=Counter("versionstore_store_operations", "Blob store operations, by store, operation and outcome "
                                 "(ok, written, existing, error)", ("store", "operation", "outcome"), registry=registry),
        store_errors=Counter("versionstore_store_errors", "Failed blob store attempts, by store and operation; final=true when "
                             "the operation gave up (retries exhausted or a permanent error)", ("store", "operation", "final"),
                             registry=registry),
        revisions_written=Counter("versionstore_revisions_written", "Revision blobs newly written to a backup store (uploads, "
                                  "the pending drainer, migrations, repairs)", ("store",), registry=registry),
        dedup_hits=Counter("versionstore_dedup_hits", "Revision writes that found the same bytes already stored (the blob is "
                           "named by its digest, so nothing was written)", ("store",), registry=registry),
        snapshot_failures=Counter("versionstore_snapshot_failures", "Snapshots (operation=snapshot) and retention runs "
                                  "(operation=retention) that failed, by environment", ("cloud", "operation"), registry=registry),
        drill_failures=Counter("versionstore_drill_failures", "Restore drills that failed or found a mismatch, by environment",
                               ("cloud",), registry=registry),
        upload_bodies=Counter("versionstore_upload_bodies", "Multipart upload bodies, by the reader that read them (small: "
                              "read whole and split in one pass; stream: part by part)", ("reader",), registry=registry),
    )


def use_multiprocess(directory: Path) -> None:
    """Keep metric values in files under `directory` (created if missing; files of earlier
    runs removed), so a scrape of any process can sum all of them. Call once in the parent,
    before workers are forked and before any metric is used."""
    global _current
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("*.db"):
        stale.unlink(missing_ok=True)
    os.environ[MULTIPROC_VARIABLE] = str(directory)
    values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]
    _current = None


def multiprocess_dir() -> Path | None:
    value = os.environ.get(MULTIPROC_VARIABLE)
    return Path(value) if value else None
