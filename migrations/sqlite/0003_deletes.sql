-- Deletes: every delete operation is a row; tombstones and the tag-history rows a delete wrote
-- point at it, so a restore brings back exactly what the delete took.
CREATE TABLE deletes (
    id            INTEGER PRIMARY KEY,
    repository_id INTEGER REFERENCES repositories (id),
    kind          TEXT    NOT NULL, -- manifest | tag | repository | purge
    target        TEXT    NOT NULL, -- the digest, tag or repository name the request named
    actor         TEXT,
    reason        TEXT,
    at            INTEGER NOT NULL
);

-- Why a manifest is a tombstone: deleted (directly), subject (with its subject), repository
-- (with its repository), purged. `unrestorable` says why it can no longer be restored (a blob
-- it references was unlinked or purged); NULL while it can.
ALTER TABLE manifests ADD COLUMN delete_id INTEGER REFERENCES deletes (id);
ALTER TABLE manifests ADD COLUMN deleted_why TEXT;
ALTER TABLE manifests ADD COLUMN unrestorable TEXT;
CREATE INDEX manifests_by_delete ON manifests (delete_id);
CREATE INDEX manifests_tombstones ON manifests (repository_id, deleted_at);

-- What kind of move a history row records: push | move | delete | restore | revert.
ALTER TABLE tag_history ADD COLUMN kind TEXT;
ALTER TABLE tag_history ADD COLUMN delete_id INTEGER REFERENCES deletes (id);
CREATE INDEX tag_history_by_delete ON tag_history (delete_id);

-- A deleted repository: invisible until restored or pushed to again.
ALTER TABLE repositories ADD COLUMN deleted_at INTEGER;
ALTER TABLE repositories ADD COLUMN delete_id INTEGER REFERENCES deletes (id);
