//! Rows the metadata store returns.

/// A stored blob.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct BlobRow {
    /// Its row id.
    pub id: i64,
    /// Its digest.
    pub digest: String,
    /// Its size in bytes.
    pub size: i64,
    /// Where its bytes are in blob storage.
    pub storage_key: String,
}

/// A manifest with its bytes.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ManifestRow {
    /// Its row id.
    pub id: i64,
    /// Digest of `payload`.
    pub digest: String,
    /// Media type it is served with.
    pub media_type: String,
    /// The bytes as pushed.
    pub payload: Vec<u8>,
}

/// A manifest without its bytes.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ManifestHead {
    /// Its row id.
    pub id: i64,
    /// Its digest.
    pub digest: String,
    /// Media type it is served with.
    pub media_type: String,
    /// Its size in bytes.
    pub size: i64,
}

/// A manifest that refers to a subject.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ReferrerRow {
    /// Its digest.
    pub digest: String,
    /// Its media type.
    pub media_type: String,
    /// Its size in bytes.
    pub size: i64,
    /// `artifactType`, or its config's media type.
    pub artifact_type: Option<String>,
    /// Its annotations as JSON text.
    pub annotations: Option<String>,
}

/// An upload session.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct UploadRow {
    /// The session id (a UUID).
    pub id: String,
    /// The repository it was started in.
    pub repository: String,
    /// Where its bytes are in blob storage.
    pub storage_key: String,
    /// Bytes received and hashed so far.
    pub size: i64,
    /// Saved SHA-256 state of those bytes.
    pub hash_state: Vec<u8>,
    /// On object storage: the objects holding those bytes, as JSON `[{key, len}]`.
    pub chunks: String,
    /// When it started (Unix ms).
    pub started_at: i64,
    /// When it last received bytes (Unix ms).
    pub updated_at: i64,
}

/// One recorded tag move.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow, serde::Serialize)]
pub struct TagMove {
    /// The tag.
    pub tag: String,
    /// The digest the tag pointed at before, if any.
    pub old_digest: Option<String>,
    /// The digest it points at after, if any (none for a delete).
    pub new_digest: Option<String>,
    /// Who moved it (`anonymous` without access control or credentials — as the CLI and the
    /// audit log say).
    pub actor: Option<String>,
    /// When (Unix ms).
    pub at: i64,
    /// What moved it: `push`, `delete`, `restore`, `revert`, or `unlock` (immutability lifted).
    pub kind: String,
    /// Why, when the move says more than who did it (an unlock's reason, the retention rule's
    /// condition).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// The bulk restore that made this move (kind `restore`), if one did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bulk_restore: Option<i64>,
}
