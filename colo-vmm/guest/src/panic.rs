//! What a `no_std` binary with `panic = "abort"` must provide: the panic handler, and the two
//! unwinding symbols the precompiled `alloc` (built with unwinding) still refers to.

use core::panic::PanicInfo;
use core::sync::atomic::{AtomicBool, Ordering};

use crate::halt;

static PANICKING: AtomicBool = AtomicBool::new(false);

/// Reports the panic on the console and exits with code 1.
#[panic_handler]
fn panic(info: &PanicInfo<'_>) -> ! {
    if PANICKING.swap(true, Ordering::Relaxed) {
        // Panicked while reporting a panic: just leave.
        halt::exit(1);
    }
    match info.location() {
        Some(at) => halt::fatal(format_args!("panic at {}:{}: {}", at.file(), at.line(), info.message())),
        None => halt::fatal(format_args!("panic: {}", info.message())),
    }
}

/// Never called: nothing unwinds with `panic = "abort"`.
#[no_mangle]
pub extern "C" fn rust_eh_personality() {}

/// Never called: nothing unwinds with `panic = "abort"`.
#[no_mangle]
pub extern "C" fn _Unwind_Resume() -> ! {
    halt::exit(1)
}
