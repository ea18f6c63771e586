-- Core registry metadata. Times are Unix milliseconds supplied by the application clock.

CREATE TABLE repositories (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name        TEXT    COLLATE "C" NOT NULL UNIQUE,
    created_at  BIGINT  NOT NULL
);

-- One row per stored blob. storage_key is never reused: bytes uploaded again after a blob was
-- collected get a new key, so a collector can only ever delete the object it decided on.
CREATE TABLE blobs (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    digest      TEXT    NOT NULL UNIQUE,
    size        BIGINT  NOT NULL,
    storage_key TEXT    NOT NULL UNIQUE,
    created_at  BIGINT  NOT NULL
);

-- A blob is visible in a repository only while linked there.
CREATE TABLE repository_blobs (
    repository_id BIGINT  NOT NULL REFERENCES repositories (id),
    blob_id       BIGINT  NOT NULL REFERENCES blobs (id),
    linked_at     BIGINT  NOT NULL,
    PRIMARY KEY (repository_id, blob_id)
);
CREATE INDEX repository_blobs_by_blob ON repository_blobs (blob_id);

-- Manifests are stored byte-for-byte in payload; their digest is of those bytes.
CREATE TABLE manifests (
    id             BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    repository_id  BIGINT  NOT NULL REFERENCES repositories (id),
    digest         TEXT    NOT NULL,
    media_type     TEXT    NOT NULL,
    artifact_type  TEXT,
    subject_digest TEXT,
    annotations    TEXT,
    size           BIGINT  NOT NULL,
    payload        BYTEA   NOT NULL,
    pushed_at      BIGINT  NOT NULL,
    deleted_at     BIGINT,
    UNIQUE (repository_id, digest)
);
CREATE INDEX manifests_by_subject ON manifests (repository_id, subject_digest);

CREATE TABLE manifest_blobs (
    manifest_id BIGINT  NOT NULL REFERENCES manifests (id),
    blob_id     BIGINT  NOT NULL REFERENCES blobs (id),
    PRIMARY KEY (manifest_id, blob_id)
);
CREATE INDEX manifest_blobs_by_blob ON manifest_blobs (blob_id);

CREATE TABLE manifest_children (
    parent_id BIGINT  NOT NULL REFERENCES manifests (id),
    child_id  BIGINT  NOT NULL REFERENCES manifests (id),
    PRIMARY KEY (parent_id, child_id)
);
CREATE INDEX manifest_children_by_child ON manifest_children (child_id);

CREATE TABLE tags (
    repository_id BIGINT  NOT NULL REFERENCES repositories (id),
    name          TEXT    COLLATE "C" NOT NULL,
    manifest_id   BIGINT  NOT NULL REFERENCES manifests (id),
    updated_at    BIGINT  NOT NULL,
    PRIMARY KEY (repository_id, name)
);
CREATE INDEX tags_by_manifest ON tags (manifest_id);

-- Every tag move and delete: who, when, from, to.
CREATE TABLE tag_history (
    id            BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    repository_id BIGINT  NOT NULL REFERENCES repositories (id),
    tag           TEXT    NOT NULL,
    old_digest    TEXT,
    new_digest    TEXT,
    actor         TEXT,
    at            BIGINT  NOT NULL
);
CREATE INDEX tag_history_by_tag ON tag_history (repository_id, tag, id);

-- Upload sessions: bytes live under storage_key, the hash state of the first `size` bytes here,
-- so a session can continue in any process.
CREATE TABLE uploads (
    id          TEXT    PRIMARY KEY,
    repository  TEXT    NOT NULL,
    storage_key TEXT    NOT NULL UNIQUE,
    size        BIGINT  NOT NULL,
    hash_state  BYTEA   NOT NULL,
    started_at  BIGINT  NOT NULL,
    updated_at  BIGINT  NOT NULL
);
