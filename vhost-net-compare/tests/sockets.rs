//! Every socket the backend listens on is private whatever the umask: the VM sockets and the
//! control socket are created with mode 0600 before anyone can connect, the daemons' sockets
//! sit in 0700 directories. This binary holds this one test because it sets the process's
//! umask to 000, which the backend inherits.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).permissions().mode() & 0o777
}

fn relay_dir(socket: &Path) -> PathBuf {
    socket.with_file_name(format!(".{}.relay", socket.file_name().unwrap().to_string_lossy()))
}

#[test]
fn every_socket_is_private_even_under_umask_000() {
    if !prerequisites("every_socket_is_private_even_under_umask_000") {
        return;
    }
    // SAFETY: umask has no preconditions; no other test runs in this process.
    unsafe { libc::umask(0) };
    let dir = TempDir::new("vnc");
    // The temporary directory is private (0700); open it to everyone, so that only the
    // backend's own modes keep others out.
    std::fs::set_permissions(dir.dir(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let tap = TestTap::new();
    let backend = Backend::spawn(
        &dir,
        BackendOpts { one_vm: false, tap: &tap.name, secondary: true, control: true, extra: vec![] },
    );
    let sockets = [backend.primary.clone(), backend.secondary.clone().unwrap(), backend.control.clone().unwrap()];
    for s in &sockets {
        // Under umask 000 a plain bind makes 0777: anyone could drive the VM's network.
        assert_eq!(mode(s), 0o600, "{}", s.display());
    }
    for s in &sockets[..2] {
        assert_eq!(mode(&relay_dir(s)), 0o700, "{}", relay_dir(s).display());
    }
    assert_eq!(mode(dir.dir()) & 0o005, 0o005, "others may reach the sockets' directory");

    // Another user is refused by the socket's mode (socat is one of scripts/setup.sh's tools).
    if Command::new("socat").arg("-V").output().is_ok() {
        for s in &sockets {
            let out = {
                let _guard = fork_guard();
                Command::new("socat")
                    .args(["-u", "OPEN:/dev/null"])
                    .arg(format!("UNIX-CONNECT:{}", s.display()))
                    .uid(65534)
                    .gid(65534)
                    .output()
                    .unwrap()
            };
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success() && err.contains("Permission denied"), "{}: {err}", s.display());
        }
    } else {
        eprintln!("socat not found: connecting as another user not tried");
    }
    // The owner is served.
    let mut ctl = backend.control();
    assert!(ctl.stats().is_ok());
    let mut vm = Vm::connect(&backend.primary);
    vm.setup();
    assert!(backend.alive());
}
