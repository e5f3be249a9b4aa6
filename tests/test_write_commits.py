"""Commits of a write (issue 10: the upload row). Each metadata commit is a synchronous fsync
on SQLite (and a round trip plus a WAL flush on PostgreSQL), so a write commits no more often
than its crash rules need: an overwrite journals its blob writes and the original it replaces
in one transaction, and a crash after its commit still leaves that original to orphan
collection."""

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import blake3
import pytest
from aiohttp.test_utils import TestClient

from tests.conftest import CLOUD, Api, upload_form
from versionstore import layout
from versionstore.config import Config
from versionstore.http.keys import META, SERVICE


def _original(config: Config, data: bytes) -> Path:
    return config.data_dir / "primary" / layout.original_key(CLOUD, blake3.blake3(data).hexdigest())


class Commits:
    """Counts the store's write transactions."""

    def __init__(self, meta: Any) -> None:
        self.count = 0
        opened: Callable[[], AbstractAsyncContextManager[Any]] = meta.transaction

        @asynccontextmanager
        async def counted() -> AsyncIterator[Any]:
            self.count += 1
            async with opened() as db:
                yield db

        meta.transaction = counted


async def test_an_overwrite_journals_its_write_and_the_replaced_original_in_one_commit(api: Api, client: TestClient) -> None:
    await api.upload(b"first bytes", public_id="w/a")
    commits = Commits(client.app[META])
    await api.upload(b"second bytes", public_id="w/a")
    # the journal (write rows and the replaced original's release row), the version, then the
    # release: the deletion claim taken and dropped, the release row removed
    assert commits.count == 5
    rows = await client.app[META]._all("SELECT role FROM inflight_writes")
    assert rows == []


async def test_an_overwrite_cut_off_after_its_commit_leaves_the_replaced_original_to_orphan_collection(
    api: Api, client: TestClient, config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The process stops between the commit and the release of the original it replaced: the
    release row journaled with the write names it, so orphan collection removes it."""
    await api.upload(b"old original", public_id="w/b", backup="0")
    service = client.app[SERVICE]

    async def crashed(cloud: str, digest: str) -> None:
        raise RuntimeError("stopped before the release")

    monkeypatch.setattr(service, "_release_primary", crashed)
    response = await client.post(f"/v1_1/{CLOUD}/image/upload", data=upload_form(b"new original", public_id="w/b", backup="0"))
    assert response.status == 500
    monkeypatch.undo()
    current = await client.app[META].get_asset(CLOUD, "image", "upload", "w/b")
    assert current is not None and current.digest == blake3.blake3(b"new original").hexdigest()  # committed
    assert _original(config, b"old original").exists()
    roles = await client.app[META]._all("SELECT role, digest, lease_until FROM inflight_writes")
    assert roles == [("release", blake3.blake3(b"old original").hexdigest(), 0)]
    await service.collect_expired_writes()
    assert not _original(config, b"old original").exists()
    assert _original(config, b"new original").exists()
    assert await client.app[META]._all("SELECT role FROM inflight_writes") == []
