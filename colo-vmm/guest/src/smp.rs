//! The other vCPUs (APs): the boot vCPU carves a stack for each and publishes it in
//! [`AP_STACKS`], where each AP's entry code waits for it (`entry.rs`); the AP then waits until
//! the boot vCPU has set up everything shared and joins the scheduler (`sched.rs`).

use core::sync::atomic::{AtomicPtr, AtomicU64, Ordering};

use colo_vmm_abi::MAX_CPUS;

use crate::halt;
use crate::region::Region;
use crate::sched::{self, System};

/// Stack of each AP.
pub const AP_STACK_BYTES: u64 = 256 << 10;

/// Each vCPU's stack top (0: not yet given), read by the entry code of APs.
pub static AP_STACKS: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];

/// What the APs run: set once the boot vCPU has built it.
static SYSTEM: AtomicPtr<System> = AtomicPtr::new(core::ptr::null_mut());

/// Carves a stack for each AP (before the heap takes the rest of the free RAM); `None` if they
/// do not fit.
pub fn carve_stacks(region: &mut Region, cpus: usize) -> Option<[u64; MAX_CPUS]> {
    let mut tops = [0u64; MAX_CPUS];
    for top in tops.iter_mut().take(cpus).skip(1) {
        *top = region.take(AP_STACK_BYTES)? as u64 + AP_STACK_BYTES;
    }
    Some(tops)
}

/// Lets the APs go: they take their stacks and run `system`'s scheduler.
pub fn start_aps(system: &'static System, stacks: &[u64; MAX_CPUS]) {
    SYSTEM.store(system as *const System as *mut System, Ordering::Release);
    for (slot, &top) in AP_STACKS.iter().zip(stacks).skip(1) {
        slot.store(top, Ordering::Release);
    }
}

/// Where an AP arrives on its own stack (from `entry.rs`), with its index.
///
/// # Safety
/// Called once per AP by the entry code, on the stack published for it.
pub unsafe extern "C" fn ap_main(cpu: u64) -> ! {
    // The system was published before the stack, so it is there.
    let system = SYSTEM.load(Ordering::Acquire);
    if system.is_null() || cpu as usize >= MAX_CPUS {
        halt::fatal(format_args!("vCPU {cpu} started without a system to run"));
    }
    // SAFETY: a leaked, never freed System (start_aps).
    sched::cpu_loop(unsafe { &*system }, cpu as usize)
}
