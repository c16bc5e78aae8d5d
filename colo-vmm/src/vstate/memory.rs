//! Guest RAM: one memfd mapped shared, so a vhost-user backend can map the same pages, with a
//! vm-memory dirty bitmap that records the VMM's own writes (KVM only sees the vCPU's).

use std::ffi::CString;
use std::fs::File;
use std::os::fd::FromRawFd;

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{FileOffset, GuestAddress};

/// Guest memory with a dirty bitmap for writes made through vm-memory.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<AtomicBitmap>;
/// One region of it.
pub type GuestRegionMmap = vm_memory::GuestRegionMmap<AtomicBitmap>;

/// Errors creating guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// memfd_create or ftruncate failed.
    #[error("cannot create the guest memory file: {0}")]
    Memfd(std::io::Error),
    /// Mapping it failed.
    #[error("cannot map {size} bytes of guest memory: {error}")]
    Map {
        /// Bytes asked for.
        size: u64,
        /// What vm-memory said.
        error: String,
    },
}

/// Guest RAM backed by a memfd.
#[derive(Debug)]
pub struct GuestRam {
    memory: GuestMemoryMmap,
    file: File,
    size: u64,
}

impl GuestRam {
    /// `size` bytes of RAM from guest-physical address 0, zero-filled.
    pub fn new(size: u64) -> Result<GuestRam, MemoryError> {
        let name = CString::new("colo-vmm-guest-ram").expect("no NUL");
        // SAFETY: memfd_create with a valid C string; the result is checked.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
        if fd < 0 {
            return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
        }
        // SAFETY: `fd` is a fresh descriptor we own.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size).map_err(MemoryError::Memfd)?;
        // Fix the size: nobody (the backend included) may shrink it under our mappings.
        // SAFETY: fcntl on our own descriptor.
        unsafe { libc::fcntl(fd, libc::F_ADD_SEALS, libc::F_SEAL_GROW | libc::F_SEAL_SHRINK) };
        let offset = FileOffset::new(file.try_clone().map_err(MemoryError::Memfd)?, 0);
        let memory = GuestMemoryMmap::from_ranges_with_files([(GuestAddress(0), size as usize, Some(offset))])
            .map_err(|e| MemoryError::Map { size, error: e.to_string() })?;
        Ok(GuestRam { memory, file, size })
    }

    /// The mapped memory.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    /// The memfd.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Bytes of RAM.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The host address of guest-physical 0 (RAM is one contiguous mapping).
    pub fn host_base(&self) -> u64 {
        use vm_memory::GuestMemoryBackend;
        self.memory.iter().next().map(|r| r.as_ptr() as u64).expect("one region")
    }
}
