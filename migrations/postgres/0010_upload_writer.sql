-- On object storage, a session's large writes go into one multipart upload that the session
-- keeps open; only one request at a time may add parts to it. That request holds the session
-- (`writer`, a random token) until `writer_until` (Unix ms), renewing while it writes; a holder
-- that dies lets go when the time passes.
ALTER TABLE uploads ADD COLUMN writer TEXT;
ALTER TABLE uploads ADD COLUMN writer_until BIGINT NOT NULL DEFAULT 0;
