//! The vCPU thread: runs KVM_RUN, dispatches port and MMIO exits to the devices, sleeps in the
//! paravirtual halt, and obeys the VMM's requests (pause, resume, quit, and work that must run on
//! the vCPU thread while it is paused, such as saving its state).
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

use crate::devices::pvhalt::Wake;
use crate::devices::{Devices, PioAction};

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
pub type Task = Box<dyn FnOnce(&mut VcpuFd, &mut Devices) + Send>;

struct State {
    want: Want,
    paused: bool,
    ended: bool,
    tasks: Vec<Task>,
}

/// The VMM's handle on a vCPU thread.
pub struct VcpuHandle {
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
        let mut s = self.lock();
        while !s.paused && !s.ended {
            s = self.changed.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        !s.ended
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
    pub fn run_paused<R: Send + 'static>(
        &self,
        task: impl FnOnce(&mut VcpuFd, &mut Devices) -> R + Send + 'static,
    ) -> Option<R> {
        let (tx, rx) = std::sync::mpsc::channel();
        {
            let mut s = self.lock();
            if !s.paused || s.ended {
                return None;
            }
            s.tasks.push(Box::new(move |v, d| {
                let _ = tx.send(task(v, d));
            }));
        }
        self.changed.notify_all();
        rx.recv().ok()
    }
}

/// Starts the vCPU thread. `devices` move to it; the VMM keeps the handle.
pub fn spawn(mut vcpu: VcpuFd, mut devices: Devices) -> std::io::Result<(Arc<VcpuHandle>, JoinHandle<VcpuEnd>)> {
    let handle = Arc::new(VcpuHandle {
        state: Mutex::new(State { want: Want::Run, paused: false, ended: false, tasks: vec![] }),
        changed: Condvar::new(),
        kicker: devices.waiter.kicker()?,
        thread: Mutex::new(None),
    });
    let h = handle.clone();
    let thread = std::thread::Builder::new().name("vcpu0".into()).spawn(move || {
        *h.thread.lock().unwrap_or_else(|p| p.into_inner()) = Some(unsafe { libc::pthread_self() });
        KVM_RUN.with(|p| p.set(vcpu.get_kvm_run() as *mut kvm_run));
        let end = run_loop(&h, &mut vcpu, &mut devices);
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
fn obey(h: &VcpuHandle, vcpu: &mut VcpuFd, devices: &mut Devices) -> bool {
    let mut s = h.lock();
    loop {
        let tasks = std::mem::take(&mut s.tasks);
        if !tasks.is_empty() {
            drop(s);
            for t in tasks {
                t(vcpu, devices);
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
                    s.paused = true;
                    h.changed.notify_all();
                }
                s = h.changed.wait(s).unwrap_or_else(|p| p.into_inner());
            }
        }
    }
}

fn run_loop(h: &VcpuHandle, vcpu: &mut VcpuFd, devices: &mut Devices) -> VcpuEnd {
    loop {
        if !obey(h, vcpu, devices) {
            return VcpuEnd::Quit;
        }
        let action = match vcpu.run() {
            Ok(VcpuExit::IoOut(port, data)) => devices.pio_out(port, data),
            Ok(VcpuExit::IoIn(port, data)) => {
                devices.pio_in(port, data);
                PioAction::Continue
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                devices.mmio_read(addr, data);
                PioAction::Continue
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                devices.mmio_write(addr, data);
                PioAction::Continue
            }
            // Only CPL0 code can execute HLT; treat it as a halt without deadline.
            Ok(VcpuExit::Hlt) => PioAction::Halt(colo_vmm_abi::HALT_FOREVER),
            Ok(VcpuExit::Shutdown) => {
                return VcpuEnd::Crashed(describe_crash("triple fault (KVM_EXIT_SHUTDOWN)", vcpu))
            }
            Ok(VcpuExit::InternalError) => return VcpuEnd::Crashed(describe_crash("KVM internal error", vcpu)),
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                return VcpuEnd::Crashed(format!("KVM could not enter the guest: reason {reason:#x} on cpu {cpu}"))
            }
            Ok(other) => return VcpuEnd::Crashed(describe_crash(&format!("unexpected exit {other:?}"), vcpu)),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                vcpu.set_kvm_immediate_exit(0);
                PioAction::Continue
            }
            Err(e) => return VcpuEnd::Crashed(format!("KVM_RUN failed: {e}")),
        };
        match action {
            PioAction::Continue => {}
            PioAction::Exit(code) => return VcpuEnd::GuestExit(code),
            PioAction::Halt(us) => match devices.waiter.wait(us) {
                Ok(Wake::Device | Wake::Timeout | Wake::Kick) => {}
                Err(e) => return VcpuEnd::Crashed(format!("halt wait failed: {e}")),
            },
        }
    }
}

fn describe_crash(what: &str, vcpu: &VcpuFd) -> String {
    match (vcpu.get_regs(), vcpu.get_sregs()) {
        (Ok(r), Ok(s)) => format!(
            "guest crashed: {what}: rip={:#x} rsp={:#x} rflags={:#x} cr2={:#x} cs={:#x} rax={:#x} rdi={:#x}",
            r.rip, r.rsp, r.rflags, s.cr2, s.cs.selector, r.rax, r.rdi
        ),
        _ => format!("guest crashed: {what}"),
    }
}
