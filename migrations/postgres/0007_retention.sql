-- Immutability lifted by an administrator for one tag: until `until`, the tag may be moved or
-- deleted once (the change consumes the row). Recorded in the tag history as kind 'unlock'.
CREATE TABLE tag_unlocks (
    repository_id BIGINT NOT NULL REFERENCES repositories (id),
    tag           TEXT   COLLATE "C" NOT NULL,
    until         BIGINT NOT NULL,
    actor         TEXT,
    reason        TEXT   NOT NULL,
    PRIMARY KEY (repository_id, tag)
);

-- Every real retention run (the newest hundred are kept): when, why, and what it removed.
CREATE TABLE retention_runs (
    id                BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    replica           TEXT   NOT NULL,
    started_by        TEXT   NOT NULL,
    started_at        BIGINT NOT NULL,
    finished_at       BIGINT NOT NULL,
    repositories      BIGINT NOT NULL,
    tags_considered   BIGINT NOT NULL,
    tags_removed      BIGINT NOT NULL,
    manifests_removed BIGINT NOT NULL,
    skipped           BIGINT NOT NULL,
    errors            BIGINT NOT NULL,
    by_rule           TEXT   NOT NULL
);

-- Why a tag moved, when the move says more than who did it: the reason an administrator gave
-- for lifting immutability, the rule condition that removed a tag in retention.
ALTER TABLE tag_history ADD COLUMN note TEXT;
