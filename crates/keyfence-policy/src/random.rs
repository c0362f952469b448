//! Randomness as an argument: the secrets and identifiers keyfence mints come from a
//! [`RandomSource`] the caller hands in, so that this crate never reaches for the OS generator and
//! tests can mint deterministically. The production source (the OS CSPRNG) lives in the binary.

/// A source of cryptographically secure random bytes.
pub trait RandomSource: Send + Sync {
    /// Fills `dest` with random bytes.
    fn fill(&self, dest: &mut [u8]);

    /// Random lowercase-alphanumeric text, each character uniform over the 36 symbols.
    fn token(&self, len: usize) -> String {
        const ALPHABET: &[u8; 36] = b"abcdefghijklmnopqrstuvwxyz0123456789";
        // 252 = 7 × 36: bytes at or above it are redrawn, so no symbol is favoured.
        const UNBIASED_BELOW: u8 = 252;
        let mut out = String::with_capacity(len);
        let mut buffer = [0u8; 64];
        while out.len() < len {
            self.fill(&mut buffer);
            for &byte in &buffer {
                if byte < UNBIASED_BELOW && out.len() < len {
                    out.push(char::from(ALPHABET[usize::from(byte % 36)]));
                }
            }
        }
        out
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::atomic::{AtomicU8, Ordering};

    use super::*;

    /// Counts up, byte by byte: deterministic, and never the same token twice in a short test.
    #[derive(Default)]
    pub(crate) struct Counter(AtomicU8);

    impl RandomSource for Counter {
        fn fill(&self, dest: &mut [u8]) {
            for byte in dest {
                *byte = self.0.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    #[test]
    fn tokens_use_the_alphabet_and_skip_biased_bytes() {
        let random = Counter::default();
        let token = random.token(300);
        assert_eq!(token.len(), 300);
        assert!(
            token
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        );
        // 252 of every 256 counter bytes are used, in order: the first 36 spell the alphabet.
        assert!(token.starts_with("abcdefghijklmnopqrstuvwxyz0123456789abc"));
        assert_ne!(random.token(20), random.token(20));
    }
}
