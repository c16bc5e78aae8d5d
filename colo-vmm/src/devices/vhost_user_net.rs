//! A virtio-net device whose data path is a vhost-user backend (vhost-net-compare, or any
//! vhost-user-net backend): the VMM is the vhost-user frontend. It negotiates features and
//! protocol features, shares guest memory (the memfd) with the backend, and hands it each
//! virtqueue with a kick eventfd (written by KVM on QUEUE_NOTIFY) and a call eventfd (which
//! wakes the guest's paravirtual halt). The MAC address and link status are served from the
//! VMM's own configuration space.

use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use colo_proxy::virtio_net::{feature, NetConfig, FEATURES};
use colo_proxy::wire::MacAddr;
use vhost::vhost_user::message::{VhostUserHeaderFlag, VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserDirtyLogRegion, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::{VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use super::virtio_mmio::{QueueConfig, VirtioDevice};
use super::vring_stop;
use super::DeviceError;
use crate::vstate::memory::GuestMemoryMmap;

/// Features the VMM provides itself: the configuration space (MAC address, link status) is
/// served here, whatever the backend offers.
const OWN: u64 = feature(VIRTIO_NET_F_MAC) | feature(VIRTIO_NET_F_STATUS);
/// Queue 0 receives, queue 1 transmits.
const NUM_QUEUES: usize = 2;
/// Largest queue we offer.
const QUEUE_MAX: u16 = 256;

/// Errors talking to the backend.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The backend's socket is not there or refuses connections.
    #[error("cannot connect to the vhost-user backend at {path}: {error}")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// What went wrong.
        error: vhost::Error,
    },
    /// A step of the negotiation failed.
    #[error("vhost-user negotiation with {path} failed at {step}: {error}")]
    Negotiate {
        /// The socket.
        path: PathBuf,
        /// The request that failed.
        step: &'static str,
        /// What the backend (or the socket) said.
        error: vhost::Error,
    },
    /// The backend lacks something we need.
    #[error("the vhost-user backend at {path} {why}")]
    Unsupported {
        /// The socket.
        path: PathBuf,
        /// What is missing.
        why: &'static str,
    },
    /// Creating an eventfd failed.
    #[error("eventfd: {0}")]
    EventFd(std::io::Error),
}

/// What the device and the dirty-log handle share: the connection, the features last given to
/// the backend, and the dirty log while one is active.
struct Shared {
    /// The connection; `None` after [`VirtioDevice::disconnect`].
    frontend: Option<Frontend>,
    /// Features sent with the last SET_FEATURES (0 before the driver activates the device).
    features: u64,
    log: Option<LogBuffer>,
    /// The backend on this connection has guest memory (SET_MEM_TABLE was sent) and, when
    /// logging, the current log: restarting the rings after a checkpoint leaves both as they
    /// are instead of having the backend remap all of guest memory each time.
    table_sent: bool,
    /// The last restart of the rings went out unconfirmed (see [`VhostUserNet::setup_rings`]):
    /// the next answer the backend gives confirms it, and a failure then may be its refusal.
    restart_unconfirmed: bool,
}

/// What a ring (re)start sends beyond the rings themselves.
#[derive(Debug, Clone, Copy)]
struct Resend {
    /// SET_FEATURES: the features changed, or the backend has none yet.
    features: bool,
    /// SET_MEM_TABLE (and SET_LOG_BASE when logging): a fresh connection.
    table: bool,
}

/// The device.
pub struct VhostUserNet {
    shared: Arc<Mutex<Shared>>,
    path: PathBuf,
    mac: MacAddr,
    backend_features: u64,
    protocol: VhostUserProtocolFeatures,
    memory: GuestMemoryMmap,
    kicks: Vec<EventFd>,
    calls: Vec<EventFd>,
    active: Vec<usize>,
}

/// A fresh connection, negotiated up to what does not depend on the guest driver: ownership,
/// virtio features offered, protocol features.
fn negotiate(path: &Path) -> Result<(Frontend, u64, VhostUserProtocolFeatures), NetError> {
    let mut frontend =
        Frontend::connect(path, NUM_QUEUES as u64).map_err(|error| NetError::Connect { path: path.into(), error })?;
    let step = |step: &'static str| move |error| NetError::Negotiate { path: path.into(), step, error };
    frontend.set_owner().map_err(step("SET_OWNER"))?;
    let backend_features = frontend.get_features().map_err(step("GET_FEATURES"))?;
    if backend_features & feature(VIRTIO_F_VERSION_1) == 0 {
        return Err(NetError::Unsupported { path: path.into(), why: "does not offer VIRTIO_F_VERSION_1" });
    }
    let mut protocol = VhostUserProtocolFeatures::empty();
    if backend_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0 {
        let offered = frontend.get_protocol_features().map_err(step("GET_PROTOCOL_FEATURES"))?;
        let wanted = VhostUserProtocolFeatures::REPLY_ACK | VhostUserProtocolFeatures::LOG_SHMFD;
        protocol = offered & wanted;
        frontend.set_protocol_features(protocol).map_err(step("SET_PROTOCOL_FEATURES"))?;
        if protocol.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            // Every request waits for the backend's answer: we need to know when a ring is
            // really stopped or started.
            frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
    }
    Ok((frontend, backend_features, protocol))
}

impl VhostUserNet {
    /// Connects to the backend at `path` and negotiates.
    pub fn connect(path: &Path, mac: MacAddr, memory: GuestMemoryMmap) -> Result<VhostUserNet, NetError> {
        let (frontend, backend_features, protocol) = negotiate(path)?;
        let new_fd = || EventFd::new(libc::EFD_NONBLOCK).map_err(NetError::EventFd);
        let kicks = (0..NUM_QUEUES).map(|_| new_fd()).collect::<Result<_, _>>()?;
        let calls = (0..NUM_QUEUES).map(|_| new_fd()).collect::<Result<_, _>>()?;
        tracing::info!(
            path = %path.display(),
            features = format_args!("{backend_features:#x}"),
            protocol = ?protocol,
            "vhost-user backend connected"
        );
        Ok(VhostUserNet {
            shared: Arc::new(Mutex::new(Shared {
                frontend: Some(frontend),
                features: 0,
                log: None,
                table_sent: false,
                restart_unconfirmed: false,
            })),
            path: path.into(),
            mac,
            backend_features,
            protocol,
            memory,
            kicks,
            calls,
            active: vec![],
        })
    }

    /// The backend socket.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A handle to drive the backend's dirty log from another thread (migration, checkpoints).
    pub fn log_handle(&self) -> DirtyLog {
        DirtyLog {
            shared: self.shared.clone(),
            supported: self.protocol.contains(VhostUserProtocolFeatures::LOG_SHMFD)
                && self.backend_features & VhostUserVirtioFeatures::LOG_ALL.bits() != 0,
            mem_size: self.memory.iter().map(|r| r.start_addr().0 + r.len()).max().unwrap_or(0),
            path: self.path.clone(),
        }
    }

    fn setup_rings(&mut self, acked: u64, queues: &[QueueConfig], bases: &[u16]) -> Result<(), DeviceError> {
        let protocol_features = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        let mut shared = lock(&self.shared);
        let mut to_backend = (acked & self.backend_features) | (self.backend_features & protocol_features);
        if shared.log.is_some() {
            to_backend |= VhostUserVirtioFeatures::LOG_ALL.bits();
        }
        let fail = |step: &'static str| move |source: vhost::Error| DeviceError::Vhost { step, source };
        let Shared { frontend, log, features, table_sent, restart_unconfirmed } = &mut *shared;
        let frontend = frontend.as_mut().ok_or(DeviceError::Disconnected)?;
        let resend = Resend { features: *features != to_backend || !*table_sent, table: !*table_sent };
        // Pipelined: the requests go out without waiting for each answer, and one request
        // answered at the end confirms them all, since the backend handles them in order and
        // drops the connection at the first it refuses (SET_LOG_BASE is answered whatever the
        // flags). A restart over the same memory and features (after every checkpoint) is
        // not even confirmed: the PVM resumes one round trip sooner, and the next request
        // answered (the next pause's GET_VRING_BASE) confirms it. The kicks below, and the
        // backend's own on each ring start, are not lost meanwhile: an eventfd keeps its count
        // until the backend reads it.
        let confirm = resend.features || resend.table || std::mem::take(restart_unconfirmed);
        frontend.set_hdr_flags(VhostUserHeaderFlag::empty());
        let sent =
            Self::send_rings(frontend, log, &self.memory, &self.calls, &self.kicks, to_backend, resend, queues, bases);
        if self.protocol.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        let active = sent?;
        if confirm {
            frontend.get_features().map_err(fail("restarting the rings (the backend refused a request)"))?;
        } else {
            *restart_unconfirmed = true;
        }
        *table_sent = true;
        self.active = active;
        // A ring restarted after a pause may have work waiting (inbound frames the backend
        // queued meanwhile, descriptors the guest posted): kick it rather than wait for the
        // guest's next notification.
        for &i in &self.active {
            let _ = self.kicks[i].write(1);
        }
        shared.features = to_backend;
        Ok(())
    }

    /// The requests of [`Self::setup_rings`]; returns the queues started.
    #[allow(clippy::too_many_arguments)]
    fn send_rings(
        frontend: &mut Frontend,
        log: &Option<LogBuffer>,
        memory: &GuestMemoryMmap,
        calls: &[EventFd],
        kicks: &[EventFd],
        to_backend: u64,
        resend: Resend,
        queues: &[QueueConfig],
        bases: &[u16],
    ) -> Result<Vec<usize>, DeviceError> {
        let protocol_features = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        let fail = |step: &'static str| move |source: vhost::Error| DeviceError::Vhost { step, source };
        let mut active = vec![];
        if resend.features {
            frontend.set_features(to_backend).map_err(fail("SET_FEATURES"))?;
        }
        if resend.table {
            let regions = memory
                .iter()
                .map(VhostUserMemoryRegionInfo::from_guest_region)
                .collect::<Result<Vec<_>, _>>()
                .map_err(fail("describing guest memory"))?;
            frontend.set_mem_table(&regions).map_err(fail("SET_MEM_TABLE"))?;
            if let Some(log) = log {
                // A backend maps the new table with fresh bitmaps (rust-vmm's
                // vhost-user-backend does), which would silently end dirty logging: hand it
                // the current log again.
                frontend.set_log_base(0, Some(log.region())).map_err(fail("SET_LOG_BASE"))?;
            }
        }
        for (i, q) in queues.iter().enumerate().take(NUM_QUEUES) {
            if !q.ready || q.size == 0 {
                continue;
            }
            let n = u64::from(q.size);
            let host = |gpa: u64, len: u64, what: &'static str| -> Result<u64, DeviceError> {
                let ok = memory.check_range(GuestAddress(gpa), len as usize);
                let addr = memory.get_host_address(GuestAddress(gpa)).ok().filter(|_| ok);
                addr.map(|p| p as u64).ok_or(DeviceError::QueueOutsideMemory { queue: i, what, gpa })
            };
            let config = VringConfigData {
                queue_max_size: QUEUE_MAX,
                queue_size: q.size,
                flags: 0,
                desc_table_addr: host(q.desc, 16 * n, "descriptor table")?,
                used_ring_addr: host(q.used, 6 + 8 * n, "used ring")?,
                avail_ring_addr: host(q.avail, 6 + 2 * n, "available ring")?,
                log_addr: None,
            };
            frontend.set_vring_num(i, q.size).map_err(fail("SET_VRING_NUM"))?;
            frontend.set_vring_addr(i, &config).map_err(fail("SET_VRING_ADDR"))?;
            let base = bases.get(i).copied().unwrap_or(0);
            frontend.set_vring_base(i, base).map_err(fail("SET_VRING_BASE"))?;
            frontend.set_vring_call(i, &calls[i]).map_err(fail("SET_VRING_CALL"))?;
            frontend.set_vring_kick(i, &kicks[i]).map_err(fail("SET_VRING_KICK"))?;
            if to_backend & protocol_features != 0 {
                frontend.set_vring_enable(i, true).map_err(fail("SET_VRING_ENABLE"))?;
            }
            active.push(i);
        }
        Ok(active)
    }
}

impl VirtioDevice for VhostUserNet {
    fn device_type(&self) -> u32 {
        1
    }

    fn features(&self) -> u64 {
        // What the backend offers of what a protected guest may use (no offloads: COLO
        // compares frames byte for byte), and the configuration space.
        (self.backend_features & FEATURES) | OWN
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_MAX; NUM_QUEUES]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // Outside the configuration space: zeros (a register read cannot fail).
        match (NetConfig { mac: self.mac }).read(offset, data.len() as u64) {
            Some(bytes) => data.copy_from_slice(&bytes),
            None => data.fill(0),
        }
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(&mut self, acked: u64, queues: &[QueueConfig], bases: &[u16]) -> Result<(), DeviceError> {
        self.active.clear();
        self.setup_rings(acked, queues, bases)?;
        tracing::debug!(acked = format_args!("{acked:#x}"), queues = ?self.active, ?bases, "virtio-net activated");
        Ok(())
    }

    fn quiesce(&mut self) -> Result<Vec<u16>, DeviceError> {
        let mut bases = vec![0u16; NUM_QUEUES];
        // GET_VRING_BASE stops the ring in the backend and returns where it stands; the
        // backend completes descriptors synchronously, so nothing is in flight afterwards.
        let mut shared = lock(&self.shared);
        let unconfirmed = std::mem::take(&mut shared.restart_unconfirmed);
        let frontend = shared.frontend.as_ref().ok_or(DeviceError::Disconnected)?;
        let active = std::mem::take(&mut self.active);
        // All rings in one round trip.
        let stopped = vring_stop::get_vring_bases(frontend, &active).map_err(|(queue, source)| match unconfirmed {
            // The first answer since an unconfirmed restart: the backend may have refused it.
            true => DeviceError::Vhost { step: "restarting the rings, or stopping them again", source },
            false => DeviceError::VringBase { queue, source },
        })?;
        for (&i, base) in active.iter().zip(stopped) {
            bases[i] = base as u16;
        }
        Ok(bases)
    }

    fn reset(&mut self) {
        // SET_VRING_ENABLE exists only once PROTOCOL_FEATURES was negotiated.
        let enable = self.backend_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0;
        let mut shared = lock(&self.shared);
        shared.features = 0;
        let Some(frontend) = shared.frontend.as_mut() else { return };
        for i in std::mem::take(&mut self.active) {
            if enable {
                let _ = frontend.set_vring_enable(i, false);
            }
            if let Err(e) = frontend.get_vring_base(i) {
                tracing::warn!(queue = i, error = %e, "stopping the ring failed");
            }
        }
    }

    fn disconnect(&mut self) {
        let mut shared = lock(&self.shared);
        shared.frontend = None;
        shared.features = 0;
        shared.table_sent = false;
        shared.restart_unconfirmed = false;
        shared.log = None;
        self.active.clear();
        tracing::info!(path = %self.path.display(), "vhost-user backend released");
    }

    fn reconnect(&mut self) -> Result<(), DeviceError> {
        let (frontend, features, protocol) = negotiate(&self.path)?;
        if features & self.backend_features != self.backend_features {
            return Err(DeviceError::FeaturesShrank {
                path: self.path.clone(),
                now: features,
                before: self.backend_features,
            });
        }
        self.protocol = protocol;
        let mut shared = lock(&self.shared);
        shared.frontend = Some(frontend);
        shared.features = 0;
        shared.table_sent = false;
        shared.restart_unconfirmed = false;
        tracing::info!(path = %self.path.display(), "vhost-user backend attached");
        Ok(())
    }

    fn kick_fds(&self) -> Vec<&EventFd> {
        self.kicks.iter().collect()
    }

    fn call_fds(&self) -> Vec<RawFd> {
        self.calls.iter().map(|c| c.as_raw_fd()).collect()
    }
}

fn lock(m: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A dirty log shared with the backend: a memfd holding one bit per 4 KiB guest page, which
/// the backend sets (atomically) for every page it writes.
struct LogBuffer {
    file: std::fs::File,
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is owned by this value and only read through `&self` while the backend
// (another process) writes it with atomic operations; moving it between threads is sound.
unsafe impl Send for LogBuffer {}

impl LogBuffer {
    /// A zeroed log for `mem_size` bytes of guest memory.
    fn new(mem_size: u64) -> std::io::Result<LogBuffer> {
        let pages = mem_size.div_ceil(4096);
        // Whole u64 words, so the backend's atomic updates never straddle the end.
        let len = (pages.div_ceil(64) * 8).max(8) as usize;
        let name = std::ffi::CString::new("colo-vmm-dirty-log").expect("no NUL");
        // SAFETY: memfd_create with a valid name; checked.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor we own.
        let file = unsafe { std::fs::File::from_raw_fd(fd) };
        file.set_len(len as u64)?;
        // SAFETY: mapping `len` bytes of our memfd, shared; checked below.
        let ptr = unsafe {
            libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, fd, 0)
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(LogBuffer { file, ptr: ptr.cast(), len })
    }

    fn region(&self) -> VhostUserDirtyLogRegion {
        VhostUserDirtyLogRegion { mmap_size: self.len as u64, mmap_offset: 0, mmap_handle: self.file.as_raw_fd() }
    }

    /// The bits, one u64 per 64 pages, each word cleared as it is read. The backend sets bits
    /// with atomic ORs on this shared memory, so a bit it sets meanwhile is either in what this
    /// returns or stays for the next call: nothing is lost, and no fresh log (and no
    /// SET_LOG_BASE round trip, with the backend mapping it) is needed per collection. QEMU
    /// clears the kernel's vhost log the same way. A word that reads zero is left untouched,
    /// so an idle log costs one plain read per 64 pages.
    fn take_words(&self) -> Vec<u64> {
        (0..self.len / 8)
            .map(|i| {
                // SAFETY: in bounds and 8-aligned (mmap is page-aligned); this shared mapping
                // is only ever accessed atomically, here and by the backend.
                let word = unsafe { &*self.ptr.add(i * 8).cast::<AtomicU64>() };
                match word.load(Ordering::Relaxed) {
                    0 => 0,
                    _ => word.swap(0, Ordering::AcqRel),
                }
            })
            .collect()
    }
}

impl Drop for LogBuffer {
    fn drop(&mut self) {
        // SAFETY: unmapping our own mapping once.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// Drives a vhost-user backend's dirty log (LOG_SHMFD): start, collect, stop. Collecting reads
/// and clears the shared log in place, word by word with atomic swaps (see
/// [`LogBuffer::take_words`]).
#[derive(Clone)]
pub struct DirtyLog {
    shared: Arc<Mutex<Shared>>,
    supported: bool,
    mem_size: u64,
    path: PathBuf,
}

impl DirtyLog {
    /// Whether the backend can log (LOG_SHMFD and LOG_ALL offered).
    pub fn supported(&self) -> bool {
        self.supported
    }

    /// Starts logging every page the backend writes.
    pub fn start(&self) -> Result<(), DeviceError> {
        if !self.supported {
            return Err(DeviceError::NoDirtyLog { path: self.path.clone() });
        }
        let buf = LogBuffer::new(self.mem_size).map_err(DeviceError::LogBuffer)?;
        let mut s = lock(&self.shared);
        let features = s.features;
        let frontend = s.frontend.as_mut().ok_or(DeviceError::Disconnected)?;
        frontend
            .set_log_base(0, Some(buf.region()))
            .map_err(|source| DeviceError::Vhost { step: "SET_LOG_BASE", source })?;
        if features != 0 {
            let f = features | VhostUserVirtioFeatures::LOG_ALL.bits();
            frontend
                .set_features(f)
                .map_err(|source| DeviceError::Vhost { step: "SET_FEATURES with LOG_ALL", source })?;
            s.features = f;
        }
        s.log = Some(buf);
        Ok(())
    }

    /// The pages the backend wrote since the last collection (one bit per page).
    pub fn collect(&self) -> Result<Vec<u64>, DeviceError> {
        let s = lock(&self.shared);
        Ok(s.log.as_ref().ok_or(DeviceError::LogInactive)?.take_words())
    }

    /// Stops logging.
    pub fn stop(&self) {
        let mut s = lock(&self.shared);
        let features = s.features;
        if s.log.take().is_some() && features != 0 {
            let f = features & !VhostUserVirtioFeatures::LOG_ALL.bits();
            if let Some(frontend) = s.frontend.as_mut() {
                if let Err(e) = frontend.set_features(f) {
                    tracing::warn!(error = %e, "turning the backend's dirty log off");
                }
            }
            s.features = f;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU8;

    /// Sets page `page`'s bit in the log mapped at `base` as vhost-user-backend does: an
    /// atomic OR on the byte.
    fn mark(base: usize, page: usize) {
        // SAFETY: in bounds for the pages of the logs made below, which outlive every call.
        let byte = unsafe { &*(base as *const u8).add(page / 8).cast::<AtomicU8>() };
        byte.fetch_or(1 << (page % 8), Ordering::Relaxed);
    }

    #[test]
    fn taking_the_log_returns_its_bits_once() {
        let log = LogBuffer::new(64 * 4096 * 4).unwrap();
        for p in [0, 5, 63, 64, 200] {
            mark(log.ptr as usize, p);
        }
        let words = log.take_words();
        assert_eq!(words, vec![1 | 1 << 5 | 1 << 63, 1, 0, 1 << 8]);
        assert_eq!(log.take_words(), vec![0; 4], "each bit is returned once");
    }

    #[test]
    fn no_bit_set_while_the_log_is_taken_is_lost() {
        let log = LogBuffer::new(64 * 4096 * 16).unwrap();
        let (base, pages) = (log.ptr as usize, 64 * 16);
        // The backend's side: another thread marking every page once, while this one takes.
        let marking = std::thread::spawn(move || (0..pages).for_each(|p| mark(base, p)));
        let mut seen = vec![0u64; 16];
        while !marking.is_finished() {
            for (s, w) in seen.iter_mut().zip(log.take_words()) {
                assert_eq!(*s & w, 0, "a bit came back twice");
                *s |= w;
            }
        }
        marking.join().unwrap();
        for (s, w) in seen.iter_mut().zip(log.take_words()) {
            *s |= w;
        }
        assert_eq!(seen, vec![u64::MAX; 16]);
    }
}
