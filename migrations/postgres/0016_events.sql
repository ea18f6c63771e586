-- Events: one row per change, written in the change's own transaction (docs/events.md).
--
-- `stream` orders events: a repository's name for what happens in a repository, `/blobs/X`
-- (X the first hex digit of the digest; not a repository name) for registry-wide blob
-- events. `seq` numbers a stream's events in commit order: it is taken from the stream's
-- counter row, bumped as the last statement of the transaction, so a later sequence number is a
-- later commit.
CREATE TABLE events (
    id          BIGSERIAL PRIMARY KEY,
    stream      TEXT    NOT NULL,
    seq         BIGINT  NOT NULL,
    at          BIGINT  NOT NULL,
    kind        TEXT    NOT NULL,
    repository  TEXT,
    digest      TEXT,
    media_type  TEXT,
    size        BIGINT,
    tag         TEXT,
    old_digest  TEXT,
    actor       TEXT,
    -- The request that made the change (JSON: id, addr, host, method, useragent), if any.
    request     TEXT,
    -- Kind-specific facts (JSON: the delete id, the reason, the rule, bytes freed, …).
    detail      TEXT,
    UNIQUE (stream, seq)
);
CREATE INDEX events_by_time ON events (at);

CREATE TABLE event_counters (
    stream TEXT   PRIMARY KEY,
    seq    BIGINT NOT NULL
);

-- How far each endpoint has delivered each stream.
CREATE TABLE event_cursors (
    endpoint TEXT   NOT NULL,
    stream   TEXT   NOT NULL,
    seq      BIGINT NOT NULL,
    PRIMARY KEY (endpoint, stream)
);

-- Each endpoint's delivery state (the lease is in gc_leases as `events:NAME`). `seen_at`: when
-- a replica configured with it last registered it or delivered to it; an endpoint not seen
-- within `events.retain` holds no event back from pruning. `next_attempt_at`: after a failure,
-- no replica sends before then.
CREATE TABLE event_endpoints (
    name            TEXT    PRIMARY KEY,
    created_at      BIGINT  NOT NULL,
    seen_at         BIGINT  NOT NULL,
    next_attempt_at BIGINT,
    failures        INTEGER NOT NULL DEFAULT 0,
    last_error      TEXT,
    last_attempt_at BIGINT,
    last_success_at BIGINT,
    delivered       BIGINT  NOT NULL DEFAULT 0,
    failed          BIGINT  NOT NULL DEFAULT 0
);

-- Events an endpoint gave up on (`dead`) or is asked to deliver again (`replay`).
CREATE TABLE event_letters (
    endpoint   TEXT    NOT NULL,
    event_id   BIGINT  NOT NULL,
    state      TEXT    NOT NULL,
    attempts   INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    at         BIGINT  NOT NULL,
    PRIMARY KEY (endpoint, event_id)
);
CREATE INDEX event_letters_by_event ON event_letters (event_id);
