"""FileRange: a part of a spooled file as the sized, seekable stream bucket SDKs read in pieces."""

import io
import os
import zlib
from pathlib import Path

import pytest

from versionstore.blobstore.file_range import PIECE, FileRange, pieces


def test_a_range_reads_resends_and_reports_only_its_own_bytes(tmp_path: Path) -> None:
    data = os.urandom(3 * PIECE + 123)
    path = tmp_path / "spool"
    path.write_bytes(data)
    with open(path, "rb") as file:
        part = FileRange(file.fileno(), PIECE + 7, PIECE + 100)
        assert len(part) == PIECE + 100 and part.tell() == 0
        assert part.read(10) == data[PIECE + 7 : PIECE + 17]
        assert part.seek(0, io.SEEK_END) == PIECE + 100  # how a client measures what is left
        assert part.read(5) == b""
        part.seek(0)  # a retry resends from the start
        assert part.read() == data[PIECE + 7 : 2 * PIECE + 107]
        with pytest.raises(OSError):
            part.fileno()  # clients would take the whole file's size from a descriptor
        assert file.tell() == 0  # pread: the shared descriptor's position never moves
        assert zlib.crc32(b"".join(bytes(p) for p in pieces(file.fileno(), 5, 2 * PIECE))) == zlib.crc32(data[5 : 2 * PIECE + 5])


def test_a_file_shorter_than_its_range_is_an_error_not_a_short_body(tmp_path: Path) -> None:
    path = tmp_path / "spool"
    path.write_bytes(b"x" * 100)
    with open(path, "rb") as file:
        with pytest.raises(OSError, match="early"):
            FileRange(file.fileno(), 50, 100).read()
        with pytest.raises(OSError, match="early"):
            list(pieces(file.fileno(), 0, 200))
