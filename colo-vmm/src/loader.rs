//! Loading a guest: the ELF image, and the boot state the ABI promises (GDT and TSS, page
//! tables, boot-info block, command line).

use std::fs::File;
use std::io::Cursor;
use std::path::{Path, PathBuf};

use colo_vmm_abi::{
    BootInfo, VirtioMmioDevice, BOOT_INFO, BOOT_MAGIC, BOOT_VERSION, CMDLINE, CMDLINE_MAX, IMAGE_BASE,
    MAX_VIRTIO_DEVICES, TSS,
};
use linux_loader::loader::{elf::Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress};

use crate::arch::{gdt, paging};
use crate::vstate::memory::GuestMemoryMmap;

/// The reference guest, built with the workspace (empty if the guest crate was missing).
pub static REFERENCE_GUEST: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/reference-guest.elf"));

/// Errors loading a guest.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The kernel file could not be read.
    #[error("cannot read kernel {path}: {error}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        error: std::io::Error,
    },
    /// The image is not a loadable x86-64 ELF executable (or does not fit in memory).
    #[error("{what} is not a loadable x86-64 ELF executable: {error}")]
    Elf {
        /// Which image.
        what: String,
        /// What the loader said.
        error: linux_loader::loader::Error,
    },
    /// No reference guest is embedded in this build.
    #[error("this colo-vmm was built without the reference guest; pass --kernel")]
    NoReferenceGuest,
    /// The command line is too long.
    #[error("command line is {0} bytes; at most {max} fit", max = CMDLINE_MAX - 1)]
    CmdlineTooLong(usize),
    /// Writing guest memory failed (it is too small for the boot structures).
    #[error("writing {what} into guest memory: {error}")]
    Write {
        /// What was written.
        what: &'static str,
        /// Why it failed.
        error: vm_memory::GuestMemoryError,
    },
}

/// Where the guest image comes from.
#[derive(Debug, Clone)]
pub enum Image {
    /// The embedded reference guest.
    Reference,
    /// An ELF file.
    File(PathBuf),
}

/// What loading produced.
#[derive(Debug, Clone, Copy)]
pub struct Loaded {
    /// Entry point.
    pub entry: u64,
    /// First page after the image.
    pub end: u64,
}

/// Loads `image` into `mem` at its physical addresses.
pub fn load_image(mem: &GuestMemoryMmap, image: &Image) -> Result<Loaded, LoadError> {
    let result = match image {
        Image::Reference => {
            if REFERENCE_GUEST.is_empty() {
                return Err(LoadError::NoReferenceGuest);
            }
            Elf::load(mem, None, &mut Cursor::new(REFERENCE_GUEST), Some(GuestAddress(IMAGE_BASE)))
                .map_err(|error| LoadError::Elf { what: "the reference guest".into(), error })?
        }
        Image::File(path) => {
            let mut f = File::open(path).map_err(|error| LoadError::Read { path: path.clone(), error })?;
            Elf::load(mem, None, &mut f, Some(GuestAddress(IMAGE_BASE)))
                .map_err(|error| LoadError::Elf { what: path.display().to_string(), error })?
        }
    };
    let end = (result.kernel_end + 0xfff) & !0xfff;
    Ok(Loaded { entry: result.kernel_load.0, end })
}

/// Writes the GDT, TSS, page tables, command line and boot-info block.
pub fn write_boot_state(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    loaded: &Loaded,
    cmdline: &str,
    tsc_khz: u64,
    virtio: &[VirtioMmioDevice],
    cpus: u32,
) -> Result<(), LoadError> {
    let w = |what: &'static str, at: u64, bytes: &[u8]| {
        mem.write_slice(bytes, GuestAddress(at)).map_err(|error| LoadError::Write { what, error })
    };
    w("the GDT", gdt::base(), &gdt::bytes())?;
    w("the TSS", TSS, &gdt::tss_bytes())?;
    for (at, page) in paging::tables() {
        w("the page tables", at, &page)?;
    }
    if cmdline.len() >= CMDLINE_MAX {
        return Err(LoadError::CmdlineTooLong(cmdline.len()));
    }
    let mut c = cmdline.as_bytes().to_vec();
    c.push(0);
    w("the command line", CMDLINE, &c)?;
    let mut devices = [VirtioMmioDevice::default(); MAX_VIRTIO_DEVICES];
    for (slot, d) in devices.iter_mut().zip(virtio) {
        *slot = *d;
    }
    let info = BootInfo {
        magic: BOOT_MAGIC,
        version: BOOT_VERSION,
        size: std::mem::size_of::<BootInfo>() as u32,
        mem_size,
        free_start: loaded.end,
        free_end: mem_size,
        tsc_khz,
        cmdline_addr: CMDLINE,
        cmdline_len: cmdline.len() as u64,
        virtio_count: virtio.len().min(MAX_VIRTIO_DEVICES) as u32,
        reserved: 0,
        virtio: devices,
        cpus,
        reserved2: 0,
    };
    // SAFETY: BootInfo is repr(C), made of integers, with no padding holes left uninitialised
    // (explicit `reserved` fields), so viewing it as bytes is sound.
    let bytes =
        unsafe { std::slice::from_raw_parts((&info as *const BootInfo).cast::<u8>(), std::mem::size_of::<BootInfo>()) };
    w("the boot-info block", BOOT_INFO, bytes)
}

/// Whether `path` looks like an ELF file (for early, clear errors).
pub fn check_kernel_file(path: &Path) -> Result<(), LoadError> {
    let mut magic = [0u8; 4];
    let read = File::open(path).and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic));
    read.map_err(|error| LoadError::Read { path: path.into(), error })?;
    if &magic != b"\x7fELF" {
        return Err(LoadError::Elf {
            what: path.display().to_string(),
            error: linux_loader::loader::Error::Elf(linux_loader::loader::elf::Error::InvalidElfMagicNumber),
        });
    }
    Ok(())
}
