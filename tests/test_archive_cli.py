"""`versionstore archive export|import`: a round trip through a file, and a refused file."""

import json
import tarfile
import time

from tests.test_snapshots_cli import _library
from versionstore.cli import main


def test_archive_export_then_import_and_a_tampered_file(tmp_path, capsys):
    data = str(tmp_path)
    _library(tmp_path)  # environment m: m/a (two versions, backed up) and m/b (not backed up)
    out = tmp_path / "m.tar"
    assert main(["archive", "export", "--cloud", "m", "--at", str(time.time()), "--prefix", "m/", "-o", str(out),
                 "--no-progress", "--data-dir", data]) == 0
    exported = json.loads(capsys.readouterr().out)
    assert exported["count"] == 1 and [s["public_id"] for s in exported["skipped"]] == ["m/b"]
    assert not (tmp_path / "m.tar.part").exists() and out.stat().st_size == exported["size"]
    with tarfile.open(out) as tar:
        assert tar.getnames() == ["manifest.jsonl", "image/upload/m/a"]
        assert tar.extractfile("image/upload/m/a").read() == b"content 2"  # type: ignore[union-attr]

    assert main(["cloud", "create", "n", "--api-key", "nk", "--api-secret", "ns", "--data-dir", data]) == 0
    capsys.readouterr()
    tampered = tmp_path / "bad.tar"
    tampered.write_bytes(out.read_bytes().replace(b"content 2", b"content 3"))
    assert main(["archive", "import", "--cloud", "n", str(tampered), "--no-progress", "--data-dir", data]) == 2
    assert "archive refused, nothing imported: image/upload/m/a: BLAKE3" in capsys.readouterr().err
    # Nothing of it was kept: its staged bytes went with their directory, no store has a blob.
    assert not list((tmp_path / "spool").iterdir())
    assert not [p for store in ("primary", "backup") for p in (tmp_path / store / "n").rglob("*") if p.is_file()]
    assert main(["archive", "import", "--cloud", "n", str(out), "--no-progress", "--data-dir", data]) == 0
    assert json.loads(capsys.readouterr().out) == {"file": str(out), "source_cloud": "m", "imported": 1, "unchanged": 0}
    assert main(["archive", "import", "--cloud", "n", str(out), "--no-progress", "--data-dir", data]) == 0
    assert json.loads(capsys.readouterr().out)["unchanged"] == 1


def test_cloud_set_archive_keep_days_is_checked_audited_and_shown(tmp_path, capsys):
    """`cloud set --archive-keep-days N|default`: the environment's default for exports that do
    not give `keep_days`; a bad value is a usage error that changes nothing (not even the
    other options of the same command)."""
    data = str(tmp_path)
    assert main(["cloud", "create", "k", "--api-key", "kk", "--api-secret", "ks", "--data-dir", data]) == 0
    assert main(["cloud", "set", "k", "--archive-keep-days", "30", "--data-dir", data]) == 0
    capsys.readouterr()
    for bad in ("0", "3651", "soon"):
        assert main(["cloud", "set", "k", "--auto-backup", "off", "--archive-keep-days", bad, "--data-dir", data]) == 2
        assert "archive_keep_days must be a whole number of days" in capsys.readouterr().err
    assert main(["cloud", "status", "k", "--data-dir", data]) == 0
    status = json.loads(capsys.readouterr().out)
    assert (status["auto_backup"], status["archive_keep_days"], status["server_archive_keep_days"]) == (True, 30, 7)
    assert main(["cloud", "set", "k", "--archive-keep-days", "default", "--data-dir", data]) == 0
    capsys.readouterr()
    assert main(["cloud", "status", "k", "--data-dir", data]) == 0
    assert json.loads(capsys.readouterr().out)["archive_keep_days"] is None
    assert main(["audit", "export", "--cloud", "k", "--data-dir", data]) == 0
    details = [json.loads(line)["detail"] for line in capsys.readouterr().out.splitlines()]
    assert [d.get("archive_keep_days", "-") for d in details if "archive_keep_days" in d] == [30, None]
