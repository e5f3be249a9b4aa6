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
