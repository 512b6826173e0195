//! ed25519 key files: the I/O half of `shared_proto::sign`, which only parses and prints.

use std::path::Path;

use shared_proto::sign::{KeyPair, PublicKey};

use crate::fs::{write_atomic, write_private, Durability};
use crate::Error;

fn read(path: &Path) -> Result<String, Error> {
    std::fs::read_to_string(path).map_err(Error::io(path))
}

fn key_err(path: &Path) -> impl FnOnce(shared_proto::ProtoError) -> Error + '_ {
    move |source| Error::Key {
        path: path.to_owned(),
        source,
    }
}

/// Reads a PKCS#8 PEM private key file.
pub fn load_keypair(path: impl AsRef<Path>) -> Result<KeyPair, Error> {
    let path = path.as_ref();
    KeyPair::from_pem(&read(path)?).map_err(key_err(path))
}

/// Writes the private key as PKCS#8 PEM, owner-only (0600), durably.
pub fn save_keypair(path: impl AsRef<Path>, key: &KeyPair) -> Result<(), Error> {
    write_private(path.as_ref(), key.to_pem().as_bytes())
}

/// Reads a public key file, PEM or compact form.
pub fn load_public_key(path: impl AsRef<Path>) -> Result<PublicKey, Error> {
    let path = path.as_ref();
    PublicKey::parse(&read(path)?).map_err(key_err(path))
}

/// Writes a public key as SPKI PEM (world-readable), durably.
pub fn save_public_key(path: impl AsRef<Path>, key: &PublicKey) -> Result<(), Error> {
    write_atomic(path.as_ref(), key.to_pem().as_bytes(), Durability::Durable)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_through_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.key");
        let k = KeyPair::generate();
        save_keypair(&path, &k).unwrap();
        assert_eq!(load_keypair(&path).unwrap().public(), k.public());
        // Overwriting (a rotated key) works too.
        save_keypair(&path, &k).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(
                mode & 0o077,
                0,
                "private key must not be group/world readable"
            );
        }
        let pub_path = dir.path().join("agent.pub");
        save_public_key(&pub_path, &k.public()).unwrap();
        assert_eq!(load_public_key(&pub_path).unwrap(), k.public());
        std::fs::write(&pub_path, k.public().to_compact()).unwrap();
        assert_eq!(load_public_key(&pub_path).unwrap(), k.public());
        assert!(matches!(
            load_keypair(dir.path().join("missing")),
            Err(Error::Io { .. })
        ));
        std::fs::write(&pub_path, "garbage").unwrap();
        assert!(matches!(load_public_key(&pub_path), Err(Error::Key { .. })));
    }
}
