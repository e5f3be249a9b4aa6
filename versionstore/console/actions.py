"""What staff do to assets, through the domain (VersionService) and nothing else: each
action checks the member's role and environment, and is audited whatever its outcome."""

from dataclasses import dataclass

from versionstore import protection, verify
from versionstore.console.audit import AuditLog
from versionstore.console.records import StaffMember
from versionstore.errors import BadRequest, Forbidden, NotFound
from versionstore.models import Asset, Version
from versionstore.service import DeleteVersionsOutcome, RestoreOutcome, VersionService


@dataclass
class VersionRow:
    """One line of an asset's timeline."""

    version: Version
    current: bool
    restorable: bool
    why_not: str | None
    last_verified_at: float | None


def actor(member: StaffMember) -> str:
    return f"staff:{member.email}"


def require(member: StaffMember, cloud: str, role: str) -> None:
    if not member.may_see(cloud):
        raise Forbidden(f"{member.email} has no access to {cloud}")
    if not member.may(role):
        raise Forbidden(f"This needs the {role} role")


class ConsoleActions:
    def __init__(self, service: VersionService, audit: AuditLog) -> None:
        self.service = service
        self.meta = service.meta
        self.audit = audit

    async def asset(self, member: StaffMember, cloud: str, asset_id: str) -> Asset:
        require(member, cloud, "viewer")
        asset = await self.meta.get_asset_by_id(cloud, asset_id)
        if asset is None:
            raise NotFound(f"No asset {asset_id}")
        return asset

    async def timeline(self, asset: Asset) -> list[VersionRow]:
        """Newest first, with whether each version can be restored now and why not."""
        versions = await self.meta.versions(asset.pk or 0)
        digests = [v.digest for v in versions if v.backed_up]
        pending = await self.meta.pending_digests(asset.cloud, digests)
        bad = await self.meta.bad_revisions(asset.cloud, digests)
        rows = []
        for v in reversed(versions):
            why = ("not backed up" if not v.backed_up else "backup pending" if v.digest in pending
                   else f"backup copy {bad[v.digest]}" if v.digest in bad else None)
            checked = await self.meta.last_verified_at(asset.cloud, v.digest, verify.BACKUP) if v.backed_up else None
            rows.append(VersionRow(v, asset.live and v.version_id == asset.version_id, why is None, why, checked))
        return rows

    async def restore(self, member: StaffMember, asset: Asset, version_id: str | None, address: str | None) -> RestoreOutcome:
        require(member, asset.cloud, "restorer")
        outcome = await self.service.restore(asset, version_id)
        detail: dict[str, object] = {"version_id": version_id, "via": "console"}
        if outcome.error is not None:
            detail["error"] = outcome.error.message
        if outcome.asset is not None:
            detail["new_version_id"] = outcome.asset.version_id
        await self.audit.record(
            actor(member), "restore", cloud=asset.cloud, target=f"{asset.asset_id} {asset.public_id}", address=address,
            outcome="ok" if outcome.asset else "failed", detail=detail,
        )
        return outcome

    async def delete_version(
        self, member: StaffMember, asset: Asset, version_id: str, typed_public_id: str, address: str | None
    ) -> DeleteVersionsOutcome:
        """Irreversible; admin only, and only when the public ID was typed back exactly."""
        require(member, asset.cloud, "admin")
        if typed_public_id != asset.public_id:
            await self.audit.record(actor(member), "delete_version", cloud=asset.cloud, target=f"{asset.asset_id} {asset.public_id}",
                                    address=address, outcome="refused", detail={"version_id": version_id, "why": "confirmation mismatch"})
            raise BadRequest("Type the public ID exactly to confirm the irreversible deletion")
        outcome = await self.service.delete_versions(asset.cloud, asset.asset_id, [version_id], actor=actor(member))
        await self.audit.record(
            actor(member), "delete_version", cloud=asset.cloud, target=f"{asset.asset_id} {asset.public_id}", address=address,
            outcome="ok" if outcome.deleted else "failed",
            detail={"version_id": version_id, "via": "console", "failures": outcome.failures},
        )
        await protection.record_scheduled(self.audit, actor(member), outcome.scheduled_purge, address, "console")
        return outcome
