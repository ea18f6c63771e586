-- Quotas (`[[quotas]]`, docs/quotas.md): what each rule's scope holds, maintained by every
-- transaction that changes it, in that transaction.
--
-- One row per rule: the bytes (distinct blobs linked in the scope's repositories, hidden links
-- of deleted repositories included, plus every manifest row there, tombstones included) and the
-- repositories (not deleted) its scope holds. `pattern` is the scope the figures were counted
-- for; `counted_at` is NULL until they were counted from scratch (a rule new to the database),
-- and no limit is enforced before.
CREATE TABLE quota_usage (
    rule         TEXT    PRIMARY KEY,
    pattern      TEXT    NOT NULL,
    bytes        BIGINT  NOT NULL,
    repositories BIGINT  NOT NULL,
    counted_at   BIGINT
);

-- How many links each blob has in each rule's scope (a blob counts once per scope, on its first
-- link there), with its size, so that the last link's removal (or the blob's) frees it.
CREATE TABLE quota_blobs (
    rule    TEXT    NOT NULL,
    blob_id BIGINT  NOT NULL,
    size    BIGINT  NOT NULL,
    links   BIGINT  NOT NULL,
    PRIMARY KEY (rule, blob_id)
);
CREATE INDEX quota_blobs_by_blob ON quota_blobs (blob_id);
