"""staging.Stager on real files, with O_DIRECT and through the page cache: every size (empty,
short of a block, a block and a byte, several blocks) comes out byte-identical with its
BLAKE3 and MD5, durable, and a source that ends early leaves no file behind."""

import hashlib
import io
from pathlib import Path

import blake3
import pytest

from versionstore.staging import ALIGN, STAGE_BLOCK, Stager

SIZES = [0, 1, ALIGN - 1, ALIGN, ALIGN + 1, STAGE_BLOCK - 1, STAGE_BLOCK, STAGE_BLOCK + 1, 3 * STAGE_BLOCK + ALIGN + 7]


def source(data: bytes, step: int | None = None) -> io.BytesIO:
    """A source whose `readinto` gives at most `step` bytes at a time (short reads mid-file)."""
    stream = io.BytesIO(data)
    if step is not None:
        whole = stream.readinto
        stream.readinto = lambda view: whole(memoryview(view)[:step])  # type: ignore[method-assign]
    return stream


@pytest.mark.parametrize("direct", [True, False])
def test_every_size_is_staged_byte_identical_with_both_digests(tmp_path: Path, direct: bool) -> None:
    stager = Stager(tmp_path, direct=direct)
    staged = []
    for number, size in enumerate(SIZES):
        data = bytes((number + i) % 251 for i in range(size))
        staged.append((data, stager.stage(source(data, step=ALIGN + 3 if number % 2 else None).readinto, size, md5=True)))
    stager.drain()
    for data, file in staged:
        file.durable.result()
        assert file.path.read_bytes() == data
        assert file.blake3 == blake3.blake3(data).hexdigest() and file.md5 is not None
        assert file.md5.result() == hashlib.md5(data).hexdigest() and file.head == data[:64]
        spooled = file.spooled()
        assert (spooled.size, spooled.digest, spooled.synced) == (len(data), file.blake3, True)
        file.discard()
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("direct", [True, False])
def test_a_source_that_ends_early_leaves_nothing(tmp_path: Path, direct: bool) -> None:
    stager = Stager(tmp_path, direct=direct)
    with pytest.raises(OSError, match="ended"):
        stager.stage(source(b"x" * (STAGE_BLOCK + 10)).readinto, STAGE_BLOCK + 20, md5=False)
    kept = stager.stage(source(b"after").readinto, 5, md5=False)  # the stager goes on
    stager.drain()
    kept.durable.result()
    assert [p.name for p in tmp_path.iterdir()] == [kept.path.name] and kept.path.read_bytes() == b"after"
