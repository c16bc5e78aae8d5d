//! The link key: a secret shared by the hosts of one protected VM (`--link-key FILE`).
//!
//! The file holds at least [`MIN_SECRET_LEN`] bytes (e.g. `head -c 32 /dev/urandom`) and must
//! be readable by its owner only (mode 0600 or 0400): a key others can read protects nothing,
//! so such a file is refused rather than warned about. The 32-byte pre-shared key of the Noise
//! handshake is derived from the file's bytes with HKDF-SHA256 (RFC 5869), so a key file of
//! any length at least that long can be used, and the key is never used directly.

use std::fmt;
use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use hkdf::Hkdf;
use sha2::Sha256;

/// Shortest secret accepted, in bytes.
pub const MIN_SECRET_LEN: usize = 32;
/// Longest key file read (a key is a few dozen bytes; anything this large is a mistake).
pub const MAX_SECRET_LEN: usize = 4096;

/// HKDF salt and info: name the purpose, so the same file used elsewhere yields another key.
const SALT: &[u8] = b"colo link key v1";
const INFO: &[u8] = b"noise psk";

/// Why a key file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// It cannot be read.
    #[error("cannot read the link key {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// It is not a regular file.
    #[error("the link key {0} is not a regular file")]
    NotAFile(PathBuf),
    /// Others may read or write it.
    #[error("the link key {path} has mode {mode:04o}; it must be 0600 or 0400 (chmod 600 {path})")]
    Mode {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// Too short to be a secret.
    #[error("the link key {path} holds {len} bytes; at least {MIN_SECRET_LEN} random bytes are needed (head -c 32 /dev/urandom > {path})")]
    TooShort {
        /// The file.
        path: PathBuf,
        /// Its length.
        len: usize,
    },
    /// Too long to be a key file.
    #[error("the link key {path} is larger than {MAX_SECRET_LEN} bytes; is it the right file?")]
    TooLong {
        /// The file.
        path: PathBuf,
    },
}

/// The derived pre-shared key. Its `Debug` never shows the key.
#[derive(Clone)]
pub struct LinkKey {
    psk: [u8; 32],
}

impl fmt::Debug for LinkKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("LinkKey(..)")
    }
}

impl LinkKey {
    /// Reads and checks the key file at `path`.
    pub fn load(path: &Path) -> Result<LinkKey, KeyError> {
        let read = |source| KeyError::Read { path: path.to_path_buf(), source };
        let meta = fs::metadata(path).map_err(read)?;
        if !meta.is_file() {
            return Err(KeyError::NotAFile(path.to_path_buf()));
        }
        let mode = meta.permissions().mode() & 0o7777;
        if mode != 0o600 && mode != 0o400 {
            return Err(KeyError::Mode { path: path.to_path_buf(), mode });
        }
        let mut secret = Vec::new();
        fs::File::open(path).map_err(read)?.take(MAX_SECRET_LEN as u64 + 1).read_to_end(&mut secret).map_err(read)?;
        if secret.len() > MAX_SECRET_LEN {
            return Err(KeyError::TooLong { path: path.to_path_buf() });
        }
        if secret.len() < MIN_SECRET_LEN {
            return Err(KeyError::TooShort { path: path.to_path_buf(), len: secret.len() });
        }
        let key = LinkKey::derive(&secret);
        secret.fill(0);
        Ok(key)
    }

    /// The key derived from `secret` (tests and tools; files go through [`LinkKey::load`]).
    pub fn derive(secret: &[u8]) -> LinkKey {
        let mut psk = [0u8; 32];
        Hkdf::<Sha256>::new(Some(SALT), secret).expand(INFO, &mut psk).expect("32 bytes is a valid HKDF-SHA256 length");
        LinkKey { psk }
    }

    /// The 32-byte pre-shared key for the handshake.
    pub(crate) fn psk(&self) -> &[u8; 32] {
        &self.psk
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::OpenOptionsExt;

    fn write(dir: &Path, name: &str, mode: u32, bytes: &[u8]) -> PathBuf {
        let path = dir.join(name);
        let mut f = fs::OpenOptions::new().create(true).write(true).truncate(true).mode(mode).open(&path).unwrap();
        std::io::Write::write_all(&mut f, bytes).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    fn tempdir() -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "colo-key-test-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn a_private_file_of_enough_bytes_is_a_key_and_the_same_bytes_give_the_same_key() {
        let d = tempdir();
        let a = LinkKey::load(&write(&d, "a", 0o600, &[7u8; 32])).unwrap();
        let b = LinkKey::load(&write(&d, "b", 0o400, &[7u8; 32])).unwrap();
        assert_eq!(a.psk(), b.psk());
        assert_ne!(a.psk(), &[7u8; 32], "derived, not the file's bytes");
        assert_ne!(a.psk(), LinkKey::derive(&[8u8; 32]).psk());
        assert_eq!(format!("{a:?}"), "LinkKey(..)");
        fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn readable_by_others_short_long_or_missing_files_are_refused() {
        let d = tempdir();
        let e = LinkKey::load(&write(&d, "open", 0o644, &[1u8; 32])).unwrap_err();
        assert!(e.to_string().contains("mode 0644") && e.to_string().contains("0600 or 0400"), "{e}");
        assert!(matches!(LinkKey::load(&write(&d, "group", 0o640, &[1u8; 32])), Err(KeyError::Mode { .. })));
        let e = LinkKey::load(&write(&d, "short", 0o600, &[1u8; 31])).unwrap_err();
        assert!(e.to_string().contains("31 bytes"), "{e}");
        assert!(matches!(LinkKey::load(&write(&d, "long", 0o600, &[1u8; 5000])), Err(KeyError::TooLong { .. })));
        assert!(matches!(LinkKey::load(&d.join("absent")), Err(KeyError::Read { .. })));
        assert!(matches!(LinkKey::load(&d), Err(KeyError::NotAFile(_))));
        fs::remove_dir_all(d).unwrap();
    }
}
