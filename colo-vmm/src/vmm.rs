//! Building and running one VM: memory, KVM, the guest image and boot state, the devices, the
//! vCPU thread; and the operations the control API offers.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use colo_vmm_abi::{VirtioMmioDevice, MAX_MEM, MIN_MEM, MMIO_BASE, MMIO_DEVICE_SIZE};
use kvm_ioctls::IoEventAddress;
use serde_json::{json, Value};

use crate::arch::{cpuid, regs};
use crate::colo::shared::ColoShared;
use crate::colo::status::State as ColoState;
use crate::devices::pvhalt::Waiter;
use crate::devices::serial::{SerialConsole, SerialOutput};
use crate::devices::vhost_user_net::DirtyLog;
use crate::devices::vhost_user_net::VhostUserNet;
use crate::devices::virtio_mmio::{MmioTransport, QUEUE_NOTIFY_OFFSET};
use crate::devices::Devices;
use crate::devices::DevicesState;
use crate::loader::{self, Image};
use crate::migration::source;
use crate::migration::status::{MigrationParams, MigrationState, MigrationStatus, StatusHandle};
use crate::migration::uri::MigrationUri;
use crate::persist::sections::Sections;
use crate::persist::snapshot::{self, Meta, SnapshotStats};
use crate::persist::stream::{StreamError, StreamReader};
use crate::persist::{vcpu_state, vm_state};
use crate::vstate::dirty::DirtyTracker;
use crate::vstate::memory::GuestRam;
use crate::vstate::vcpu::{self, VcpuEnd, VcpuHandle};
use crate::vstate::vm::Vm;
use kvm_ioctls::VcpuFd;

/// `--net vhost-user=PATH[,mac=MAC]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    /// The backend's socket.
    pub socket: PathBuf,
    /// The guest's MAC address.
    pub mac: [u8; 6],
}

/// The default MAC: locally administered, QEMU's prefix, device index in the last byte.
pub fn default_mac(index: usize) -> [u8; 6] {
    [0x52, 0x54, 0x00, 0x12, 0x34, 0x56u8.wrapping_add(index as u8)]
}

impl FromStr for NetConfig {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut socket = None;
        let mut mac = None;
        for part in s.split(',') {
            match part.split_once('=') {
                Some(("vhost-user", p)) if !p.is_empty() => socket = Some(PathBuf::from(p)),
                Some(("mac", m)) => mac = Some(parse_mac(m)?),
                _ => return Err(format!("'{part}' in '{s}': expected vhost-user=PATH[,mac=MAC]")),
            }
        }
        let socket = socket.ok_or_else(|| format!("'{s}': missing vhost-user=PATH"))?;
        Ok(NetConfig { socket, mac: mac.unwrap_or_else(|| default_mac(0)) })
    }
}

/// Parses `52:54:00:12:34:56`.
pub fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let bytes: Vec<u8> = s
        .split(':')
        .map(|b| u8::from_str_radix(b, 16).map_err(|_| format!("'{s}' is not a MAC address")))
        .collect::<Result<_, _>>()?;
    let mac: [u8; 6] = bytes.try_into().map_err(|_| format!("'{s}' is not a MAC address (six bytes)"))?;
    if mac[0] & 1 != 0 {
        return Err(format!("'{s}' is a multicast address"));
    }
    Ok(mac)
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
    /// Network devices.
    pub net: Vec<NetConfig>,
    /// Console output.
    pub serial: SerialOutput,
    /// Control sockets of the compare processes this VM's traffic goes through (COLO).
    pub compare_sockets: Vec<PathBuf>,
}

/// Errors booting a VM.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// Memory size out of range.
    #[error("--mem {0} MiB: guest memory must be between {min} and {max} MiB", min = MIN_MEM >> 20, max = MAX_MEM >> 20)]
    MemorySize(u64),
    /// Too many devices.
    #[error("at most {0} network devices")]
    TooManyDevices(usize),
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

/// Memory, KVM and the vCPU, before any device: what a migration destination builds while it
/// receives pages (its backends are still the source's).
pub struct Core {
    ram: GuestRam,
    vm: Vm,
    vcpu: VcpuFd,
    msr_list: Vec<u32>,
    tsc_khz: u64,
}

impl Core {
    /// RAM of `mem_size` bytes, the VM and its vCPU.
    pub fn build(mem_size: u64) -> Result<Core, BootError> {
        if !(MIN_MEM..=MAX_MEM).contains(&mem_size) {
            return Err(BootError::MemorySize(mem_size >> 20));
        }
        let ram = GuestRam::new(mem_size)?;
        let vm = Vm::new(&ram)?;
        let vcpu = vm.fd().create_vcpu(0).map_err(other("creating the vCPU"))?;
        vcpu.set_cpuid2(&cpuid::for_vcpu(vm.kvm(), 0).map_err(other("reading CPUID"))?)
            .map_err(other("setting CPUID"))?;
        let tsc_khz = vm.tsc_khz(&vcpu);
        let msr_list = vcpu_state::saveable_msrs(vm.kvm(), &vcpu).map_err(other("listing MSRs"))?;
        Ok(Core { ram, vm, vcpu, msr_list, tsc_khz })
    }

    /// Guest RAM.
    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }

    /// Connects the network backends of `config` (the console starts silent; a boot opens it,
    /// a restore takes over the saved one).
    pub fn attach(self, config: &VmConfig) -> Result<Machine, BootError> {
        if config.net.len() > colo_vmm_abi::MAX_VIRTIO_DEVICES {
            return Err(BootError::TooManyDevices(colo_vmm_abi::MAX_VIRTIO_DEVICES));
        }
        let mut waiter = Waiter::new().map_err(other("creating the halt waiter"))?;
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
            for fd in transport.device().call_fds() {
                waiter.add_source(fd).map_err(other("watching a queue"))?;
            }
            described.push(VirtioMmioDevice { base, size: MMIO_DEVICE_SIZE, irq: 5 + i as u32, reserved: 0 });
            mmio.push(transport);
        }
        let serial = SerialConsole::new(&SerialOutput::None).map_err(other("serial"))?;
        let devices = Devices { serial, mmio, waiter, unknown_io: 0 };
        Ok(Machine { core: self, devices, described, logs, compare_sockets: config.compare_sockets.clone() })
    }
}

/// A VM with its devices, before its vCPU starts.
pub struct Machine {
    core: Core,
    devices: Devices,
    described: Vec<VirtioMmioDevice>,
    logs: Vec<DirtyLog>,
    compare_sockets: Vec<PathBuf>,
}

impl Machine {
    /// Guest RAM.
    pub fn ram(&self) -> &GuestRam {
        &self.core.ram
    }

    /// Starts dirty tracking (before the vCPU runs, so nothing it writes is missed).
    pub fn dirty_tracker(&self) -> Result<DirtyTracker, String> {
        DirtyTracker::start(&self.core.vm, &self.core.ram, self.logs.clone()).map_err(|e| e.to_string())
    }

    /// Starts the vCPU thread.
    pub fn start(self) -> Result<Vmm, BootError> {
        vcpu::install_kick_handler().map_err(other("installing the vCPU kick handler"))?;
        let Core { ram, vm, vcpu, msr_list, tsc_khz } = self.core;
        let mem_size = ram.size();
        let (handle, thread) = vcpu::spawn(vcpu, self.devices).map_err(other("starting the vCPU thread"))?;
        Ok(Vmm {
            ram,
            vm,
            vcpu: handle,
            thread: Mutex::new(Some(thread)),
            started: Instant::now(),
            mem_size,
            msr_list: Arc::new(msr_list),
            tsc_khz,
            logs: self.logs,
            migration: Arc::new(Mutex::new(MigrationStatus::default())),
            migration_params: Mutex::new(MigrationParams::default()),
            colo: Arc::new(ColoShared::new(self.compare_sockets)),
        })
    }
}

/// A running VM.
pub struct Vmm {
    /// Guest RAM, mapped for KVM and the backends.
    ram: GuestRam,
    /// The VM (its memory slot and ioeventfds live as long as it does).
    vm: Vm,
    vcpu: Arc<VcpuHandle>,
    thread: Mutex<Option<JoinHandle<VcpuEnd>>>,
    started: Instant,
    mem_size: u64,
    msr_list: Arc<Vec<u32>>,
    tsc_khz: u64,
    logs: Vec<DirtyLog>,
    migration: StatusHandle,
    migration_params: Mutex<MigrationParams>,
    colo: Arc<ColoShared>,
}

/// Errors saving a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The guest is not running any more.
    #[error("the guest is no longer running")]
    NotRunning,
    /// Saving vCPU or VM state failed.
    #[error(transparent)]
    State(#[from] crate::persist::vcpu_state::VcpuStateError),
    /// A device could not be paused or resumed.
    #[error("device: {0}")]
    Device(String),
    /// Writing the file failed.
    #[error("writing the snapshot: {0}")]
    Write(#[from] StreamError),
    /// Creating the file failed.
    #[error("cannot create {path}: {error}")]
    Create {
        /// The file.
        path: PathBuf,
        /// Why.
        error: std::io::Error,
    },
}

impl Vmm {
    /// Creates the VM, loads the guest and starts its vCPU.
    pub fn boot(config: &VmConfig) -> Result<Vmm, BootError> {
        if let Image::File(p) = &config.image {
            loader::check_kernel_file(p)?;
        }
        let mut m = Core::build(config.mem_mib << 20)?.attach(config)?;
        m.devices.serial = SerialConsole::new(&config.serial).map_err(other("opening the serial output"))?;
        let (ram, tsc_khz) = (&m.core.ram, m.core.tsc_khz);
        let loaded = loader::load_image(ram.memory(), &config.image)?;
        loader::write_boot_state(ram.memory(), ram.size(), &loaded, &config.cmdline, tsc_khz, &m.described)?;
        regs::setup(&m.core.vcpu, loaded.entry).map_err(other("setting up the vCPU registers"))?;
        tracing::info!(mem_mib = config.mem_mib, entry = format_args!("{:#x}", loaded.entry), tsc_khz, "guest started");
        m.start()
    }

    /// Creates the VM from a snapshot file and resumes it where it was saved. Nothing runs
    /// unless the whole file verifies.
    pub fn restore(config: &VmConfig, path: &Path) -> Result<Vmm, BootError> {
        let file = std::fs::File::open(path).map_err(|e| BootError::Other {
            what: "opening the snapshot",
            error: format!("{}: {e}", path.display()),
        })?;
        let mut reader = StreamReader::new(std::io::BufReader::with_capacity(1 << 20, file))?;
        let meta = snapshot::read_meta(&mut reader)?;
        if meta.vcpus != 1 {
            return Err(BootError::Other {
                what: "restoring",
                error: format!("snapshot has {} vCPUs; this VMM runs one", meta.vcpus),
            });
        }
        let mut m = Core::build(meta.mem_size)?.attach(config)?;
        let state = snapshot::read_rest(&mut reader, m.core.ram.memory(), meta.mem_size)?;
        Self::apply_state(&mut m, &state, &config.serial)?;
        tracing::info!(snapshot = %path.display(), mem_mib = meta.mem_size >> 20, "guest restored");
        m.start()
    }

    /// Applies saved vCPU, VM and device state to a freshly built machine.
    pub fn apply_state(m: &mut Machine, state: &Sections, serial: &SerialOutput) -> Result<(), BootError> {
        vm_state::restore(m.core.vm.fd(), state).map_err(other("restoring the VM state"))?;
        vcpu_state::restore(&m.core.vcpu, 0, state).map_err(other("restoring the vCPU"))?;
        let devices: DevicesState = state.json("devices")?;
        m.devices.serial = SerialConsole::restored(serial, &devices.serial).map_err(other("restoring the console"))?;
        m.devices.restore(&devices).map_err(|e| BootError::Other { what: "restoring the devices", error: e })?;
        Ok(())
    }

    /// The vCPU handle.
    pub fn vcpu(&self) -> &VcpuHandle {
        &self.vcpu
    }

    /// Guest RAM.
    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }

    /// Takes the vCPU thread's join handle (once), to wait for the guest's end.
    pub fn take_thread(&self) -> Option<JoinHandle<VcpuEnd>> {
        self.thread.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    /// Saves the VM to `path`. The VM is paused while saving and resumed after, unless it was
    /// already stopped.
    pub fn snapshot(&self, path: &Path) -> Result<SnapshotStats, SnapshotError> {
        let was_paused = self.vcpu.is_paused();
        if !was_paused && !self.vcpu.pause() {
            return Err(SnapshotError::NotRunning);
        }
        let result = self.snapshot_paused(path);
        if !was_paused {
            self.vcpu.resume();
        }
        result
    }

    fn snapshot_paused(&self, path: &Path) -> Result<SnapshotStats, SnapshotError> {
        let t = Instant::now();
        let (mut state, devices) = self.save_vcpu_and_devices()?;
        let mut write = || -> Result<SnapshotStats, SnapshotError> {
            vm_state::save(self.vm.fd(), &mut state)?;
            let file =
                std::fs::File::create(path).map_err(|error| SnapshotError::Create { path: path.into(), error })?;
            let meta = self.meta();
            Ok(snapshot::write(std::io::BufWriter::with_capacity(1 << 20, file), &meta, self.ram.memory(), &state)?)
        };
        let result = write();
        // Whatever happened, the devices run again.
        let resumed = self
            .vcpu
            .run_paused(move |_, d| d.resume(&devices))
            .unwrap_or_else(|| Err("the vCPU thread is gone".into()));
        let stats = result?;
        resumed.map_err(SnapshotError::Device)?;
        tracing::info!(path = %path.display(), pages = stats.pages, bytes = stats.bytes, ms = t.elapsed().as_millis() as u64, "snapshot saved");
        Ok(stats)
    }

    /// COLO state.
    pub fn colo(&self) -> &Arc<ColoShared> {
        &self.colo
    }

    /// The VM.
    pub fn vm(&self) -> &Vm {
        &self.vm
    }

    /// Handles on the backends' dirty logs.
    pub fn dirty_logs(&self) -> Vec<DirtyLog> {
        self.logs.clone()
    }

    /// Migration parameters (`migrate-set-parameters`).
    pub fn migration_params(&self) -> &Mutex<MigrationParams> {
        &self.migration_params
    }

    /// Migration progress.
    pub fn migration_status(&self) -> MigrationStatus {
        self.migration.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Starts migrating to `uri` on a background thread; `done` runs when it ends (with
    /// whether it completed).
    pub fn start_migration(
        self: &Arc<Self>,
        uri: MigrationUri,
        done: impl FnOnce(bool) + Send + 'static,
    ) -> Result<(), String> {
        if matches!(self.colo.status().state, ColoState::Starting | ColoState::Running) {
            return Err("COLO is running: end it (lost-heartbeat) before migrating".into());
        }
        {
            let mut st = self.migration.lock().unwrap_or_else(|p| p.into_inner());
            if st.status == MigrationState::Active {
                return Err("a migration is already running".into());
            }
            *st = MigrationStatus { status: MigrationState::Active, ..Default::default() };
        }
        let params = *self.migration_params.lock().unwrap_or_else(|p| p.into_inner());
        let vmm = self.clone();
        std::thread::Builder::new()
            .name("migration".into())
            .spawn(move || {
                let ok = source::migrate(&vmm, &uri, params, &vmm.migration).is_ok();
                done(ok);
            })
            .map_err(|e| e.to_string())?;
        Ok(())
    }

    /// Saves the vCPU and pauses the devices, on the (paused) vCPU thread.
    pub(crate) fn save_vcpu_and_devices(&self) -> Result<(Sections, DevicesState), SnapshotError> {
        let msrs = self.msr_list.clone();
        let r = self.vcpu.run_paused(move |vcpu, devices| -> Result<(Sections, DevicesState), SnapshotError> {
            let mut s = Sections::new();
            vcpu_state::save(vcpu, 0, &msrs, &mut s)?;
            let d = devices.pause().map_err(SnapshotError::Device)?;
            s.put_json("devices", &d);
            Ok((s, d))
        });
        r.unwrap_or(Err(SnapshotError::NotRunning))
    }

    /// What kind of machine this is.
    pub fn meta(&self) -> Meta {
        Meta {
            mem_size: self.mem_size,
            vcpus: 1,
            tsc_khz: self.tsc_khz,
            writer: format!("colo-vmm {}", env!("CARGO_PKG_VERSION")),
        }
    }

    /// What `query-status` reports.
    pub fn status(&self) -> Value {
        let paused = self.vcpu.is_paused();
        let migrated = self.migration_status().status == MigrationState::Completed;
        json!({
            "status": if migrated { "postmigrate" } else if paused { "paused" } else { "running" },
            "running": !paused,
            "uptime-ms": self.started.elapsed().as_millis() as u64,
            "memory-mib": self.mem_size >> 20,
        })
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
