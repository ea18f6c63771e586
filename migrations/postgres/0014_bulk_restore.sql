-- Bulk restores: one record per run of `POST /admin/v1/restore?…` (or `berth restore --since …`,
-- `berth retention undo`). `finished_at` stays NULL if the run stopped before its end; what it
-- restored by then is marked on the deletes, so a run again picks up the rest.
CREATE TABLE bulk_restores (
    id            BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    actor         TEXT,
    started_at    BIGINT NOT NULL,
    finished_at   BIGINT,
    selection     TEXT   NOT NULL, -- the filter, as JSON
    take_tags     BIGINT NOT NULL, -- 1: tags pushed again since were moved back
    restored      BIGINT NOT NULL DEFAULT 0,
    unchanged     BIGINT NOT NULL DEFAULT 0,
    conflicts     BIGINT NOT NULL DEFAULT 0,
    conflict_list TEXT             -- the first conflicts with their reasons, as JSON
);

-- The retention run that made a delete (retention's untags and untagged-manifest deletes), so
-- a run can be undone exactly.
ALTER TABLE deletes ADD COLUMN run_id BIGINT;
-- The bulk restore that undid a delete: it is not selected again.
ALTER TABLE deletes ADD COLUMN restored_by BIGINT REFERENCES bulk_restores (id);
CREATE INDEX deletes_by_at ON deletes (at);
CREATE INDEX deletes_by_run ON deletes (run_id);
CREATE INDEX deletes_by_restore ON deletes (restored_by);

-- The bulk restore a history row belongs to (kind `restore`).
ALTER TABLE tag_history ADD COLUMN bulk_restore_id BIGINT;
