"""The batch client's directory walk and its re-run shortcut: an unchanged file is skipped on the
walk's own stat, without a second stat or a worker (the bulk of an unchanged re-run)."""

import argparse
import asyncio
import os
from pathlib import Path

import pytest

from versionstore.backup_client import Report, SourceRun
from versionstore.backup_io import Item, StateFile, walk_directory


def _tree(root: Path) -> None:
    (root / "a").mkdir(parents=True)
    (root / "a" / "one.jpg").write_bytes(b"1" * 10)
    (root / "two.png").write_bytes(b"2" * 20)
    (root / ".hidden").write_bytes(b"h")
    os.mkfifo(root / "pipe.raw")  # not a regular file: never listed
    (root / "gone.jpg").symlink_to(root / "missing")  # a dangling link: its stat fails, never listed


def test_the_walk_lists_regular_files_with_their_size_and_mtime(tmp_path: Path) -> None:
    _tree(tmp_path)
    items = list(walk_directory(tmp_path))
    assert [item.public_id for item in items] == ["two", "a/one"]  # sorted per directory, files before subdirectories
    for item in items:
        info = os.stat(item.source)
        assert item.listed == (info.st_size, info.st_mtime_ns)


def _run(tmp_path: Path, verify: bool = False) -> tuple[SourceRun, list[str]]:
    args = argparse.Namespace(progress=False, concurrency=2, verify=verify, dry_run=False)
    state = StateFile(tmp_path / "state.jsonl", "http://example.invalid/demo")
    run = SourceRun(args, None, state, Report("source", "demo"))  # type: ignore[arg-type]  # no request is made
    processed: list[str] = []

    async def one(item: Item, advanced: list[int]) -> int:
        processed.append(item.public_id)
        return 0

    run._one = one  # type: ignore[method-assign]  # what reaches a worker, instead of uploading it
    return run, processed


@pytest.mark.parametrize("verify", [False, True])
def test_an_unchanged_backed_up_file_is_skipped_without_a_worker(tmp_path: Path, verify: bool) -> None:
    src = tmp_path / "src"
    _tree(src)
    writer, _ = _run(tmp_path)
    for item in walk_directory(src):
        assert item.listed is not None
        size, mtime_ns = item.listed
        asyncio.run(writer.state.record(item, size=size, mtime_ns=mtime_ns, digest="d" * 64, outcome="uploaded"))  # type: ignore[union-attr]
    os.utime(src / "two.png", ns=(0, 0))  # changed since: its mtime differs from the state line's

    run, processed = _run(tmp_path, verify=verify)
    asyncio.run(run.run(lambda: walk_directory(src)))
    if verify:  # --verify ignores the state file's shortcut
        assert sorted(processed) == ["a/one", "two"] and run.report.counts["skipped_unchanged"] == 0
    else:
        assert processed == ["two"] and run.report.counts["skipped_unchanged"] == 1
        assert run.bars is not None and (run.bars.assets.n, run.bars.bytes.n) == (2, 10)  # the skip counts its bytes
