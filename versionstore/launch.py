"""The `versionstore` command's entry point (`python -m versionstore` and the console script).

`initial-backup`, the operators' batch client, goes straight to versionstore/backup_client.py:
importing versionstore/cli.py first (the metadata store, the blob stores, the HTTP app) took
about half of the ~0.9 s an unchanged library's re-run costs on the benchmark machine, for
modules the client never uses. Every other command goes to `cli.main`.
"""

import sys


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["initial-backup"]:
        from versionstore.backup_client import main as initial_backup

        return initial_backup(args[1:], prog="versionstore initial-backup")
    from versionstore.cli import main as command

    return command(args)
