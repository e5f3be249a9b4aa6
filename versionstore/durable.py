"""One durability step shared by every writer of a name (docs/design.md, "Write order")."""

import os
from pathlib import Path


def fsync_path(path: Path | str) -> None:
    """fsync a file or a directory by path: a file's bytes before a name points at them, a
    directory after a name was added to it, so the entry survives a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
