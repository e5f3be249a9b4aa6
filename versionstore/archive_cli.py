"""`versionstore archive export|import`: archives on the store directly, with progress bars.

`export` writes the selection's tar to a local file (like the `archive_export` job, without
publishing it); `import` reads an archive file once, verifying every member while staging its
bytes, and commits them only once all of it verified (nothing is written when it does not:
`archives.import_file`). Both print a JSON summary.
"""

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm import tqdm

from versionstore import archives, pitr
from versionstore.archive_format import ArchiveInvalid
from versionstore.errors import ApiError
from versionstore.snapshot_cli import Command, Service, _run


def _bar(args: argparse.Namespace, desc: str, total: int | None) -> "tqdm[Any]":
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, file=sys.stderr,
                disable=not args.progress or None)


async def _export(snapshots: Service, args: argparse.Namespace) -> Any:
    selection = await pitr.check_selection(
        snapshots.meta, pitr.Selection(args.cloud, args.prefix or "", pitr.parse_time(args.at), args.snapshot)
    )
    out = Path(args.output)
    temp = out.with_name(out.name + ".part")
    with _bar(args, "export", None) as bar:

        def total(size: int) -> None:
            bar.reset(total=size)

        written = await archives.write_archive(snapshots.service, selection, temp, time.time(), bar.update, total)
    temp.replace(out)  # only a whole archive gets the name asked for
    return {"output": str(out), "digest": written.digest, "size": written.size, "count": written.count,
            "bytes": written.bytes, "skipped": written.skipped}


async def _import(snapshots: Service, args: argparse.Namespace) -> Any:
    path = Path(args.file)
    cloud = await snapshots.meta.get_cloud(args.cloud)
    assert cloud is not None  # _run checked it
    try:
        with _bar(args, "verify and stage", path.stat().st_size) as bar:
            manifest, counts = await archives.import_file(snapshots.service, cloud, path, bar.update)
    except ArchiveInvalid as exc:
        raise ApiError(f"archive refused, nothing imported: {exc}") from None
    return {"file": str(path), "source_cloud": manifest.header.get("cloud"), **counts}


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]", command: Command,
             data_dir_option: Callable[..., None]) -> None:
    """Add `archive export` and `archive import` to the top-level parser."""

    def with_cloud(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        parser.add_argument("--cloud", required=True, help="environment name")
        parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
        data_dir_option(parser, creates=False)
        return parser

    archive = command(sub, "archive", "archives of a snapshot or a point in time (docs/snapshots.md)")
    archive_sub = archive.add_subparsers(dest="archive_command", required=True, metavar="COMMAND")
    export = with_cloud(command(archive_sub, "export", "write a snapshot's or a point in time's archive (a tar)", _run(_export)))
    export.add_argument("--snapshot", metavar="ID", help="what this snapshot lists")
    export.add_argument("--at", help="or: the library at this time (unix seconds or ISO 8601)")
    export.add_argument("--prefix", help="only public_ids under this prefix")
    export.add_argument("-o", "--output", required=True, metavar="FILE", help="the tar to write")
    imported = with_cloud(command(archive_sub, "import", "verify an archive, then import it into the environment", _run(_import)))
    imported.add_argument("file", metavar="FILE", help="an archive written by export")
