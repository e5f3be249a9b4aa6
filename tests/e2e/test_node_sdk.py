"""The official Node SDK (pinned in tests/e2e/node/package.json), unchanged, against the server.

scripts/test.sh installs it with `npm ci`; Node itself comes with this machine kind. Without
Node or the package this test fails rather than skipping: Node compatibility is a promise.
"""

import json
import os
import subprocess
from pathlib import Path

from tests.e2e.conftest import API_KEY, API_SECRET, CLOUD, ServerProcess, bodies_read

NODE_DIR = Path(__file__).resolve().parent / "node"


def test_node_sdk_end_to_end(server: ServerProcess) -> None:
    assert (NODE_DIR / "node_modules" / "cloudinary").is_dir(), "run scripts/test.sh (it runs npm ci in tests/e2e/node)"
    env = {**os.environ, "CLOUDINARY_URL": f"cloudinary://{API_KEY}:{API_SECRET}@{CLOUD}?upload_prefix={server.base_url}"}
    run = subprocess.run(["node", "drive.js"], cwd=NODE_DIR, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, f"{run.stderr}\nserver log:\n{server.log_tail()}"
    out = json.loads(run.stdout)
    # The Node SDK's small uploads were read whole (http/small_body.py), its 12 MiB one streamed.
    read = bodies_read(server)
    assert read.get("small", 0) >= 2 and read.get("stream", 0) >= 1, read

    first, second = out["first"], out["second"]
    assert out["ping"]["status"] == "ok"
    assert first["asset_id"] == second["asset_id"] and first["backup"] is True
    assert [v["version_id"] for v in out["resource"]["versions"]] == [first["version_id"], second["version_id"]]
    assert out["by_asset_id"]["public_id"] == "node/sample"
    assert out["download"] == {"status": 200, "same": True}
    assert out["download_range"] == {"status": 206, "same": True}
    assert out["update"]["tags"] == ["x", "y"] and out["add_tag"]["public_ids"] == ["node/sample"]
    assert [r["public_id"] for r in out["list"]["resources"]] == ["node/sample"]
    assert out["delete"]["deleted"] == {"node/sample": "deleted", "node/missing": "not_found"}
    assert out["placeholder"]["placeholder"] is True and out["placeholder"]["bytes"] == 0
    assert [r["public_id"] for r in out["search"]["resources"]] == ["node/sample"]
    assert out["restore"]["node/sample"]["bytes"] == 3000
    assert out["delete_versions"]["deleted_version_ids"] == [second["version_id"]]
    assert out["delete_current"]["deleted_version_ids"] == [] and out["delete_current"]["failures"]
    assert [v["size"] for v in out["after"]["versions"]] == [3000, 3000]
    assert out["rename_refused"]["http_code"] == 400
    assert out["rename"]["public_id"] == "node/renamed" and out["rename"]["asset_id"] == first["asset_id"]
    assert out["destroy"]["result"] == "ok" and out["destroy_missing"]["result"] == "not found"
    assert out["not_found"]["http_code"] == 404
    assert out["large"]["bytes"] == 12 * 1024 * 1024 + 123 and out["large"]["resource_type"] == "raw"
    assert out["large_download"] == {"status": 200, "same": True}
