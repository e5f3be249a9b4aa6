"""Compatibility details checked in-process (the SDK-level checks are in tests/e2e/test_compat.py):
the etag of versions stored before MD5 was kept, the hashes of a spool file and of an
assembled chunk file, the rate-limit window, and stored data left alone by refused metadata."""

import hashlib
import secrets
import sqlite3
from pathlib import Path

import blake3
import pytest

from tests.conftest import Api
from versionstore.config import Config
from versionstore.errors import RateLimited
from versionstore.http.ratelimit import AdminRateLimit
from versionstore.spool import SpoolFile


@pytest.mark.parametrize("metadata_url", [None])  # writes pre-migration rows into the SQLite file directly
async def test_a_version_stored_before_md5_keeps_its_blake3_etag(api: Api, config: Config) -> None:
    old, new = b"stored before migration 6", b"stored after"
    first = await api.upload(old, rt="raw", public_id="legacy/a")
    with sqlite3.connect(config.db_path) as db:  # what a pre-migration row looks like
        db.execute("UPDATE versions SET md5 = NULL")
        db.execute("UPDATE assets SET md5 = NULL")
    legacy = await api.admin("GET", "resources/raw/upload/legacy/a")
    assert legacy["etag"] == blake3.blake3(old).hexdigest()[:32]
    assert legacy["blake3"] == blake3.blake3(old).hexdigest()
    await api.upload(new, rt="raw", public_id="legacy/a")
    assert (await api.admin("GET", "resources/raw/upload/legacy/a"))["etag"] == hashlib.md5(new).hexdigest()
    # Restoring the old version brings back the etag it always had.
    await api.admin("POST", "resources/raw/upload/restore", json={"public_ids": ["legacy/a"], "versions": [first["version_id"]]})
    assert (await api.admin("GET", "resources/raw/upload/legacy/a"))["etag"] == blake3.blake3(old).hexdigest()[:32]


async def test_a_spool_file_hashes_blake3_and_md5_in_one_pass(tmp_path: Path) -> None:
    data = secrets.token_bytes(3 * 1024 * 1024 + 17)
    spool = SpoolFile(tmp_path, limit=len(data))
    for start in range(0, len(data), 65536):  # many small writes, several 1 MiB flushes
        await spool.write(data[start : start + 65536])
    spooled = await spool.finish()
    assert spooled.digest == blake3.blake3(data).hexdigest()
    assert spooled.md5 == hashlib.md5(data).hexdigest()
    assert spooled.path.read_bytes() == data
    assert spooled.head == data[:64]


def test_the_rate_limit_counts_per_environment_per_clock_hour() -> None:
    now = [7200.0 + 10]
    limit = AdminRateLimit(2, clock=lambda: now[0])
    assert limit.hit("a")["X-FeatureRateLimit-Remaining"] == "1"
    assert limit.hit("b")["X-FeatureRateLimit-Remaining"] == "1"  # another environment
    headers = limit.hit("a")
    assert headers["X-FeatureRateLimit-Remaining"] == "0"
    assert headers["X-FeatureRateLimit-Reset"] == "Thu, 01 Jan 1970 03:00:00 GMT"
    with pytest.raises(RateLimited) as refused:
        limit.hit("a")
    assert refused.value.status == 420
    now[0] = 10800.0  # the next hour
    headers = limit.hit("a")
    assert headers["X-FeatureRateLimit-Remaining"] == "1"
    assert headers["X-FeatureRateLimit-Reset"] == "Thu, 01 Jan 1970 04:00:00 GMT"  # made once an hour, never stale
    limit.limit = 5
    assert limit.hit("a")["X-FeatureRateLimit-Limit"] == "5"
    assert limit.used("a") == 2
    off = AdminRateLimit(0, clock=lambda: now[0])
    assert off.hit("a") == {} and off.used("a") == 1


async def test_refused_metadata_leaves_the_asset_alone(api: Api) -> None:
    await api.admin("POST", "metadata_fields", json={"type": "integer", "external_id": "n", "label": "N"})
    await api.upload(b"x", rt="raw", public_id="md/a", metadata="n=1")
    body = await api.admin("POST", "resources/raw/upload/md/a", expect=400, json={"metadata": "n=one"})
    assert "not an integer" in body["error"]["message"]
    await api.signed("raw/metadata", expect=400, metadata="other=1", public_ids=["md/a"])
    await api.upload(b"y", rt="raw", public_id="md/a", metadata="n=x", expect=400)
    after = await api.admin("GET", "resources/raw/upload/md/a", params={"versions": "true"})
    assert after["metadata"] == {"n": "1"} and len(after["versions"]) == 1


@pytest.mark.parametrize(
    "definition",
    [
        {"type": "string", "validation": {"type": "strlen", "min": "abc"}, "default_value": "hi"},
        {"type": "string", "validation": {"type": "greater_than", "value": 5}, "default_value": "hi"},
        {"type": "integer", "validation": {"type": "less_than", "value": "z"}, "default_value": "3"},
        {"type": "integer", "validation": {"type": "less_than"}},
        {"type": "date", "validation": {"type": "greater_than", "value": "yesterday"}},
        {"type": "integer", "validation": {"type": "and", "rules": [{"type": "strlen", "max": 2}]}},
    ],
)
async def test_a_validation_rule_that_could_not_be_applied_is_refused(api: Api, definition: dict[str, object]) -> None:
    """Rules are checked against the field's type when defined, so no later upload trips on one."""
    body = await api.admin("POST", "metadata_fields", expect=400, json={**definition, "external_id": "v", "label": "V"})
    assert body["error"]["message"]
    await api.admin("GET", "metadata_fields/v", expect=404)


async def test_typed_validation_rules_apply(api: Api) -> None:
    await api.admin("POST", "metadata_fields", json={
        "type": "integer", "external_id": "n", "label": "N",
        "validation": {"type": "and", "rules": [{"type": "greater_than", "value": "1"}, {"type": "less_than", "value": 9, "equals": True}]},
    })
    await api.admin("POST", "metadata_fields", json={"type": "date", "external_id": "d", "label": "D",
                                                     "validation": {"type": "greater_than", "value": "2020-01-01"}})
    await api.upload(b"ok", rt="raw", public_id="md/v", metadata="n=9|d=2021-05-01")
    for bad in ("n=1", "n=10", "d=2019-12-31"):
        await api.upload(b"no", rt="raw", public_id="md/v", metadata=bad, expect=400)
