-- Where the space went over time, for the console's chart: one sample an hour, taken by the
-- replica running the storage sweep, kept for 90 days.
CREATE TABLE space_samples (
    at         INTEGER NOT NULL PRIMARY KEY,
    stored     INTEGER NOT NULL,
    live       INTEGER NOT NULL,
    tombstones INTEGER NOT NULL,
    grace      INTEGER NOT NULL,
    pending    INTEGER NOT NULL
);
