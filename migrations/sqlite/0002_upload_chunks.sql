-- On object storage, each write to an upload session is its own object; the session lists them
-- (JSON array of {key, len}) so any replica can continue or complete it.
ALTER TABLE uploads ADD COLUMN chunks TEXT NOT NULL DEFAULT '[]';
