-- When a manifest was last pulled (GET or HEAD) and a blob last answered 200 to a HEAD: recorded
-- in batches off the request path, durable within seconds. The collector's grace windows and
-- retention's "not pulled within" read them.
ALTER TABLE manifests ADD COLUMN pulled_at INTEGER;
ALTER TABLE blobs ADD COLUMN seen_at INTEGER;
