-- One holder at a time for the background passes that would only repeat each other's work on
-- several replicas (the storage sweep, the scrub). A lease that is not renewed expires.
CREATE TABLE gc_leases (
    name       TEXT    PRIMARY KEY,
    holder     TEXT    NOT NULL,
    expires_at INTEGER NOT NULL
);

-- Where each throttled background pass stands: the next step resumes after `resume_after`.
CREATE TABLE gc_progress (
    name            TEXT    PRIMARY KEY,
    resume_after    TEXT    NOT NULL,
    pass_started_at INTEGER NOT NULL,
    pass_total      INTEGER NOT NULL DEFAULT 0, -- the scrub: bytes stored when the pass started
    credit          INTEGER NOT NULL DEFAULT 0, -- the scrub: bytes it may read before it must wait
    passes          INTEGER NOT NULL DEFAULT 0,
    step_at         INTEGER NOT NULL DEFAULT 0
);

-- What the scrub found wrong: stored bytes missing, of the wrong size or content, and broken
-- references between rows. A finding goes when a later check finds the item sound (or gone).
CREATE TABLE gc_findings (
    kind       TEXT    NOT NULL,
    subject    TEXT    NOT NULL,
    repository TEXT,
    detail     TEXT    NOT NULL,
    found_at   INTEGER NOT NULL,
    PRIMARY KEY (kind, subject)
);

-- Abandoned upload sessions are found by their last write.
CREATE INDEX uploads_idle ON uploads (updated_at);

-- A review that failed is retried later, the pause growing with its failures, so one bad item
-- never stops the rest of the queue.
ALTER TABLE gc_reviews ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0;

-- The last collection passes that did something, for `berth gc status` (the newest hundred are
-- kept).
CREATE TABLE gc_passes (
    id              INTEGER PRIMARY KEY,
    replica         TEXT    NOT NULL,
    started_at      INTEGER NOT NULL,
    finished_at     INTEGER NOT NULL,
    reviews         INTEGER NOT NULL,
    manifests       INTEGER NOT NULL,
    blobs           INTEGER NOT NULL,
    bytes           INTEGER NOT NULL,
    uploads_expired INTEGER NOT NULL,
    objects_deleted INTEGER NOT NULL,
    errors          INTEGER NOT NULL
);
