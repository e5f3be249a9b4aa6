"""The support console over real HTTP (in-process app): sign-in, sessions, CSRF, roles,
find, restore, irreversible deletion, previews, downloads, and the audit log behind them."""

import asyncio
import io
import re
import time
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from argon2 import PasswordHasher
from PIL import Image

from tests.conftest import BASIC_HEADERS, CLOUD, Api
from versionstore.console import passwords
from versionstore.console import staff as staff_module
from versionstore.console.audit import AuditLog
from versionstore.console.sessions import Sessions
from versionstore.console.staff import StaffAccounts
from versionstore.http.console_views import STATE
from versionstore.http.keys import META

PASSWORD = "correct horse battery"
CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


@pytest.fixture(autouse=True)
def quick_password_hashes(monkeypatch: pytest.MonkeyPatch) -> None:
    """argon2id at its lowest cost in this module. Sign-in, lockout, sessions and roles do not
    depend on the cost, and the production profile (64 MiB, 3 passes: about 0.1 s of CPU per
    hash or check) was most of these tests' time. The CLI and the e2e console keep the
    production profile; test_console_cli checks that a stored hash has it."""
    quick = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
    monkeypatch.setattr(passwords, "_HASHER", quick)
    monkeypatch.setattr(passwords, "_DUMMY", quick.hash("an unknown account"))


def png(width: int = 40, height: int = 30, colour: str = "red") -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(out, "PNG")
    return out.getvalue()


async def add_staff(client: TestClient, email: str, role: str, clouds: list[str] | None = None) -> None:
    await StaffAccounts(client.server.app[META]).add(email, role, clouds or [], PASSWORD)


async def sign_in(client: TestClient, email: str, password: str = PASSWORD, expect: int = 303) -> str:
    """Sign in through the form like a browser; returns the page's CSRF token."""
    page = await client.get("/console/login")
    token = CSRF.search(await page.text())
    assert token
    response = await client.post(
        "/console/login", data={"email": email, "password": password, "csrf_token": token[1], "next": "/console/"},
        allow_redirects=False,
    )
    assert response.status == expect, await response.text()
    if expect != 303:
        return ""
    home = await client.get(f"/console/{CLOUD}/find")
    found = CSRF.search(await home.text())
    assert found
    return found[1]


async def deleted_asset(api: Api, public_id: str = "cat") -> dict[str, Any]:
    first = await api.upload(png(colour="red"), public_id=public_id, filename="cat.png")
    await api.upload(png(colour="blue"), public_id=public_id, filename="cat.png")
    await api.admin("DELETE", "resources/image/upload", params={"public_ids[]": public_id})
    return first


async def audit_actions(client: TestClient) -> list[tuple[str, str, str]]:
    records = [r async for r in AuditLog(client.server.app[META]).records()]
    return [(r.actor, r.action, r.outcome) for r in records]


async def test_sign_in_sets_a_strict_session_cookie_and_security_headers(client: TestClient) -> None:
    await add_staff(client, "ann@example.com", "viewer")
    page = await client.get("/console/login")
    for header, value in (("X-Frame-Options", "DENY"), ("X-Content-Type-Options", "nosniff")):
        assert page.headers[header] == value
    assert "default-src 'self'" in page.headers["Content-Security-Policy"]
    assert "unsafe-inline" not in page.headers["Content-Security-Policy"]
    token = CSRF.search(await page.text())
    assert token
    response = await client.post(
        "/console/login", data={"email": "Ann@Example.com", "password": PASSWORD, "csrf_token": token[1]}, allow_redirects=False
    )
    assert response.status == 303
    cookie = next(v for v in response.headers.getall("Set-Cookie") if v.startswith("vs_console="))
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie and "Secure" not in cookie  # plain HTTP here
    find = await client.get(f"/console/{CLOUD}/find")
    assert find.status == 200 and "ann@example.com" in await find.text()
    stored = await client.server.app[META]._all("SELECT token_hash FROM console_sessions")
    assert cookie.split(";")[0].split("=", 1)[1] not in str(stored)  # only the hash is kept
    csrf = CSRF.search(await find.text())
    assert csrf
    out = await client.post("/console/logout", data={"csrf_token": csrf[1]}, allow_redirects=False)
    assert out.status == 303
    after = await client.get(f"/console/{CLOUD}/find", allow_redirects=False)
    assert after.status == 303 and after.headers["Location"].startswith("/console/login")
    assert [a for _, a, _ in await audit_actions(client)] == ["sign_in", "sign_out"]


async def test_wrong_password_is_refused_and_repeated_failures_lock_the_account(client: TestClient) -> None:
    await add_staff(client, "bob@example.com", "restorer")
    for _ in range(staff_module.MAX_FAILURES - 1):
        await sign_in(client, "bob@example.com", "wrong password!", expect=401)
    await sign_in(client, "bob@example.com", "wrong password!", expect=429)  # the last failure locks
    await sign_in(client, "bob@example.com", PASSWORD, expect=429)  # even the right password, while locked
    outcomes = await audit_actions(client)
    assert outcomes == [("staff:bob@example.com", "sign_in", "failed")] * (staff_module.MAX_FAILURES + 1)


async def test_one_address_cannot_walk_through_accounts(client: TestClient) -> None:
    await add_staff(client, "cat@example.com", "viewer")
    await sign_in(client, "cat@example.com", expect=303)  # builds the console's state
    console_app = next(app for app in client.server.app._subapps)
    console_app[STATE]["console"].staff.limiter = staff_module.AddressLimiter(limit=3)
    for n in range(3):
        await sign_in(client, f"nobody{n}@example.com", "whatever at all", expect=401)
    await sign_in(client, "cat@example.com", PASSWORD, expect=429)


async def test_post_without_or_with_a_wrong_csrf_token_is_403_and_changes_nothing(client: TestClient, api: Api) -> None:
    await add_staff(client, "dan@example.com", "admin")
    asset = await deleted_asset(api)
    csrf = await sign_in(client, "dan@example.com")
    url = f"/console/{CLOUD}/assets/{asset['asset_id']}/restore"
    assert (await client.post(url, data={}, allow_redirects=False)).status == 403
    assert (await client.post(url, data={"csrf_token": csrf + "x"}, allow_redirects=False)).status == 403
    login = await client.post("/console/login", data={"email": "dan@example.com", "password": PASSWORD}, allow_redirects=False)
    assert login.status == 403
    assert (await api.admin("GET", f"resources/{asset['asset_id']}"))["placeholder"] is True  # still deleted


async def test_viewer_sees_no_restore_button_and_a_forged_post_is_403(client: TestClient, api: Api) -> None:
    await add_staff(client, "eve@example.com", "viewer")
    asset = await deleted_asset(api)
    csrf = await sign_in(client, "eve@example.com")
    page = await (await client.get(f"/console/{CLOUD}/assets/{asset['asset_id']}")).text()
    assert "cat" in page and "/restore\"" not in page and "/download\"" not in page and "/delete\"" not in page
    forged = await client.post(f"/console/{CLOUD}/assets/{asset['asset_id']}/restore", data={"csrf_token": csrf},
                               allow_redirects=False)
    assert forged.status == 403
    listed = await api.admin("GET", "resources/image/upload")
    assert listed["resources"] == []


async def test_staff_scoped_to_another_environment_cannot_open_this_one(client: TestClient, api: Api) -> None:
    await client.server.app[META].create_cloud("other", "k2", "s2", auto_backup=True)
    await add_staff(client, "fay@example.com", "admin", ["other"])
    asset = await deleted_asset(api)
    page = await client.get("/console/login")
    token = CSRF.search(await page.text())
    assert token
    await client.post("/console/login", data={"email": "fay@example.com", "password": PASSWORD, "csrf_token": token[1]})
    assert (await client.get(f"/console/{CLOUD}/find")).status == 403
    assert (await client.get(f"/console/{CLOUD}/assets/{asset['asset_id']}")).status == 403


async def test_find_a_deleted_asset_and_restore_it(client: TestClient, api: Api) -> None:
    await add_staff(client, "gus@example.com", "restorer")
    await api.upload(png(), public_id="folder/dog", filename="dog.png", tags="pets")
    asset = await deleted_asset(api, "folder/cat")
    csrf = await sign_in(client, "gus@example.com")
    results = await (await client.get(f"/console/{CLOUD}/find", params={"q": "cat"})).text()
    assert "folder/cat" in results and "folder/dog" not in results  # deleted ones by default
    by_prefix = await (await client.get(f"/console/{CLOUD}/find", params={"prefix": "folder/", "status": "all"})).text()
    assert "folder/cat" in by_prefix and "folder/dog" in by_prefix
    by_tag = await (await client.get(f"/console/{CLOUD}/find", params={"tag": "pets", "status": "all"})).text()
    assert "folder/dog" in by_tag and "folder/cat" not in by_tag
    today = time.strftime("%Y-%m-%d", time.gmtime())
    dated = await (await client.get(f"/console/{CLOUD}/find", params={"deleted_from": today, "deleted_to": today})).text()
    assert "folder/cat" in dated
    wildcard = await (await client.get(f"/console/{CLOUD}/find", params={"q": "%"})).text()
    assert "folder/cat" not in wildcard  # LIKE metacharacters match literally
    restored = await client.post(f"/console/{CLOUD}/assets/{asset['asset_id']}/restore", data={"csrf_token": csrf})
    assert restored.status == 200 and 'id="asset-state">live' in await restored.text()
    listed = await api.admin("GET", "resources/image/upload", params={"prefix": "folder/cat"})
    assert [r["public_id"] for r in listed["resources"]] == ["folder/cat"]
    assert ("staff:gus@example.com", "restore", "ok") in await audit_actions(client)


async def test_restore_a_chosen_version(client: TestClient, api: Api) -> None:
    await add_staff(client, "hal@example.com", "restorer")
    first = await api.upload(png(colour="red"), public_id="pic", filename="pic.png")
    second = await api.upload(png(20, 10, "blue"), public_id="pic", filename="pic.png")
    csrf = await sign_in(client, "hal@example.com")
    response = await client.post(
        f"/console/{CLOUD}/assets/{first['asset_id']}/restore", data={"csrf_token": csrf, "version_id": first["version_id"]}
    )
    assert response.status == 200
    current = await api.admin("GET", "resources/image/upload/pic")
    assert current["bytes"] == first["bytes"] and current["version"] > second["version"]


async def test_irreversible_deletion_needs_admin_and_the_typed_public_id(client: TestClient, api: Api) -> None:
    await add_staff(client, "ida@example.com", "admin")
    await add_staff(client, "jon@example.com", "restorer")
    first = await api.upload(png(colour="red"), public_id="gone", filename="g.png")
    await api.upload(png(colour="blue"), public_id="gone", filename="g.png")
    url = f"/console/{CLOUD}/assets/{first['asset_id']}/versions/{first['version_id']}/delete"
    csrf = await sign_in(client, "jon@example.com")
    assert (await client.post(url, data={"csrf_token": csrf, "confirm": "gone"})).status == 403
    client.session.cookie_jar.clear()
    csrf = await sign_in(client, "ida@example.com")
    assert "Type the public ID" in await (await client.get(url)).text()
    wrong = await client.post(url, data={"csrf_token": csrf, "confirm": "gon"})
    assert wrong.status == 400
    versions = (await api.admin("GET", f"resources/{first['asset_id']}", params={"versions": "true"}))["versions"]
    assert len(versions) == 2
    done = await client.post(url, data={"csrf_token": csrf, "confirm": "gone"})
    assert done.status == 200 and "Version deleted." in await done.text()
    versions = (await api.admin("GET", f"resources/{first['asset_id']}", params={"versions": "true"}))["versions"]
    assert [v["version_id"] for v in versions] != [] and first["version_id"] not in [v["version_id"] for v in versions]
    actions = await audit_actions(client)
    assert ("staff:ida@example.com", "delete_version", "refused") in actions
    assert ("staff:ida@example.com", "delete_version", "ok") in actions


async def test_download_goes_through_the_signed_url_as_an_attachment(client: TestClient, api: Api) -> None:
    await add_staff(client, "kim@example.com", "restorer")
    data = png(33, 44, "green")
    first = await api.upload(data, public_id="dl", filename="dl.png")
    await sign_in(client, "kim@example.com")
    hop = await client.get(f"/console/{CLOUD}/assets/{first['asset_id']}/versions/{first['version_id']}/download",
                           allow_redirects=False)
    assert hop.status == 303 and "/download_backup?" in hop.headers["Location"]
    got = await client.get(hop.headers["Location"])
    assert got.status == 200 and await got.read() == data
    assert got.headers["Content-Disposition"].startswith("attachment")


async def test_previews_are_generated_pngs_and_never_the_uploaded_file(client: TestClient, api: Api) -> None:
    await add_staff(client, "lee@example.com", "viewer")
    image = await api.upload(png(800, 600, "navy"), public_id="big", filename="big.png")
    svg = b'<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>'
    vector = await api.upload(svg, public_id="vec", filename="vec.svg")
    await sign_in(client, "lee@example.com")
    got = await client.get(f"/console/{CLOUD}/assets/{image['asset_id']}/versions/{image['version_id']}/preview.png")
    assert got.status == 200 and got.headers["Content-Type"] == "image/png" and got.headers["X-Content-Type-Options"] == "nosniff"
    thumb = Image.open(io.BytesIO(await got.read()))
    assert max(thumb.size) <= 320
    refused = await client.get(f"/console/{CLOUD}/assets/{vector['asset_id']}/versions/{vector['version_id']}/preview.png")
    assert refused.status == 404 and b"<script>" not in await refused.read()
    page = await (await client.get(f"/console/{CLOUD}/assets/{vector['asset_id']}")).text()
    assert "<script" not in page and "preview.png" not in page


async def test_a_decompression_bomb_gets_no_preview(client: TestClient, api: Api) -> None:
    await add_staff(client, "max@example.com", "viewer")
    out = io.BytesIO()
    Image.new("1", (10000, 10000)).save(out, "PNG")  # 100 megapixels in a few KB
    bomb = await api.upload(out.getvalue(), public_id="bomb", filename="bomb.png")
    await sign_in(client, "max@example.com")
    got = await client.get(f"/console/{CLOUD}/assets/{bomb['asset_id']}/versions/{bomb['version_id']}/preview.png")
    assert got.status == 404 and "decompression bomb" in await got.text()


async def test_sessions_expire_when_idle(client: TestClient) -> None:
    await add_staff(client, "ned@example.com", "viewer")
    meta = client.server.app[META]
    member = await meta.get_staff("ned@example.com")
    assert member is not None
    sessions = Sessions(meta, idle=0.2, absolute=60)
    cookie, _ = await sessions.start(member, "127.0.0.1")
    assert await sessions.resolve(cookie) is not None
    await asyncio.sleep(0.3)
    assert await sessions.resolve(cookie) is None
    absolute = Sessions(meta, idle=60, absolute=0.2)
    cookie, _ = await absolute.start(member, "127.0.0.1")
    await asyncio.sleep(0.3)
    assert await absolute.resolve(cookie) is None


async def test_api_actions_are_audited_and_readable_over_the_api(client: TestClient, api: Api) -> None:
    first = await api.upload(png(), public_id="apicat", filename="a.png")
    await api.admin("DELETE", "resources/image/upload", params={"public_ids[]": "apicat"})
    await api.admin("POST", "resources/image/upload/restore", data={"public_ids[]": "apicat"})
    await api.signed("image/destroy", public_id="apicat")
    await api.admin("PUT", "versionstore/settings", data={"auto_backup": "false"})
    body = await api.admin("GET", "versionstore/audit")
    got = [(r["action"], r["actor"], r["outcome"]) for r in body["records"]]
    actor = "api_key:key123"
    assert got == [("settings", actor, "ok"), ("delete", actor, "ok"), ("restore", actor, "ok"), ("delete", actor, "ok")]
    assert body["records"][2]["target"].startswith(first["asset_id"])
    page = await api.admin("GET", "versionstore/audit", params={"max_results": "2"})
    assert len(page["records"]) == 2 and page["next_cursor"] == page["records"][-1]["seq"]
    rest = await api.admin("GET", "versionstore/audit", params={"next_cursor": str(page["next_cursor"])})
    assert [r["seq"] for r in rest["records"]] == [2, 1]
    assert (await client.get(f"/v1_1/{CLOUD}/versionstore/audit")).status == 401
    assert (await client.get(f"/v1_1/{CLOUD}/versionstore/audit", headers=BASIC_HEADERS)).status == 200


async def _tamper(meta: Any, sql: str) -> None:
    """Edit the log behind the store's back (what an attacker with database access does)."""
    async with meta.transaction() as db:
        await db.execute(sql)


async def test_concurrent_audit_writers_keep_one_chain_and_verify_finds_tampering(client: TestClient) -> None:
    meta = client.server.app[META]
    log = AuditLog(meta)
    await asyncio.gather(*(log.record("cli", "test", target=str(n)) for n in range(40)))
    report = await log.verify()
    assert report.records == 40 and report.problems == []
    await _tamper(meta, "UPDATE audit_log SET outcome = 'failed' WHERE seq = 7")
    assert (await log.verify()).problems == ["record 7: contents do not match its hash (edited)"]
    await _tamper(meta, "UPDATE audit_log SET outcome = 'ok' WHERE seq = 7")
    await _tamper(meta, "DELETE FROM audit_log WHERE seq = 12")
    problems = (await log.verify()).problems
    assert problems[0] == "record 12 missing (removed)" and "record 13: prev_hash" in problems[1]
    await _tamper(meta, "DELETE FROM audit_log WHERE seq >= 12")
    assert "log ends at record 11" in (await log.verify()).problems[0]  # the newest records removed


async def test_bulk_restore_of_selected_results_runs_as_a_job(client: TestClient, api: Api) -> None:
    await add_staff(client, "ola@example.com", "restorer")
    first = await deleted_asset(api, "bulk/one")
    second = await deleted_asset(api, "bulk/two")
    csrf = await sign_in(client, "ola@example.com")
    results = await (await client.get(f"/console/{CLOUD}/find", params={"prefix": "bulk/"})).text()
    assert results.count('name="asset_id"') == 2
    started = await client.post(
        f"/console/{CLOUD}/bulk-restore", data=[("csrf_token", csrf), ("asset_id", first["asset_id"]), ("asset_id", second["asset_id"])],
        allow_redirects=False,
    )
    assert started.status == 303
    job_id = started.headers["Location"].rsplit("job=", 1)[1]
    meta = client.server.app[META]
    for _ in range(200):
        job = await meta.get_job(CLOUD, job_id)
        if job is not None and not job.open:
            break
        await asyncio.sleep(0.05)
    assert job is not None and job.status == "completed" and job.progress["restored"] == 2
    listed = await api.admin("GET", "resources/image/upload", params={"prefix": "bulk/"})
    assert sorted(r["public_id"] for r in listed["resources"]) == ["bulk/one", "bulk/two"]
    operations = await (await client.get(f"/console/{CLOUD}/operations", params={"job": job_id})).text()
    assert f"job-{job_id}" in operations and "bulk_restore" in operations
    actions = await audit_actions(client)
    assert actions.count(("staff:ola@example.com", "restore", "ok")) == 2
    viewer_form = await client.post(f"/console/{CLOUD}/bulk-restore", data={"asset_id": first["asset_id"]}, allow_redirects=False)
    assert viewer_form.status == 403  # no CSRF token


async def test_two_image_versions_side_by_side(client: TestClient, api: Api) -> None:
    await add_staff(client, "pat@example.com", "viewer")
    first = await api.upload(png(colour="red"), public_id="pair", filename="p.png")
    second = await api.upload(png(50, 50, "blue"), public_id="pair", filename="p.png")
    await sign_in(client, "pat@example.com")
    asset_page = await (await client.get(f"/console/{CLOUD}/assets/{first['asset_id']}")).text()
    assert "Compare two versions" in asset_page
    page = await client.get(f"/console/{CLOUD}/assets/{first['asset_id']}/compare",
                            params={"left": first["version_id"], "right": second["version_id"]})
    text = await page.text()
    assert page.status == 200 and text.count("preview.png") == 2 and "50 x 50" in text
    assert (await client.get(f"/console/{CLOUD}/assets/{first['asset_id']}/compare", params={"left": first["version_id"]})).status == 400


async def test_operations_show_snapshots_and_point_in_time_restores(client: TestClient, api: Api) -> None:
    await add_staff(client, "vic@example.com", "viewer")
    await deleted_asset(api, "ops/one")
    snapshot = await api.admin("POST", "versionstore/snapshots", json={"note": "before the import"})
    restore = await api.admin("POST", "versionstore/point_in_time_restore", json={"at": time.time(), "prefix": "ops/"})
    await sign_in(client, "vic@example.com")
    operations = await (await client.get(f"/console/{CLOUD}/operations")).text()
    assert f"snapshot-{snapshot['id']}" in operations and "before the import" in operations
    assert f"job-{restore['id']}" in operations and "point_in_time_restore" in operations
