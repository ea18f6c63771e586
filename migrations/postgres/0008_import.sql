-- Imports from the reference registry's storage (berth import): one row per source, the tags
-- each run brought over (so the next run looks only at what changed, and an interrupted run
-- continues), and every storage key ever adopted in place (never adopted twice, so a key the
-- collector deleted can never come back under a new row).
CREATE TABLE imports (
    id                BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    source            TEXT   NOT NULL UNIQUE,
    started_at        BIGINT NOT NULL,
    last_run_started  BIGINT,
    last_run_finished BIGINT,
    cut_over_at       BIGINT
);

CREATE TABLE import_tags (
    import_id       BIGINT NOT NULL REFERENCES imports (id),
    repository      TEXT   COLLATE "C" NOT NULL,
    tag             TEXT   COLLATE "C" NOT NULL,
    digest          TEXT   NOT NULL,
    source_modified BIGINT NOT NULL,
    PRIMARY KEY (import_id, repository, tag)
);

CREATE TABLE adopted_keys (
    storage_key TEXT   NOT NULL PRIMARY KEY,
    import_id   BIGINT NOT NULL REFERENCES imports (id),
    digest      TEXT   NOT NULL,
    adopted_at  BIGINT NOT NULL
);
