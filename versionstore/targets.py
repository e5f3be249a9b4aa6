"""Backup targets: which store holds an environment's revisions, and whether it may be used now.

The default target is the operator's backup store. A customer bucket (`s3://` or `gs://`) is
used only while its root holds the marker `.wellknown/cloudinary/<cloud_name>`; the check is
cached for `marker_ttl` seconds so uploads do not pay for it. Failures and marker loss are
recorded as the environment's backup health (persisted, so the CLI can show it too); recording
it moves a generation in the database, on which every process drops its cached health and
marker checks of that environment (several processes agree within one request).
A failing target is not tried inline again for `breaker_seconds`: uploads go straight to the
pending queue instead of waiting on a dead bucket, and the drainer probes it meanwhile.
"""

import asyncio
import logging
import secrets
import tempfile
import time
from pathlib import Path

from versionstore import layout
from versionstore.blobstore import BlobStore, BlobStoreError, StoreURL, open_store, parse_store_url
from versionstore.blobstore.resilient import ResiliencePolicy, resilient
from versionstore.errors import BadRequest
from versionstore.metadata import target_generation
from versionstore.models import BackupHealth, Cloud
from versionstore.repository import MetadataRepository

log = logging.getLogger(__name__)

HEALTHY, MARKER_MISSING, FAILING = "healthy", "marker_missing", "failing"
#: Uploads wait for a bucket at most this long before the revision goes to the pending queue.
INLINE_POLICY = ResiliencePolicy(attempts=2, op_timeout=15.0)


class TargetUnavailable(Exception):
    def __init__(self, state: str, message: str) -> None:
        super().__init__(message)
        self.state = state
        self.message = message


#: Store options that choose where the service connects and with which identity: only the
#: operator (the CLI) may set them. Over the Admin API a tenant could otherwise point the
#: service's requests at any host it can reach (SSRF) or at credentials meant for others.
#: Sizes and pool widths are the operator's too: they decide the service's memory and threads.
OPERATOR_OPTIONS = frozenset({
    "endpoint_url", "profile", "credentials_file", "anonymous", "project", "part_size", "part_concurrency", "chunk_size", "workers",
})


def customer_bucket(url: str, *, operator: bool = False) -> StoreURL:
    """Parse and check a customer bucket URL; a clear 400 otherwise."""
    try:
        location = parse_store_url(url)
    except ValueError as exc:
        raise BadRequest(str(exc)) from None
    if location.scheme not in ("s3", "gs"):
        raise BadRequest(f"A backup bucket must be s3://bucket[/prefix] or gs://bucket[/prefix], not {url!r}")
    reserved = sorted(OPERATOR_OPTIONS & set(location.options))
    if reserved and not operator:
        raise BadRequest(f"Bucket option(s) {', '.join(reserved)} can only be set by the operator (versionstore cloud set)")
    return location


def marker_url(location: StoreURL, cloud: str) -> str:
    return f"{location.scheme}://{location.bucket}/{layout.marker_key(cloud)}"


async def verify_bucket(url: str, cloud: str) -> str:
    """Check a customer bucket before it is assigned: the marker is there, and versionstore
    can write, read back and delete under its own prefix. Returns the canonical URL."""
    location = customer_bucket(url, operator=True)  # the caller has checked who may set what
    try:
        root, store = open_store(location.root), open_store(location)
    except ValueError as exc:  # an unknown or malformed store option
        raise BadRequest(str(exc)) from None
    try:
        if await root.stat(layout.marker_key(cloud)) is None:
            raise BadRequest(
                f"Backup bucket {location.scheme}://{location.bucket} has no marker object {marker_url(location, cloud)}: "
                f"create that empty object to allow versionstore to keep {cloud}'s backups there"
            )
        await _probe(store, cloud)
    except BlobStoreError as exc:
        raise BadRequest(f"Backup bucket {location} cannot be used: {type(exc).__name__}: {exc}") from None
    finally:
        await root.close()
        await store.close()
    return str(location)


async def _probe(store: BlobStore, cloud: str) -> None:
    token = secrets.token_hex(8)
    key = layout.probe_key(cloud, token)
    payload = f"versionstore write probe {token}\n".encode()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "probe"
        await asyncio.to_thread(path.write_bytes, payload)
        if not await store.put_file(key, path):
            raise BadRequest(f"Backup bucket probe object {key} already existed")
    read = b"".join([chunk async for chunk in store.read(key)])
    await store.delete(key)
    if read != payload:
        raise BadRequest("Backup bucket returned different bytes than were written")
    if await store.stat(key) is not None:
        raise BadRequest(f"Backup bucket kept {key} after it was deleted: versionstore must be able to delete")


class BackupTargets:
    def __init__(
        self, meta: MetadataRepository, default: BlobStore, *, marker_ttl: float = 60.0, breaker_seconds: float = 10.0,
        policy: ResiliencePolicy | None = None,
    ) -> None:
        self.meta = meta
        self.default = default
        self.marker_ttl = marker_ttl
        self.breaker_seconds = breaker_seconds
        self.policy = policy or ResiliencePolicy()
        self._raw: dict[str, BlobStore] = {}
        self._stores: dict[tuple[str, bool], BlobStore] = {}
        self._markers: dict[tuple[str, str], tuple[bool, float]] = {}
        self._failed_at: dict[str, float] = {}
        #: Environments whose persisted health is `healthy`, as long as no process has recorded
        #: a health change since (the target generation, `_refresh`): a successful upload then
        #: needs one indexed read, not the health row, to know nothing changed.
        self._healthy: set[str] = set()
        #: cloud -> the target generation the caches above (and the marker checks) belong to.
        self._seen: dict[str, int] = {}

    async def _refresh(self, cloud: str, generation: int | None = None) -> None:
        """Drop what this process cached about an environment's target (health, marker checks)
        once any process, or the CLI, has recorded a change of its health: several processes
        see a lost marker or a failing bucket within one request of each other. `generation`:
        the target generation when the caller has just read it (no second read)."""
        if generation is None:
            generation = await self.meta.generation(target_generation(cloud))
        if self._seen.get(cloud) != generation:
            self._seen[cloud] = generation
            self._healthy.discard(cloud)
            for key in [key for key in self._markers if key[1] == cloud]:
                del self._markers[key]

    def store(self, target: str | None, *, inline: bool = False) -> BlobStore:
        """The (retrying) store of a target; `inline` retries briefly, for request paths."""
        if target is None:
            return self.default
        if (target, inline) not in self._stores:
            if target not in self._raw:
                self._raw[target] = open_store(target)
            policy = INLINE_POLICY if inline else self.policy
            self._stores[(target, inline)] = resilient(self._raw[target], policy)
        return self._stores[(target, inline)]

    async def usable(self, cloud: Cloud, *, inline: bool = False, generation: int | None = None) -> BlobStore:
        """The environment's current target store, after the marker check (`generation`: see _refresh)."""
        return await self.target_store(cloud.name, cloud.backup_target, inline=inline, generation=generation)

    async def target_store(self, cloud: str, target: str | None, *, inline: bool = False, generation: int | None = None) -> BlobStore:
        """One target of an environment (None: the default store), e.g. a migration's source
        or destination, after the marker check; TargetUnavailable when it may not be used."""
        store = self.store(target, inline=inline)
        await self._refresh(cloud, generation)
        if target is not None and not await self._marker_present(target, cloud):
            message = f"marker object {marker_url(parse_store_url(target), cloud)} is missing"
            await self.record_failure(cloud, MARKER_MISSING, message)
            raise TargetUnavailable(MARKER_MISSING, message)
        return store

    async def for_upload(self, cloud: Cloud) -> BlobStore | None:
        """The store an upload writes its revision to now, or None to queue it as pending."""
        failed_at = self._failed_at.get(cloud.name)
        if failed_at is not None and time.monotonic() - failed_at < self.breaker_seconds:
            return None
        try:
            return await self.usable(cloud, inline=True)
        except TargetUnavailable:
            return None
        except BlobStoreError as exc:
            await self.record_failure(cloud.name, FAILING, f"{type(exc).__name__}: {exc}")
            return None

    async def _marker_present(self, target: str, cloud: str) -> bool:
        cached = self._markers.get((target, cloud))
        now = time.monotonic()
        if cached is not None and now - cached[1] < self.marker_ttl:
            return cached[0]
        root_url = str(parse_store_url(target).root)
        present = await self.store(root_url, inline=True).stat(layout.marker_key(cloud)) is not None
        self._markers[(target, cloud)] = (present, now)
        return present

    def forget_marker(self, target: str, cloud: str) -> None:
        self._markers.pop((target, cloud), None)

    async def record_failure(self, cloud: str, state: str, error: str) -> None:
        self._failed_at[cloud] = time.monotonic()
        self._healthy.discard(cloud)
        now = time.time()
        previous = await self.meta.get_health(cloud)
        if previous is None or previous.state != state or previous.last_error != error:
            log.warning("backup target of %s: %s (%s)", cloud, state, error)
            await self.meta.save_health(BackupHealth(cloud, state, error, now, now))

    async def record_success(self, cloud: str) -> bool:
        """Mark the target healthy; True when it was not (the caller may drain the queue)."""
        self._failed_at.pop(cloud, None)
        await self._refresh(cloud)
        if cloud in self._healthy:
            return False
        self._healthy.add(cloud)
        previous = await self.meta.get_health(cloud)
        if previous is None or previous.state == HEALTHY:
            return False
        log.info("backup target of %s is healthy again", cloud)
        await self.meta.save_health(BackupHealth(cloud, HEALTHY, previous.last_error, previous.last_error_at, time.time()))
        return True

    async def close(self) -> None:
        for store in self._raw.values():
            await store.close()
        await self.default.close()
