"""The composition root (`bootstrap.open_service`): what every process, server or CLI, opens."""

import argparse
import asyncio
import time

from tests.conftest import API_KEY, API_SECRET, CLOUD
from versionstore import bootstrap, snapshot_cli
from versionstore.claims import REVISION
from versionstore.config import Config
from versionstore.metadata import MetadataStore

LEASE = 0.6


def test_a_cli_run_that_outlives_its_lease_keeps_its_claims(config: Config, monkeypatch, capsys) -> None:
    """The snapshot, retention and restore commands write (deletions journal their releases
    and hold deletion claims): their claims follow VERSIONSTORE_LEASE_SECONDS and the heartbeat
    renews them for the whole run, however long, so no other process takes them over."""
    monkeypatch.setenv("VERSIONSTORE_LEASE_SECONDS", str(LEASE))
    digest = "ab" * 32

    async def prepare() -> None:
        config.data_dir.mkdir(parents=True, exist_ok=True)
        meta = await bootstrap.open_metadata(config)
        await meta.create_cloud(CLOUD, API_KEY, API_SECRET, auto_backup=True)
        await meta.close()

    left: list[float] = []

    async def long_action(snapshots: snapshot_cli.Service, args: argparse.Namespace) -> dict[str, str]:
        claims = snapshots.service.claims
        observer = await MetadataStore.open(config.metadata_location)  # another process's view
        try:
            async with claims.deleting(CLOUD, digest, REVISION):
                for _ in range(7):  # 2.1 s: three and a half leases
                    await asyncio.sleep(LEASE / 2)
                    assert await observer.deletion_claimed(CLOUD, digest, time.time())
                    rows = await observer._all("SELECT lease_until FROM blob_deletions WHERE owner = ?", (claims.owner,))
                    left.append(rows[0][0] - time.time())
        finally:
            await observer.close()
        return {"held": digest}

    asyncio.run(prepare())
    args = argparse.Namespace(data_dir=config.data_dir, metadata=config.metadata_url, cloud=CLOUD)
    assert snapshot_cli._run(long_action)(args) == 0
    assert digest in capsys.readouterr().out
    assert len(left) == 7
    assert all(0 < remaining <= LEASE + 0.1 for remaining in left), left  # the configured lease, renewed
