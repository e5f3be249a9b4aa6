"""Running out of disk: recognise it wherever it surfaces, and report free space before it does.

A full disk shows up as ENOSPC or EDQUOT from a spool write, a store's link/copy, or SQLite's
"database or disk is full" (SQLITE_FULL), possibly wrapped in another exception or an exception
group from a task group. Nothing half-written survives it (spool files are removed, metadata is
written last, in a transaction), so the answer to the client is a plain "insufficient storage".
"""

import errno
import shutil
import sqlite3
from pathlib import Path
from typing import Any

_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
_SQLITE_FULL = 13


def _one_is_full(exc: BaseException) -> bool:
    if isinstance(exc, OSError) and exc.errno in _FULL_ERRNOS:
        return True
    if isinstance(exc, sqlite3.Error):
        return getattr(exc, "sqlite_errorcode", None) == _SQLITE_FULL or "database or disk is full" in str(exc)
    return False


def is_disk_full(exc: BaseException) -> bool:
    """True when `exc`, anything it wraps (cause, context) or any member of an exception group
    is an out-of-space error."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        current = todo.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if _one_is_full(current):
            return True
        if isinstance(current, BaseExceptionGroup):
            todo.extend(current.exceptions)
        todo.extend(e for e in (current.__cause__, current.__context__) if e is not None)
    return False


def space_report(data_dir: Path, min_free_bytes: int) -> dict[str, Any]:
    """Free and total bytes of the file system holding `data_dir`, and whether the free part is
    below the operator's threshold (`VERSIONSTORE_MIN_FREE_BYTES`). One statvfs call."""
    try:
        usage = shutil.disk_usage(data_dir)
    except OSError:
        return {"free_bytes": None, "total_bytes": None, "min_free_bytes": min_free_bytes, "low_space": True}
    return {
        "free_bytes": usage.free,
        "total_bytes": usage.total,
        "min_free_bytes": min_free_bytes,
        "low_space": usage.free < min_free_bytes,
    }
