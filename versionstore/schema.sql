-- versionstore metadata schema. Migrations are numbered blocks: "-- migration N" starts one.
-- Applied in order inside one transaction each; PRAGMA user_version records the last one.

-- migration 1
CREATE TABLE clouds (
    name        TEXT PRIMARY KEY,
    api_key     TEXT NOT NULL UNIQUE,
    api_secret  TEXT NOT NULL,
    auto_backup INTEGER NOT NULL DEFAULT 1,
    created_at  REAL NOT NULL
);

CREATE TABLE assets (
    pk                INTEGER PRIMARY KEY,
    cloud             TEXT NOT NULL REFERENCES clouds(name),
    asset_id          TEXT NOT NULL UNIQUE,
    resource_type     TEXT NOT NULL,
    type              TEXT NOT NULL,
    public_id         TEXT NOT NULL,
    status            TEXT NOT NULL CHECK (status IN ('live', 'deleted')),
    digest            TEXT NOT NULL,     -- BLAKE3 of the current (or last) original
    format            TEXT,
    bytes             INTEGER NOT NULL,
    width             INTEGER,
    height            INTEGER,
    version           INTEGER NOT NULL,  -- unix seconds of the current version
    version_id        TEXT NOT NULL,
    original_filename TEXT,
    tags              TEXT NOT NULL DEFAULT '[]',
    context           TEXT NOT NULL DEFAULT '{}',
    metadata          TEXT NOT NULL DEFAULT '{}',
    created_at        REAL NOT NULL,
    uploaded_at       REAL NOT NULL,
    deleted_at        REAL,
    UNIQUE (cloud, resource_type, type, public_id)
);
CREATE INDEX assets_cloud_status ON assets (cloud, status, public_id);

CREATE TABLE versions (
    pk            INTEGER PRIMARY KEY,
    cloud         TEXT NOT NULL,
    asset_pk      INTEGER NOT NULL REFERENCES assets(pk) ON DELETE CASCADE,
    version_id    TEXT NOT NULL UNIQUE,
    version       INTEGER NOT NULL,
    digest        TEXT NOT NULL,
    bytes         INTEGER NOT NULL,
    format        TEXT,
    backed_up     INTEGER NOT NULL,
    restored_from TEXT,
    created_at    REAL NOT NULL
);
CREATE INDEX versions_asset ON versions (asset_pk, version);
CREATE INDEX versions_digest ON versions (cloud, digest);

CREATE TABLE upload_sessions (
    cloud      TEXT NOT NULL,
    upload_id  TEXT NOT NULL,
    total      INTEGER,
    ranges     TEXT NOT NULL DEFAULT '[]',  -- merged [start, end) intervals received so far
    created_at REAL NOT NULL,
    PRIMARY KEY (cloud, upload_id)
);

-- migration 2
-- Backup targets (docs/buckets.md): NULL is the operator's default backup store.
ALTER TABLE clouds ADD COLUMN backup_target TEXT;

-- Revisions acknowledged but not yet in the backup target (marker missing, bucket failing).
-- Their bytes wait in the primary store under <cloud>/pending/; a drainer retries them.
CREATE TABLE backup_pending (
    cloud           TEXT NOT NULL,
    digest          TEXT NOT NULL,
    bytes           INTEGER NOT NULL,
    queued_at       REAL NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    last_error      TEXT,
    PRIMARY KEY (cloud, digest)
);
CREATE INDEX backup_pending_due ON backup_pending (next_attempt_at);

-- Last known state of each environment's backup target, for the API and the CLI.
CREATE TABLE backup_health (
    cloud         TEXT PRIMARY KEY,
    state         TEXT NOT NULL CHECK (state IN ('healthy', 'marker_missing', 'failing')),
    last_error    TEXT,
    last_error_at REAL,
    updated_at    REAL NOT NULL
);

-- Durable jobs (bucket migration, initial backup): resumed from `cursor` after a restart.
CREATE TABLE jobs (
    id               TEXT PRIMARY KEY,
    cloud            TEXT NOT NULL,
    kind             TEXT NOT NULL,
    status           TEXT NOT NULL CHECK (status IN ('pending', 'active', 'completed', 'failed')),
    params           TEXT NOT NULL DEFAULT '{}',
    cursor           TEXT NOT NULL DEFAULT '{}',
    progress         TEXT NOT NULL DEFAULT '{}',
    error            TEXT,
    notification_url TEXT,
    created_at       REAL NOT NULL,
    started_at       REAL,
    completed_at     REAL
);
CREATE INDEX jobs_cloud_kind ON jobs (cloud, kind, created_at);
CREATE INDEX jobs_open ON jobs (status) WHERE status IN ('pending', 'active');

-- migration 3
-- Initial backup (docs/api.md): which job made a version a revision after the fact, so the
-- job's counts are exact across restarts (they are counted, never incremented in memory).
ALTER TABLE versions ADD COLUMN backup_job TEXT;
CREATE INDEX versions_backup_job ON versions (backup_job) WHERE backup_job IS NOT NULL;
-- One open job of a kind per environment (one migration, one initial backup at a time).
CREATE UNIQUE INDEX jobs_one_open ON jobs (cloud, kind) WHERE status IN ('pending', 'active');

-- migration 4
-- Compare-and-set on asset rows (docs/design.md, "Write order"): every write of a row is
-- conditional on the generation it read and bumps it, so a write based on a stale read
-- (an upload committed meanwhile, in this process or another) changes nothing.
ALTER TABLE assets ADD COLUMN generation INTEGER NOT NULL DEFAULT 0;
-- A history detached from its public_id by a rename with overwrite: the row keeps its
-- asset_id and versions, its public_id column holds a name no client can choose (a control
-- character and its asset_id), and the name it had is kept here.
ALTER TABLE assets ADD COLUMN detached_from TEXT;
-- Per-version attributes, so a restore brings back the restored version's own. Rows from
-- before this migration: the current version of each asset takes the asset's values; older
-- ones keep NULL dimensions (a restore reads them from the restored bytes) and the asset's
-- original_filename (what a restore showed before).
ALTER TABLE versions ADD COLUMN width INTEGER;
ALTER TABLE versions ADD COLUMN height INTEGER;
ALTER TABLE versions ADD COLUMN original_filename TEXT;
UPDATE versions SET original_filename = (SELECT a.original_filename FROM assets a WHERE a.pk = versions.asset_pk);
UPDATE versions SET
    width = (SELECT a.width FROM assets a WHERE a.pk = versions.asset_pk AND a.version_id = versions.version_id),
    height = (SELECT a.height FROM assets a WHERE a.pk = versions.asset_pk AND a.version_id = versions.version_id);

-- migration 5
-- Verify and scrub (docs/operations.md): the last check of each revision's bytes in each store
-- it lives in ('backup': the environment's target; 'primary': the original beside it).
-- `outcome_seq` grows whenever an outcome changes, so caches that show `restorable` can key on
-- its maximum, whichever process (the server's job, the CLI) recorded the change.
CREATE TABLE blob_checks (
    cloud            TEXT NOT NULL,
    digest           TEXT NOT NULL,
    store            TEXT NOT NULL CHECK (store IN ('backup', 'primary')),
    outcome          TEXT NOT NULL CHECK (outcome IN ('ok', 'missing', 'corrupt', 'repaired')),
    detail           TEXT,
    last_verified_at REAL NOT NULL,
    outcome_seq      INTEGER NOT NULL,
    PRIMARY KEY (cloud, digest, store)
);
CREATE INDEX blob_checks_seq ON blob_checks (outcome_seq);
CREATE INDEX blob_checks_bad ON blob_checks (cloud, digest) WHERE outcome IN ('missing', 'corrupt');

-- migration 6
-- Cloudinary's etag is the MD5 of the original bytes (docs/design.md): computed in the same
-- pass as BLAKE3 and kept per version, and on the asset for its current version. Rows from
-- before this migration keep NULL (their etag stays the BLAKE3 prefix they always showed).
ALTER TABLE versions ADD COLUMN md5 TEXT;
ALTER TABLE assets ADD COLUMN md5 TEXT;

-- migration 7
-- Chunked uploads (docs/design.md): each chunk is its own read-only part file, recorded here
-- once received and authenticated; the session's state is a condition every write checks, so
-- no chunk joins an upload that is being assembled or is finished. Sessions of the old layout
-- (one shared file written at offsets) cannot be continued: they are dropped, and the sweep
-- removes their files.
DROP TABLE upload_sessions;
CREATE TABLE upload_sessions (
    cloud         TEXT NOT NULL,
    upload_id     TEXT NOT NULL,
    resource_type TEXT NOT NULL,
    public_id     TEXT NOT NULL,
    total         INTEGER,          -- declared size; NULL until a chunk declares it
    claimed       INTEGER NOT NULL, -- bytes counted against the environment's cap
    state         TEXT NOT NULL CHECK (state IN ('open', 'assembling', 'finished')),
    claim         TEXT,             -- the assembling request's token
    created_at    REAL NOT NULL,
    updated_at    REAL NOT NULL,
    PRIMARY KEY (cloud, upload_id)
);
CREATE INDEX upload_sessions_state ON upload_sessions (cloud, state);
CREATE TABLE upload_parts (
    cloud      TEXT NOT NULL,
    upload_id  TEXT NOT NULL,
    first_byte INTEGER NOT NULL,
    end_byte   INTEGER NOT NULL,        -- exclusive
    file       TEXT NOT NULL UNIQUE,    -- name in spool/chunks/
    PRIMARY KEY (cloud, upload_id, first_byte, end_byte),
    FOREIGN KEY (cloud, upload_id) REFERENCES upload_sessions (cloud, upload_id) ON DELETE CASCADE
);

-- migration 8
-- Structured metadata field definitions (Cloudinary's metadata_fields), per environment.
-- `definition` is the field's JSON (type, label, validation, datasource, ...); `position`
-- keeps the creation order the list answers in.
CREATE TABLE metadata_fields (
    cloud       TEXT NOT NULL,
    external_id TEXT NOT NULL,
    definition  TEXT NOT NULL,
    position    INTEGER NOT NULL,
    PRIMARY KEY (cloud, external_id)
);

-- migration 9
-- Request cost independent of library size (docs/performance.md, "Cost and library size").
-- Tags and context entries in side tables written with the asset row (metadata.py), so a tag
-- or context filter is an index range, not a JSON parse per row. `created_at` never changes
-- for an asset; kept beside the tag so a by-tag listing walks one index in its order.
CREATE TABLE asset_tags (
    cloud      TEXT NOT NULL,
    tag        TEXT NOT NULL,
    asset_pk   INTEGER NOT NULL REFERENCES assets(pk) ON DELETE CASCADE,
    created_at REAL NOT NULL,
    PRIMARY KEY (cloud, tag, asset_pk)
);
CREATE INDEX asset_tags_created ON asset_tags (cloud, tag, created_at, asset_pk);
CREATE INDEX asset_tags_asset ON asset_tags (asset_pk);
CREATE TABLE asset_context (
    cloud    TEXT NOT NULL,
    key      TEXT NOT NULL,
    value    TEXT NOT NULL,
    asset_pk INTEGER NOT NULL REFERENCES assets(pk) ON DELETE CASCADE,
    PRIMARY KEY (cloud, key, value, asset_pk)
);
CREATE INDEX asset_context_asset ON asset_context (asset_pk);
-- Rows written before this migration get their side rows at the next start (in batches, from
-- `after_pk`; metadata.py backfill_labels), not here: reading JSON is not portable SQL.
CREATE TABLE label_backfill (after_pk INTEGER NOT NULL);
INSERT INTO label_backfill (after_pk) SELECT 0 WHERE EXISTS (SELECT 1 FROM assets);
-- One index per supported sort (every filter combination starts with cloud and status), the
-- row id last so a keyset position is one index range; public_id as search sees it (a
-- detached history under the name it had).
DROP INDEX assets_cloud_status;
CREATE INDEX assets_pk ON assets (cloud, status, pk);
CREATE INDEX assets_created ON assets (cloud, status, created_at, pk);
CREATE INDEX assets_uploaded ON assets (cloud, status, uploaded_at, pk);
CREATE INDEX assets_bytes ON assets (cloud, status, bytes, pk);
CREATE INDEX assets_deleted ON assets (cloud, status, deleted_at, pk);
CREATE INDEX assets_asset_id ON assets (cloud, status, asset_id, pk);
CREATE INDEX assets_name ON assets (cloud, status, (COALESCE(detached_from, public_id)), pk);
CREATE INDEX assets_listing ON assets (cloud, resource_type, type, status, created_at, pk);
-- "Is this digest still used?" is an index probe, on the write path and at start-up.
CREATE INDEX assets_digest ON assets (cloud, digest, status);
DROP INDEX versions_digest;
CREATE INDEX versions_digest ON versions (cloud, digest, backed_up);
-- migration 10
-- Several processes on one database (docs/design.md, "Processes, claims and leases").
-- A lease is `lease_until` (unix seconds): the owner's heartbeat moves it forward; once it has
-- passed, the owner is presumed dead and its work may be taken over or cleaned up.
--
-- The journal of blob writes in flight: a row is committed BEFORE a blob is written and removed
-- in the transaction that commits the metadata naming it (or expired, lease 0, when the write
-- ends without such a commit). Orphan collection reads only rows whose lease has passed.
CREATE TABLE inflight_writes (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    cloud       TEXT NOT NULL,
    digest      TEXT NOT NULL,
    -- 'release': a reference to the digest is being dropped; if the process dies before it has
    -- released the blobs, orphan collection checks every kind of blob of the digest
    role        TEXT NOT NULL CHECK (role IN ('original', 'revision', 'pending', 'release')),
    target      TEXT,           -- a revision's target (NULL: the default backup store)
    owner       TEXT NOT NULL,  -- the writing process
    started_at  REAL NOT NULL,
    lease_until REAL NOT NULL
);
CREATE INDEX inflight_writes_digest ON inflight_writes (cloud, digest);
CREATE INDEX inflight_writes_lease ON inflight_writes (lease_until);
CREATE INDEX inflight_writes_owner ON inflight_writes (owner);
-- A blob deletion in progress: claimed before the references are checked, released after the
-- blob is gone. A writer that finds a live claim on its digest waits for it.
CREATE TABLE blob_deletions (
    cloud       TEXT NOT NULL,
    digest      TEXT NOT NULL,
    owner       TEXT NOT NULL,
    lease_until REAL NOT NULL,
    PRIMARY KEY (cloud, digest)
);
-- A backup-target switch in progress (a migration's last pass): no revision write starts while
-- it is held, and it waits for those in flight.
CREATE TABLE target_switches (
    cloud       TEXT PRIMARY KEY,
    owner       TEXT NOT NULL,
    lease_until REAL NOT NULL
);
-- Jobs and pending revisions are claimed by one process at a time, with a lease.
ALTER TABLE jobs ADD COLUMN owner TEXT;
ALTER TABLE jobs ADD COLUMN lease_until REAL NOT NULL DEFAULT 0;
ALTER TABLE backup_pending ADD COLUMN owner TEXT;
ALTER TABLE backup_pending ADD COLUMN lease_until REAL NOT NULL DEFAULT 0;
-- Counters that caches in every process key on ('revisions', 'targets:<cloud>'): bumped in the
-- transaction that changes what they stand for, read with one indexed look-up.
CREATE TABLE generations (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
-- migration 11
-- Support console (docs/console.md): staff accounts, their sessions, and the audit log.
-- `clouds` is a JSON list of environment names, or ["*"] for every environment.
CREATE TABLE staff (
    email          TEXT PRIMARY KEY,
    password_hash  TEXT NOT NULL,             -- argon2id (argon2-cffi's encoded form)
    role           TEXT NOT NULL CHECK (role IN ('viewer', 'restorer', 'admin')),
    clouds         TEXT NOT NULL,
    disabled       INTEGER NOT NULL DEFAULT 0,
    failed_logins  INTEGER NOT NULL DEFAULT 0, -- consecutive failures since the last success
    locked_until   REAL,
    created_at     REAL NOT NULL
);
-- A session is stored by the SHA-256 of its cookie value: a copy of the database does not
-- hold usable cookies.
CREATE TABLE console_sessions (
    token_hash   TEXT PRIMARY KEY,
    email        TEXT NOT NULL REFERENCES staff (email) ON DELETE CASCADE,
    csrf_token   TEXT NOT NULL,
    address      TEXT,
    created_at   REAL NOT NULL,
    last_seen_at REAL NOT NULL
);
CREATE INDEX console_sessions_email ON console_sessions (email);
-- Append-only and hash-chained: `seq` has no gaps and `prev_hash` is UNIQUE, so two writers
-- that read the same head cannot both append after it (one fails and retries).
CREATE TABLE audit_log (
    seq        INTEGER PRIMARY KEY,
    at         REAL NOT NULL,
    actor      TEXT NOT NULL,               -- staff:<email> | api_key:<key> | cli
    cloud      TEXT,
    action     TEXT NOT NULL,
    target     TEXT,
    detail     TEXT NOT NULL,               -- JSON object
    address    TEXT,
    outcome    TEXT NOT NULL,
    prev_hash  TEXT NOT NULL UNIQUE,
    hash       TEXT NOT NULL
);
CREATE INDEX audit_log_cloud ON audit_log (cloud, seq);
-- The chain's head, written in the same transaction as each record: removing the newest
-- records (which no later hash covers) is detected too, unless this row is rewritten as well.
CREATE TABLE audit_head (
    id    INTEGER PRIMARY KEY CHECK (id = 1),
    seq   INTEGER NOT NULL,
    hash  TEXT NOT NULL
);
-- migration 12
-- Library snapshots (docs/snapshots.md): a consistent point-in-time list of (asset, version)
-- per environment or prefix. A snapshot copies no bytes: its items name the revision (digest)
-- each asset's current version pointed at, and that reference keeps the revision from being
-- collected (MetadataStore.digest_referenced). `covered` is 0 for an asset whose current
-- version was not backed up: listed, never restorable from the snapshot.
CREATE TABLE snapshots (
    id               TEXT PRIMARY KEY,
    cloud            TEXT NOT NULL,
    type             TEXT NOT NULL CHECK (type IN ('manual', 'scheduled')),
    status           TEXT NOT NULL CHECK (status IN ('queued', 'running', 'completed', 'failed')),
    note             TEXT,
    prefix           TEXT NOT NULL DEFAULT '',
    created_by       TEXT NOT NULL,
    pinned           INTEGER NOT NULL DEFAULT 0,
    asset_count      INTEGER NOT NULL DEFAULT 0,
    uncovered_count  INTEGER NOT NULL DEFAULT 0,
    size_bytes       INTEGER NOT NULL DEFAULT 0,
    changed_at       REAL,            -- an irreversible version deletion removed items
    removed_items    INTEGER NOT NULL DEFAULT 0,
    error            TEXT,
    created_at       REAL NOT NULL,   -- the point in time the items describe
    expires_at       REAL,
    pending_deletion INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX snapshots_cloud ON snapshots (cloud, created_at);

CREATE TABLE snapshot_items (
    snapshot_id   TEXT NOT NULL REFERENCES snapshots(id) ON DELETE CASCADE,
    cloud         TEXT NOT NULL,
    asset_pk      INTEGER NOT NULL,
    asset_id      TEXT NOT NULL,
    resource_type TEXT NOT NULL,
    type          TEXT NOT NULL,
    public_id     TEXT NOT NULL,
    version_id    TEXT NOT NULL,
    digest        TEXT NOT NULL,
    bytes         INTEGER NOT NULL,
    covered       INTEGER NOT NULL,
    PRIMARY KEY (snapshot_id, asset_pk)
);
CREATE INDEX snapshot_items_digest ON snapshot_items (cloud, digest);
-- Irreversible deletion finds the items of an asset's deleted versions through this (integer
-- keys inserted in row order: much cheaper to maintain than an index on random version ids).
CREATE INDEX snapshot_items_asset ON snapshot_items (asset_pk);

-- One schedule and retention policy per environment (JSON documents, retention.py); the
-- scheduler claims a run by moving next_run_at with a compare-and-set.
CREATE TABLE snapshot_schedules (
    cloud       TEXT PRIMARY KEY,
    schedule    TEXT NOT NULL,
    policy      TEXT NOT NULL,
    next_run_at REAL NOT NULL,
    last_run_at REAL
);
-- Walking an environment's assets in row order, a page at a time (point-in-time selections):
-- without it the planner takes a cloud index and sorts every row for each page.
CREATE INDEX assets_cloud_pk ON assets (cloud, pk);

-- migration 13
-- Deletion protection (versionstore/protection.py, docs/design.md). Per environment, set only
-- by the operator's CLI: a purge delay in days (0: off, Cloudinary's semantics) and a second,
-- append-only key pair that may upload, restore, list and download but never delete.
CREATE TABLE cloud_protection (
    cloud            TEXT PRIMARY KEY,
    purge_delay_days INTEGER NOT NULL DEFAULT 0,
    append_key       TEXT UNIQUE,
    append_secret    TEXT
);
-- An irreversible deletion held back: the versions' rows moved here (JSON, with the snapshot
-- items they lost) until an admin undoes it or the purge job makes it final at purge_at.
-- state moves scheduled -> undone | purged, by an UPDATE conditional on 'scheduled'.
CREATE TABLE scheduled_purges (
    id           TEXT PRIMARY KEY,
    cloud        TEXT NOT NULL,
    asset_pk     INTEGER NOT NULL,
    asset_id     TEXT NOT NULL,
    public_id    TEXT NOT NULL,
    versions     TEXT NOT NULL,
    items        TEXT NOT NULL,
    actor        TEXT NOT NULL,
    state        TEXT NOT NULL CHECK (state IN ('scheduled', 'undone', 'purged')),
    scheduled_at REAL NOT NULL,
    purge_at     REAL NOT NULL,
    finished_at  REAL
);
CREATE INDEX scheduled_purges_due ON scheduled_purges (state, purge_at);
CREATE INDEX scheduled_purges_cloud ON scheduled_purges (cloud, scheduled_at);
-- While a purge is scheduled its revisions stay referenced: one row per digest, removed when
-- the purge is undone or done (MetadataStore.digest_in_use and digest_referenced ask here).
CREATE TABLE purge_holds (
    purge_id TEXT NOT NULL,
    cloud    TEXT NOT NULL,
    digest   TEXT NOT NULL,
    PRIMARY KEY (purge_id, digest)
);
CREATE INDEX purge_holds_digest ON purge_holds (cloud, digest);

-- migration 15
-- Restore drills and alerts (docs/snapshots.md). A drill is a `snapshot_drill` job (its
-- report is the job's progress); its schedule is kept like the snapshot schedule (claimed by a
-- compare-and-set on next_run_at). `alert_settings` is where an environment's failure alerts
-- are POSTed; `alert_state` is the last outcome of each watched operation (snapshot,
-- retention, drill): what the console flags and /metrics reports.
CREATE TABLE drill_schedules (
    cloud       TEXT PRIMARY KEY,
    schedule    TEXT NOT NULL,
    sample      TEXT NOT NULL,
    next_run_at REAL NOT NULL,
    last_run_at REAL
);
CREATE TABLE alert_settings (
    cloud            TEXT PRIMARY KEY,
    notification_url TEXT
);
CREATE TABLE alert_state (
    cloud           TEXT NOT NULL,
    operation       TEXT NOT NULL,
    failing         INTEGER NOT NULL DEFAULT 0,
    failures        INTEGER NOT NULL DEFAULT 0,
    last_error      TEXT,
    last_failure_at REAL,
    last_success_at REAL,
    PRIMARY KEY (cloud, operation)
);

-- migration 16
-- Archive files in the default backup store and when each goes (docs/snapshots.md, "Removal"):
-- an export's published tar once `expires_at` passed (archive_keep_days after it was
-- written), an import's uploaded tar once its job has ended. The row is written before the
-- file, so no file is ever left without one; `removed_at` is set once, by whichever process
-- (or DELETE versionstore/archives/<id>) removed the file.
CREATE TABLE archive_files (
    job_id        TEXT PRIMARY KEY,
    cloud         TEXT NOT NULL,
    kind          TEXT NOT NULL CHECK (kind IN ('export', 'import')),
    store_key     TEXT NOT NULL,
    registered_at REAL NOT NULL,
    expires_at    REAL,
    removed_at    REAL
);
CREATE INDEX archive_files_kept ON archive_files (expires_at) WHERE removed_at IS NULL;

-- migration 17
-- An environment's default for how long a prepared archive export is kept (docs/snapshots.md,
-- "Removal"): used when an export does not give `keep_days`. No row: the server's
-- VERSIONSTORE_ARCHIVE_KEEP_DAYS.
CREATE TABLE archive_settings (
    cloud     TEXT PRIMARY KEY,
    keep_days INTEGER NOT NULL
);

-- migration 18
-- The originals a prepared archive export lists (docs/snapshots.md, "Export"; docs/design.md):
-- an export copies no bytes, its download is composed from these revisions, so they are held
-- against deletion while the archive is kept (`digest_in_use`), written in the transaction
-- that records its layout. An irreversible deletion of a listed version withdraws the archive
-- in its own transaction (`removed_reason` 'content_deleted', expiry now): a takedown does not
-- survive in an archive.
CREATE TABLE archive_members (
    job_id     TEXT NOT NULL,
    cloud      TEXT NOT NULL,
    version_id TEXT NOT NULL,
    digest     TEXT NOT NULL,
    PRIMARY KEY (job_id, version_id)
);
CREATE INDEX archive_members_version ON archive_members (version_id);
CREATE INDEX archive_members_digest ON archive_members (cloud, digest);
ALTER TABLE archive_files ADD COLUMN removed_reason TEXT;

-- migration 19
-- The tag index knows whether its asset is live (docs/design.md, "Tag index"): a search
-- `tags=x` pages and counts by walking asset_tags alone, never reading an asset row per match
-- to learn its status (rows of deleted assets are kept: a delete with backup leaves a
-- reservation that `status=deleted` still finds by tag). `live` is written with the asset row,
-- in the same transaction, by every write of either (metadata.py). Rows from before: live
-- unless their asset is deleted.
ALTER TABLE asset_tags ADD COLUMN live INTEGER NOT NULL DEFAULT 1 CHECK (live IN (0, 1));
UPDATE asset_tags SET live = 0 WHERE asset_pk IN (SELECT pk FROM assets WHERE status = 'deleted');
DROP INDEX asset_tags_created;
CREATE INDEX asset_tags_created ON asset_tags (cloud, tag, live, created_at, asset_pk);
CREATE INDEX asset_tags_live ON asset_tags (cloud, tag, live, asset_pk);
