"""Finding assets for the console: deleted ones above all.

One thin function over the metadata store's listing (`find_assets`), so when that listing
changes (index-backed keyset cursors) only this module follows.
"""

from dataclasses import dataclass
from typing import Any

from versionstore import queries
from versionstore.errors import BadRequest
from versionstore.metadata import MetadataStore, like_escape
from versionstore.models import Asset

PAGE_SIZE = 24
STATUSES = {"deleted": "status = 'deleted'", "live": "status = 'live'", "all": "1 = 1"}
RESOURCE_TYPES = ("image", "video", "raw")


@dataclass
class FindQuery:
    text: str = ""  # a fragment of the public ID
    prefix: str = ""  # the start of the public ID (a folder)
    tag: str = ""
    resource_type: str = ""
    status: str = "deleted"
    deleted_from: float | None = None
    deleted_to: float | None = None
    uploaded_from: float | None = None
    uploaded_to: float | None = None
    page: int = 0


@dataclass
class FoundPage:
    assets: list[Asset]
    has_more: bool


def _clauses(query: FindQuery) -> tuple[list[str], list[Any]]:
    if query.status not in STATUSES:
        raise BadRequest(f"status must be one of {', '.join(STATUSES)}")
    clauses: list[str] = [STATUSES[query.status]]
    args: list[Any] = []
    name = "COALESCE(detached_from, public_id)"
    if query.text:
        clauses.append(f"{name} LIKE ? ESCAPE '\\'")
        args.append(f"%{like_escape(query.text)}%")
    if query.prefix:
        clauses.append(f"substr({name}, 1, ?) = ?")
        args += [len(query.prefix), query.prefix]
    if query.tag:
        if '"' in query.tag:
            raise BadRequest("a tag cannot contain a double quote")
        tag_clauses, tag_args, _ = queries.parse_expression(f'tags="{query.tag}"')  # the search API's own tag match
        clauses += tag_clauses
        args += tag_args
    if query.resource_type:
        if query.resource_type not in RESOURCE_TYPES:
            raise BadRequest(f"resource type must be one of {', '.join(RESOURCE_TYPES)}")
        clauses.append("resource_type = ?")
        args.append(query.resource_type)
    for column, low, high in (("deleted_at", query.deleted_from, query.deleted_to),
                              ("uploaded_at", query.uploaded_from, query.uploaded_to)):
        if low is not None:
            clauses.append(f"{column} >= ?")
            args.append(low)
        if high is not None:
            clauses.append(f"{column} < ?")
            args.append(high)
    return clauses, args


async def find(meta: MetadataStore, cloud: str, query: FindQuery) -> FoundPage:
    """One page, newest first: by deletion time for deleted assets, else by upload time."""
    clauses, args = _clauses(query)
    order = "deleted_at DESC, pk DESC" if query.status == "deleted" else "uploaded_at DESC, pk DESC"
    offset = max(0, min(query.page, queries.MAX_OFFSET // PAGE_SIZE)) * PAGE_SIZE
    found = await meta.find_assets(cloud, " AND ".join(clauses), args, order, PAGE_SIZE + 1, offset)
    return FoundPage(found[:PAGE_SIZE], len(found) > PAGE_SIZE)
