"""Issue 13's bar, from a cold start: `versionstore serve` on an empty data directory, an
environment and a staff member made with the CLI, an asset uploaded and deleted with the SDK;
then a support person who never used the API finds it in the console and restores it in well
under a minute, and the audit log (console page and `audit export`) shows who did it.

The second half is the purge delay seen by an admin: an irreversible version deletion over
the SDK waits on the "Scheduled purges" page, where one click undoes it.
Screenshots go to the pytest tmp path (and VERSIONSTORE_CONSOLE_SHOTS, like test_console.py).
"""

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cloudinary
import cloudinary.api
import cloudinary.uploader
import pytest
from playwright.sync_api import sync_playwright

from tests.e2e.conftest import API_KEY, API_SECRET, CLOUD, ServerProcess, cli, configure_sdk
from tests.e2e.test_console import CHROMIUM, _png, _shot, _sign_in

#: A usability bound on the browser part, not a benchmark.
BOUND_SECONDS = 60.0


@pytest.fixture
def cold(tmp_path: Path) -> Iterator[ServerProcess]:
    """`versionstore serve` on a data directory that does not exist yet."""
    server = ServerProcess(tmp_path / "data", tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    directory = tmp_path / "screenshots"
    directory.mkdir()
    print(f"\nwalkthrough screenshots: {directory}")
    return directory


def _staff(server: ServerProcess, email: str, role: str) -> str:
    out = cli("staff", "add", email, "--role", role, "--generate", data_dir=server.data_dir).stdout
    found = re.search(r"password \(shown once\): (\S+)", out)
    assert found, out
    return found[1]


def test_a_newcomer_finds_and_restores_a_deleted_asset_in_under_a_minute(cold: ServerProcess, shots: Path) -> None:
    if not Path(CHROMIUM).exists():
        pytest.fail("chromium is not installed (scripts/test.sh installs it: apt-get install -y chromium)")
    cli("cloud", "create", CLOUD, "--api-key", API_KEY, "--api-secret", API_SECRET, "--purge-delay-days", "7",
        data_dir=cold.data_dir)
    support = _staff(cold, "support@example.com", "restorer")
    admin = _staff(cold, "admin@example.com", "admin")
    configure_sdk(cold.base_url)
    try:
        uploaded = cloudinary.uploader.upload(_png("orange", (90, 60)), public_id="campaign/hero")
        cloudinary.uploader.destroy("campaign/hero")
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            try:
                page: Any = browser.new_context(base_url=cold.base_url).new_page()
                started = time.monotonic()
                _sign_in(page, "support@example.com", support)
                page.fill("#q", "hero")
                page.click("button:has-text('Find')")
                page.click("a:has-text('campaign/hero')")
                page.click("#restore-latest")
                assert page.locator("#asset-state").inner_text() == "live"
                took = time.monotonic() - started
                print(f"\nbrowser part (sign in, find, restore): {took:.1f} s")
                _shot(page, shots, "walkthrough-restored")
                assert took < BOUND_SECONDS
                back = cloudinary.api.resource("campaign/hero")
                assert back["placeholder"] is False and back["width"] == 90 and back["asset_id"] == uploaded["asset_id"]
                page.goto(f"/console/audit?cloud={CLOUD}&action=restore")
                assert "staff:support@example.com" in page.inner_text("main")
                _shot(page, shots, "walkthrough-audit")

                # The purge delay: an irreversible deletion over the SDK waits for an admin's undo.
                second = cloudinary.uploader.upload(_png("purple"), public_id="campaign/hero")
                cloudinary.api.delete_backed_up_assets(uploaded["asset_id"], [uploaded["version_id"]])
                listed = cloudinary.api.resource("campaign/hero", versions=True)["versions"]
                assert uploaded["version_id"] not in [v["version_id"] for v in listed]
                page.click("button:has-text('Sign out')")
                _sign_in(page, "admin@example.com", admin)
                page.goto(f"/console/{CLOUD}/purges")
                assert "campaign/hero" in page.inner_text("main")
                _shot(page, shots, "scheduled-purges")
                page.click("button:has-text('Undo deletion of campaign/hero')")
                assert "undone" in page.inner_text("main")
                listed = cloudinary.api.resource("campaign/hero", versions=True)["versions"]
                assert {uploaded["version_id"], second["version_id"]} <= {v["version_id"] for v in listed}
            finally:
                browser.close()
    finally:
        cloudinary.reset_config()
    exported = [json.loads(line) for line in cli("audit", "export", "--cloud", CLOUD, data_dir=cold.data_dir).stdout.splitlines()]
    actions = [(r["actor"], r["action"], r["outcome"]) for r in exported]
    assert ("staff:support@example.com", "restore", "ok") in actions
    assert (f"api_key:{API_KEY}", "purge_scheduled", "ok") in actions
    assert ("staff:admin@example.com", "purge_undone", "ok") in actions
