-- Backups (docs/backup.md).

-- A running backup's hold on the outbox: while it lasts (a lease the backup renews), the outbox
-- deletes only the keys in `backup_hold_free` — those queued before the hold was taken, so
-- before the backup's snapshot, which therefore names none of them. Keys queued later wait.
CREATE TABLE backup_holds (
    id         TEXT   PRIMARY KEY,
    holder     TEXT   NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL
);

CREATE TABLE backup_hold_free (
    hold_id     TEXT NOT NULL,
    storage_key TEXT NOT NULL,
    PRIMARY KEY (hold_id, storage_key)
);

-- Every backup taken of this deployment: what the metrics and the console show.
CREATE TABLE backup_runs (
    id           TEXT   PRIMARY KEY,
    location     TEXT   NOT NULL,
    started_at   BIGINT NOT NULL,
    snapshot_at  BIGINT,
    finished_at  BIGINT,
    state        TEXT   NOT NULL, -- running | complete | failed
    keys         BIGINT NOT NULL DEFAULT 0,
    bytes        BIGINT NOT NULL DEFAULT 0,
    keys_copied  BIGINT NOT NULL DEFAULT 0,
    bytes_copied BIGINT NOT NULL DEFAULT 0,
    error        TEXT
);
CREATE INDEX backup_runs_by_start ON backup_runs (started_at);
