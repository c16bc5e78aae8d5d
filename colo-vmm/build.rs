//! Builds the reference guest (colo-vmm/guest, its own no_std workspace) and embeds the ELF, so
//! `colo-vmm run` without `--kernel` needs no extra step from the user.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets it"));
    let guest = manifest.join("guest");
    let elf = out.join("reference-guest.elf");
    for p in ["guest/src", "guest/Cargo.toml", "guest/Cargo.lock", "guest/build.rs", "abi/src"] {
        println!("cargo:rerun-if-changed={p}");
    }
    println!("cargo:rerun-if-env-changed=COLO_VMM_SKIP_GUEST");
    let skip = std::env::var_os("COLO_VMM_SKIP_GUEST").is_some_and(|v| v == "1");
    if skip || !guest.join("Cargo.toml").exists() {
        println!("cargo:warning=building colo-vmm without the reference guest: it will need --kernel");
        std::fs::write(&elf, b"").expect("write placeholder");
        return;
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let target_dir = out.join("guest-target");
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "--release", "--manifest-path"])
        .arg(guest.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir);
    // The outer build's settings are for the host programs, not for the freestanding guest.
    for var in ["RUSTFLAGS", "CARGO_ENCODED_RUSTFLAGS", "CARGO_BUILD_TARGET", "CARGO_TARGET_DIR", "RUSTC_WRAPPER"] {
        cmd.env_remove(var);
    }
    let status = cmd.status().expect("running cargo for the reference guest");
    if !status.success() {
        panic!("building the reference guest (colo-vmm/guest) failed: {status}");
    }
    std::fs::copy(target_dir.join("release").join("colo-guest"), &elf).expect("copy the guest ELF");
}
