//! The disk as the guest and COLO see it: a raw image file, the blocks the guest wrote since
//! they were last collected (dirty tracking, like RAM's), and, on a COLO secondary, an overlay
//! that holds the SVM's own writes instead of the image.
//!
//! The secondary's image holds only what a checkpoint committed: the SVM's writes go to the
//! overlay (and its reads see them), the primary's blocks wait in a stage (an [`Overlay`] the
//! secondary owns) until their checkpoint is complete; at the checkpoint's load the overlay is
//! discarded and the stage written into the image ([`Disk::discard_writes`], [`Disk::apply`]).
//! On failover the survivor keeps its own writes ([`Disk::keep_writes`]) — the disk that matches
//! the memory it resumes with. The primary writes its image directly.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use super::overlay::{Overlay, RUN};
use super::{DiskConfig, BLOCK_SIZE, MIN_DISK, SECTOR_SIZE};
use crate::vstate::dirty::DirtyBitmap;

/// Why an image cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// It cannot be opened.
    #[error("--disk {path}: {source}")]
    Open {
        /// The image.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Not a regular file.
    #[error("--disk {0}: not a regular file (a raw image file is needed)")]
    NotAFile(PathBuf),
    /// Too small, or not whole blocks.
    #[error(
        "--disk {path}: the image is {bytes} bytes; a disk must be at least {min} bytes (1 MiB) and a whole number of {BLOCK_SIZE}-byte blocks",
        min = MIN_DISK
    )]
    Size {
        /// The image.
        path: PathBuf,
        /// Its size.
        bytes: u64,
    },
    /// Writable access was asked for a read-only image.
    #[error("--disk {path}: the image is read-only ({why}); add ',readonly' to give the guest a read-only disk")]
    ReadOnly {
        /// The image.
        path: PathBuf,
        /// What says so.
        why: String,
    },
    /// Another process has it open.
    #[error("--disk {0}: another process uses this image (each VM needs its own copy)")]
    Locked(PathBuf),
    /// Reading or writing it failed.
    #[error("disk {path}: {what}: {source}")]
    Io {
        /// The image.
        path: PathBuf,
        /// What was being done.
        what: &'static str,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// What the disk has done, for `query-status`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct DiskStats {
    /// Read requests served.
    pub reads: u64,
    /// Write requests served.
    pub writes: u64,
    /// Flush requests served.
    pub flushes: u64,
    /// Requests refused: malformed descriptor chains, out of range, writes to a read-only disk.
    pub bad_requests: u64,
}

struct Inner {
    image: File,
    /// The SVM's own writes (a COLO secondary), instead of the image.
    own: Option<Overlay>,
    /// Blocks written since the last collection, while tracking.
    dirty: Option<DirtyBitmap>,
    stats: DiskStats,
}

/// A disk; clones share it.
#[derive(Clone)]
pub struct Disk {
    inner: Arc<Mutex<Inner>>,
    path: PathBuf,
    dir: PathBuf,
    blocks: u64,
    readonly: bool,
}

fn io_err<'a>(path: &'a Path, what: &'static str) -> impl FnOnce(io::Error) -> DiskError + 'a {
    move |source| DiskError::Io { path: path.into(), what, source }
}

impl Disk {
    /// Opens the image of `config` (locked against other processes: shared for a read-only
    /// disk, exclusive otherwise). A missing, unusable, too small or (without `readonly`)
    /// read-only image is refused with a clear error.
    pub fn open(config: &DiskConfig) -> Result<Disk, DiskError> {
        let path = config.path.clone();
        let open_err = |source| DiskError::Open { path: path.clone(), source };
        let meta = std::fs::metadata(&path).map_err(open_err)?;
        if !meta.is_file() {
            return Err(DiskError::NotAFile(path));
        }
        let bytes = meta.len();
        if bytes < MIN_DISK || !bytes.is_multiple_of(BLOCK_SIZE as u64) {
            return Err(DiskError::Size { path, bytes });
        }
        if !config.readonly && meta.permissions().mode() & 0o222 == 0 {
            // root could write it anyway; the mode says it is not meant to be.
            let why = format!("mode {:o}", meta.permissions().mode() & 0o777);
            return Err(DiskError::ReadOnly { path, why });
        }
        let image =
            OpenOptions::new().read(true).write(!config.readonly).open(&path).map_err(|e| match e.raw_os_error() {
                Some(libc::EROFS | libc::EACCES | libc::EPERM) if !config.readonly => {
                    DiskError::ReadOnly { path: path.clone(), why: e.to_string() }
                }
                _ => DiskError::Open { path: path.clone(), source: e },
            })?;
        let how = if config.readonly { libc::LOCK_SH } else { libc::LOCK_EX };
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(image.as_raw_fd(), how | libc::LOCK_NB) } != 0 {
            return Err(DiskError::Locked(path));
        }
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_path_buf();
        Ok(Disk {
            inner: Arc::new(Mutex::new(Inner { image, own: None, dirty: None, stats: DiskStats::default() })),
            path,
            dir,
            blocks: bytes / BLOCK_SIZE as u64,
            readonly: config.readonly,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The image.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Blocks of [`BLOCK_SIZE`] bytes.
    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    /// Bytes.
    pub fn bytes(&self) -> u64 {
        self.blocks * BLOCK_SIZE as u64
    }

    /// 512-byte sectors.
    pub fn sectors(&self) -> u64 {
        self.bytes() / SECTOR_SIZE
    }

    /// Whether the guest may only read it.
    pub fn readonly(&self) -> bool {
        self.readonly
    }

    /// What it has served.
    pub fn stats(&self) -> DiskStats {
        self.lock().stats
    }

    /// Counts a request the device refused.
    pub fn count_bad_request(&self) {
        self.lock().stats.bad_requests += 1;
    }

    /// Reads `buf.len()` bytes at `offset` as the guest sees them (the caller checked the range).
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let mut inner = self.lock();
        inner.stats.reads += 1;
        read_view(&inner, offset, buf)
    }

    /// Writes `data` at `offset` (the caller checked the range): into the overlay when there is
    /// one, else into the image; the blocks touched count as dirty.
    pub fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        if self.readonly {
            return Err(io::Error::new(io::ErrorKind::PermissionDenied, "the disk is read-only"));
        }
        let mut inner = self.lock();
        inner.stats.writes += 1;
        if data.is_empty() {
            return Ok(());
        }
        let (first, last) = (offset / BLOCK_SIZE as u64, (offset + data.len() as u64 - 1) / BLOCK_SIZE as u64);
        if let Some(dirty) = inner.dirty.as_mut() {
            for b in first..=last {
                dirty.set(b as usize);
            }
        }
        if inner.own.is_none() {
            return inner.image.write_all_at(data, offset);
        }
        // Whole blocks into the overlay: a partial one is completed from what the guest sees.
        let mut block = vec![0u8; BLOCK_SIZE];
        for b in first..=last {
            let start = b * BLOCK_SIZE as u64;
            let from = offset.max(start);
            let to = (offset + data.len() as u64).min(start + BLOCK_SIZE as u64);
            if to - from < BLOCK_SIZE as u64 {
                read_view(&inner, start, &mut block)?;
            }
            block[(from - start) as usize..(to - start) as usize]
                .copy_from_slice(&data[(from - offset) as usize..(to - offset) as usize]);
            inner.own.as_mut().expect("checked").store(b, &block)?;
        }
        Ok(())
    }

    /// Makes what was written durable: the image's data is synced; an overlay's contents are not
    /// the disk's yet (a checkpoint discards them, a failover writes them and syncs).
    pub fn flush(&self) -> io::Result<()> {
        let mut inner = self.lock();
        inner.stats.flushes += 1;
        match inner.own {
            Some(_) => Ok(()),
            None => inner.image.sync_data(),
        }
    }

    /// Starts collecting written blocks (from none).
    pub fn start_tracking(&self) {
        self.lock().dirty = Some(DirtyBitmap::empty(self.blocks as usize));
    }

    /// Stops collecting.
    pub fn stop_tracking(&self) {
        self.lock().dirty = None;
    }

    /// The blocks written since the last call (or since tracking started); none when off.
    pub fn dirty_blocks(&self) -> DirtyBitmap {
        let fresh = DirtyBitmap::empty(self.blocks as usize);
        let mut inner = self.lock();
        match inner.dirty.as_mut() {
            Some(d) => std::mem::replace(d, fresh),
            None => fresh,
        }
    }

    /// Reads `buf.len() / BLOCK_SIZE` blocks from `first` on as the guest sees them (one read
    /// when there is no overlay).
    pub fn read_blocks(&self, first: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        let n = (buf.len() / BLOCK_SIZE) as u64;
        if first.checked_add(n).is_none_or(|end| end > self.blocks) {
            return Err(DiskError::Io {
                path: self.path.clone(),
                what: "reading blocks",
                source: io::Error::new(io::ErrorKind::InvalidInput, format!("blocks {first}+{n} are outside the disk")),
            });
        }
        read_view(&self.lock(), first * BLOCK_SIZE as u64, buf).map_err(io_err(&self.path, "reading blocks"))
    }

    /// Reads block `block` as the guest sees it.
    pub fn read_block(&self, block: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        if block >= self.blocks {
            return Err(DiskError::Io {
                path: self.path.clone(),
                what: "reading a block",
                source: io::Error::new(io::ErrorKind::InvalidInput, format!("block {block} is outside the disk")),
            });
        }
        read_view(&self.lock(), block * BLOCK_SIZE as u64, &mut buf[..BLOCK_SIZE])
            .map_err(io_err(&self.path, "reading a block"))
    }

    /// An empty stage for this disk's blocks (a file beside the image).
    pub fn new_stage(&self) -> Result<Overlay, DiskError> {
        Overlay::new(&self.dir, self.blocks).map_err(io_err(&self.path, "creating an overlay file beside the image"))
    }

    /// From now on the guest's writes go to an overlay, not the image (a COLO secondary).
    pub fn buffer_writes(&self) -> Result<(), DiskError> {
        let overlay = self.new_stage()?;
        self.lock().own = Some(overlay);
        Ok(())
    }

    /// Drops the guest's writes held in the overlay (a checkpoint replaces them); returns how
    /// many blocks they were.
    pub fn discard_writes(&self) -> Result<u64, DiskError> {
        let mut inner = self.lock();
        let Some(own) = inner.own.as_mut() else { return Ok(0) };
        let n = own.len() as u64;
        own.clear().map_err(io_err(&self.path, "discarding the overlay"))?;
        Ok(n)
    }

    /// Writes the guest's writes held in the overlay into the image, syncs it, and from now on
    /// writes the image directly (a failover: the survivor's own writes are its disk's).
    pub fn keep_writes(&self) -> Result<u64, DiskError> {
        let mut inner = self.lock();
        let Some(own) = inner.own.take() else { return Ok(0) };
        let image = &inner.image;
        own.for_each_run(|b, data| image.write_all_at(data, b * BLOCK_SIZE as u64))
            .and_then(|()| image.sync_data())
            .map_err(io_err(&self.path, "writing the overlay into the image"))?;
        Ok(own.len() as u64)
    }

    /// Writes the blocks of `stage` into the image (a checkpoint's or a transfer's, once it is
    /// complete); returns how many.
    pub fn apply(&self, stage: &Overlay) -> Result<u64, DiskError> {
        let inner = self.lock();
        let image = &inner.image;
        stage
            .for_each_run(|b, data| image.write_all_at(data, b * BLOCK_SIZE as u64))
            .map_err(io_err(&self.path, "writing received blocks into the image"))?;
        Ok(stage.len() as u64)
    }

    /// Makes the image exactly `stage` (a snapshot's or migration's disk, which carries every
    /// block that is not zero): its blocks are written, every other block becomes zero; then
    /// syncs. Blocks already equal are not written, so an image that is already a copy is left
    /// untouched.
    pub fn replace_with(&self, stage: &Overlay) -> Result<u64, DiskError> {
        let inner = self.lock();
        let image = &inner.image;
        let mut ours = vec![0u8; RUN * BLOCK_SIZE];
        let mut theirs = vec![0u8; BLOCK_SIZE];
        let zero = vec![0u8; BLOCK_SIZE];
        let mut written = 0;
        let result = (|| -> io::Result<()> {
            let mut first = 0;
            while first < self.blocks {
                let n = (RUN as u64).min(self.blocks - first);
                let chunk = &mut ours[..n as usize * BLOCK_SIZE];
                image.read_exact_at(chunk, first * BLOCK_SIZE as u64)?;
                for (i, current) in chunk.chunks(BLOCK_SIZE).enumerate() {
                    let b = first + i as u64;
                    let want: &[u8] = if stage.read(b, &mut theirs)? { &theirs } else { &zero };
                    if current != want {
                        image.write_all_at(want, b * BLOCK_SIZE as u64)?;
                        written += 1;
                    }
                }
                first += n;
            }
            image.sync_data()
        })();
        result.map_err(io_err(&self.path, "writing the received disk into the image"))?;
        Ok(written)
    }

    /// A 64-bit hash of every block as the guest sees it, in order (the verify mode).
    pub fn digests(&self) -> Result<Vec<u64>, DiskError> {
        let inner = self.lock();
        let mut buf = vec![0u8; BLOCK_SIZE];
        (0..self.blocks)
            .map(|b| {
                read_view(&inner, b * BLOCK_SIZE as u64, &mut buf).map_err(io_err(&self.path, "hashing the disk"))?;
                Ok(xxhash_rust::xxh3::xxh3_64(&buf))
            })
            .collect()
    }
}

/// Reads what the guest sees at `offset`: the overlay's blocks where it has them, the image
/// elsewhere.
fn read_view(inner: &Inner, offset: u64, buf: &mut [u8]) -> io::Result<()> {
    let Some(own) = inner.own.as_ref().filter(|o| !o.is_empty()) else {
        return inner.image.read_exact_at(buf, offset);
    };
    let mut block = vec![0u8; BLOCK_SIZE];
    let mut done = 0usize;
    while done < buf.len() {
        let at = offset + done as u64;
        let b = at / BLOCK_SIZE as u64;
        let within = (at % BLOCK_SIZE as u64) as usize;
        let n = (BLOCK_SIZE - within).min(buf.len() - done);
        if own.read(b, &mut block)? {
            buf[done..done + n].copy_from_slice(&block[within..within + n]);
        } else {
            inner.image.read_exact_at(&mut buf[done..done + n], at)?;
        }
        done += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::block::testing::image;

    fn block_of(d: &Disk, b: u64) -> Vec<u8> {
        let mut buf = vec![0u8; BLOCK_SIZE];
        d.read_block(b, &mut buf).unwrap();
        buf
    }

    fn on_image(config: &DiskConfig, b: u64) -> Vec<u8> {
        let mut buf = vec![0u8; BLOCK_SIZE];
        File::open(&config.path).unwrap().read_exact_at(&mut buf, b * BLOCK_SIZE as u64).unwrap();
        buf
    }

    #[test]
    fn bad_images_are_refused_with_clear_errors() {
        let (dir, config) = image(1);
        let e = |c: &DiskConfig| Disk::open(c).err().expect("refused").to_string();
        let missing = DiskConfig { path: dir.path("nope.img"), readonly: false };
        assert!(e(&missing).contains("No such file"), "{}", e(&missing));
        let small = DiskConfig { path: dir.path("small.img"), readonly: false };
        File::create(&small.path).unwrap().set_len(4096).unwrap();
        assert!(e(&small).contains("at least"), "{}", e(&small));
        File::create(&small.path).unwrap().set_len((1 << 20) + 512).unwrap();
        assert!(e(&small).contains("whole number"), "{}", e(&small));
        let dirpath = DiskConfig { path: dir.dir().to_path_buf(), readonly: false };
        assert!(e(&dirpath).contains("not a regular file"), "{}", e(&dirpath));
        std::fs::set_permissions(&config.path, std::fs::Permissions::from_mode(0o444)).unwrap();
        assert!(e(&config).contains("read-only"), "{}", e(&config));
        let ro = DiskConfig { readonly: true, ..config.clone() };
        let d = Disk::open(&ro).expect("a read-only image as a read-only disk");
        assert!(d.write(0, &[1u8; 512]).is_err(), "writes to a read-only disk fail");
        std::fs::set_permissions(&config.path, std::fs::Permissions::from_mode(0o644)).unwrap();
        drop(d);
        let _first = Disk::open(&config).unwrap();
        assert!(e(&config).contains("another process"), "locked: {}", e(&config));
    }

    #[test]
    fn an_overlay_holds_the_guests_writes_until_discarded_or_kept() {
        let (_dir, config) = image(1);
        let d = Disk::open(&config).unwrap();
        d.write(0, &[7u8; BLOCK_SIZE]).unwrap();
        assert_eq!(on_image(&config, 0), vec![7u8; BLOCK_SIZE], "without an overlay the image is written");
        d.buffer_writes().unwrap();
        // A partial write completes its block from what the guest saw.
        d.write(512, &[9u8; 512]).unwrap();
        d.write(3 * 4096 + 4000, &[5u8; 200]).unwrap(); // spans blocks 3 and 4
        let b0 = block_of(&d, 0);
        assert_eq!((&b0[..512], &b0[512..1024], &b0[1024..]), (&[7u8; 512][..], &[9u8; 512][..], &[7u8; 3072][..]));
        let mut span = vec![0u8; 200];
        d.read(3 * 4096 + 4000, &mut span).unwrap();
        assert_eq!(span, vec![5u8; 200], "a read across two overlay blocks");
        assert_eq!(on_image(&config, 0), vec![7u8; BLOCK_SIZE], "the image is untouched");
        assert_eq!(d.discard_writes().unwrap(), 3);
        assert_eq!(block_of(&d, 0), vec![7u8; BLOCK_SIZE], "discarded: the guest sees the image again");
        d.write(4096, &[1u8; 4096]).unwrap();
        assert_eq!(on_image(&config, 1), vec![0u8; BLOCK_SIZE]);
        assert_eq!(d.keep_writes().unwrap(), 1);
        assert_eq!(on_image(&config, 1), vec![1u8; BLOCK_SIZE], "kept: written into the image");
        d.write(8192, &[2u8; 4096]).unwrap();
        assert_eq!(on_image(&config, 2), vec![2u8; BLOCK_SIZE], "and the image is written directly again");
    }

    #[test]
    fn dirty_blocks_stages_and_replacement() {
        let (_dir, config) = image(1);
        let d = Disk::open(&config).unwrap();
        d.write(0, &[1u8; 512]).unwrap();
        assert_eq!(d.dirty_blocks().count(), 0, "not tracking");
        d.start_tracking();
        d.write(4096 * 5 + 512, &[1u8; 512]).unwrap();
        d.write(4096 * 7 - 512, &[1u8; 1024]).unwrap();
        assert_eq!(d.dirty_blocks().iter().collect::<Vec<_>>(), vec![5, 6, 7]);
        assert_eq!(d.dirty_blocks().count(), 0, "collected");
        let mut stage = d.new_stage().unwrap();
        stage.store(2, &[4u8; BLOCK_SIZE]).unwrap();
        assert_eq!(d.apply(&stage).unwrap(), 1);
        assert_eq!(on_image(&config, 2), vec![4u8; BLOCK_SIZE]);
        // Replacing: the stage's blocks, zero elsewhere (blocks 0, 2, 5, 6 and 7 were written).
        stage.clear().unwrap();
        stage.store(9, &[8u8; BLOCK_SIZE]).unwrap();
        let written = d.replace_with(&stage).unwrap();
        assert_eq!(written, 6, "five blocks zeroed, block 9 written");
        assert_eq!(d.replace_with(&stage).unwrap(), 0, "a copy already: nothing written");
        let digests = d.digests().unwrap();
        assert_eq!(digests.len(), 256);
        let zero = xxhash_rust::xxh3::xxh3_64(&[0u8; BLOCK_SIZE]);
        assert!(digests.iter().enumerate().all(|(b, &h)| (h == zero) == (b != 9)), "only block 9 is not zero");
    }
}
