-- The collector's review queue: one row per item that may have become garbage, reviewed once
-- review_after has passed. Every event that can make something garbage upserts its row in the
-- event's own transaction. review_after is a lower bound (a review re-derives the deadline from
-- the item's rows and reschedules itself), so an upsert keeps the earlier time.
CREATE TABLE gc_reviews (
    kind         TEXT    NOT NULL, -- blob | manifest
    item_id      INTEGER NOT NULL,
    review_after INTEGER NOT NULL,
    PRIMARY KEY (kind, item_id)
);
CREATE INDEX gc_reviews_due ON gc_reviews (review_after);

-- Storage keys whose blob rows are gone: the objects are deleted after the transaction that
-- removed the rows commits, and again after a crash. Keys are never reused.
CREATE TABLE gc_outbox (
    storage_key  TEXT    PRIMARY KEY,
    enqueued_at  INTEGER NOT NULL,
    attempts     INTEGER NOT NULL DEFAULT 0,
    next_attempt INTEGER NOT NULL
);

-- A manifest's review reads when a tag last moved away from it: by digest, not by tag.
CREATE INDEX tag_history_by_old_digest ON tag_history (repository_id, old_digest);
