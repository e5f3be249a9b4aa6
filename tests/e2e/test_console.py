"""The support console in a real browser: Debian's chromium driven by Playwright, against
`versionstore serve` as a process, with the official SDK on the other side.

Screenshots of the main pages are saved under the pytest tmp path (printed); with
VERSIONSTORE_CONSOLE_SHOTS=DIR they are also written to DIR (docs/console/ holds a few).
"""

import asyncio
import io
import os
import re
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import cloudinary
import cloudinary.api
import cloudinary.uploader
import pytest
from PIL import Image
from playwright.sync_api import sync_playwright

from tests.e2e.conftest import CLOUD, ServerProcess, cli, configure_sdk
from versionstore.config import Config
from versionstore.console.staff import StaffAccounts
from versionstore.metadata import MetadataStore

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
PASSWORD = "a long staff password"
SVG_ATTACK = (b'<svg xmlns="http://www.w3.org/2000/svg" onload="alert(1)"><script>alert(2);document.title="pwned"</script>'
              b'<rect width="10" height="10"/></svg>')


def _png(colour: str, size: tuple[int, int] = (64, 48)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, "PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def staff(server: ServerProcess) -> dict[str, str]:
    """email -> password of one member per role: the admin made with the real CLI (`--generate`),
    the others written beside it in this process (one argon2id hash each, in parallel)."""
    out = cli("staff", "add", "admin@example.com", "--role", "admin", "--cloud", CLOUD, "--generate", data_dir=server.data_dir).stdout
    found = re.search(r"password \(shown once\): (\S+)", out)
    assert found, out
    others = {"restorer@example.com": "restorer", "viewer@example.com": "viewer", "victim@example.com": "restorer"}

    async def add_others() -> None:
        meta = await MetadataStore.open(Config(data_dir=server.data_dir).db_path)
        try:
            accounts = StaffAccounts(meta)
            await asyncio.gather(*(accounts.add(email, role, [CLOUD], PASSWORD) for email, role in others.items()))
        finally:
            await meta.close()

    with ThreadPoolExecutor(1) as thread:  # a loop of its own: pytest-asyncio may run one in this thread
        thread.submit(asyncio.run, add_others()).result()
    return {"admin@example.com": found[1], **dict.fromkeys(others, PASSWORD)}


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("console-screenshots")
    print(f"\nconsole screenshots: {directory}")
    return directory


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not Path(CHROMIUM).exists():
        pytest.fail("chromium is not installed (scripts/test.sh installs it: apt-get install -y chromium)")
    with sync_playwright() as p:
        launched = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield launched
        launched.close()


@pytest.fixture
def page(browser: Any, server: ServerProcess) -> Iterator[Any]:
    context = browser.new_context(base_url=server.base_url, accept_downloads=True)
    opened = context.new_page()
    dialogs: list[str] = []
    opened.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    opened.dialogs = dialogs
    configure_sdk(server.base_url)
    yield opened
    context.close()
    cloudinary.reset_config()


def _shot(page: Any, shots: Path, name: str) -> None:
    path = shots / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    if extra := os.environ.get("VERSIONSTORE_CONSOLE_SHOTS"):
        Path(extra).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(extra) / path.name)


def _sign_in(page: Any, email: str, password: str) -> None:
    page.goto("/console/login")
    page.fill("#email", email)
    page.fill("#password", password)
    page.click("button[type=submit]:has-text('Sign in')")


def _deleted(public_id: str) -> dict[str, object]:
    first = cloudinary.uploader.upload(_png("red"), public_id=public_id)
    cloudinary.uploader.upload(_png("blue", (80, 40)), public_id=public_id)
    cloudinary.uploader.destroy(public_id)
    return first


def test_sign_in_wrong_password_and_lockout(page: Any, staff: dict[str, str], shots: Path) -> None:
    _sign_in(page, "restorer@example.com", "not the password")
    assert page.locator("#login-error").inner_text() == "Wrong email or password."
    _shot(page, shots, "sign-in-refused")
    for _ in range(5):  # staff.MAX_FAILURES
        _sign_in(page, "victim@example.com", "not the password")
    assert "locked" in page.locator("#login-error").inner_text()
    _sign_in(page, "victim@example.com", staff["victim@example.com"])
    assert "locked" in page.locator("#login-error").inner_text()
    _sign_in(page, "restorer@example.com", staff["restorer@example.com"])
    assert page.url.endswith(f"/console/{CLOUD}/find")


def test_find_a_deleted_asset_and_restore_it(page: Any, staff: dict[str, str], shots: Path) -> None:
    _deleted("e2e/lost-cat")
    _sign_in(page, "restorer@example.com", staff["restorer@example.com"])
    page.fill("#q", "lost-cat")
    page.click("button:has-text('Find')")
    _shot(page, shots, "find-deleted")
    page.click("a:has-text('e2e/lost-cat')")
    assert page.locator("#asset-state").inner_text() == "deleted"
    page.locator("table.timeline img").first.wait_for()
    _shot(page, shots, "asset-deleted")
    page.click("#restore-latest")
    assert page.locator("#asset-state").inner_text() == "live"
    _shot(page, shots, "asset-restored")
    back = cloudinary.api.resource("e2e/lost-cat")
    assert back["width"] == 80 and back["bytes"] > 0  # the newest backed-up version, over the SDK


def test_bulk_restore_of_search_results(page: Any, staff: dict[str, str], shots: Path) -> None:
    for name in ("e2e-bulk/a", "e2e-bulk/b"):
        _deleted(name)
    _sign_in(page, "restorer@example.com", staff["restorer@example.com"])
    page.goto(f"/console/{CLOUD}/find?prefix=e2e-bulk/")
    for box in page.locator("input[name=asset_id]").all():
        box.check()
    page.click("#bulk-restore")
    page.wait_for_url(re.compile(r"/operations\?job="))
    job = parse_qs(urlparse(page.url).query)["job"][0]
    deadline = time.monotonic() + 30
    while (status := page.inner_text(f"#job-{job} td:nth-child(3)")) != "completed":  # the job's own row
        assert status in ("pending", "active") and time.monotonic() < deadline, status
        page.wait_for_timeout(100)
        page.reload()
    _shot(page, shots, "bulk-restore-done")
    assert all(cloudinary.api.resource(name)["placeholder"] is False for name in ("e2e-bulk/a", "e2e-bulk/b"))


def test_download_a_version(page: Any, staff: dict[str, str]) -> None:
    data = _png("green", (33, 22))
    uploaded = cloudinary.uploader.upload(data, public_id="e2e/download-me")
    _sign_in(page, "restorer@example.com", staff["restorer@example.com"])
    page.goto(f"/console/{CLOUD}/assets/{uploaded['asset_id']}")
    with page.expect_download() as info:
        page.click("a:has-text('Download')")
    download = info.value
    assert Path(download.path()).read_bytes() == data
    assert download.suggested_filename == "download-me.png"


def test_irreversible_deletion_with_typed_confirmation(page: Any, staff: dict[str, str], shots: Path) -> None:
    first = cloudinary.uploader.upload(_png("red"), public_id="e2e/forget-me")
    cloudinary.uploader.upload(_png("blue"), public_id="e2e/forget-me")
    _sign_in(page, "admin@example.com", staff["admin@example.com"])
    page.goto(f"/console/{CLOUD}/assets/{first['asset_id']}")
    page.click(f"a[href$='/versions/{first['version_id']}/delete']")
    page.fill("#confirm", "e2e/forget")
    page.click("button:has-text('Delete this version forever')")
    assert "Type the public ID exactly" in page.inner_text("main")
    _shot(page, shots, "confirm-deletion")
    page.fill("#confirm", "e2e/forget-me")
    page.click("button:has-text('Delete this version forever')")
    assert "Version deleted." in page.inner_text("main")
    versions = cloudinary.api.resource_by_asset_id(first["asset_id"], versions=True)["versions"]
    assert first["version_id"] not in [v["version_id"] for v in versions] and len(versions) == 1


def test_viewer_sees_no_restore_button_and_a_forged_post_is_403(page: Any, staff: dict[str, str]) -> None:
    gone = _deleted("e2e/viewer-cannot")
    _sign_in(page, "viewer@example.com", staff["viewer@example.com"])
    page.goto(f"/console/{CLOUD}/assets/{gone['asset_id']}")
    assert page.locator("button:has-text('Restore')").count() == 0
    assert page.locator("a:has-text('Download')").count() == 0
    token = page.locator("input[name=csrf_token]").first.get_attribute("value")
    forged = page.request.post(f"/console/{CLOUD}/assets/{gone['asset_id']}/restore", form={"csrf_token": token})
    assert forged.status == 403
    assert cloudinary.api.resource("e2e/viewer-cannot")["placeholder"] is True  # still deleted


def test_a_post_without_csrf_token_is_403(page: Any, staff: dict[str, str]) -> None:
    gone = _deleted("e2e/no-token")
    _sign_in(page, "restorer@example.com", staff["restorer@example.com"])
    response = page.request.post(f"/console/{CLOUD}/assets/{gone['asset_id']}/restore", form={})
    assert response.status == 403
    assert cloudinary.api.resource("e2e/no-token")["placeholder"] is True  # still deleted


def test_an_svg_with_a_script_does_not_execute_in_the_console(page: Any, staff: dict[str, str], shots: Path) -> None:
    svg = cloudinary.uploader.upload(SVG_ATTACK, public_id="e2e/evil", resource_type="image")
    _sign_in(page, "admin@example.com", staff["admin@example.com"])
    page.goto(f"/console/{CLOUD}/find?status=all&q=evil")
    page.goto(f"/console/{CLOUD}/assets/{svg['asset_id']}")
    preview = page.request.get(f"/console/{CLOUD}/assets/{svg['asset_id']}/versions/{svg['version_id']}/preview.png")
    assert preview.status == 404 and b"<svg" not in preview.body()
    page.goto(f"/console/{CLOUD}/assets/{svg['asset_id']}/versions/{svg['version_id']}/preview.png")
    page.wait_for_timeout(300)
    assert page.dialogs == [] and page.title() != "pwned"


def test_operations_and_audit_pages(page: Any, staff: dict[str, str], shots: Path, server: ServerProcess) -> None:
    _sign_in(page, "admin@example.com", staff["admin@example.com"])
    page.goto(f"/console/{CLOUD}/operations")
    assert "Jobs" in page.inner_text("main")
    _shot(page, shots, "operations")
    page.goto(f"/console/audit?cloud={CLOUD}&action=restore")
    assert "staff:restorer@example.com" in page.inner_text("main")
    _shot(page, shots, "audit")
    verified = cli("audit", "verify", data_dir=server.data_dir)
    assert '"intact": true' in verified.stdout
