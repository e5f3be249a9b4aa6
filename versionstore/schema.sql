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
