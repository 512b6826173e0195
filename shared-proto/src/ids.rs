//! The hex digests the protocol passes around, as types: a [`ModelId`] (what a model *is*)
//! and a [`Sha256Hex`] (the hash of one blob). Both serialize as the plain lowercase hex string
//! they wrap, so the wire format is that of a `String`; what a value is can no longer be mixed
//! up in code (a blob hash handed where a model id is wanted does not compile).
//!
//! Neither checks its text when decoded: a malformed value in a signed message is caught where
//! it is used ([`ModelId::validate`] before it names a topic or a file, [`Sha256Hex::digest`]
//! before a hash is compared), with the reason that check reports.

use std::fmt;
use std::ops::Deref;

use serde::{Deserialize, Serialize};

use crate::ProtoError;

macro_rules! hex_digest {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            /// The hex text as it is on the wire.
            pub fn as_str(&self) -> &str {
                &self.0
            }

            /// The 32 bytes it spells, or `BadHash` unless it is 64 hex digits.
            pub fn digest(&self) -> Result<[u8; 32], ProtoError> {
                crate::hash::parse_sha256_hex(&self.0)
            }
        }

        impl From<String> for $name {
            fn from(s: String) -> Self {
                Self(s)
            }
        }

        impl From<&str> for $name {
            fn from(s: &str) -> Self {
                Self(s.to_string())
            }
        }

        impl From<[u8; 32]> for $name {
            fn from(d: [u8; 32]) -> Self {
                Self(hex::encode(d))
            }
        }

        impl From<$name> for String {
            fn from(v: $name) -> String {
                v.0
            }
        }

        // Read as text wherever a `&str` is taken (topics, file names, logs).
        impl Deref for $name {
            type Target = str;
            fn deref(&self) -> &str {
                &self.0
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl AsRef<std::path::Path> for $name {
            fn as_ref(&self) -> &std::path::Path {
                self.0.as_ref()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                self.0 == other
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.0 == *other
            }
        }

        impl PartialEq<String> for $name {
            fn eq(&self, other: &String) -> bool {
                &self.0 == other
            }
        }

        impl PartialEq<$name> for String {
            fn eq(&self, other: &$name) -> bool {
                self == &other.0
            }
        }

        impl PartialEq<$name> for &str {
            fn eq(&self, other: &$name) -> bool {
                *self == other.0
            }
        }
    };
}

hex_digest! {
    /// A model's content address: the lowercase hex SHA-256 of its canonical f32 safetensors
    /// ([`crate::tensor::model_id`]). It names the model's topics and its file in a cache.
    ModelId
}

hex_digest! {
    /// The lowercase hex SHA-256 of one blob (an encoded update, a published model blob).
    Sha256Hex
}

impl ModelId {
    /// Checks it is 64 lowercase hex digits, as it must be before naming a topic or a file.
    pub fn validate(&self) -> Result<(), ProtoError> {
        crate::topic::validate_model_id(&self.0)
    }
}

impl Sha256Hex {
    /// The hash of `bytes`.
    pub fn of(bytes: &[u8]) -> Sha256Hex {
        Sha256Hex(crate::hash::sha256_hex(bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_form_is_the_plain_string() {
        let id = ModelId::from([0xab; 32]);
        let mut cbor = Vec::new();
        ciborium::into_writer(&id, &mut cbor).unwrap();
        let mut plain = Vec::new();
        ciborium::into_writer(&"ab".repeat(32), &mut plain).unwrap();
        assert_eq!(cbor, plain);
        let back: ModelId = ciborium::from_reader(plain.as_slice()).unwrap();
        assert_eq!(back, id);
        assert!(back.validate().is_ok());
        assert_eq!(back.digest().unwrap(), [0xab; 32]);
    }

    #[test]
    fn malformed_values_fail_where_they_are_checked() {
        let id = ModelId::from("../etc/passwd");
        assert!(id.validate().is_err());
        assert!(id.digest().is_err());
        assert!(
            ModelId::from("AB".repeat(32)).validate().is_err(),
            "uppercase"
        );
        let h = Sha256Hex::of(b"abc");
        assert_eq!(h.digest().unwrap(), crate::hash::sha256(b"abc"));
        assert_eq!(h, crate::hash::sha256_hex(b"abc"));
        assert!(Sha256Hex::default().is_empty());
    }
}
