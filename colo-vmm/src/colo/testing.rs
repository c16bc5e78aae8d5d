//! Test helpers for the COLO roles: a fake VM that implements the orchestrators' interface and
//! writes what is done to it into a shared log, a compare process (colo-proxy's real control
//! server) that logs the commands it gets, and both ends of a checkpoint link. The roles' unit
//! tests then read the order of operations from one log, without KVM.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use colo_proxy::control::{Command, ControlHandle, ControlServer, Event};

use super::link::{Incoming, Link};
use super::message::Control;
use crate::devices::block::disk::Disk;
use crate::migratable::{Migratable, MigratableError, Pausable, Snapshottable};
use crate::migration::uri::Channel;
use crate::persist::snapshot::Meta;
use crate::persist::state::{MachineState, StateRecord, VcpuState};
use crate::persist::stream::{StreamReader, StreamWriter, PAGE_SIZE};
use crate::vstate::dirty::DirtyBitmap;

/// The RIP of the fake's state.
const MARK: u64 = 0xc0105;

/// What happened, in order, as seen by everyone who logs into it.
#[derive(Clone, Default)]
pub struct Log(Arc<Mutex<Vec<String>>>);

impl Log {
    /// Appends an entry.
    pub fn push(&self, entry: impl Into<String>) {
        self.0.lock().unwrap().push(entry.into());
    }

    /// Everything so far.
    pub fn entries(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }

    /// Where `entry` first appears.
    pub fn position(&self, entry: &str) -> Option<usize> {
        self.entries().iter().position(|e| e == entry)
    }

    /// Whether `entry` appears.
    pub fn contains(&self, entry: &str) -> bool {
        self.position(entry).is_some()
    }

    /// Panics unless each pair's first entry first appears before its second's.
    pub fn assert_order(&self, pairs: &[(&str, &str)]) {
        let all = self.entries();
        for (a, b) in pairs {
            let pa = all.iter().position(|e| e == a).unwrap_or_else(|| panic!("'{a}' never happened: {all:#?}"));
            let pb = all.iter().position(|e| e == b).unwrap_or_else(|| panic!("'{b}' never happened: {all:#?}"));
            assert!(pa < pb, "'{a}' must come before '{b}': {all:#?}");
        }
    }

    /// Waits until `entry` appears (panics after 10 s).
    pub fn wait_for(&self, entry: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.contains(entry) {
            assert!(Instant::now() < deadline, "'{entry}' never happened: {:#?}", self.entries());
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// A VM of a few pages that logs every operation as `vm: NAME`.
pub struct FakeVm {
    log: Log,
    memory: Mutex<Vec<u8>>,
    dirty: Mutex<DirtyBitmap>,
    tracking: AtomicBool,
    paused: AtomicBool,
    /// How long restoring a state takes (so tests can see what happens meanwhile).
    pub restore_time: Duration,
    /// Reading the dirty pages panics (a bug somewhere below the orchestrator).
    pub dirty_pages_panic: AtomicBool,
    /// Reading the dirty pages while paused panics (a bug hit in the middle of a pause).
    pub paused_dirty_pages_panic: AtomicBool,
    /// A disk (a real one, on an image file), if given.
    disk: Option<Disk>,
}

impl FakeVm {
    /// `pages` zeroed pages, running.
    pub fn new(log: &Log, pages: usize) -> FakeVm {
        FakeVm {
            log: log.clone(),
            memory: Mutex::new(vec![0; pages * PAGE_SIZE]),
            dirty: Mutex::new(DirtyBitmap::empty(pages)),
            tracking: AtomicBool::new(false),
            paused: AtomicBool::new(false),
            restore_time: Duration::ZERO,
            dirty_pages_panic: AtomicBool::new(false),
            paused_dirty_pages_panic: AtomicBool::new(false),
            disk: None,
        }
    }

    /// The same VM with `disk`.
    pub fn with_disk(mut self, disk: Disk) -> FakeVm {
        self.disk = Some(disk);
        self
    }

    /// The guest writes `byte` over page `page`.
    pub fn guest_writes(&self, page: usize, byte: u8) {
        self.memory.lock().unwrap()[page * PAGE_SIZE..(page + 1) * PAGE_SIZE].fill(byte);
        self.dirty.lock().unwrap().set(page);
    }

    /// The first byte of page `page`.
    pub fn first_byte(&self, page: usize) -> u8 {
        self.memory.lock().unwrap()[page * PAGE_SIZE]
    }

    /// Whether the vCPU is paused now.
    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::Relaxed)
    }

    /// The state this fake saves (its vCPU's RIP marks it).
    pub fn state() -> MachineState {
        let mut vcpu = VcpuState::default();
        vcpu.regs.rip = MARK;
        MachineState { vcpus: vec![vcpu], ..Default::default() }
    }

    /// [`FakeVm::state`] as a state record.
    pub fn state_record() -> Vec<u8> {
        StateRecord::Paused { state: Box::new(Self::state()), page_digests: None, block_digests: None }.encode()
    }
}

impl Pausable for FakeVm {
    fn pause(&self) -> Result<(), MigratableError> {
        self.paused.store(true, Ordering::Relaxed);
        self.log.push("vm: pause");
        Ok(())
    }

    fn resume(&self) -> Result<(), MigratableError> {
        self.paused.store(false, Ordering::Relaxed);
        self.log.push("vm: resume");
        Ok(())
    }
}

impl Snapshottable for FakeVm {
    fn describe(&self) -> Meta {
        Meta { mem_size: self.mem_size(), vcpus: 1, tsc_khz: 1, writer: "fake".into(), disk: None }
    }

    fn save_state(&self) -> Result<MachineState, MigratableError> {
        if !self.is_paused() {
            return Err(MigratableError::NotPaused);
        }
        self.log.push("vm: save-state");
        Ok(Self::state())
    }

    fn restore_state(&self, state: MachineState) -> Result<(), MigratableError> {
        if !self.is_paused() {
            return Err(MigratableError::NotPaused);
        }
        assert_eq!(state.vcpus[0].regs.rip, MARK, "the state the primary saved");
        std::thread::sleep(self.restore_time);
        self.log.push("vm: restore-state");
        Ok(())
    }
}

impl Migratable for FakeVm {
    fn start_dirty_log(&self) -> Result<(), MigratableError> {
        self.tracking.store(true, Ordering::Relaxed);
        if let Some(d) = &self.disk {
            d.start_tracking();
        }
        Ok(())
    }

    fn disk(&self) -> Option<&Disk> {
        self.disk.as_ref()
    }

    fn dirty_pages(&self) -> Result<DirtyBitmap, MigratableError> {
        if !self.tracking.load(Ordering::Relaxed) {
            return Err(MigratableError::NotTracking);
        }
        assert!(!self.dirty_pages_panic.load(Ordering::Relaxed), "the fake's dirty log broke");
        assert!(
            !(self.paused_dirty_pages_panic.load(Ordering::Relaxed) && self.is_paused()),
            "the fake's dirty log broke during a pause"
        );
        let mut d = self.dirty.lock().unwrap();
        let pages = self.page_count();
        Ok(std::mem::replace(&mut *d, DirtyBitmap::empty(pages)))
    }

    fn stop_dirty_log(&self) {
        self.tracking.store(false, Ordering::Relaxed);
        self.log.push("vm: stop-dirty-log");
    }

    fn page_count(&self) -> usize {
        self.memory.lock().unwrap().len() / PAGE_SIZE
    }

    fn read_page(&self, page: usize, buf: &mut [u8]) -> Result<(), MigratableError> {
        buf.copy_from_slice(&self.memory.lock().unwrap()[page * PAGE_SIZE..(page + 1) * PAGE_SIZE]);
        Ok(())
    }

    fn write_page(&self, page: usize, data: &[u8]) -> Result<(), MigratableError> {
        self.memory.lock().unwrap()[page * PAGE_SIZE..(page + 1) * PAGE_SIZE].copy_from_slice(data);
        Ok(())
    }

    fn release_backends(&self) {
        self.log.push("vm: release-backends");
    }

    fn reattach_backends(&self) -> Result<(), MigratableError> {
        self.log.push("vm: reattach-backends");
        Ok(())
    }
}

/// A compare process: colo-proxy's control server, answering every command at once and logging
/// it as `compare: checkpoint` or `compare: mode MODE`.
pub struct FakeCompare {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    _handle: ControlHandle,
}

impl FakeCompare {
    /// Serves a fresh socket.
    pub fn start(log: &Log) -> FakeCompare {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("colo-vmm-test-compare-{}-{n}.sock", std::process::id()));
        let hello = || Event::Hello {
            component: "fake".into(),
            version: "0".into(),
            nic: "net0".into(),
            mode: colo_proxy::compare::Mode::PrimaryOnly,
            replica: None,
        };
        let (handle, requests) = ControlServer::spawn(&path, hello).expect("control server");
        let stop = Arc::new(AtomicBool::new(false));
        let (h, s, log) = (handle.clone(), stop.clone(), log.clone());
        std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let Ok(req) = requests.recv_timeout(Duration::from_millis(20)) else { continue };
                let reply = match req.command {
                    Command::Checkpoint { id } => {
                        log.push("compare: checkpoint");
                        Event::Flushed { id, released: 1, dropped: 0 }
                    }
                    Command::Mode { id, mode } => {
                        log.push(format!("compare: mode {mode:?}"));
                        Event::ModeSet { id, mode }
                    }
                    Command::QueryStats { id } => Event::Error { id: Some(id), message: "not here".into() },
                    other => other.refused_by_pair(),
                };
                h.reply(req.conn, reply);
            }
        });
        FakeCompare { path, stop, _handle: handle }
    }

    /// Its control socket.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for FakeCompare {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// One end of a checkpoint link as the roles hold it: the reader, the writer, the connection.
pub struct LinkEnd<W: std::io::Write> {
    /// Reads the peer's stream.
    pub reader: StreamReader<std::io::BufReader<Channel>>,
    /// Writes ours.
    pub writer: StreamWriter<W>,
    /// The connection.
    pub chan: Channel,
}

/// Both ends of a link over a socket pair (the channel gathers small writes until a flush).
pub fn link_ends() -> (LinkEnd<Channel>, LinkEnd<Channel>) {
    let (a, b) = UnixStream::pair().unwrap();
    let (a, b) = (Channel::paired(a).unwrap(), Channel::paired(b).unwrap());
    let wa = StreamWriter::new(a.try_clone().unwrap()).unwrap();
    let wb = StreamWriter::new(b.try_clone().unwrap()).unwrap();
    let ra = StreamReader::new(std::io::BufReader::new(a.try_clone().unwrap())).unwrap();
    let rb = StreamReader::new(std::io::BufReader::new(b.try_clone().unwrap())).unwrap();
    (LinkEnd { reader: ra, writer: wa, chan: a }, LinkEnd { reader: rb, writer: wb, chan: b })
}

/// A scripted peer on a link: it logs what it receives as `WHO: got TYPE` and what it sends as
/// `WHO: sent TYPE`.
pub struct Peer<W: std::io::Write + Send + 'static = Channel> {
    /// The link.
    pub link: Link<W>,
    who: &'static str,
    log: Log,
}

/// The kebab-case `type` of a message, as on the wire.
pub fn name(c: &Control) -> String {
    serde_json::to_value(c).unwrap()["type"].as_str().unwrap().to_string()
}

impl<W: std::io::Write + Send + 'static> Peer<W> {
    /// A peer called `who` (heartbeats every 50 ms) on `end`.
    pub fn new(who: &'static str, end: LinkEnd<W>, log: &Log) -> Peer<W> {
        let link = Link::new(end.reader, end.writer, end.chan, Arc::new(AtomicU64::new(50)));
        Peer { link, who, log: log.clone() }
    }

    /// Sends `c`.
    pub fn send(&self, c: &Control) {
        self.log.push(format!("{}: sent {}", self.who, name(c)));
        self.link.send(c).unwrap();
    }

    /// The next message (within 10 s), logged.
    pub fn recv(&mut self) -> Incoming {
        let m = self.link.recv(Duration::from_secs(10)).unwrap_or_else(|e| panic!("{}: {e:?}", self.who));
        let what = match &m {
            Incoming::Control(c) => name(c),
            Incoming::Pages(_) => "pages".into(),
            Incoming::Blocks(_) => "blocks".into(),
            Incoming::State(_) => "state".into(),
            Incoming::Closed(w) | Incoming::Corrupt(w) => w.clone(),
        };
        self.log.push(format!("{}: got {what}", self.who));
        m
    }

    /// The next control message, which must be `want`'s type (heartbeat parameters, which the
    /// primary sends when it likes, are passed over); returns it.
    pub fn expect(&mut self, want: &str) -> Control {
        loop {
            match self.recv() {
                Incoming::Control(c) if name(&c) == want => return c,
                Incoming::Control(Control::HeartbeatParameters { .. }) => {}
                other => panic!("{}: expected {want}, got {other:?}", self.who),
            }
        }
    }
}
