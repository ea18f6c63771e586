//! Content digests (`algorithm:encoded`) and the hashers that produce them.
//!
//! Only `sha256` and `sha512` are accepted, with the exact lowercase-hex lengths the
//! OCI image spec registers; anything else is rejected before it reaches storage.

use std::fmt;
use std::str::FromStr;

use aws_lc_rs::digest::{Context, SHA512};

use super::sha256::Sha256;

/// A registered digest algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Algorithm {
    /// SHA-256, 64 hex characters.
    Sha256,
    /// SHA-512, 128 hex characters.
    Sha512,
}

impl Algorithm {
    /// The algorithm's name as it appears in a digest string.
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::Sha256 => "sha256",
            Algorithm::Sha512 => "sha512",
        }
    }

    fn hex_len(self) -> usize {
        match self {
            Algorithm::Sha256 => 64,
            Algorithm::Sha512 => 128,
        }
    }
}

/// A validated digest such as `sha256:e3b0…`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(String);

/// Why a string is not a digest.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DigestError {
    /// No `:` separator.
    #[error("digest must look like <algorithm>:<hex>")]
    Malformed,
    /// An algorithm other than sha256 or sha512.
    #[error("unsupported digest algorithm `{0}` (sha256 and sha512 are supported)")]
    UnsupportedAlgorithm(String),
    /// Wrong length or non-lowercase-hex characters.
    #[error("digest encoding must be {0} lowercase hex characters")]
    BadEncoding(usize),
}

impl Digest {
    /// Parses and validates a digest string.
    ///
    /// # Errors
    /// [`DigestError`] when the string is not a sha256/sha512 digest in canonical form.
    pub fn parse(s: &str) -> Result<Self, DigestError> {
        let (alg, enc) = s.split_once(':').ok_or(DigestError::Malformed)?;
        let algorithm = match alg {
            "sha256" => Algorithm::Sha256,
            "sha512" => Algorithm::Sha512,
            // The grammar allows other algorithms; we do not implement them.
            other if is_algorithm_grammar(other) => {
                return Err(DigestError::UnsupportedAlgorithm(other.to_string()));
            }
            _ => return Err(DigestError::Malformed),
        };
        let ok = enc.len() == algorithm.hex_len()
            && enc.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !ok {
            return Err(DigestError::BadEncoding(algorithm.hex_len()));
        }
        Ok(Digest(s.to_string()))
    }

    /// The sha256 digest of `bytes`.
    pub fn sha256_of(bytes: &[u8]) -> Self {
        Digest(format!("sha256:{}", hex::encode(Sha256::digest(bytes))))
    }

    /// The digest of `bytes` computed with this digest's algorithm.
    pub fn same_algorithm_of(&self, bytes: &[u8]) -> Self {
        match self.algorithm() {
            Algorithm::Sha256 => Self::sha256_of(bytes),
            Algorithm::Sha512 => {
                Digest(format!("sha512:{}", hex::encode(aws_lc_rs::digest::digest(&SHA512, bytes))))
            }
        }
    }

    /// The algorithm part.
    pub fn algorithm(&self) -> Algorithm {
        if self.0.starts_with("sha512:") { Algorithm::Sha512 } else { Algorithm::Sha256 }
    }

    /// The hex part after the colon.
    pub fn hex(&self) -> &str {
        &self.0[self.0.find(':').map_or(0, |i| i + 1)..]
    }

    /// The whole digest string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn is_algorithm_grammar(s: &str) -> bool {
    // algorithm-component ::= [a-z0-9]+, joined by [+._-]
    !s.is_empty()
        && s.split(['+', '.', '_', '-'])
            .all(|c| !c.is_empty() && c.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()))
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for Digest {
    type Err = DigestError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Digest::parse(s)
    }
}

impl serde::Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Digest::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// An incremental SHA-256 whose state can be saved between requests, so that a chunked
/// upload can continue on any process (or replica) without re-reading what it already has.
#[derive(Clone, Default)]
pub struct UploadHasher(Sha256);

impl UploadHasher {
    /// Feeds more bytes.
    pub fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    /// The digest of everything fed so far (the state is left untouched).
    pub fn digest(&self) -> Digest {
        Digest(format!("sha256:{}", hex::encode(self.0.finish())))
    }

    /// The opaque saved state.
    pub fn save(&self) -> Vec<u8> {
        self.0.save()
    }

    /// Restores a state from [`UploadHasher::save`]; `None` if the bytes are not one.
    pub fn restore(state: &[u8]) -> Option<Self> {
        Sha256::restore(state).map(UploadHasher)
    }
}

/// A one-pass hasher of either registered algorithm, for digests computed by reading bytes back
/// (fsck's re-hash, a composed S3 upload, sha512 uploads).
#[derive(Clone)]
pub enum ContentHasher {
    /// SHA-256 at the CPU's speed.
    Sha256(Sha256),
    /// SHA-512 (AWS-LC's, which picks the CPU's fastest code path; never saved mid-way, so its
    /// own context does).
    Sha512(Box<Context>),
}

impl ContentHasher {
    /// A hasher for `algorithm`.
    pub fn new(algorithm: Algorithm) -> Self {
        match algorithm {
            Algorithm::Sha256 => ContentHasher::Sha256(Sha256::default()),
            Algorithm::Sha512 => ContentHasher::Sha512(Box::new(Context::new(&SHA512))),
        }
    }

    /// Feeds more bytes.
    pub fn update(&mut self, bytes: &[u8]) {
        match self {
            ContentHasher::Sha256(h) => h.update(bytes),
            ContentHasher::Sha512(h) => h.update(bytes),
        }
    }

    /// The digest of everything fed.
    pub fn finish(self) -> Digest {
        match self {
            ContentHasher::Sha256(h) => Digest(format!("sha256:{}", hex::encode(h.finish()))),
            ContentHasher::Sha512(h) => Digest(format!("sha512:{}", hex::encode(h.finish()))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EMPTY: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn parses_valid_and_rejects_invalid() {
        assert_eq!(Digest::parse(EMPTY).unwrap().hex().len(), 64);
        assert!(Digest::parse(&format!("sha512:{}", "a".repeat(128))).is_ok());
        assert_eq!(Digest::parse("sha256"), Err(DigestError::Malformed));
        assert_eq!(Digest::parse("sha256:abc"), Err(DigestError::BadEncoding(64)));
        assert_eq!(Digest::parse(&format!("sha256:{}", "A".repeat(64))), Err(DigestError::BadEncoding(64)));
        assert!(matches!(
            Digest::parse("md5:d41d8cd98f00b204e9800998ecf8427e"),
            Err(DigestError::UnsupportedAlgorithm(_))
        ));
        assert_eq!(Digest::parse("SHA256:00"), Err(DigestError::Malformed));
    }

    #[test]
    fn sha512_in_pieces_of_odd_lengths_equals_the_one_shot_digest() {
        use sha2::Digest as _;
        let data: Vec<u8> = (0..300_007u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        let expected = format!("sha512:{}", hex::encode(sha2::Sha512::digest(&data)));
        for step in [1, 63, 127, 128, 129, 4095, 65_537] {
            let mut h = ContentHasher::new(Algorithm::Sha512);
            for piece in data.chunks(step) {
                h.update(piece);
            }
            assert_eq!(h.finish().as_str(), expected, "pieces of {step}");
        }
        let reference = Digest::parse(&expected).unwrap();
        assert_eq!(reference.same_algorithm_of(&data), reference);
    }

    #[test]
    fn hasher_state_survives_save_and_restore() {
        let mut h = UploadHasher::default();
        h.update(b"hello ");
        let mut restored = UploadHasher::restore(&h.save()).unwrap();
        restored.update(b"world");
        assert_eq!(restored.digest(), Digest::sha256_of(b"hello world"));
        assert_eq!(UploadHasher::default().digest().as_str(), EMPTY);
        assert!(UploadHasher::restore(b"junk").is_none());
    }
}
