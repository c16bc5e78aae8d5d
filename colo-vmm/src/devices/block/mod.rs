//! The block device: `--disk path=FILE[,readonly]`, a raw image behind virtio-blk on
//! virtio-mmio, served by the VMM itself.
//!
//! - [`disk`]: the image as COLO needs it — the guest's view, the blocks it wrote (tracked like
//!   dirty pages), and an overlay that holds a secondary's own writes until a checkpoint
//!   discards them or a failover keeps them;
//! - [`overlay`]: blocks kept beside an image in a private file (a secondary's own writes, the
//!   primary's blocks of a checkpoint in flight, a migration's blocks until it completed);
//! - [`virtio_blk`]: the virtio-blk device on the guest's queue.

pub mod disk;
pub mod overlay;
pub mod virtio_blk;

use std::path::PathBuf;
use std::str::FromStr;

/// Bytes of a block: the unit of dirty tracking, transfer and overlays (the guest's sectors
/// are 512 bytes; a partial write dirties its whole block).
pub const BLOCK_SIZE: usize = 4096;
/// Bytes of a virtio-blk sector.
pub const SECTOR_SIZE: u64 = 512;
/// Smallest image accepted.
pub const MIN_DISK: u64 = 1 << 20;

/// `--disk path=FILE[,readonly]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskConfig {
    /// The raw image.
    pub path: PathBuf,
    /// The guest may only read it (virtio-blk `RO`): the VMM opens it read-only and never
    /// writes it.
    pub readonly: bool,
}

/// Why a `--disk` option is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DiskOptionError {
    /// A part that is neither `path=FILE` nor `readonly`.
    #[error("'{part}' in '{option}': expected path=FILE[,readonly]")]
    Part {
        /// The part.
        part: String,
        /// The whole option.
        option: String,
    },
    /// No path.
    #[error("'{0}': missing path=FILE")]
    NoPath(String),
}

impl FromStr for DiskConfig {
    type Err = DiskOptionError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut path = None;
        let mut readonly = false;
        for part in s.split(',') {
            match part.split_once('=') {
                Some(("path", p)) if !p.is_empty() => path = Some(PathBuf::from(p)),
                None if part == "readonly" => readonly = true,
                _ => return Err(DiskOptionError::Part { part: part.into(), option: s.into() }),
            }
        }
        let path = path.ok_or_else(|| DiskOptionError::NoPath(s.into()))?;
        Ok(DiskConfig { path, readonly })
    }
}

/// Images for unit tests.
#[cfg(test)]
pub(crate) mod testing {
    use colo_test_support::TempDir;

    use super::DiskConfig;

    /// A fresh zeroed image of `mib` MiB in a directory of its own.
    pub(crate) fn image(mib: u64) -> (TempDir, DiskConfig) {
        let dir = TempDir::new("disk-test");
        let path = dir.path("disk.img");
        std::fs::File::create(&path).unwrap().set_len(mib << 20).unwrap();
        (dir, DiskConfig { path, readonly: false })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_option_parses() {
        let d: DiskConfig = "path=/var/lib/vm.img".parse().unwrap();
        assert_eq!(d, DiskConfig { path: "/var/lib/vm.img".into(), readonly: false });
        let d: DiskConfig = "path=/x.img,readonly".parse().unwrap();
        assert!(d.readonly);
        for bad in ["", "readonly", "path=", "path=/x,ro", "file=/x", "path=/x,readonly=1"] {
            assert!(bad.parse::<DiskConfig>().is_err(), "{bad}");
        }
    }
}
