//! Network namespaces and veth pairs for tests. Every interface a test makes lives inside a
//! namespace the test made, so deleting the namespaces (on drop, also after a panic) removes
//! everything; processes started inside must be dropped first (declare them before the
//! namespaces, or drop them explicitly).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::process::Command;

use std::sync::atomic::{AtomicU32, Ordering};

use crate::{run, unique, Proc};

/// A network namespace, deleted on drop.
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates a namespace named `colo-<tag>-<pid>-<n>` with loopback up and IPv6 off (no
    /// autoconfiguration traffic to disturb captures). Namespaces of that form left by a
    /// process that no longer runs (killed, so its drops never ran) are deleted first.
    pub fn new(tag: &str) -> Netns {
        static N: AtomicU32 = AtomicU32::new(0);
        sweep_orphans();
        let name = format!("colo-{tag}-{}-{}", std::process::id(), N.fetch_add(1, Ordering::SeqCst));
        let (st, out) = run(Command::new("ip").args(["netns", "add", &name]));
        assert!(st.success(), "ip netns add {name}: {out}");
        let ns = Netns { name };
        ns.exec(&["ip", "link", "set", "lo", "up"]);
        ns.exec(&["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"]);
        ns.exec(&["sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1"]);
        ns
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs a command inside and asserts it succeeds; returns its output.
    pub fn exec(&self, args: &[&str]) -> String {
        let (st, out) = run(Command::new("ip").args(["netns", "exec", &self.name]).args(args));
        assert!(st.success(), "in {}: {args:?}: {out}", self.name);
        out
    }

    /// Runs a command inside; returns (success, output).
    pub fn try_exec(&self, args: &[&str]) -> (bool, String) {
        let (st, out) = run(Command::new("ip").args(["netns", "exec", &self.name]).args(args));
        (st.success(), out)
    }

    /// A command that runs `program` inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// Starts a long-running process inside.
    pub fn spawn(&self, name: &str, program: &str, args: &[&str]) -> Proc {
        let mut c = self.command(program);
        c.args(args);
        Proc::spawn(name, c)
    }

    /// Runs `f` on a thread that has entered this namespace: sockets it creates belong to the
    /// namespace (and can be used from any thread afterwards).
    pub fn enter<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let file = File::open(format!("/var/run/netns/{}", self.name)).expect("namespace file");
        std::thread::spawn(move || {
            // SAFETY: setns on a valid namespace fd affects only this thread.
            let r = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .expect("thread inside the namespace panicked")
    }
}

/// Deletes the namespaces [`Netns::new`] named for processes that have ended.
fn sweep_orphans() {
    let Ok(entries) = std::fs::read_dir("/run/netns") else { return };
    for name in entries.flatten().filter_map(|e| e.file_name().into_string().ok()) {
        let mut parts = name.rsplitn(3, '-');
        let (Some(_n), Some(pid), Some(prefix)) = (parts.next(), parts.next(), parts.next()) else { continue };
        let Ok(pid) = pid.parse::<u32>() else { continue };
        if prefix.starts_with("colo-") && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = run(Command::new("ip").args(["netns", "del", &name]));
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = run(Command::new("ip").args(["netns", "del", &self.name]));
    }
}

/// Creates a veth pair `a` (in `ns_a`) — `b` (in `ns_b`), both up, with checksum and
/// segmentation offloads off so every frame on the wire is complete and comparable.
pub fn veth(a: &str, ns_a: &Netns, b: &str, ns_b: &Netns) {
    let tmp_a = unique("va");
    let tmp_b = unique("vb");
    let (st, out) = run(Command::new("ip").args(["link", "add", &tmp_a, "type", "veth", "peer", "name", &tmp_b]));
    assert!(st.success(), "ip link add veth: {out}");
    for (tmp, name, ns) in [(&tmp_a, a, ns_a), (&tmp_b, b, ns_b)] {
        let (st, out) = run(Command::new("ip").args(["link", "set", tmp, "netns", ns.name(), "name", name]));
        assert!(st.success(), "moving {tmp} to {}: {out}", ns.name());
        ns.exec(&["ip", "link", "set", "dev", name, "up"]);
        let _ = ns.try_exec(&["ethtool", "-K", name, "tx", "off", "tso", "off", "gso", "off", "gro", "off"]);
    }
}

/// Whether the tools a namespace test needs are here, else why not.
pub fn prerequisites(tools: &[&str]) -> Result<(), String> {
    if !crate::is_root() {
        return Err("needs root (network namespaces)".into());
    }
    for t in tools {
        if !crate::have(t) {
            return Err(format!("needs {t} (apt-get install it)"));
        }
    }
    Ok(())
}
