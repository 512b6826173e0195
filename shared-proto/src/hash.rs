//! SHA-256 helpers: blob hashes in manifests, model ids, key fingerprints.

use sha2::{Digest, Sha256};

use crate::ProtoError;

/// SHA-256 of `bytes`.
pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// SHA-256 of `bytes` as lowercase hex (the form used in manifests and model ids).
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(sha256(bytes))
}

/// Parses a 64-digit hex SHA-256 (either case).
pub fn parse_sha256_hex(s: &str) -> Result<[u8; 32], ProtoError> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(s, &mut out)
        .map_err(|_| ProtoError::BadHash(s.chars().take(80).collect()))?;
    Ok(out)
}

/// Checks that `bytes` hash to `expected`.
pub fn verify(bytes: &[u8], expected: &[u8; 32]) -> Result<(), ProtoError> {
    let actual = sha256(bytes);
    if &actual == expected {
        Ok(())
    } else {
        Err(ProtoError::HashMismatch {
            expected: hex::encode(expected),
            actual: hex::encode(actual),
        })
    }
}

/// Incremental SHA-256, for callers that stream a blob (e.g. chunks spooled to disk).
#[derive(Clone, Default)]
pub struct StreamHasher(Sha256);

impl StreamHasher {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    pub fn finalize(self) -> [u8; 32] {
        self.0.finalize().into()
    }

    /// The digest as lowercase hex, as [`sha256_hex`] gives it.
    pub fn finalize_hex(self) -> String {
        hex::encode(self.finalize())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_vector() {
        // FIPS 180-2 test vector.
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn streaming_matches_one_shot() {
        let mut h = StreamHasher::new();
        h.update(b"hello ");
        h.update(b"world");
        assert_eq!(h.clone().finalize_hex(), sha256_hex(b"hello world"));
        assert_eq!(h.finalize(), sha256(b"hello world"));
    }

    #[test]
    fn verify_and_parse() {
        let d = sha256(b"x");
        assert!(verify(b"x", &d).is_ok());
        assert!(matches!(
            verify(b"y", &d),
            Err(ProtoError::HashMismatch { .. })
        ));
        assert_eq!(parse_sha256_hex(&hex::encode(d)).unwrap(), d);
        assert_eq!(parse_sha256_hex(&hex::encode(d).to_uppercase()).unwrap(), d);
        assert!(parse_sha256_hex("abc").is_err());
        assert!(parse_sha256_hex(&"zz".repeat(32)).is_err());
    }
}
