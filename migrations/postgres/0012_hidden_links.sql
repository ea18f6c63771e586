-- A repository delete hides the repository's blob links (keeping them for a restore, which needs
-- them): the delete that did. A push into the deleted name makes the repository live again, but
-- not what it held; a link shows again when its blob is uploaded or mounted again, or a restore
-- brings back a manifest that references it (or the whole repository).
ALTER TABLE repository_blobs ADD COLUMN hidden_by_delete BIGINT;
