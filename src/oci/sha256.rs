//! SHA-256 at the CPU's speed with a state Berth keeps itself.
//!
//! The block function is AWS-LC's (`SHA256_TransformBlocks`, already linked through `aws-lc-rs`),
//! which picks the fastest code path the CPU offers at run time — SHA-NI, AVX2, AVX, SSSE3, or
//! portable code — where the `sha2` crate has only SHA-NI and portable code. The state around it
//! (eight words, the number of blocks hashed, the partial block) is ours, so an upload's hash can
//! be saved between requests and resumed on any replica. The saved form is byte for byte the one
//! `sha2` 0.11 wrote (state words and block count little-endian, then the partial block's length
//! and bytes), so sessions saved by an older Berth resume.

use std::sync::Once;

const INITIAL: [u32; 8] =
    [0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19];

/// Length of [`Sha256::save`]'s output: the words, the block count, the partial block's length
/// and its (at most 63) bytes.
pub const SAVED_LEN: usize = 32 + 8 + 1 + 63;

/// An incremental SHA-256.
#[derive(Clone)]
pub struct Sha256 {
    state: [u32; 8],
    blocks: u64,
    partial: [u8; 64],
    partial_len: usize,
}

impl Default for Sha256 {
    fn default() -> Self {
        Sha256 { state: INITIAL, blocks: 0, partial: [0; 64], partial_len: 0 }
    }
}

/// Hashes whole 64-byte blocks into `state`.
fn transform(state: &mut [u32; 8], blocks: &[u8]) {
    debug_assert_eq!(blocks.len() % 64, 0);
    static CPU_FEATURES: Once = Once::new();
    // AWS-LC reads the CPU's features once; its own entry points do this, the bare block
    // function does not.
    CPU_FEATURES.call_once(|| unsafe { aws_lc_sys::CRYPTO_library_init() });
    if blocks.is_empty() {
        return;
    }
    // SAFETY: `state` is eight words, `blocks` holds `len / 64` whole blocks; the function reads
    // exactly those and writes only the state.
    unsafe { aws_lc_sys::SHA256_TransformBlocks(state.as_mut_ptr(), blocks.as_ptr(), blocks.len() / 64) };
}

impl Sha256 {
    /// Feeds more bytes.
    pub fn update(&mut self, mut bytes: &[u8]) {
        if self.partial_len > 0 {
            let take = (64 - self.partial_len).min(bytes.len());
            self.partial[self.partial_len..self.partial_len + take].copy_from_slice(&bytes[..take]);
            self.partial_len += take;
            bytes = &bytes[take..];
            if self.partial_len < 64 {
                return;
            }
            let block = self.partial;
            transform(&mut self.state, &block);
            self.blocks += 1;
            self.partial_len = 0;
        }
        let whole = bytes.len() / 64 * 64;
        transform(&mut self.state, &bytes[..whole]);
        self.blocks += (whole / 64) as u64;
        let tail = &bytes[whole..];
        self.partial[..tail.len()].copy_from_slice(tail);
        self.partial_len = tail.len();
    }

    /// The digest of everything fed so far (the state is left as it is).
    pub fn finish(&self) -> [u8; 32] {
        let mut state = self.state;
        let bits = (self.blocks * 64 + self.partial_len as u64).wrapping_mul(8);
        let mut last = [0u8; 128];
        last[..self.partial_len].copy_from_slice(&self.partial[..self.partial_len]);
        last[self.partial_len] = 0x80;
        let len = if self.partial_len < 56 { 64 } else { 128 };
        last[len - 8..len].copy_from_slice(&bits.to_be_bytes());
        transform(&mut state, &last[..len]);
        let mut out = [0u8; 32];
        for (chunk, word) in out.chunks_exact_mut(4).zip(state) {
            chunk.copy_from_slice(&word.to_be_bytes());
        }
        out
    }

    /// The digest of `bytes`.
    pub fn digest(bytes: &[u8]) -> [u8; 32] {
        let mut h = Sha256::default();
        h.update(bytes);
        h.finish()
    }

    /// The saved state ([`SAVED_LEN`] bytes).
    pub fn save(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(SAVED_LEN);
        for word in self.state {
            out.extend_from_slice(&word.to_le_bytes());
        }
        out.extend_from_slice(&self.blocks.to_le_bytes());
        out.push(self.partial_len as u8);
        out.extend_from_slice(&self.partial[..self.partial_len]);
        out.resize(SAVED_LEN, 0);
        out
    }

    /// Restores a state from [`Sha256::save`]; `None` if the bytes are not one.
    pub fn restore(saved: &[u8]) -> Option<Self> {
        if saved.len() != SAVED_LEN {
            return None;
        }
        let mut state = [0u32; 8];
        for (word, chunk) in state.iter_mut().zip(saved[..32].chunks_exact(4)) {
            *word = u32::from_le_bytes(chunk.try_into().ok()?);
        }
        let blocks = u64::from_le_bytes(saved[32..40].try_into().ok()?);
        let partial_len = usize::from(saved[40]);
        let data = &saved[41..];
        if partial_len >= 64 || data[partial_len..].iter().any(|&b| b != 0) {
            return None;
        }
        let mut partial = [0u8; 64];
        partial[..partial_len].copy_from_slice(&data[..partial_len]);
        Some(Sha256 { state, blocks, partial, partial_len })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::Digest as _;
    use sha2::digest::common::hazmat::SerializableState;

    fn bytes(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 31 % 251) as u8).collect()
    }

    #[test]
    fn equals_the_one_shot_digest_across_saves_at_odd_offsets() {
        let data = bytes(100_003);
        let expected: [u8; 32] = sha2::Sha256::digest(&data).into();
        assert_eq!(Sha256::digest(&data), expected);
        for step in [1, 7, 63, 64, 65, 1000, 4099] {
            let mut h = Sha256::default();
            for chunk in data.chunks(step) {
                h = Sha256::restore(&h.save()).unwrap();
                h.update(chunk);
            }
            assert_eq!(h.finish(), expected, "chunks of {step}");
        }
        for n in [0, 1, 55, 56, 57, 63, 64, 65, 119, 120, 128] {
            let d = bytes(n);
            assert_eq!(Sha256::digest(&d), <[u8; 32]>::from(sha2::Sha256::digest(&d)), "{n} bytes");
        }
    }

    #[test]
    fn resumes_states_saved_by_the_sha2_crate_and_the_other_way() {
        let data = bytes(10_000);
        for cut in [0, 5, 64, 100, 9_999] {
            let mut old = sha2::Sha256::new();
            old.update(&data[..cut]);
            let saved = old.serialize().to_vec();
            assert_eq!(saved.len(), SAVED_LEN);
            let mut new = Sha256::restore(&saved).unwrap();
            assert_eq!(new.save(), saved, "the same saved form at {cut}");
            new.update(&data[cut..]);
            assert_eq!(new.finish(), <[u8; 32]>::from(sha2::Sha256::digest(&data)));
        }
        assert!(Sha256::restore(b"junk").is_none());
        let mut bad = Sha256::default().save();
        bad[40] = 64;
        assert!(Sha256::restore(&bad).is_none());
    }
}
