-- Every storage key the sweep took for an orphan. Keys are never reused, so a key listed here
-- can never be recorded by a blob row again: a publication that stalled past the grace while
-- the sweep took its bytes is refused however long after the outbox deleted them.
CREATE TABLE swept_keys (
    storage_key TEXT   NOT NULL PRIMARY KEY,
    swept_at    BIGINT NOT NULL
);
