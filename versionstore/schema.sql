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
