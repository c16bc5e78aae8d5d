//! Building and running one VM: memory, KVM, the guest image and boot state, the devices, the
//! vCPU thread; and the operations the control API offers.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use colo_proxy::wire::{MacAddr, MacError};
use colo_vmm_abi::{VirtioMmioDevice, MAX_CPUS, MAX_MEM, MIN_MEM, MMIO_BASE, MMIO_DEVICE_SIZE};
use kvm_ioctls::{IoEventAddress, VcpuFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::arch::{cpuid, regs};
use crate::devices::block::disk::{Disk, DiskError};
use crate::devices::block::virtio_blk::VirtioBlk;
use crate::devices::block::DiskConfig;
use crate::devices::pvhalt::Waiter;
use crate::devices::serial::{SerialConsole, SerialOutput};
use crate::devices::vhost_user_net::{DirtyLog, VhostUserNet};
use crate::devices::virtio_mmio::{MmioTransport, QUEUE_NOTIFY_OFFSET};
use crate::devices::{Devices, DevicesState};
use crate::loader::{self, Image};
use crate::migratable::{Migratable, MigratableError, Pausable, Snapshottable};
use crate::persist::snapshot::{self, DiskMeta, Meta};
use crate::persist::state::{MachineState, VcpuState};
use crate::persist::stream::{StreamError, StreamReader, PAGE_SIZE};
use crate::persist::vcpu_state::{self, VcpuStateError};
use crate::persist::vm_state;
use crate::vstate::dirty::{DirtyBitmap, DirtyTracker};
use crate::vstate::memory::GuestRam;
use crate::vstate::vcpu::{self, Queued, SharedDevices, VcpuEnd, Vcpus};
use crate::vstate::vm::Vm;

/// `--net vhost-user=PATH[,mac=MAC]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    /// The backend's socket.
    pub socket: PathBuf,
    /// The guest's MAC address.
    pub mac: MacAddr,
}

/// The default MAC: locally administered, QEMU's prefix, device index in the last byte.
pub fn default_mac(index: usize) -> MacAddr {
    MacAddr([0x52, 0x54, 0x00, 0x12, 0x34, 0x56u8.wrapping_add(index as u8)])
}

/// Why a `--net` option is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NetOptionError {
    /// A part that is neither `vhost-user=PATH` nor `mac=MAC`.
    #[error("'{part}' in '{option}': expected vhost-user=PATH[,mac=MAC]")]
    Part {
        /// The part.
        part: String,
        /// The whole option.
        option: String,
    },
    /// No socket.
    #[error("'{0}': missing vhost-user=PATH")]
    NoSocket(String),
    /// A MAC address that is not a unicast one.
    #[error(transparent)]
    Mac(#[from] MacError),
}

impl FromStr for NetConfig {
    type Err = NetOptionError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut socket = None;
        let mut mac = None;
        for part in s.split(',') {
            match part.split_once('=') {
                Some(("vhost-user", p)) if !p.is_empty() => socket = Some(PathBuf::from(p)),
                Some(("mac", m)) => mac = Some(m.parse()?),
                _ => return Err(NetOptionError::Part { part: part.into(), option: s.into() }),
            }
        }
        let socket = socket.ok_or_else(|| NetOptionError::NoSocket(s.into()))?;
        Ok(NetConfig { socket, mac: mac.unwrap_or_else(|| default_mac(0)) })
    }
}

/// Everything needed to boot a VM.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// The guest image.
    pub image: Image,
    /// Its command line.
    pub cmdline: String,
    /// RAM in MiB.
    pub mem_mib: u64,
    /// vCPUs (1 to [`MAX_CPUS`]); a restore or migration takes the saved count instead.
    pub cpus: u32,
    /// Network devices.
    pub net: Vec<NetConfig>,
    /// The disk, if any.
    pub disk: Option<DiskConfig>,
    /// Console output.
    pub serial: SerialOutput,
}

/// Errors booting a VM.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// Memory size out of range.
    #[error("--mem {0} MiB: guest memory must be between {min} and {max} MiB", min = MIN_MEM >> 20, max = MAX_MEM >> 20)]
    MemorySize(u64),
    /// vCPU count out of range.
    #[error("--cpus {0}: a VM has 1 to {MAX_CPUS} vCPUs")]
    Cpus(u32),
    /// Too many devices.
    #[error("at most {0} virtio devices (network devices and the disk)")]
    TooManyDevices(usize),
    /// The disk's image.
    #[error(transparent)]
    Disk(#[from] DiskError),
    /// A saved VM whose disk does not fit `--disk`.
    #[error("{0}")]
    DiskMismatch(String),
    /// Guest memory.
    #[error(transparent)]
    Memory(#[from] crate::vstate::memory::MemoryError),
    /// KVM.
    #[error(transparent)]
    Vm(#[from] crate::vstate::vm::VmError),
    /// Loading the guest.
    #[error(transparent)]
    Load(#[from] loader::LoadError),
    /// A snapshot or migration stream was refused.
    #[error(transparent)]
    Stream(#[from] StreamError),
    /// A network backend.
    #[error(transparent)]
    Net(#[from] crate::devices::vhost_user_net::NetError),
    /// Saved device state that does not fit these devices.
    #[error("restoring the devices: {0}")]
    Devices(#[source] crate::devices::DeviceError),
    /// Anything else, with context.
    #[error("{what}: {error}")]
    Other {
        /// What was being done.
        what: &'static str,
        /// The error.
        error: String,
    },
}

fn other<E: std::fmt::Display>(what: &'static str) -> impl FnOnce(E) -> BootError {
    move |e| BootError::Other { what, error: e.to_string() }
}

/// Memory, KVM and the vCPUs, before any device: what a migration destination builds while it
/// receives pages (its backends are still the source's).
pub struct Core {
    ram: GuestRam,
    vm: Vm,
    vcpus: Vec<VcpuFd>,
    msr_list: Vec<u32>,
    tsc_khz: u64,
    disk: Option<Disk>,
}

impl Core {
    /// RAM of `mem_size` bytes, the VM, `cpus` vCPUs and the disk's image (opened now, so a
    /// bad one is refused before anything else happens).
    pub fn build(mem_size: u64, cpus: u32, disk: Option<&DiskConfig>) -> Result<Core, BootError> {
        if !(MIN_MEM..=MAX_MEM).contains(&mem_size) {
            return Err(BootError::MemorySize(mem_size >> 20));
        }
        if !(1..=MAX_CPUS as u32).contains(&cpus) {
            return Err(BootError::Cpus(cpus));
        }
        let disk = disk.map(Disk::open).transpose()?;
        let ram = GuestRam::new(mem_size)?;
        let vm = Vm::new(&ram)?;
        let mut vcpus = Vec::with_capacity(cpus as usize);
        for i in 0..cpus {
            let vcpu = vm.fd().create_vcpu(u64::from(i)).map_err(other("creating a vCPU"))?;
            vcpu.set_cpuid2(&cpuid::for_vcpu(vm.kvm(), i as u8).map_err(other("reading CPUID"))?)
                .map_err(other("setting CPUID"))?;
            vcpus.push(vcpu);
        }
        let tsc_khz = vm.tsc_khz(&vcpus[0]);
        let msr_list = vcpu_state::saveable_msrs(vm.kvm(), &vcpus[0]).map_err(other("listing MSRs"))?;
        Ok(Core { ram, vm, vcpus, msr_list, tsc_khz, disk })
    }

    /// Guest RAM.
    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }

    /// The disk.
    pub fn disk(&self) -> Option<&Disk> {
        self.disk.as_ref()
    }

    /// Checks that a saved VM described by `meta` fits this one's disk: both have none, or
    /// disks of the same size and kind.
    pub fn check_disk(&self, meta: &Meta) -> Result<(), BootError> {
        let here = self.disk.as_ref().map(|d| DiskMeta { bytes: d.bytes(), readonly: d.readonly() });
        match (&meta.disk, &here) {
            (None, None) => Ok(()),
            (Some(saved), Some(here)) if saved == here => Ok(()),
            (Some(saved), None) => Err(BootError::DiskMismatch(format!(
                "the VM has a {}disk of {} bytes: give --disk path=FILE{} with an image of that size",
                if saved.readonly { "read-only " } else { "" },
                saved.bytes,
                if saved.readonly { ",readonly" } else { "" }
            ))),
            (None, Some(_)) => Err(BootError::DiskMismatch("the VM has no disk: leave out --disk".into())),
            (Some(saved), Some(here)) => Err(BootError::DiskMismatch(format!(
                "the VM's disk is {} bytes{}, --disk is {} bytes{}",
                saved.bytes,
                if saved.readonly { " (read-only)" } else { "" },
                here.bytes,
                if here.readonly { " (read-only)" } else { "" }
            ))),
        }
    }

    /// Connects the network backends of `config` (the console starts silent; a boot opens it,
    /// a restore takes over the saved one).
    pub fn attach(self, config: &VmConfig) -> Result<Machine, BootError> {
        if config.net.len() + usize::from(self.disk.is_some()) > colo_vmm_abi::MAX_VIRTIO_DEVICES {
            return Err(BootError::TooManyDevices(colo_vmm_abi::MAX_VIRTIO_DEVICES));
        }
        let mut mmio = vec![];
        let mut described = vec![];
        let mut logs = vec![];
        for (i, net) in config.net.iter().enumerate() {
            let base = MMIO_BASE + i as u64 * MMIO_DEVICE_SIZE;
            let dev = VhostUserNet::connect(&net.socket, net.mac, self.ram.memory().clone())?;
            logs.push(dev.log_handle());
            let transport = MmioTransport::new(base, MMIO_DEVICE_SIZE, Box::new(dev));
            for (q, kick) in transport.device().kick_fds().into_iter().enumerate() {
                self.vm
                    .fd()
                    .register_ioevent(kick, &IoEventAddress::Mmio(base + QUEUE_NOTIFY_OFFSET), q as u32)
                    .map_err(other("registering a queue notifier"))?;
            }
            described.push(VirtioMmioDevice { base, size: MMIO_DEVICE_SIZE, irq: 5 + i as u32, reserved: 0 });
            mmio.push(transport);
        }
        if let Some(disk) = &self.disk {
            // After the network devices: its notifications exit to the VMM (no ioeventfd).
            let i = mmio.len();
            let base = MMIO_BASE + i as u64 * MMIO_DEVICE_SIZE;
            let dev = VirtioBlk::new(disk.clone(), self.ram.memory().clone());
            mmio.push(MmioTransport::new(base, MMIO_DEVICE_SIZE, Box::new(dev)));
            described.push(VirtioMmioDevice { base, size: MMIO_DEVICE_SIZE, irq: 5 + i as u32, reserved: 0 });
        }
        let serial = SerialConsole::new(&SerialOutput::None).map_err(other("serial"))?;
        let devices = Devices { serial, mmio, unknown_io: 0 };
        Ok(Machine { core: self, devices, described, logs, tracker: None })
    }
}

/// A VM with its devices, before its vCPUs start.
pub struct Machine {
    core: Core,
    devices: Devices,
    described: Vec<VirtioMmioDevice>,
    logs: Vec<DirtyLog>,
    tracker: Option<DirtyTracker>,
}

impl Machine {
    /// Guest RAM.
    pub fn ram(&self) -> &GuestRam {
        &self.core.ram
    }

    /// Starts dirty tracking (before the vCPUs run, so nothing they write is missed); the
    /// running VM goes on with it.
    pub fn start_dirty_log(&mut self) -> Result<(), MigratableError> {
        self.tracker = Some(DirtyTracker::start(&self.core.vm, &self.core.ram, self.logs.clone())?);
        Ok(())
    }

    /// Starts the vCPU threads, each halting on its own waiter that also watches every device.
    pub fn start(self) -> Result<Vmm, BootError> {
        vcpu::install_kick_handler().map_err(other("installing the vCPU kick handler"))?;
        let Core { ram, vm, vcpus, msr_list, tsc_khz, disk } = self.core;
        let mem_size = ram.size();
        let calls = self.devices.call_fds();
        let devices = Arc::new(Mutex::new(self.devices));
        let (mut handles, mut threads) = (vec![], vec![]);
        for (i, fd) in vcpus.into_iter().enumerate() {
            let mut waiter = Waiter::new().map_err(other("creating the halt waiter"))?;
            for &c in &calls {
                waiter.add_source(c).map_err(other("watching a queue"))?;
            }
            let (handle, thread) =
                vcpu::spawn(i, fd, devices.clone(), waiter).map_err(other("starting a vCPU thread"))?;
            handles.push(handle);
            threads.push(thread);
        }
        Ok(Vmm {
            ram,
            vm,
            vcpus: Vcpus::new(handles),
            devices,
            threads: Mutex::new(threads),
            started: Instant::now(),
            mem_size,
            msr_list: Arc::new(msr_list),
            tsc_khz,
            logs: self.logs,
            disk,
            quiesced: Mutex::new(None),
            tracker: Mutex::new(self.tracker),
            saving: Mutex::new(None),
            stopped: AtomicBool::new(false),
            handed_over: AtomicBool::new(false),
        })
    }
}

/// A running VM.
pub struct Vmm {
    /// Guest RAM, mapped for KVM and the backends.
    ram: GuestRam,
    /// The VM (its memory slot and ioeventfds live as long as it does).
    vm: Vm,
    vcpus: Vcpus,
    /// The devices, shared by the vCPU threads.
    devices: SharedDevices,
    threads: Mutex<Vec<JoinHandle<VcpuEnd>>>,
    started: Instant,
    mem_size: u64,
    msr_list: Arc<Vec<u32>>,
    tsc_khz: u64,
    logs: Vec<DirtyLog>,
    /// The disk (also the virtio-blk device's).
    disk: Option<Disk>,
    /// The devices' state while they are stopped by [`Pausable::pause`]: where
    /// [`Pausable::resume`] restarts them.
    quiesced: Mutex<Option<DevicesState>>,
    /// Dirty tracking, while a migration or COLO wants it.
    tracker: Mutex<Option<DirtyTracker>>,
    /// The vCPU threads' reading of their state for the next [`Snapshottable::save_state`] of
    /// this pause, begun by [`Snapshottable::pause_to_save`].
    saving: Mutex<Option<Queued<Result<VcpuState, VcpuStateError>>>>,
    /// The user stopped the vCPUs (`stop`): a pause and resume around a snapshot leaves them so.
    stopped: AtomicBool,
    /// The backends went to a migration destination: the vCPUs must not run (until `cont`).
    handed_over: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Vmm {
    /// Creates the VM, loads the guest and starts its vCPUs.
    pub fn boot(config: &VmConfig) -> Result<Vmm, BootError> {
        if let Image::File(p) = &config.image {
            loader::check_kernel_file(p)?;
        }
        let mut m = Core::build(config.mem_mib << 20, config.cpus, config.disk.as_ref())?.attach(config)?;
        m.devices.serial = SerialConsole::new(&config.serial).map_err(other("opening the serial output"))?;
        let (ram, tsc_khz) = (&m.core.ram, m.core.tsc_khz);
        let loaded = loader::load_image(ram.memory(), &config.image)?;
        let cpus = m.core.vcpus.len() as u32;
        loader::write_boot_state(ram.memory(), ram.size(), &loaded, &config.cmdline, tsc_khz, &m.described, cpus)?;
        for (i, vcpu) in m.core.vcpus.iter().enumerate() {
            regs::setup(vcpu, loaded.entry, i as u64).map_err(other("setting up the vCPU registers"))?;
        }
        tracing::info!(
            mem_mib = config.mem_mib,
            cpus,
            entry = format_args!("{:#x}", loaded.entry),
            tsc_khz,
            "guest started"
        );
        m.start()
    }

    /// Creates the VM from a snapshot file and resumes it where it was saved. Nothing runs
    /// unless the whole file verifies.
    pub fn restore(config: &VmConfig, path: &Path) -> Result<Vmm, BootError> {
        let file = std::fs::File::open(path).map_err(|e| BootError::Other {
            what: "opening the snapshot",
            error: format!("{}: {e}", path.display()),
        })?;
        // Refuses a stream whose pages are not summed: a file stores what a disk may damage.
        let mut reader = StreamReader::new(std::io::BufReader::with_capacity(1 << 20, file))?;
        let meta = snapshot::read_meta(&mut reader)?;
        let core = Core::build(meta.mem_size, meta.vcpus, config.disk.as_ref())?;
        core.check_disk(&meta)?;
        let mut m = core.attach(config)?;
        let mut stage = snapshot::disk_stage(m.core.disk())?;
        let state = snapshot::read_rest(&mut reader, m.core.ram.memory(), meta.mem_size, stage.as_mut())?;
        // The whole file verified: only now does the image become the saved disk.
        if let (Some(disk), Some(stage)) = (m.core.disk(), &stage) {
            let written = disk.replace_with(stage)?;
            tracing::info!(disk = %disk.path().display(), blocks = stage.len(), written, "disk restored");
        }
        Self::apply_state(&mut m, state, &config.serial)?;
        tracing::info!(snapshot = %path.display(), mem_mib = meta.mem_size >> 20, cpus = meta.vcpus, "guest restored");
        m.start()
    }

    /// Applies saved vCPU, VM and device state to a freshly built machine (its console
    /// appending to `serial`).
    pub fn apply_state(m: &mut Machine, state: MachineState, serial: &SerialOutput) -> Result<(), BootError> {
        m.devices.serial = SerialConsole::appending(serial).map_err(other("opening the serial output"))?;
        let MachineState { vcpus, vm, devices } = state;
        if vcpus.len() != m.core.vcpus.len() {
            return Err(BootError::Other {
                what: "restoring",
                error: MigratableError::VcpuCount { saved: vcpus.len(), here: m.core.vcpus.len() }.to_string(),
            });
        }
        vm_state::restore(m.core.vm.fd(), &vm).map_err(other("restoring the VM state"))?;
        for (fd, s) in m.core.vcpus.iter().zip(&vcpus) {
            vcpu_state::restore(fd, s).map_err(other("restoring a vCPU"))?;
        }
        restore_devices(&mut m.devices, &devices).map_err(other("restoring the devices"))?;
        Ok(())
    }

    /// The vCPUs.
    pub fn vcpus(&self) -> &Vcpus {
        &self.vcpus
    }

    /// Guest RAM.
    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }

    /// Takes the vCPU threads' join handles (once), to wait for the guest's end.
    pub fn take_threads(&self) -> Vec<JoinHandle<VcpuEnd>> {
        std::mem::take(&mut *lock(&self.threads))
    }

    /// `stop`: pauses the vCPUs until `cont` (the devices keep running).
    pub fn stop(&self) -> Result<(), MigratableError> {
        self.stopped.store(true, Ordering::Relaxed);
        if !self.vcpus.pause() {
            return Err(MigratableError::NotRunning);
        }
        Ok(())
    }

    /// `cont`: lets the vCPUs run again.
    pub fn cont(&self) {
        self.stopped.store(false, Ordering::Relaxed);
        self.handed_over.store(false, Ordering::Relaxed);
        self.vcpus.resume();
    }

    /// Whether the vCPUs are paused now.
    pub fn is_paused(&self) -> bool {
        self.vcpus.is_paused()
    }

    /// The disk's image, size and what it served (`query-status`), or null without one.
    pub fn disk_status(&self) -> serde_json::Value {
        match &self.disk {
            Some(d) => serde_json::json!({
                "path": d.path(),
                "bytes": d.bytes(),
                "readonly": d.readonly(),
                "stats": d.stats(),
            }),
            None => serde_json::Value::Null,
        }
    }

    /// How long the VM has existed.
    pub fn uptime(&self) -> std::time::Duration {
        self.started.elapsed()
    }

    fn devices(&self) -> std::sync::MutexGuard<'_, Devices> {
        lock(&self.devices)
    }

    /// Hands each paused vCPU thread the reading of its own state.
    fn queue_vcpu_saves(&self) -> Option<Queued<Result<VcpuState, VcpuStateError>>> {
        let msrs = self.msr_list.clone();
        self.vcpus.queue_paused_each(move |_, vcpu| vcpu_state::save(vcpu, &msrs))
    }

    /// [`Pausable::pause`]; with `save`, the vCPU threads start reading their state as soon as
    /// they stopped, while this thread stops the devices.
    fn pause_vm(&self, save: bool) -> Result<(), MigratableError> {
        let was_paused = self.vcpus.is_paused();
        if !self.vcpus.pause() {
            return Err(MigratableError::NotRunning);
        }
        if save {
            // Only its own thread changes a vCPU's KVM state (devices signal the guest through
            // the halt's eventfds, not the in-kernel interrupt chips), so stopping the rings
            // cannot change what the threads read now.
            let mut saving = lock(&self.saving);
            if saving.is_none() {
                *saving = self.queue_vcpu_saves();
            }
        }
        let mut quiesced = lock(&self.quiesced);
        if quiesced.is_none() {
            // Every vCPU is out of the guest, the exits the VMM already served finished (a
            // vCPU thread completes them as it pauses), so none can write guest memory after
            // the devices stopped.
            match self.devices().pause() {
                Ok(state) => *quiesced = Some(state),
                Err(e) => {
                    drop(quiesced);
                    lock(&self.saving).take();
                    if !was_paused {
                        self.vcpus.resume();
                    }
                    return Err(MigratableError::Device(e));
                }
            }
        }
        Ok(())
    }
}

impl Pausable for Vmm {
    fn pause(&self) -> Result<(), MigratableError> {
        self.pause_vm(false)
    }

    fn resume(&self) -> Result<(), MigratableError> {
        // A state saved for this pause describes nothing after it.
        lock(&self.saving).take();
        let devices = lock(&self.quiesced).take();
        let restarted = match devices {
            Some(d) => self.devices().resume(&d).map_err(MigratableError::Device),
            None => Ok(()),
        };
        if !self.stopped.load(Ordering::Relaxed) && !self.handed_over.load(Ordering::Relaxed) {
            self.vcpus.resume();
        }
        restarted
    }
}

impl Snapshottable for Vmm {
    fn describe(&self) -> Meta {
        Meta {
            mem_size: self.mem_size,
            vcpus: self.vcpus.len() as u32,
            tsc_khz: self.tsc_khz,
            writer: format!("colo-vmm {}", env!("CARGO_PKG_VERSION")),
            disk: self.disk.as_ref().map(|d| DiskMeta { bytes: d.bytes(), readonly: d.readonly() }),
        }
    }

    fn pause_to_save(&self) -> Result<(), MigratableError> {
        self.pause_vm(true)
    }

    fn save_state(&self) -> Result<MachineState, MigratableError> {
        let devices = lock(&self.quiesced).clone().ok_or(MigratableError::NotPaused)?;
        // Every vCPU is paused (the quiesced devices say so) before any is read. The vCPU
        // threads read theirs while this thread reads the VM's.
        let queued = lock(&self.saving).take().or_else(|| self.queue_vcpu_saves());
        let vm = vm_state::save(self.vm.fd());
        let vcpus = queued
            .and_then(|q| q.wait())
            .ok_or(MigratableError::NotRunning)?
            .into_iter()
            .collect::<Result<Vec<_>, _>>()?;
        Ok(MachineState { vcpus, vm: vm?, devices })
    }

    fn restore_state(&self, state: MachineState) -> Result<(), MigratableError> {
        if !self.vcpus.is_paused() {
            return Err(MigratableError::NotPaused);
        }
        // What a begun save read is overwritten now.
        lock(&self.saving).take();
        let MachineState { vcpus, vm, devices } = state;
        if vcpus.len() != self.vcpus.len() {
            return Err(MigratableError::VcpuCount { saved: vcpus.len(), here: self.vcpus.len() });
        }
        vm_state::restore(self.vm.fd(), &vm)?;
        for (h, s) in self.vcpus.iter().zip(vcpus) {
            h.run_paused(move |vcpu| vcpu_state::restore(vcpu, &s)).ok_or(MigratableError::NotRunning)??;
        }
        restore_devices(&mut self.devices(), &devices)?;
        // The devices run from the restored state now.
        *lock(&self.quiesced) = None;
        Ok(())
    }
}

/// The one restore of the devices' part of a machine state, for a fresh machine and for a
/// running one: the console's registers (its output stays where it goes), and the devices,
/// whose rings restart where the state left them.
fn restore_devices(devices: &mut Devices, saved: &DevicesState) -> Result<(), MigratableError> {
    devices.serial.load(&saved.serial);
    devices.restore(saved)?;
    Ok(())
}

impl Migratable for Vmm {
    fn start_dirty_log(&self) -> Result<(), MigratableError> {
        let mut t = lock(&self.tracker);
        if t.is_none() {
            *t = Some(DirtyTracker::start(&self.vm, &self.ram, self.logs.clone())?);
            if let Some(d) = &self.disk {
                d.start_tracking();
            }
        }
        Ok(())
    }

    fn dirty_pages(&self) -> Result<DirtyBitmap, MigratableError> {
        let t = lock(&self.tracker);
        Ok(t.as_ref().ok_or(MigratableError::NotTracking)?.collect(&self.vm, &self.ram)?)
    }

    fn stop_dirty_log(&self) {
        if let Some(t) = lock(&self.tracker).take() {
            t.stop(&self.vm, &self.ram);
        }
        if let Some(d) = &self.disk {
            d.stop_tracking();
        }
    }

    fn disk(&self) -> Option<&Disk> {
        self.disk.as_ref()
    }

    fn page_count(&self) -> usize {
        (self.mem_size / PAGE_SIZE as u64) as usize
    }

    fn read_page(&self, page: usize, buf: &mut [u8]) -> Result<(), MigratableError> {
        self.ram
            .memory()
            .read_slice(buf, GuestAddress((page * PAGE_SIZE) as u64))
            .map_err(|source| MigratableError::Page { page, source })
    }

    fn with_paused_pages<T>(
        &self,
        pages: &[usize],
        f: impl FnOnce(&[&[u8]]) -> T,
    ) -> Result<Option<T>, MigratableError> {
        // Held until `f` returns: `resume` takes it first, so the devices stay stopped.
        let quiesced = lock(&self.quiesced);
        if quiesced.is_none() || !self.vcpus.is_paused() {
            return Ok(None);
        }
        let mem = self.ram.memory();
        let mut slices = Vec::with_capacity(pages.len());
        for &page in pages {
            let at = GuestAddress((page * PAGE_SIZE) as u64);
            let slice = mem.get_slice(at, PAGE_SIZE).map_err(|source| MigratableError::Page { page, source })?;
            // SAFETY: `slice` is PAGE_SIZE mapped bytes of guest memory, mapped as long as the
            // VM (and so `self`) lives. Nothing writes them while the returned slices live:
            // every vCPU is out of the guest and paused, and the devices (the vhost-user
            // backends' rings and the block device included) are stopped (`quiesced`), and stay
            // so while this holds the lock that `resume` takes first.
            slices.push(unsafe { std::slice::from_raw_parts(slice.ptr_guard().as_ptr(), PAGE_SIZE) });
        }
        Ok(Some(f(&slices)))
    }

    fn write_page(&self, page: usize, data: &[u8]) -> Result<(), MigratableError> {
        self.ram
            .memory()
            .write_slice(data, GuestAddress((page * PAGE_SIZE) as u64))
            .map_err(|source| MigratableError::Page { page, source })
    }

    fn release_backends(&self) {
        self.handed_over.store(true, Ordering::Relaxed);
        self.devices().disconnect();
    }

    fn reattach_backends(&self) -> Result<(), MigratableError> {
        self.handed_over.store(false, Ordering::Relaxed);
        let devices = lock(&self.quiesced).take().ok_or(MigratableError::NotPaused)?;
        self.devices().reconnect(&devices).map_err(MigratableError::Device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn net_option_parses() {
        let n: NetConfig = "vhost-user=/tmp/vu.sock,mac=52:54:00:aa:bb:cc".parse().unwrap();
        assert_eq!(n.socket, PathBuf::from("/tmp/vu.sock"));
        assert_eq!(n.mac, [0x52, 0x54, 0, 0xaa, 0xbb, 0xcc]);
        let d: NetConfig = "vhost-user=/x".parse().unwrap();
        assert_eq!(d.mac, default_mac(0));
        for bad in [
            "",
            "tap=x",
            "vhost-user=",
            "vhost-user=/x,mac=zz",
            "vhost-user=/x,mac=01:00:00:00:00:00",
            "mac=52:54:00:00:00:01",
        ] {
            assert!(bad.parse::<NetConfig>().is_err(), "{bad}");
        }
    }
}
