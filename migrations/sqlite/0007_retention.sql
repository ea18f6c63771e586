-- Immutability lifted by an administrator for one tag: until `until`, the tag may be moved or
-- deleted once (the change consumes the row). Recorded in the tag history as kind 'unlock'.
CREATE TABLE tag_unlocks (
    repository_id INTEGER NOT NULL REFERENCES repositories (id),
    tag           TEXT    NOT NULL,
    until         INTEGER NOT NULL,
    actor         TEXT,
    reason        TEXT    NOT NULL,
    PRIMARY KEY (repository_id, tag)
);

-- Every real retention run (the newest hundred are kept): when, why, and what it removed.
CREATE TABLE retention_runs (
    id                INTEGER PRIMARY KEY,
    replica           TEXT    NOT NULL,
    started_by        TEXT    NOT NULL,
    started_at        INTEGER NOT NULL,
    finished_at       INTEGER NOT NULL,
    repositories      INTEGER NOT NULL,
    tags_considered   INTEGER NOT NULL,
    tags_removed      INTEGER NOT NULL,
    manifests_removed INTEGER NOT NULL,
    skipped           INTEGER NOT NULL,
    errors            INTEGER NOT NULL,
    by_rule           TEXT    NOT NULL
);

-- Why a tag moved, when the move says more than who did it: the reason an administrator gave
-- for lifting immutability, the rule condition that removed a tag in retention.
ALTER TABLE tag_history ADD COLUMN note TEXT;
