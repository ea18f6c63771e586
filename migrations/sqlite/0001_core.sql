-- Core registry metadata. Times are Unix milliseconds supplied by the application clock.

CREATE TABLE repositories (
    id          INTEGER PRIMARY KEY,
    name        TEXT    NOT NULL UNIQUE,
    created_at  INTEGER NOT NULL
);

-- One row per stored blob. storage_key is never reused: bytes uploaded again after a blob was
-- collected get a new key, so a collector can only ever delete the object it decided on.
CREATE TABLE blobs (
    id          INTEGER PRIMARY KEY,
    digest      TEXT    NOT NULL UNIQUE,
    size        INTEGER NOT NULL,
    storage_key TEXT    NOT NULL UNIQUE,
    created_at  INTEGER NOT NULL
);

-- A blob is visible in a repository only while linked there.
CREATE TABLE repository_blobs (
    repository_id INTEGER NOT NULL REFERENCES repositories (id),
    blob_id       INTEGER NOT NULL REFERENCES blobs (id),
    linked_at     INTEGER NOT NULL,
    PRIMARY KEY (repository_id, blob_id)
);
CREATE INDEX repository_blobs_by_blob ON repository_blobs (blob_id);

-- Manifests are stored byte-for-byte in payload; their digest is of those bytes.
CREATE TABLE manifests (
    id             INTEGER PRIMARY KEY,
    repository_id  INTEGER NOT NULL REFERENCES repositories (id),
    digest         TEXT    NOT NULL,
    media_type     TEXT    NOT NULL,
    artifact_type  TEXT,
    subject_digest TEXT,
    annotations    TEXT,
    size           INTEGER NOT NULL,
    payload        BLOB    NOT NULL,
    pushed_at      INTEGER NOT NULL,
    deleted_at     INTEGER,
    UNIQUE (repository_id, digest)
);
CREATE INDEX manifests_by_subject ON manifests (repository_id, subject_digest);

CREATE TABLE manifest_blobs (
    manifest_id INTEGER NOT NULL REFERENCES manifests (id),
    blob_id     INTEGER NOT NULL REFERENCES blobs (id),
    PRIMARY KEY (manifest_id, blob_id)
);
CREATE INDEX manifest_blobs_by_blob ON manifest_blobs (blob_id);

CREATE TABLE manifest_children (
    parent_id INTEGER NOT NULL REFERENCES manifests (id),
    child_id  INTEGER NOT NULL REFERENCES manifests (id),
    PRIMARY KEY (parent_id, child_id)
);
CREATE INDEX manifest_children_by_child ON manifest_children (child_id);

CREATE TABLE tags (
    repository_id INTEGER NOT NULL REFERENCES repositories (id),
    name          TEXT    NOT NULL,
    manifest_id   INTEGER NOT NULL REFERENCES manifests (id),
    updated_at    INTEGER NOT NULL,
    PRIMARY KEY (repository_id, name)
);
CREATE INDEX tags_by_manifest ON tags (manifest_id);

-- Every tag move and delete: who, when, from, to.
CREATE TABLE tag_history (
    id            INTEGER PRIMARY KEY,
    repository_id INTEGER NOT NULL REFERENCES repositories (id),
    tag           TEXT    NOT NULL,
    old_digest    TEXT,
    new_digest    TEXT,
    actor         TEXT,
    at            INTEGER NOT NULL
);
CREATE INDEX tag_history_by_tag ON tag_history (repository_id, tag, id);

-- Upload sessions: bytes live under storage_key, the hash state of the first `size` bytes here,
-- so a session can continue in any process.
CREATE TABLE uploads (
    id          TEXT    PRIMARY KEY,
    repository  TEXT    NOT NULL,
    storage_key TEXT    NOT NULL UNIQUE,
    size        INTEGER NOT NULL,
    hash_state  BLOB    NOT NULL,
    started_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL
);
