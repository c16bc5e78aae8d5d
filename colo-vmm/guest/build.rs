//! Links the guest as a freestanding static ELF at the address the VMM loads images.
//!
//! The guest builds for the host target (x86_64-unknown-linux-gnu, the only one installed):
//! no C runtime, no libc, no dynamic linker, not position-independent, laid out by
//! `guest.ld`. The arguments go to the binary only, so `cargo test` still links the library's
//! tests as ordinary host programs.

use std::env;
use std::path::PathBuf;

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let script = manifest_dir.join("guest.ld");
    println!("cargo:rerun-if-changed=guest.ld");
    println!("cargo:rerun-if-changed=build.rs");
    for arg in [
        // No crt0 (we have `_start`), no libc or libgcc, nothing dynamic.
        "-nostartfiles",
        "-nostdlib",
        "-static",
        // The target defaults to PIE; the VMM loads the image at its link address.
        "-no-pie",
        // No .note.gnu.build-id: nothing to load that is not code or data.
        "-Wl,--build-id=none",
        "-Wl,-z,noexecstack",
    ] {
        println!("cargo:rustc-link-arg-bins={arg}");
    }
    println!("cargo:rustc-link-arg-bins=-Wl,-T,{}", script.display());
}
