//! The scheduler every vCPU runs: a few shared tasks, each taken by one vCPU at a time, and a
//! CPU burner of each vCPU's own.
//!
//! Tasks: the network (smoltcp, the network services), the memory and disk dirtiers. A vCPU takes a task
//! with a try-lock; if another vCPU has it, it leaves a note ([`Task`]'s `pending`) and that
//! vCPU runs the task once more before it lets go, so work signalled in the meantime (a frame
//! whose device signal woke this vCPU) never waits for the next deadline. With nothing to do a
//! vCPU halts until the earliest task deadline; a device signal wakes one halted vCPU (the
//! VMM's halt, see colo_vmm_abi), which takes the network task. With `burn`, each vCPU burns in
//! slices between looks at the tasks and never halts.
//!
//! Everything here runs at CPL3: the lock is a compare-and-swap, there are no interrupts and
//! no inter-processor signals, only memory and the halt port.

use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};

use smoltcp::time::Instant;

use colo_vmm_abi::MAX_CPUS;

use crate::halt;
use crate::services::burn::Burn;
use crate::services::dirty::Dirty;
use crate::services::diskdirty::DiskDirty;
use crate::services::NetCore;
use crate::time;

/// A shared task: one vCPU at a time runs it.
pub struct Task<T> {
    locked: AtomicBool,
    /// Another vCPU wanted to run the task while it was taken.
    pending: AtomicBool,
    inner: UnsafeCell<T>,
}

// SAFETY: the inner value is only reached by the vCPU holding `locked` (run, try_with), which a
// compare-and-swap gives to one at a time; T moves between vCPUs, so it must be Send.
unsafe impl<T: Send> Sync for Task<T> {}

impl<T> Task<T> {
    /// A task over `value`.
    pub const fn new(value: T) -> Task<T> {
        Task { locked: AtomicBool::new(false), pending: AtomicBool::new(false), inner: UnsafeCell::new(value) }
    }

    fn try_lock(&self) -> bool {
        self.locked.compare_exchange(false, true, SeqCst, SeqCst).is_ok()
    }

    fn unlock(&self) {
        self.locked.store(false, SeqCst);
    }

    /// Runs `f` on the task, unless another vCPU has it: then that vCPU runs it again before it
    /// lets go. Returns whether this vCPU ran it.
    ///
    /// Why no wakeup is lost (every access sequentially consistent): a vCPU whose try-lock
    /// fails stored `pending` before it, and its failed compare-and-swap read the lock taken,
    /// so it came before the holder's unlock, which comes before the holder's look at
    /// `pending`. A vCPU that stores `pending` after that look tries the lock after the unlock.
    pub fn run(&self, mut f: impl FnMut(&mut T)) -> bool {
        let mut ran = false;
        loop {
            self.pending.store(true, SeqCst);
            if !self.try_lock() {
                return ran;
            }
            self.pending.store(false, SeqCst);
            // SAFETY: this vCPU holds the lock.
            f(unsafe { &mut *self.inner.get() });
            ran = true;
            self.unlock();
            if !self.pending.load(SeqCst) {
                return true;
            }
        }
    }

    /// Runs `f` on the task if no other vCPU has it (without asking to run it later).
    pub fn try_with<R>(&self, f: impl FnOnce(&mut T) -> R) -> Option<R> {
        if !self.try_lock() {
            return None;
        }
        // SAFETY: this vCPU holds the lock.
        let r = f(unsafe { &mut *self.inner.get() });
        self.unlock();
        Some(r)
    }
}

/// What a vCPU did, for `/stats`.
pub struct CpuCounters {
    /// Times it ran a shared task.
    pub runs: AtomicU64,
    /// Iterations of its burner.
    pub burn: AtomicU64,
}

/// Counters the tasks share.
pub struct Counters {
    /// Per vCPU.
    pub cpu: [CpuCounters; MAX_CPUS],
    /// Pages the dirtier wrote.
    pub dirty_pages: AtomicU64,
    /// Blocks the disk dirtier wrote.
    pub dirty_blocks: AtomicU64,
}

impl Counters {
    const fn new() -> Counters {
        Counters {
            cpu: [const { CpuCounters { runs: AtomicU64::new(0), burn: AtomicU64::new(0) } }; MAX_CPUS],
            dirty_pages: AtomicU64::new(0),
            dirty_blocks: AtomicU64::new(0),
        }
    }

    /// Burn iterations of every vCPU.
    pub fn burn_total(&self) -> u64 {
        self.cpu.iter().map(|c| c.burn.load(SeqCst)).sum()
    }
}

/// "No deadline", in a deadline slot.
const NONE: u64 = u64::MAX;

fn store_deadline(slot: &AtomicU64, deadline: Option<Instant>) {
    slot.store(deadline.map_or(NONE, |d| d.total_micros().max(0) as u64), SeqCst);
}

fn load_deadline(slot: &AtomicU64) -> Option<Instant> {
    match slot.load(SeqCst) {
        NONE => None,
        us => Some(Instant::from_micros(us as i64)),
    }
}

/// Everything the vCPUs share.
pub struct System {
    /// How many vCPUs there are.
    pub cpus: usize,
    net: Option<Task<NetCore>>,
    dirty: Option<Task<Dirty>>,
    disk_dirty: Option<Task<DiskDirty>>,
    burn: bool,
    /// When each task next needs to run without outside events (microseconds since boot).
    net_deadline: AtomicU64,
    dirty_deadline: AtomicU64,
    disk_dirty_deadline: AtomicU64,
    /// The counters.
    pub counters: Counters,
}

impl System {
    /// The tasks for `cpus` vCPUs: the network, the dirtiers, and burners if `burn`.
    pub fn new(
        cpus: usize,
        net: Option<NetCore>,
        dirty: Option<Dirty>,
        disk_dirty: Option<DiskDirty>,
        burn: bool,
    ) -> System {
        System {
            cpus,
            net: net.map(Task::new),
            dirty: dirty.map(Task::new),
            disk_dirty: disk_dirty.map(Task::new),
            burn,
            // Until a task has run and said when it needs to run again: never.
            net_deadline: AtomicU64::new(NONE),
            dirty_deadline: AtomicU64::new(NONE),
            disk_dirty_deadline: AtomicU64::new(NONE),
            counters: Counters::new(),
        }
    }

    /// Whether the network has work no vCPU is doing (a memory read: no exit).
    fn net_has_work(&self) -> bool {
        self.net.as_ref().and_then(|n| n.try_with(NetCore::has_work)).unwrap_or(false)
    }

    /// The earliest deadline of any task.
    fn deadline(&self) -> Option<Instant> {
        let dirtiers = earliest(load_deadline(&self.dirty_deadline), load_deadline(&self.disk_dirty_deadline));
        earliest(load_deadline(&self.net_deadline), dirtiers)
    }

    /// Runs the shared tasks once; returns whether this vCPU ran any.
    fn run_tasks(&self) -> bool {
        let mut ran = false;
        if let Some(net) = &self.net {
            ran |= net.run(|core| {
                let deadline = core.poll(time::now(), self);
                store_deadline(&self.net_deadline, deadline);
            });
        }
        if let Some(dirty) = &self.dirty {
            ran |= dirty.run(|d| {
                d.poll(time::now());
                self.counters.dirty_pages.store(d.written(), SeqCst);
                store_deadline(&self.dirty_deadline, d.deadline());
            });
        }
        if let Some(dirty) = &self.disk_dirty {
            ran |= dirty.run(|d| {
                d.poll(time::now());
                self.counters.dirty_blocks.store(d.written(), SeqCst);
                store_deadline(&self.disk_dirty_deadline, d.deadline());
            });
        }
        ran
    }
}

/// The earlier of two optional instants.
pub fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, None) => a,
        (None, b) => b,
    }
}

/// What vCPU `cpu` runs forever.
pub fn cpu_loop(system: &'static System, cpu: usize) -> ! {
    let me = &system.counters.cpu[cpu];
    // The burner's state lives on this vCPU's stack: a vCPU that lost its state (restored
    // wrongly) would start counting again from zero, which the tests would see.
    let mut burner = system.burn.then(Burn::new);
    loop {
        if system.run_tasks() {
            me.runs.fetch_add(1, SeqCst);
        }
        if let Some(burner) = &mut burner {
            // Never halt while burning; network work ends the slice early.
            burner.run(|| system.net_has_work());
            me.burn.store(burner.iterations(), SeqCst);
            continue;
        }
        if system.net_has_work() {
            continue;
        }
        let now = time::now();
        match system.deadline() {
            Some(deadline) if deadline <= now => {}
            Some(deadline) => halt::halt(Some(deadline - now)),
            None => halt::halt(None),
        }
    }
}
