//! ed25519 keys: signing manifests, verifying them, key files and fingerprints.
//!
//! Private keys are stored as PKCS#8 PEM (mode 0600), public keys as SPKI PEM or in a compact
//! one-line form `ed25519:<base64 of the 32 raw bytes>` that fits in a status message or a
//! config file. Fingerprints follow ssh: `SHA256:<unpadded base64 of sha256(raw key)>`.

use std::fmt;
use std::str::FromStr;

use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD};
use base64::Engine;
use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey};
use ed25519_dalek::{Signer, SigningKey, VerifyingKey};

use crate::hash::sha256;
use crate::ProtoError;

/// Prefix of the compact public key form.
pub const COMPACT_PREFIX: &str = "ed25519:";

/// An ed25519 signing key. `Debug` never prints the secret.
#[derive(Clone)]
pub struct KeyPair(SigningKey);

impl fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("KeyPair")
            .field(&self.public().fingerprint())
            .finish()
    }
}

impl KeyPair {
    /// A fresh key from the operating system's CSPRNG.
    pub fn generate() -> Self {
        Self(SigningKey::generate(&mut rand::rngs::OsRng))
    }

    /// A key from 32 secret bytes (tests and deterministic fixtures).
    pub fn from_secret_bytes(secret: &[u8; 32]) -> Self {
        Self(SigningKey::from_bytes(secret))
    }

    /// Parses a PKCS#8 PEM private key (`-----BEGIN PRIVATE KEY-----`, as `openssl genpkey
    /// -algorithm ed25519` writes).
    pub fn from_pem(pem: &str) -> Result<Self, ProtoError> {
        SigningKey::from_pkcs8_pem(pem)
            .map(Self)
            .map_err(|e| ProtoError::BadKey(format!("private key: {e}")))
    }

    /// PKCS#8 PEM of the private key.
    pub fn to_pem(&self) -> String {
        // Encoding a valid 32-byte key cannot fail; fall back to empty rather than panic.
        self.0
            .to_pkcs8_pem(LineEnding::LF)
            .map(|z| z.as_str().to_owned())
            .unwrap_or_default()
    }

    pub fn public(&self) -> PublicKey {
        PublicKey(self.0.verifying_key())
    }

    pub fn sign(&self, msg: &[u8]) -> [u8; 64] {
        self.0.sign(msg).to_bytes()
    }
}

/// An ed25519 verifying key. `Display`/`FromStr` use the compact form; `FromStr` also takes PEM.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct PublicKey(VerifyingKey);

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("PublicKey")
            .field(&self.fingerprint())
            .finish()
    }
}

impl PublicKey {
    pub fn from_bytes(raw: &[u8; 32]) -> Result<Self, ProtoError> {
        VerifyingKey::from_bytes(raw)
            .map(Self)
            .map_err(|e| ProtoError::BadKey(format!("public key: {e}")))
    }

    pub fn to_bytes(&self) -> [u8; 32] {
        self.0.to_bytes()
    }

    /// Parses an SPKI PEM public key (`-----BEGIN PUBLIC KEY-----`).
    pub fn from_pem(pem: &str) -> Result<Self, ProtoError> {
        VerifyingKey::from_public_key_pem(pem)
            .map(Self)
            .map_err(|e| ProtoError::BadKey(format!("public key: {e}")))
    }

    pub fn to_pem(&self) -> String {
        self.0.to_public_key_pem(LineEnding::LF).unwrap_or_default()
    }

    /// `ed25519:<base64>`: one line, safe in MQTT payloads, TOML and shell arguments.
    pub fn to_compact(&self) -> String {
        format!("{COMPACT_PREFIX}{}", STANDARD.encode(self.0.as_bytes()))
    }

    pub fn from_compact(s: &str) -> Result<Self, ProtoError> {
        let b64 = s
            .trim()
            .strip_prefix(COMPACT_PREFIX)
            .ok_or_else(|| ProtoError::BadKey("missing ed25519: prefix".into()))?;
        let raw = STANDARD
            .decode(b64)
            .map_err(|e| ProtoError::BadKey(format!("public key base64: {e}")))?;
        let raw: [u8; 32] = raw
            .try_into()
            .map_err(|_| ProtoError::BadKey("public key is not 32 bytes".into()))?;
        Self::from_bytes(&raw)
    }

    /// Accepts either the compact form or SPKI PEM.
    pub fn parse(s: &str) -> Result<Self, ProtoError> {
        if s.trim_start().starts_with("-----BEGIN") {
            Self::from_pem(s)
        } else {
            Self::from_compact(s)
        }
    }

    /// `SHA256:<base64>` of the raw key, as `ssh-keygen -l` prints fingerprints.
    pub fn fingerprint(&self) -> String {
        format!(
            "SHA256:{}",
            STANDARD_NO_PAD.encode(sha256(self.0.as_bytes()))
        )
    }

    /// Strict verification: rejects non-canonical signatures and weak keys, so a signature
    /// cannot be malleated into a second valid one.
    pub fn verify(&self, msg: &[u8], sig: &[u8]) -> Result<(), ProtoError> {
        let sig =
            ed25519_dalek::Signature::from_slice(sig).map_err(|_| ProtoError::BadSignature)?;
        self.0
            .verify_strict(msg, &sig)
            .map_err(|_| ProtoError::BadSignature)
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_compact())
    }
}

impl FromStr for PublicKey {
    type Err = ProtoError;
    fn from_str(s: &str) -> Result<Self, ProtoError> {
        Self::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_and_verify() {
        let k = KeyPair::generate();
        let sig = k.sign(b"hello");
        assert!(k.public().verify(b"hello", &sig).is_ok());
        assert!(matches!(
            k.public().verify(b"hellp", &sig),
            Err(ProtoError::BadSignature)
        ));
        assert!(KeyPair::generate().public().verify(b"hello", &sig).is_err());
        assert!(k.public().verify(b"hello", &sig[..63]).is_err());
        let mut bad = sig;
        bad[10] ^= 1;
        assert!(k.public().verify(b"hello", &bad).is_err());
    }

    #[test]
    fn pem_and_compact_round_trips() {
        let k = KeyPair::generate();
        let pem = k.to_pem();
        assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----"));
        let k2 = KeyPair::from_pem(&pem).unwrap();
        assert_eq!(k2.public(), k.public());

        let p = k.public();
        assert!(p.to_pem().starts_with("-----BEGIN PUBLIC KEY-----"));
        assert_eq!(PublicKey::from_pem(&p.to_pem()).unwrap(), p);
        assert_eq!(PublicKey::from_compact(&p.to_compact()).unwrap(), p);
        assert_eq!(p.to_string().parse::<PublicKey>().unwrap(), p);
        assert_eq!(p.to_pem().parse::<PublicKey>().unwrap(), p);
        assert!(PublicKey::parse("ed25519:AAAA").is_err());
        assert!(PublicKey::parse("garbage").is_err());
        assert!(KeyPair::from_pem(&p.to_pem()).is_err());
    }

    #[test]
    fn fingerprint_is_ssh_style() {
        // RFC 8032 test 1 secret; its public key is d75a98...
        let secret: [u8; 32] =
            hex::decode("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
                .unwrap()
                .try_into()
                .unwrap();
        let k = KeyPair::from_secret_bytes(&secret);
        assert_eq!(
            hex::encode(k.public().to_bytes()),
            "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"
        );
        let fp = k.public().fingerprint();
        assert!(fp.starts_with("SHA256:"));
        assert_eq!(fp.len(), 7 + 43); // 32 bytes, unpadded base64
        assert_eq!(
            fp,
            format!(
                "SHA256:{}",
                STANDARD_NO_PAD.encode(sha256(&k.public().to_bytes()))
            )
        );
        assert!(!format!("{k:?}").contains(&hex::encode(secret)));
    }
}
