-- Pull-through caches. A cached repository is an ordinary repository (`PREFIX/NAME`); these two
-- tables hold what only a cache needs.
--
-- How each cached tag was last resolved upstream: the digest, and when the upstream was last
-- asked. Within the cache's tag_ttl of checked_at the tag is answered from here.
CREATE TABLE proxy_tags (
    repository TEXT    NOT NULL,
    tag        TEXT    NOT NULL,
    digest     TEXT    NOT NULL,
    checked_at BIGINT  NOT NULL,
    PRIMARY KEY (repository, tag)
);
-- Manifests fetched from an upstream whose blobs are not all here yet. A manifest is recorded
-- (through the push path, so every reference is checked) only once everything it references is
-- linked in its repository; until then its bytes are served from here.
CREATE TABLE proxy_pending (
    repository TEXT    NOT NULL,
    digest     TEXT    NOT NULL,
    media_type TEXT    NOT NULL,
    payload    BYTEA   NOT NULL,
    fetched_at BIGINT  NOT NULL,
    PRIMARY KEY (repository, digest)
);
CREATE INDEX proxy_pending_by_time ON proxy_pending (fetched_at);
