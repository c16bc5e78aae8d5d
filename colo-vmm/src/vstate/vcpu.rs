//! A vCPU thread: runs KVM_RUN, dispatches port and MMIO exits to the devices (shared by every
//! vCPU, behind one lock), sleeps in its own paravirtual halt, and obeys the VMM's requests
//! (pause, resume, quit, and work that must run on the vCPU thread while it is paused, such as
//! saving its state). [`Vcpus`] drives all of a VM's vCPUs together: a pause stops every one
//! before it returns.
//!
//! A request is delivered by setting the wanted state, writing the halt waiter's kick eventfd,
//! and sending the thread a signal whose handler sets `immediate_exit` in the thread's
//! `kvm_run`: so the vCPU leaves KVM_RUN (or never enters it, or leaves its halt) promptly.

use std::cell::Cell;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use kvm_bindings::kvm_run;
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::pvhalt::{Waiter, Wake};
use crate::devices::{Devices, PioAction};
use crate::persist::vcpu_state;

/// How the vCPU thread ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuEnd {
    /// The guest wrote its exit code to the exit port.
    GuestExit(u32),
    /// The VMM asked it to quit.
    Quit,
    /// The guest crashed or KVM failed; the text says how.
    Crashed(String),
}

/// What the VMM wants from the vCPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Want {
    Run,
    Pause,
    Quit,
}

/// Work run on the vCPU thread while it is paused.
pub type Task = Box<dyn FnOnce(&mut VcpuFd) + Send>;

/// The devices, as every vCPU thread shares them.
pub type SharedDevices = Arc<Mutex<Devices>>;

struct State {
    want: Want,
    paused: bool,
    ended: bool,
    tasks: Vec<Task>,
}

/// The VMM's handle on a vCPU thread.
pub struct VcpuHandle {
    index: usize,
    state: Mutex<State>,
    changed: Condvar,
    kicker: EventFd,
    thread: Mutex<Option<libc::pthread_t>>,
}

thread_local! {
    /// The running vCPU's `kvm_run`, for the kick signal handler (const-initialised, so reading
    /// it in a signal handler allocates nothing).
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    KVM_RUN.with(|p| {
        let run = p.get();
        if !run.is_null() {
            // SAFETY: the pointer is this thread's kvm_run mapping, valid while the vCPU lives;
            // a single byte store is async-signal-safe.
            unsafe { (*run).immediate_exit = 1 };
        }
    });
}

/// The signal used to kick vCPU threads out of KVM_RUN.
pub fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

/// Installs the kick signal handler (once per process).
pub fn install_kick_handler() -> std::io::Result<()> {
    vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick)
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
}

impl VcpuHandle {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn request(&self, want: Want) {
        let mut s = self.lock();
        if s.want != Want::Quit {
            s.want = want;
        }
        drop(s);
        self.kick();
    }

    fn kick(&self) {
        let _ = self.kicker.write(1);
        if let Some(t) = *self.thread.lock().unwrap_or_else(|p| p.into_inner()) {
            // SAFETY: the thread id is of a live thread (it is cleared before the thread ends).
            unsafe { libc::pthread_kill(t, kick_signal()) };
        }
    }

    /// Pauses the vCPU and waits until it is out of the guest. Returns false if the thread has
    /// already ended.
    pub fn pause(&self) -> bool {
        self.request(Want::Pause);
        self.wait_paused()
    }

    /// Waits until a requested pause has taken effect; false if the thread has ended.
    fn wait_paused(&self) -> bool {
        let mut s = self.lock();
        while !s.paused && !s.ended {
            s = self.changed.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        !s.ended
    }

    /// Its index (0 is the boot vCPU).
    pub fn index(&self) -> usize {
        self.index
    }

    /// Lets a paused vCPU run again.
    pub fn resume(&self) {
        let mut s = self.lock();
        if s.want == Want::Pause {
            s.want = Want::Run;
        }
        drop(s);
        self.changed.notify_all();
    }

    /// Asks the vCPU thread to end.
    pub fn quit(&self) {
        self.request(Want::Quit);
        self.changed.notify_all();
    }

    /// Whether the vCPU is paused now.
    pub fn is_paused(&self) -> bool {
        self.lock().paused
    }

    /// Runs `task` on the paused vCPU thread and waits for it. The vCPU must be paused.
    pub fn run_paused<R: Send + 'static>(&self, task: impl FnOnce(&mut VcpuFd) -> R + Send + 'static) -> Option<R> {
        self.queue_paused(task)?.recv().ok()
    }

    /// Queues `task` for the paused vCPU thread; its result arrives on the receiver. `None` if
    /// the vCPU is not paused or has ended.
    fn queue_paused<R: Send + 'static>(
        &self,
        task: impl FnOnce(&mut VcpuFd) -> R + Send + 'static,
    ) -> Option<std::sync::mpsc::Receiver<R>> {
        let (tx, rx) = std::sync::mpsc::channel();
        {
            let mut s = self.lock();
            if !s.paused || s.ended {
                return None;
            }
            s.tasks.push(Box::new(move |v| {
                let _ = tx.send(task(v));
            }));
        }
        self.changed.notify_all();
        Some(rx)
    }
}

/// Starts the thread of vCPU `index`, which halts on `waiter`; the VMM keeps the handle.
pub fn spawn(
    index: usize,
    mut vcpu: VcpuFd,
    devices: SharedDevices,
    waiter: Waiter,
) -> std::io::Result<(Arc<VcpuHandle>, JoinHandle<VcpuEnd>)> {
    let handle = Arc::new(VcpuHandle {
        index,
        state: Mutex::new(State { want: Want::Run, paused: false, ended: false, tasks: vec![] }),
        changed: Condvar::new(),
        kicker: waiter.kicker()?,
        thread: Mutex::new(None),
    });
    let h = handle.clone();
    let thread = std::thread::Builder::new().name(format!("vcpu{index}")).spawn(move || {
        // SAFETY: pthread_self has no preconditions.
        *h.thread.lock().unwrap_or_else(|p| p.into_inner()) = Some(unsafe { libc::pthread_self() });
        KVM_RUN.with(|p| p.set(vcpu.get_kvm_run() as *mut kvm_run));
        let end = run_loop(&h, &mut vcpu, &devices, &waiter);
        KVM_RUN.with(|p| p.set(std::ptr::null_mut()));
        *h.thread.lock().unwrap_or_else(|p| p.into_inner()) = None;
        let mut s = h.lock();
        s.ended = true;
        drop(s);
        h.changed.notify_all();
        end
    })?;
    Ok((handle, thread))
}

/// Obeys pause requests (running queued tasks meanwhile); returns false if asked to quit.
fn obey(h: &VcpuHandle, vcpu: &mut VcpuFd) -> bool {
    let mut s = h.lock();
    loop {
        let tasks = std::mem::take(&mut s.tasks);
        if !tasks.is_empty() {
            drop(s);
            for t in tasks {
                t(vcpu);
            }
            s = h.lock();
            continue;
        }
        match s.want {
            Want::Run => {
                if s.paused {
                    s.paused = false;
                    h.changed.notify_all();
                }
                return true;
            }
            Want::Quit => return false,
            Want::Pause => {
                if !s.paused {
                    // Finish the exit the VMM already served before saying "paused", so a
                    // paused vCPU never has an instruction half done: nothing it does later
                    // writes guest memory or devices, and its saved state is complete
                    // (vcpu_state::complete_pending_io). Here, on its own thread, it costs the
                    // pause no extra round trip.
                    drop(s);
                    vcpu_state::complete_pending_io(vcpu);
                    s = h.lock();
                    if s.want != Want::Pause {
                        continue;
                    }
                    s.paused = true;
                    h.changed.notify_all();
                }
                s = h.changed.wait(s).unwrap_or_else(|p| p.into_inner());
            }
        }
    }
}

fn lock_devices(devices: &SharedDevices) -> MutexGuard<'_, Devices> {
    devices.lock().unwrap_or_else(|p| p.into_inner())
}

fn run_loop(h: &VcpuHandle, vcpu: &mut VcpuFd, devices: &SharedDevices, waiter: &Waiter) -> VcpuEnd {
    let index = h.index;
    loop {
        if !obey(h, vcpu) {
            return VcpuEnd::Quit;
        }
        let action = match vcpu.run() {
            Ok(VcpuExit::IoOut(port, data)) => lock_devices(devices).pio_out(port, data),
            Ok(VcpuExit::IoIn(port, data)) => {
                lock_devices(devices).pio_in(port, data);
                PioAction::Continue
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                lock_devices(devices).mmio_read(addr, data);
                PioAction::Continue
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                lock_devices(devices).mmio_write(addr, data);
                PioAction::Continue
            }
            // Only CPL0 code can execute HLT; treat it as a halt without deadline.
            Ok(VcpuExit::Hlt) => PioAction::Halt(colo_vmm_abi::HALT_FOREVER),
            Ok(VcpuExit::Shutdown) => {
                return VcpuEnd::Crashed(describe_crash(index, "triple fault (KVM_EXIT_SHUTDOWN)", vcpu))
            }
            Ok(VcpuExit::InternalError) => return VcpuEnd::Crashed(describe_crash(index, "KVM internal error", vcpu)),
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                return VcpuEnd::Crashed(format!(
                    "KVM could not enter the guest on vCPU {index}: reason {reason:#x} on cpu {cpu}"
                ))
            }
            Ok(other) => return VcpuEnd::Crashed(describe_crash(index, &format!("unexpected exit {other:?}"), vcpu)),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                vcpu.set_kvm_immediate_exit(0);
                PioAction::Continue
            }
            Err(e) => return VcpuEnd::Crashed(format!("KVM_RUN failed on vCPU {index}: {e}")),
        };
        match action {
            PioAction::Continue => {}
            PioAction::Exit(code) => return VcpuEnd::GuestExit(code),
            PioAction::Halt(us) => match waiter.wait(us) {
                Ok(Wake::Device | Wake::Timeout | Wake::Kick) => {}
                Err(e) => return VcpuEnd::Crashed(format!("halt wait failed: {e}")),
            },
        }
    }
}

fn describe_crash(index: usize, what: &str, vcpu: &VcpuFd) -> String {
    match (vcpu.get_regs(), vcpu.get_sregs()) {
        (Ok(r), Ok(s)) => format!(
            "guest crashed on vCPU {index}: {what}: rip={:#x} rsp={:#x} rflags={:#x} cr2={:#x} cs={:#x} rax={:#x} rdi={:#x}",
            r.rip, r.rsp, r.rflags, s.cr2, s.cs.selector, r.rax, r.rdi
        ),
        _ => format!("guest crashed on vCPU {index}: {what}"),
    }
}

/// Every vCPU of a VM, driven together.
pub struct Vcpus {
    handles: Vec<Arc<VcpuHandle>>,
}

impl Vcpus {
    /// The vCPUs whose threads [`spawn`] started, by index.
    pub fn new(handles: Vec<Arc<VcpuHandle>>) -> Vcpus {
        Vcpus { handles }
    }

    /// How many.
    pub fn len(&self) -> usize {
        self.handles.len()
    }

    /// Whether there are none (never, for a built VM).
    pub fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }

    /// Each vCPU's handle, by index.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<VcpuHandle>> {
        self.handles.iter()
    }

    /// Pauses every vCPU and waits until all are out of the guest: asks them all first, so they
    /// stop in parallel. False if a vCPU thread has ended (the guest is gone); the others are
    /// paused then.
    pub fn pause(&self) -> bool {
        for h in &self.handles {
            h.request(Want::Pause);
        }
        // Wait for every one, even after a failure: none may be left half-asked.
        let paused: Vec<bool> = self.handles.iter().map(|h| h.wait_paused()).collect();
        paused.into_iter().all(|ok| ok)
    }

    /// Lets every paused vCPU run again.
    pub fn resume(&self) {
        for h in &self.handles {
            h.resume();
        }
    }

    /// Asks every vCPU thread to end.
    pub fn quit(&self) {
        for h in &self.handles {
            h.quit();
        }
    }

    /// Whether every vCPU is paused now.
    pub fn is_paused(&self) -> bool {
        self.handles.iter().all(|h| h.is_paused())
    }

    /// Runs `task` on every paused vCPU thread — on all of them at once — and returns the
    /// results by index; `None` if a vCPU is not paused or has ended.
    pub fn run_paused_each<R: Send + 'static>(
        &self,
        task: impl Fn(usize, &mut VcpuFd) -> R + Send + Sync + 'static,
    ) -> Option<Vec<R>> {
        self.queue_paused_each(task)?.wait()
    }

    /// Hands `task` to every paused vCPU thread and returns at once: the threads work while
    /// the caller does something else, [`Queued::wait`] collects. `None` if a vCPU is not
    /// paused or has ended.
    pub fn queue_paused_each<R: Send + 'static>(
        &self,
        task: impl Fn(usize, &mut VcpuFd) -> R + Send + Sync + 'static,
    ) -> Option<Queued<R>> {
        let task = Arc::new(task);
        let mut results = Vec::with_capacity(self.handles.len());
        for h in &self.handles {
            let (t, i) = (task.clone(), h.index);
            results.push(h.queue_paused(move |v| t(i, v))?);
        }
        Some(Queued(results))
    }
}

/// Work [`Vcpus::queue_paused_each`] handed to the vCPU threads; dropping it discards the
/// results (the threads still finish the work).
pub struct Queued<R>(Vec<std::sync::mpsc::Receiver<R>>);

impl<R> Queued<R> {
    /// Each vCPU's result, by index; `None` if a vCPU thread ended before it finished.
    pub fn wait(self) -> Option<Vec<R>> {
        self.0.into_iter().map(|rx| rx.recv().ok()).collect()
    }
}
