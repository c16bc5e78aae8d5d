//! The console: COM1, a 16550 UART, driven by polling.
//!
//! [`status!`] prints one `colo-guest: ...` line; the tests read these lines, so their text is
//! part of the guest's interface. Lines end in `\n` only.
//!
//! Each port access is a VM exit, so the transmitter's status is read once per 16 bytes: when
//! it says "empty", the 16-byte FIFO has room for that many.

use core::fmt::{self, Write};
use core::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use colo_vmm_abi::port::SERIAL;

use crate::port::{inb, outb};

const THR: u16 = SERIAL; // transmit holding register
const IER: u16 = SERIAL + 1; // interrupt enable
const FCR: u16 = SERIAL + 2; // FIFO control
const LCR: u16 = SERIAL + 3; // line control
const MCR: u16 = SERIAL + 4; // modem control
const LSR: u16 = SERIAL + 5; // line status
const LSR_THR_EMPTY: u8 = 0x20;
const FIFO_SIZE: usize = 16;
/// Status reads before writing anyway: a UART that never reports "empty" must not hang us.
const MAX_POLLS: u32 = 100_000;

/// Bytes the transmit FIFO can still take without checking its status.
static FIFO_ROOM: AtomicUsize = AtomicUsize::new(0);

/// Sets the UART up for polled output: no interrupts, 8N1, FIFOs on.
pub fn init() {
    outb(IER, 0);
    outb(LCR, 0x03);
    outb(FCR, 0x07);
    outb(MCR, 0x03);
}

fn put(byte: u8) {
    if FIFO_ROOM.load(Ordering::Relaxed) == 0 {
        for _ in 0..MAX_POLLS {
            if inb(LSR) & LSR_THR_EMPTY != 0 {
                break;
            }
            core::hint::spin_loop();
        }
        FIFO_ROOM.store(FIFO_SIZE, Ordering::Relaxed);
    }
    outb(THR, byte);
    FIFO_ROOM.fetch_sub(1, Ordering::Relaxed);
}

/// The console as a `fmt::Write`.
pub struct Console;

impl Write for Console {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        s.bytes().for_each(put);
        Ok(())
    }
}

/// Held while a vCPU prints a line, so lines of several vCPUs do not interleave.
static LINE: AtomicBool = AtomicBool::new(false);
/// Looks at a busy console before printing anyway: a vCPU that stopped while printing (a
/// fatal error elsewhere) must not silence the others.
const MAX_LINE_WAIT: u32 = 1_000_000;

/// Prints `colo-guest: <args>\n`. Use [`status!`].
pub fn print_status(args: fmt::Arguments<'_>) {
    let mut spins = 0;
    while LINE.compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed).is_err() && spins < MAX_LINE_WAIT {
        core::hint::spin_loop();
        spins += 1;
    }
    // Console::write_str never fails.
    let _ = writeln!(Console, "colo-guest: {args}");
    LINE.store(false, Ordering::Release);
}

/// Prints one `colo-guest: ...` line to the console, formatted like `format!`.
macro_rules! status {
    ($($arg:tt)*) => {
        $crate::serial::print_status(format_args!($($arg)*))
    };
}
