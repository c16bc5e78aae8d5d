//! Time since boot, from the TSC and the frequency the VMM measured (`BootInfo::tsc_khz`).
//!
//! RDTSC runs natively at CPL3, so reading the clock costs no exit. The clock never goes
//! backwards, even if the TSC does (a VM restored on another host): smoltcp's timers assume
//! it.

use core::arch::asm;
use core::sync::atomic::{AtomicU64, Ordering};

use smoltcp::time::{Duration, Instant};

static TSC_KHZ: AtomicU64 = AtomicU64::new(1);
static BOOT_TSC: AtomicU64 = AtomicU64::new(0);
static LAST_MICROS: AtomicU64 = AtomicU64::new(0);

/// Reads the time-stamp counter.
pub fn rdtsc() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: RDTSC only reads the counter (CR4.TSD is clear: allowed at CPL3).
    unsafe { asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags)) };
    (u64::from(hi) << 32) | u64::from(lo)
}

/// Starts the clock at zero now. `tsc_khz` must not be zero.
pub fn init(tsc_khz: u64) {
    TSC_KHZ.store(tsc_khz.max(1), Ordering::Relaxed);
    BOOT_TSC.store(rdtsc(), Ordering::Relaxed);
}

/// The TSC frequency in kHz.
pub fn tsc_khz() -> u64 {
    TSC_KHZ.load(Ordering::Relaxed)
}

/// Microseconds in `ticks` TSC ticks, without overflowing for any u64.
fn ticks_to_micros(ticks: u64) -> u64 {
    let khz = tsc_khz();
    ticks / khz * 1000 + ticks % khz * 1000 / khz
}

/// TSC ticks in `duration`, saturating.
pub fn ticks_in(duration: Duration) -> u64 {
    let micros = duration.total_micros();
    (micros / 1000).saturating_mul(tsc_khz()).saturating_add(micros % 1000 * tsc_khz() / 1000)
}

/// Time since boot, never less than a value returned before (on any vCPU: their TSCs may
/// differ slightly, after a restore on another host more).
pub fn now() -> Instant {
    let ticks = rdtsc().saturating_sub(BOOT_TSC.load(Ordering::Relaxed));
    let micros = ticks_to_micros(ticks);
    let micros = LAST_MICROS.fetch_max(micros, Ordering::SeqCst).max(micros);
    // i64 microseconds last 292 000 years.
    Instant::from_micros(micros as i64)
}
