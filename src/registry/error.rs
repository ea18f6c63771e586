//! Domain errors, named by outcome in the OCI vocabulary.

use crate::oci::Digest;

/// What a registry operation can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The blob is not linked in the repository.
    #[error("blob unknown to registry")]
    BlobUnknown,
    /// The upload session does not exist (in this repository).
    #[error("blob upload unknown to registry")]
    BlobUploadUnknown,
    /// The upload request is malformed.
    #[error("blob upload invalid: {0}")]
    BlobUploadInvalid(String),
    /// A chunk does not start where the upload currently ends.
    #[error("chunk must start at offset {size}")]
    RangeInvalid {
        /// Bytes the session holds.
        size: u64,
        /// The session, for the `Location` of the answer.
        upload_id: String,
    },
    /// A requested byte range lies outside the blob.
    #[error("range not satisfiable for a blob of {size} bytes")]
    RangeNotSatisfiable {
        /// The blob's size.
        size: u64,
    },
    /// The content does not match the given digest, or the digest is malformed.
    #[error("{0}")]
    DigestInvalid(String),
    /// The declared size does not match the content.
    #[error("{0}")]
    SizeInvalid(String),
    /// The manifest is malformed or of an unsupported kind.
    #[error("{0}")]
    ManifestInvalid(String),
    /// The manifest is over the size limit.
    #[error("manifest is larger than {limit} bytes")]
    ManifestTooLarge {
        /// The limit in bytes.
        limit: usize,
    },
    /// The manifest references content not present in the repository.
    #[error("manifest references content not in the repository")]
    ManifestBlobUnknown(Vec<Digest>),
    /// No such manifest in the repository.
    #[error("manifest unknown to registry")]
    ManifestUnknown,
    /// The manifest exists but in none of the media types the client accepts.
    #[error("manifest is a `{media_type}`, which the request's Accept header does not include")]
    ManifestNotAcceptable {
        /// The stored media type.
        media_type: String,
    },
    /// The registry will not do this delete (405 `DENIED`): the message names what holds the
    /// item.
    #[error("{0}")]
    DeleteRefused(String),
    /// The change would move or remove an immutable tag (403 `DENIED`); the message names the
    /// tag and the rule.
    #[error("{0}")]
    Immutable(String),
    /// An `If-Match` / `If-None-Match` condition did not hold; nothing changed (412).
    #[error("{0}")]
    PreconditionFailed(String),
    /// An admin operation conflicts with the current state (a restore whose tag moved since, a
    /// tombstone that can no longer be restored…); nothing changed (409).
    #[error("{0}")]
    Conflict(String),
    /// No such tag (or nothing to restore for it).
    #[error("{0}")]
    TagUnknown(String),
    /// No such repository.
    #[error("repository name not known to registry")]
    NameUnknown,
    /// A request (of the admin API, the CLI) is malformed; the message says how. Nothing changed.
    #[error("{0}")]
    Invalid(String),
    /// What an admin request names does not exist (the message says what).
    #[error("{0}")]
    NotFound(String),
    /// The operation is not supported (yet) by this registry.
    #[error("{0}")]
    Unsupported(String),
    /// A part the registry depends on is overloaded or busy (the metadata store kept reporting
    /// conflicts, or had no free connection); nothing was changed and the request may be retried.
    #[error("{0}")]
    Unavailable(String),
    /// A pull-through cache's upstream failed and nothing cached could stand in.
    #[error("{message}")]
    Upstream {
        /// The upstream answered 429.
        rate_limited: bool,
        /// What failed, naming the upstream.
        message: String,
    },

    /// The change would take a quota's scope past a limit (403 `DENIED`); the message names the
    /// rule, the usage and the limit. Nothing of it was recorded.
    #[error("{0}")]
    QuotaExceeded(String),

    /// A write into a pull-through cache's repository.
    #[error("{0}")]
    ReadOnlyCache(String),

    /// Something failed inside the registry; details are logged, not shown.
    #[error("internal error: {0}")]
    Internal(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl From<crate::meta::Error> for Error {
    fn from(e: crate::meta::Error) -> Self {
        if let crate::meta::Error::Quota(refusal) = &e {
            return Error::QuotaExceeded(refusal.to_string());
        }
        if e.is_busy() {
            tracing::warn!(error = %e, "answering 503");
            return Error::Unavailable("the metadata store is busy; retry the request".into());
        }
        Error::Internal(Box::new(e))
    }
}

impl From<crate::blob::Error> for Error {
    fn from(e: crate::blob::Error) -> Self {
        match e {
            crate::blob::Error::Body(msg) => {
                Error::BlobUploadInvalid(format!("request body ended early: {msg}"))
            }
            other => Error::Internal(Box::new(other)),
        }
    }
}
