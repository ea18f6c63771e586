-- What runs: each source (a cluster, a deploy system) reports the images it runs, replacing its
-- previous report; the report lapses at `expires_at` (a dead reporter must not pin forever).
CREATE TABLE in_use_reports (
    source      TEXT   NOT NULL PRIMARY KEY,
    reported_at BIGINT NOT NULL,
    expires_at  BIGINT NOT NULL,
    reported_by TEXT
);

-- One pinned manifest of a report: the repository by name and the digest (a reported tag is
-- resolved to its digest when reported). `expires_at` repeats the report's, so a pin check is
-- one index lookup.
CREATE TABLE in_use_pins (
    source     TEXT   NOT NULL REFERENCES in_use_reports (source) ON DELETE CASCADE,
    repository TEXT   NOT NULL,
    digest     TEXT   NOT NULL,
    reference  TEXT   NOT NULL,
    expires_at BIGINT NOT NULL,
    PRIMARY KEY (source, repository, digest)
);
CREATE INDEX in_use_pins_by_manifest ON in_use_pins (repository, digest);
