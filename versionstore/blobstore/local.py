"""Local-disk blob store: the embedded default.

Blobs are hard-linked from the spool file when both live on one filesystem, so the bytes of
an upload hit the disk once; otherwise they are copied to a private temp file (a unique name,
O_EXCL) that is then linked create-only. No code path opens a published blob for writing.
"""

import asyncio
import errno
import os
import secrets
import shutil
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

from versionstore.blobstore import BlobInfo, BlobNotFound
from versionstore.durable import fsync_path

CHUNK = 1 << 20
#: Local paths `local_path` keeps (dropped all at once when full).
_LOCAL_PATHS = 4096
#: Directories `_durable_dirs` remembers as durable (the default layout has 256 + 65,536 fan-out directories).
_DURABLE_DIRS = 100_000


class LocalBlobStore:
    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.name = f"file://{self.root}"
        self.root.mkdir(parents=True, exist_ok=True)
        self._root_str = str(self.root)
        self._root_prefix = self._root_str + os.sep
        self._local_paths: dict[str, str] = {}  # key -> _safe(key): a download asks for the same few again and again
        self._durable: set[Path] = {self.root}  # directories whose own entries this process has made durable

    def _safe(self, key: str) -> str:
        # Lexical normalisation on strings: keys with ".." or an absolute path cannot leave
        # the root. Not resolve(): the store never creates symlinks, and resolve() (or even
        # pathlib parsing) on every download was a large share of the event loop's time.
        path = os.path.normpath(os.path.join(self._root_str, key))
        if not path.startswith(self._root_prefix):
            raise ValueError(f"key escapes the store: {key!r}")
        return path

    def _path(self, key: str) -> Path:
        return Path(self._safe(key))

    async def put_file(self, key: str, source: Path) -> bool:
        return await asyncio.to_thread(self._put_file, self._path(key), source)

    def _put_file(self, target: Path, source: Path) -> bool:
        linked = self._link(target, source)
        if linked is not False:  # ours, or someone's that may not be durable yet (see _link)
            fsync_path(target.parent)
        return linked is not None

    async def put_files(self, items: Sequence[tuple[str, Path]]) -> list[bool]:
        return await asyncio.to_thread(self._put_files, [(self._path(key), source) for key, source in items])

    def _put_files(self, items: list[tuple[Path, Path]]) -> list[bool]:
        """Every link first, then each directory they went into fsynced once: on a journaling
        file system the first fsync commits every new entry, and the others find theirs done."""
        linked = [self._link(target, source) for target, source in items]
        for directory in dict.fromkeys(target.parent for (target, _), done in zip(items, linked, strict=True) if done is not False):
            fsync_path(directory)
        return [done is not None for done in linked]

    def _link(self, target: Path, source: Path) -> bool | None:
        """Publish `source` at `target` create-only: True when linked (its directory entry still
        to be fsynced), False when copied (made durable already), None when already there.

        "Already there" may be another writer's link made a moment ago whose directory fsync
        has not run yet: a caller about to commit metadata that points at the blob must not
        count on that writer, so the directory is fsynced for None as for True (a directory
        with nothing new to write back costs a fraction of a millisecond)."""
        self._durable_dirs(target.parent)
        if target.exists():
            return None
        try:
            # link() is atomic and create-only: a racing writer of the same digest gets
            # EEXIST instead of replacing bytes someone may be reading.
            os.link(source, target)
        except FileExistsError:
            return None
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
                raise
            return False if self._copy_then_link(target, source) else None
        # Write protection: the inode is shared with the spool file (and maybe the other
        # store), all of which are immutable content by now.
        os.chmod(target, 0o444)
        return True

    def _copy_then_link(self, target: Path, source: Path) -> bool:
        """Copy into a private temp file, make it durable and read-only, then link it.

        The temp name is unique per writer and created with O_EXCL: racing writers of one key
        (several uploads of the same bytes) each fill their own file, so none can truncate a
        file another one is about to publish. Whatever happens, the temp file is removed.
        """
        tmp = target.with_name(f".{target.name}.{secrets.token_hex(8)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
        try:
            try:
                with open(source, "rb") as src, os.fdopen(fd, "wb", closefd=False) as dst:
                    shutil.copyfileobj(src, dst, CHUNK)
                os.fsync(fd)  # bytes durable before the name appears
                os.fchmod(fd, 0o444)
            finally:
                os.close(fd)
            try:
                os.link(tmp, target)
            except FileExistsError:
                return False  # another writer published the same key first: success
        finally:
            tmp.unlink(missing_ok=True)
        fsync_path(target.parent)  # the new directory entry survives a crash
        return True

    async def stat(self, key: str) -> BlobInfo | None:
        try:
            size = (await asyncio.to_thread(os.stat, self._path(key))).st_size
        except FileNotFoundError:
            return None
        return BlobInfo(key, size)

    async def read(self, key: str, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        try:
            handle = await asyncio.to_thread(open, self._path(key), "rb")
        except FileNotFoundError:
            raise BlobNotFound(key) from None
        try:
            await asyncio.to_thread(handle.seek, start)
            remaining = None if end is None else end - start
            while remaining is None or remaining > 0:
                size = CHUNK if remaining is None else min(CHUNK, remaining)
                data = await asyncio.to_thread(handle.read, size)
                if not data:
                    break
                if remaining is not None:
                    remaining -= len(data)
                yield data
        finally:
            handle.close()

    async def delete(self, key: str) -> None:
        path = self._path(key)
        await asyncio.to_thread(path.unlink, True)

    async def list(self, prefix: str) -> AsyncIterator[str]:
        top = self._path(prefix.rsplit("/", 1)[0]) if "/" in prefix else self.root
        def keys() -> list[str]:
            if not top.is_dir():
                return []
            found = (p.relative_to(self.root).as_posix() for p in top.rglob("*") if p.is_file() and not p.name.startswith("."))
            # Sorted as strings, like S3 and GCS listings (the retry wrapper resumes by key).
            return sorted(k for k in found if k.startswith(prefix))

        for key in await asyncio.to_thread(keys):
            yield key

    def local_path(self, key: str) -> str | None:
        path = self._local_paths.get(key)
        if path is None:
            path = self._safe(key)  # a pure function of the key (join and normpath cost a download microseconds)
            if len(self._local_paths) >= _LOCAL_PATHS:
                self._local_paths.clear()
            self._local_paths[key] = path
        return path

    async def close(self) -> None:
        pass

    def _durable_dirs(self, directory: Path) -> None:
        """`directory` and its parents up to the root exist, each one's entry made durable (its
        parent fsynced) before anything is linked into it: a link's directory fsync keeps the
        link through a crash only if the directory's own entry survives too, which POSIX does
        not promise for a directory created without one (a fan-out directory `ab/` or `ab/cd/`
        of a first digest). A directory found already there may be another writer's (another
        process's) that is not durable yet, so it is treated like a new one, once per process:
        the directories known durable are kept (the fan-out bounds them; dropped all at once
        past _DURABLE_DIRS)."""
        self._made_durable(self._new_dirs(directory))

    def _new_dirs(self, directory: Path) -> Sequence[Path]:
        """`directory` and its parents not known durable, made (outermost first) but not yet
        fsynced in their parents: `_made_durable` does that, before anything is linked into them."""
        chain = []
        while directory not in self._durable and directory != directory.parent:
            chain.append(directory)
            directory = directory.parent
        chain.reverse()
        for new in chain:
            new.mkdir(exist_ok=True)  # a racing writer may have made it: its entry is fsynced all the same
        return chain

    def _made_durable(self, chain: Sequence[Path]) -> None:
        """Each directory's entry fsynced in its parent, then remembered as durable."""
        if len(self._durable) + len(chain) > _DURABLE_DIRS:
            self._durable = {self.root}
        for new in chain:
            fsync_path(new.parent)
            self._durable.add(new)


def publish(source: Path, sync: bool, puts: Sequence[tuple[LocalBlobStore, str]]) -> list[bool]:
    """`source` fsynced (with `sync`), then linked at each (store, key) as `put_file` does
    (create-only, read-only, its directory fsynced): in one worker-thread call, one hop for an
    upload's whole publication instead of one for the fsync and one per store. The source's
    fsync precedes every link, so no name ever points at bytes a crash could lose, and every
    new directory's entry is durable before anything is linked into it (docs/design.md,
    "Write order")."""
    targets = [(store, store._path(key)) for store, key in puts]
    # The syncs are those of `put_file` for each store, in an order that lets one journal
    # commit serve several on a journaling file system: every new fan-out directory made, then
    # the source's fsync, then the new directories' parents, every link, and last each link's
    # directory (as `_put_files`). Each one still runs (POSIX promises nothing across files).
    chains = [(store, store._new_dirs(target.parent)) for store, target in targets]
    if sync:
        fsync_path(source)
    for store, chain in chains:
        store._made_durable(chain)
    linked = [store._link(target, source) for store, target in targets]
    for directory in dict.fromkeys(target.parent for (_, target), done in zip(targets, linked, strict=True) if done is not False):
        fsync_path(directory)
    return [done is not None for done in linked]
