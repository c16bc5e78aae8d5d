//! Every error path of `colo-vmm run` gives a clear message and a non-zero exit code:
//! no /dev/kvm, an unreadable or non-ELF kernel, too little memory, a missing backend socket,
//! bad options; and `colo-vmm ctl` without a VMM.

use std::process::Command;

use colo_tests::{bin, have, is_root, run, skip, TempDir};

fn colo_vmm() -> Command {
    Command::new(bin("colo-vmm"))
}

fn expect_failure(cmd: &mut Command, needle: &str) {
    let (st, out) = run(cmd);
    assert!(!st.success(), "{cmd:?} should fail; output:\n{out}");
    assert_eq!(st.code(), Some(1), "{cmd:?}: exit code 1 for errors; output:\n{out}");
    assert!(out.contains(needle), "{cmd:?}: expected '{needle}' in:\n{out}");
}

#[test]
fn bad_kernels_memory_and_backends_are_refused_clearly() {
    if !std::path::Path::new("/dev/kvm").exists() {
        return skip("bad_kernels_memory_and_backends_are_refused_clearly", "no /dev/kvm");
    }
    let dir = TempDir::new("vmmerr");
    let missing = dir.path("missing.elf");
    expect_failure(colo_vmm().args(["run", "--kernel"]).arg(&missing), "cannot read kernel");
    let text = dir.path("not-elf");
    std::fs::write(&text, b"#!/bin/sh\necho not a kernel\n").unwrap();
    expect_failure(colo_vmm().args(["run", "--kernel"]).arg(&text), "not a loadable x86-64 ELF");
    expect_failure(colo_vmm().args(["run", "--mem", "4"]), "guest memory must be between");
    expect_failure(colo_vmm().args(["run", "--mem", "8192"]), "guest memory must be between");
    let sock = dir.path("no-backend.sock");
    expect_failure(
        colo_vmm().args(["run", "--net"]).arg(format!("vhost-user={}", sock.display())),
        "cannot connect to the vhost-user backend",
    );
    // A socket that accepts and hangs up at once: the negotiation fails with a clear step.
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let t = std::thread::spawn(move || {
        if let Ok((s, _)) = listener.accept() {
            drop(s);
        }
    });
    expect_failure(
        colo_vmm().args(["run", "--net"]).arg(format!("vhost-user={}", sock.display())),
        "vhost-user negotiation",
    );
    t.join().unwrap();
}

#[test]
fn missing_kvm_is_a_clear_error() {
    if !is_root() || !have("unshare") || !std::path::Path::new("/dev/kvm").exists() {
        return skip("missing_kvm_is_a_clear_error", "needs root and unshare(1) to hide /dev/kvm");
    }
    // Hide /dev/kvm in a private mount namespace: the VMM sees a /dev/kvm that is not KVM.
    let script = format!("mount --bind /dev/null /dev/kvm && exec {} run", bin("colo-vmm").display());
    expect_failure(
        Command::new("unshare").args(["--mount", "--propagation", "private", "sh", "-c", &script]),
        "/dev/kvm",
    );
}

#[test]
fn bad_options_fail_with_usage() {
    for (args, needle) in [
        (vec!["run", "--net", "tap=x"], "expected vhost-user=PATH"),
        (vec!["run", "--net", "vhost-user=/x,mac=zz"], "not a MAC address"),
        (vec!["run", "--serial", "tty"], "expected stdio, file:PATH or none"),
        (vec!["run", "--mem", "lots"], "--mem"),
        (vec!["frobnicate"], "unrecognized subcommand"),
    ] {
        let (st, out) = run(colo_vmm().args(&args));
        assert!(!st.success(), "{args:?}");
        assert!(out.contains(needle), "{args:?}: expected '{needle}' in:\n{out}");
    }
    let (st, out) = run(colo_vmm().args(["run", "--help"]));
    assert!(st.success());
    for opt in ["--kernel", "--cmdline", "--mem", "--net", "--serial", "--api"] {
        assert!(out.contains(opt), "--help mentions {opt}");
    }
}

#[test]
fn ctl_without_a_vmm_fails_clearly() {
    let dir = TempDir::new("ctl");
    expect_failure(colo_vmm().args(["ctl", "--api"]).arg(dir.path("none.sock")).arg("query-status"), "cannot connect");
    expect_failure(colo_vmm().args(["ctl", "--api", "/x", "stop", "oops"]), "is not key=value");
}
