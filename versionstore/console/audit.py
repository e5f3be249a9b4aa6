"""The audit log: who did what, when, from where, with which outcome. Append-only and
hash-chained: each record's hash covers its fields and the previous record's hash, and the
chain's head is kept beside it, so `verify` finds any edited, removed or reordered record.

Someone who can write the database can still rewrite the whole chain from some point on;
export the head hash (`versionstore audit verify` prints it) somewhere else to anchor it.
"""

import hashlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from typing import Any

from versionstore.console.records import AuditRecord
from versionstore.metadata import AUDIT_GENESIS
from versionstore.repository import MetadataRepository

PAGE = 500


def seal(record: AuditRecord) -> str:
    """The SHA-256 of a record's fields (its own hash aside), prev_hash included."""
    fields = asdict(record)
    fields.pop("hash")
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass
class VerifyReport:
    records: int
    head: str
    problems: list[str]


class AuditLog:
    def __init__(self, meta: MetadataRepository) -> None:
        self.meta = meta

    async def record(
        self, actor: str, action: str, *, cloud: str | None = None, target: str | None = None, outcome: str = "ok",
        address: str | None = None, detail: dict[str, Any] | None = None,
    ) -> AuditRecord:
        # The detail goes through JSON once here, so the hash is computed on what is stored.
        stored_detail = json.loads(json.dumps(detail or {}, sort_keys=True, default=str))
        record = AuditRecord(0, time.time(), actor, cloud, action, target, stored_detail, address, outcome)
        return await self.meta.append_audit(record, seal)

    async def records(self, **filters: str) -> AsyncIterator[AuditRecord]:
        """Every record in order (filtered by whole columns), read in pages."""
        after = 0
        while True:
            page = await self.meta.audit_records(after, PAGE, filters=filters)
            for record in page:
                yield record
            if len(page) < PAGE:
                return
            after = page[-1].seq

    async def verify(self) -> VerifyReport:
        """Walk the chain: numbering without gaps, each prev_hash the previous hash, each hash
        recomputed, the last record the recorded head."""
        problems: list[str] = []
        expected_seq, prev_hash, count = 1, AUDIT_GENESIS, 0
        async for record in self.records():
            count += 1
            if record.seq != expected_seq:
                problems.append(f"record {expected_seq}" + (f"..{record.seq - 1}" if record.seq - 1 > expected_seq else "")
                                + " missing (removed)")
            if record.prev_hash != prev_hash:
                problems.append(f"record {record.seq}: prev_hash does not match the record before it")
            if seal(record) != record.hash:
                problems.append(f"record {record.seq}: contents do not match its hash (edited)")
            expected_seq, prev_hash = record.seq + 1, record.hash
        head = await self.meta.audit_head()
        if head is None and count:
            problems.append("the chain head is missing")
        elif head is not None and (head[0] != expected_seq - 1 or head[1] != prev_hash):
            problems.append(f"the chain head names record {head[0]} but the log ends at record {expected_seq - 1} "
                            "(newest records removed, or the head edited)")
        return VerifyReport(count, prev_hash, problems)


def as_json(record: AuditRecord) -> dict[str, Any]:
    return asdict(record)
