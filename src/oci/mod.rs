//! Pure OCI types: digests, repository names, tags, references and manifest parsing.
//!
//! No I/O happens here (hashing runs AWS-LC's block function, see [`sha256`]); everything that crosses a layer boundary is one of these validated types,
//! never a bare string.

pub mod digest;
pub mod manifest;
pub mod name;
pub mod sha256;

pub use digest::{Algorithm, ContentHasher, Digest, DigestError, UploadHasher};
pub use name::{RepoName, Tag};

/// A manifest reference: a tag or a digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reference {
    /// A mutable name.
    Tag(Tag),
    /// An immutable content address.
    Digest(Digest),
}

impl Reference {
    /// Parses a reference: a digest if it contains `:`, else a tag.
    ///
    /// # Errors
    /// The digest or tag error, for `DIGEST_INVALID` or `MANIFEST_INVALID`-family errors.
    pub fn parse(s: &str) -> Result<Self, ReferenceError> {
        if s.contains(':') {
            Digest::parse(s).map(Reference::Digest).map_err(ReferenceError::Digest)
        } else {
            Tag::parse(s).map(Reference::Tag).map_err(ReferenceError::Tag)
        }
    }
}

impl std::fmt::Display for Reference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reference::Tag(t) => t.fmt(f),
            Reference::Digest(d) => d.fmt(f),
        }
    }
}

/// Why a reference does not parse.
#[derive(Debug, thiserror::Error)]
pub enum ReferenceError {
    /// Looked like a digest but is not a valid one.
    #[error("{0}")]
    Digest(DigestError),
    /// Not a valid tag.
    #[error("{0}")]
    Tag(String),
}
