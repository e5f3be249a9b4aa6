"""What an append-only API key may do, route by route (docs/api.md has this table in prose).

The key can upload, restore, list and download; anything that deletes or replaces history
is refused with 403. Every route in routes.ROUTES must be listed here for each of its
methods (tests/test_protection.py walks the table), and a route missing from it is refused:
a new route cannot silently let the key delete.

ALLOW: always. REFUSE: always 403. CHECK: the handler decides on the parameters (an upload
that would replace a current version nobody backed up, a rename with overwrite, a
point-in-time restore that deletes or overwrites unbacked assets).
"""

from aiohttp import web

from versionstore.errors import AppendOnlyRefused

ALLOW, REFUSE, CHECK = "allow", "refuse", "check"

#: Request key: the route's policy, set by the dispatcher before any handler runs.
POLICY = web.RequestKey("append_only_policy", str)
#: Request key: set once the request proved the append-only key (not the main one).
USED = web.RequestKey("append_only_key", bool)

POLICIES: dict[str, str] = {
    "GET ping": ALLOW,
    "POST {rt}/upload": CHECK,
    "POST {rt}/destroy": REFUSE,
    "POST {rt}/rename": CHECK,
    "POST {rt}/explicit": ALLOW,
    "POST {rt}/tags": ALLOW,
    "POST {rt}/context": ALLOW,
    "POST {rt}/metadata": ALLOW,
    "GET download_backup": ALLOW,
    "GET resources/search": ALLOW,
    "POST resources/search": ALLOW,
    "GET resources": ALLOW,
    "GET resources/{rt}/tags/{tag}": ALLOW,
    "GET resources/{rt}/context": ALLOW,
    "GET tags/{rt}": ALLOW,
    "GET usage": ALLOW,
    "GET usage/{date}": ALLOW,
    "GET config": ALLOW,
    "GET metadata_fields": ALLOW,
    "POST metadata_fields": ALLOW,
    "PUT metadata_fields/{field}/datasource": ALLOW,
    "DELETE metadata_fields/{field}/datasource": REFUSE,
    "POST metadata_fields/{field}/datasource_restore": ALLOW,
    "GET metadata_fields/{field}": ALLOW,
    "PUT metadata_fields/{field}": ALLOW,
    "DELETE metadata_fields/{field}": REFUSE,
    "GET resources/by_asset_ids": ALLOW,
    "POST resources/restore": ALLOW,
    "DELETE resources": REFUSE,
    "DELETE resources/backup/{asset_id}": REFUSE,
    "GET resources/{asset_id}": ALLOW,
    "GET resources/{rt}": ALLOW,
    "GET resources/{rt}/{type}": ALLOW,
    "DELETE resources/{rt}/{type}": REFUSE,
    "POST resources/{rt}/{type}/restore": ALLOW,
    "GET resources/{rt}/{type}/{public_id}": ALLOW,
    "POST resources/{rt}/{type}/{public_id}": ALLOW,
    "PUT resources/{rt}/{type}/{public_id}": ALLOW,
    "POST operations/initial_backup": ALLOW,
    "GET operations/initial_backup": ALLOW,
    "GET operations/initial_backup/{job_id}": ALLOW,
    "GET versionstore/settings": ALLOW,
    "PUT versionstore/settings": REFUSE,  # could turn automatic backup off
    "POST versionstore/settings": REFUSE,
    "GET versionstore/backup": ALLOW,
    "PUT versionstore/backup": REFUSE,  # moving or dropping the backup target
    "POST versionstore/backup": REFUSE,
    "DELETE versionstore/backup": REFUSE,
    "GET versionstore/jobs/{job_id}": ALLOW,
    "GET versionstore/audit": ALLOW,
    "GET versionstore/purges": ALLOW,
    "GET versionstore/snapshots": ALLOW,
    "POST versionstore/snapshots": ALLOW,
    "GET versionstore/snapshots/{snapshot_id}": ALLOW,
    "DELETE versionstore/snapshots/{snapshot_id}": REFUSE,
    "GET versionstore/snapshots/{snapshot_id}/items": ALLOW,
    "POST versionstore/snapshots/{snapshot_id}/pin": ALLOW,
    "DELETE versionstore/snapshots/{snapshot_id}/pin": REFUSE,  # lets retention remove it
    "GET versionstore/snapshot_schedule": ALLOW,
    "PUT versionstore/snapshot_schedule": REFUSE,  # a retention policy removes snapshots
    "POST versionstore/snapshot_schedule": REFUSE,
    "DELETE versionstore/snapshot_schedule": REFUSE,
    "GET versionstore/retention/simulate": ALLOW,
    "POST versionstore/point_in_time_restore/preview": ALLOW,
    "POST versionstore/point_in_time_restore": CHECK,
    "GET download_archive": ALLOW,
    "POST versionstore/archives": ALLOW,
    "POST versionstore/archives/import": ALLOW,  # adds versions, as a restore does
    "GET versionstore/archives/{archive_id}": ALLOW,
    "DELETE versionstore/archives/{archive_id}": REFUSE,  # removes a prepared archive
    "GET versionstore/drills": ALLOW,
    "POST versionstore/drills": ALLOW,  # restores into its own scratch environment, then removes that
    "GET versionstore/drills/{drill_id}": ALLOW,
    "GET versionstore/drill_schedule": ALLOW,
    "PUT versionstore/drill_schedule": REFUSE,  # stopping drills hides a damaged backup
    "POST versionstore/drill_schedule": REFUSE,
    "DELETE versionstore/drill_schedule": REFUSE,
    "GET versionstore/alerts": ALLOW,
    "PUT versionstore/alerts": REFUSE,  # redirecting or silencing failure alerts
    "POST versionstore/alerts": REFUSE,
    "DELETE versionstore/alerts": REFUSE,
}

PREFIX = "/v1_1/{cloud_name}/"


def policy(method: str, route: str) -> str:
    """The policy of `method` on a route's canonical path (routes.canonical); REFUSE if unlisted."""
    return POLICIES.get(f"{method} {route.removeprefix(PREFIX)}", REFUSE)


def refused(what: str) -> AppendOnlyRefused:
    return AppendOnlyRefused(f"This API key is append-only: it cannot {what} (use the environment's main key)")


def proved(request: web.Request) -> None:
    """The request authenticated with the append-only key: refuse it here if its route is
    REFUSE (before the handler does anything), else remember it for CHECK handlers."""
    if request.get(POLICY, REFUSE) == REFUSE:
        raise refused(f"{request.method} this path")
    request[USED] = True


def used(request: web.Request) -> bool:
    return bool(request.get(USED, False))


def check(request: web.Request, destructive: bool, what: str) -> None:
    """In a CHECK handler: refuse the append-only key when these parameters would destroy."""
    if destructive and used(request):
        raise refused(what)
