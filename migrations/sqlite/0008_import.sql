-- Imports from the reference registry's storage (berth import): one row per source, the tags
-- each run brought over (so the next run looks only at what changed, and an interrupted run
-- continues), and every storage key ever adopted in place (never adopted twice, so a key the
-- collector deleted can never come back under a new row).
CREATE TABLE imports (
    id                INTEGER PRIMARY KEY,
    source            TEXT    NOT NULL UNIQUE,
    started_at        INTEGER NOT NULL,
    last_run_started  INTEGER,
    last_run_finished INTEGER,
    cut_over_at       INTEGER
);

CREATE TABLE import_tags (
    import_id       INTEGER NOT NULL REFERENCES imports (id),
    repository      TEXT    NOT NULL,
    tag             TEXT    NOT NULL,
    digest          TEXT    NOT NULL,
    source_modified INTEGER NOT NULL,
    PRIMARY KEY (import_id, repository, tag)
);

CREATE TABLE adopted_keys (
    storage_key TEXT    NOT NULL PRIMARY KEY,
    import_id   INTEGER NOT NULL REFERENCES imports (id),
    digest      TEXT    NOT NULL,
    adopted_at  INTEGER NOT NULL
);
