"""`GET /readyz`: may a load balancer send this process requests? (`/healthz` only says it lives.)

Ready means: the metadata database answers a trivial query, every configured store (primary,
default backup) answers, and the data dir's file system is not low on space. Each check has
its own short deadline and they run side by side, so a hung store makes the probe answer 503
within `CHECK_TIMEOUT`, not hang it. Customer buckets are not checked: one tenant's bucket
outage queues that tenant's revisions (docs/buckets.md) and must not take the replica out.
"""

import asyncio
import os
from collections.abc import Awaitable
from typing import Any

from versionstore import layout
from versionstore.blobstore import BlobStore
from versionstore.config import Config
from versionstore.disk_space import space_report
from versionstore.repository import MetadataRepository

CHECK_TIMEOUT = 2.0
_PROBE = layout.probe_key("readyz", "probe")  # never written: a stat of it answers "absent"


async def _checked(check: Awaitable[None]) -> str | None:
    """None when the check passed, else one line saying why not."""
    try:
        async with asyncio.timeout(CHECK_TIMEOUT):
            await check
    except TimeoutError:
        return f"no answer within {CHECK_TIMEOUT:g} s"
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


async def _store_answers(store: BlobStore) -> None:
    """One attempt, no retries (the resilient wrapper's retries would outlast any probe)."""
    inner: BlobStore = getattr(store, "inner", store)
    path = inner.local_path(_PROBE)
    if path is not None:
        root = os.path.dirname(os.path.dirname(os.path.dirname(path)))  # <root>/readyz/probe/probe
        if not await asyncio.to_thread(os.path.isdir, root):
            raise FileNotFoundError(f"store directory {root} is missing")
    await inner.stat(_PROBE)


async def readiness(config: Config, meta: MetadataRepository, stores: dict[str, BlobStore]) -> tuple[bool, dict[str, Any]]:
    """(ready, body): the body names every check and, for a failed one, why it failed."""
    names = ["database", *stores]
    results = await asyncio.gather(_checked(meta.ping()), *(_checked(_store_answers(s)) for s in stores.values()))
    checks: dict[str, Any] = {name: ({"ok": True} if error is None else {"ok": False, "error": error})
                              for name, error in zip(names, results, strict=True)}
    space = space_report(config.data_dir, config.min_free_bytes)
    checks["disk_space"] = {"ok": not space.get("low_space", False), **space}
    ready = all(check["ok"] for check in checks.values())
    return ready, {"status": "ready" if ready else "not_ready", "checks": checks}
