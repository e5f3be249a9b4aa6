"""Finding assets for the console: deleted ones above all.

One thin function over the metadata store's listing: the filters become a
`queries.AssetQuery`, so the console's pages are the same index ranges with keyset cursors
as the Admin API's (a page does not shift when assets are deleted or restored meanwhile).
A public ID fragment (`text`) is the one filter no index serves: it narrows the walk of
the sort index, which stops as soon as a page is full.
"""

from dataclasses import dataclass

from versionstore import queries
from versionstore.errors import BadRequest
from versionstore.models import Asset
from versionstore.queries import AssetQuery, Filter, SortKey
from versionstore.repository import MetadataRepository

PAGE_SIZE = 24
STATUSES = {"deleted": ("deleted",), "live": ("live",), "all": ("live", "deleted")}
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
    after: str = ""  # the cursor of the page before (empty: the first page)


@dataclass
class FoundPage:
    assets: list[Asset]
    next_cursor: str | None


def asset_query(query: FindQuery) -> AssetQuery:
    """Newest first: by deletion time for deleted assets, else by upload time."""
    if query.status not in STATUSES:
        raise BadRequest(f"status must be one of {', '.join(STATUSES)}")
    statuses = STATUSES[query.status]
    filters = [Filter("status", "=", statuses[0]) if len(statuses) == 1 else Filter("status", "in", statuses)]
    if query.text:
        filters.append(Filter("public_id", "contains", query.text))
    if query.prefix:
        filters.append(Filter("public_id", "prefix", query.prefix))
    if query.tag:
        filters.append(Filter("tag", "=", query.tag))
    if query.resource_type:
        if query.resource_type not in RESOURCE_TYPES:
            raise BadRequest(f"resource type must be one of {', '.join(RESOURCE_TYPES)}")
        filters.append(Filter("resource_type", "=", query.resource_type))
    for column, low, high in (("deleted_at", query.deleted_from, query.deleted_to),
                              ("uploaded_at", query.uploaded_from, query.uploaded_to)):
        if low is not None:
            filters.append(Filter(column, ">=", low))
        if high is not None:
            filters.append(Filter(column, "<", high))
    column = "deleted_at" if query.status == "deleted" else "uploaded_at"
    return AssetQuery(tuple(filters), (SortKey(column, True), SortKey("pk", True)), PAGE_SIZE + 1)


async def find(meta: MetadataRepository, cloud: str, query: FindQuery) -> FoundPage:
    base = asset_query(query)
    page = base.page(PAGE_SIZE + 1, queries.decode_keyset(base, query.after))
    found = await meta.find_assets(cloud, page)
    more = len(found) > PAGE_SIZE
    next_cursor = queries.encode_keyset(base, queries.sort_values(base, found[PAGE_SIZE - 1])) if more else None
    return FoundPage(found[:PAGE_SIZE], next_cursor)
