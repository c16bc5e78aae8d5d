//! Helpers for the end-to-end tests: the workspace's binaries, temporary directories, child
//! processes that are killed when a test ends (even by panic), network namespaces, and skips
//! that say why.

pub mod checkpoint_steps;
pub mod colo_hosts;
pub mod colo_topology;
pub mod counter_load;
pub mod hosts;
pub mod interrupt;
pub mod kv;
pub mod linux_guest;
pub mod netns;
pub mod pcapread;
pub mod port_capture;
pub mod qemu;
pub mod qemu_vhost;
pub mod qframe;
pub mod scrape;
pub mod soak;
pub mod status_watch;
pub mod timeline;
pub mod topology;
pub mod vm_topology;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub use colo_test_support::{can_run, expect_event, skip, TempDir};

/// Path of a binary of this workspace: next to the running executable (a binary in
/// `target/<profile>/`) or one directory up (a test in `target/<profile>/deps/`). `cargo test`
/// alone does not build the binaries of members without integration tests, so
/// `scripts/test.sh` runs `cargo build --workspace --bins` first.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("executable path");
    let here = exe.parent().expect("executable directory");
    let candidates = [here.join(name), here.parent().map(|p| p.join(name)).unwrap_or_default()];
    candidates.iter().find(|p| p.is_file()).cloned().unwrap_or_else(|| {
        panic!(
            "{name} not found next to {}: build the workspace's binaries first \
             (`cargo build --workspace --bins`, or run `scripts/test.sh`)",
            exe.display()
        )
    })
}

/// A unique name for this test run: `prefix` + pid + counter (fits interface names when the
/// prefix is short).
pub fn unique(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!("{prefix}{}{}", std::process::id() % 100_000, N.fetch_add(1, Ordering::SeqCst))
}

/// A child process killed (SIGKILL) and reaped on drop, with its stderr kept for diagnostics.
pub struct Proc {
    child: Option<Child>,
    name: String,
    stderr_path: PathBuf,
}

impl Proc {
    /// Starts `cmd` with stderr captured to a file next to the test's temp files.
    pub fn spawn(name: &str, mut cmd: Command) -> Proc {
        let stderr_path = std::env::temp_dir().join(unique(&format!("colo-{name}-stderr-")));
        let f = std::fs::File::create(&stderr_path).expect("stderr file");
        cmd.stderr(f).stdin(Stdio::null());
        let child = cmd.spawn().unwrap_or_else(|e| panic!("starting {name}: {e}"));
        Proc { child: Some(child), name: name.to_string(), stderr_path }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// What the process wrote to stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Whether it is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// Sends a signal.
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.pid() as i32, sig) };
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut()?;
        loop {
            if let Ok(Some(st)) = child.try_wait() {
                return Some(st);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Asserts the process is still running, showing its stderr if not.
    pub fn assert_running(&mut self) {
        assert!(self.is_running(), "{} exited unexpectedly; stderr:\n{}", self.name, self.stderr());
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!("--- stderr of {} ---\n{}", self.name, self.stderr());
        }
        let _ = std::fs::remove_file(&self.stderr_path);
    }
}

/// Waits until `path` exists.
pub fn wait_for_path(path: &Path, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if path.exists() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    false
}

/// Runs a command to completion; returns (status, stdout+stderr).
pub fn run(cmd: &mut Command) -> (ExitStatus, String) {
    let out = cmd.output().unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status, text)
}

/// Writes a demo's outputs, each to its path: (path, what it is, its contents or why there
/// are none). Says on stderr, as `program: ...`, what could not be written; returns whether
/// everything was.
pub fn write_outputs<'a>(
    program: &str,
    outputs: impl IntoIterator<Item = (&'a Path, &'a str, anyhow::Result<String>)>,
) -> bool {
    let mut all = true;
    for (path, what, contents) in outputs {
        let written = contents.and_then(|c| std::fs::write(path, c).map_err(anyhow::Error::from));
        if let Err(e) = written {
            eprintln!("{program}: the {what} ({}): {e:#}", path.display());
            all = false;
        }
    }
    all
}

/// Whether we are root (namespaces, taps, AF_PACKET).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Whether a program is on PATH (or is an existing path).
pub fn have(program: &str) -> bool {
    if program.contains('/') {
        return Path::new(program).exists();
    }
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|d| d.join(program).is_file()))
        .unwrap_or(false)
}

/// A memory figure of process `pid` from /proc/PID/status, in KiB: `VmRSS` (resident now) or
/// `VmHWM` (the most ever resident). Tests bound memory with it, never time.
pub fn memory_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("process status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().strip_suffix("kB")?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// CPU time used so far by the live threads of process `pid` (each thread's
/// /proc/PID/task/TID/schedstat: nanosecond resolution, where /proc/PID/stat counts 10 ms
/// ticks; threads that ended are not counted, so measure processes that keep theirs).
pub fn process_cpu(pid: u32) -> Duration {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return Duration::ZERO };
    let ns: u64 = tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    Duration::from_nanos(ns)
}

/// Reads exactly `n` bytes or fails after the stream's timeout.
pub fn read_exact(r: &mut impl Read, n: usize) -> std::io::Result<Vec<u8>> {
    let mut buf = vec![0; n];
    r.read_exact(&mut buf)?;
    Ok(buf)
}
