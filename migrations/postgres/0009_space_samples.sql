-- Where the space went over time, for the console's chart: one sample an hour, taken by the
-- replica running the storage sweep, kept for 90 days.
CREATE TABLE space_samples (
    at         BIGINT  NOT NULL PRIMARY KEY,
    stored     BIGINT  NOT NULL,
    live       BIGINT  NOT NULL,
    tombstones BIGINT  NOT NULL,
    grace      BIGINT  NOT NULL,
    pending    BIGINT  NOT NULL
);
