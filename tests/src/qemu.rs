//! QEMU's colo-compare and our `colo-proxy compare`, started the same way so that one piece of
//! driver code can feed both: four server-side Unix sockets (primary-in, secondary-in, outdev,
//! notify_dev) in a temporary directory, with a connected [`QPeer`] on each.
//!
//! QEMU runs standalone (`-M none`, no guest): its colo-compare object only needs chardevs and an
//! iothread. It is found at `$COLO_QEMU`, else [`DEFAULT_QEMU`] (installed by
//! `scripts/install-qemu.sh`); [`qemu_available`] says whether it is usable and, if not, why.

use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::qframe::QPeer;
use crate::{Proc, TempDir};

/// Where `scripts/install-qemu.sh` puts QEMU 7.2.
pub const DEFAULT_QEMU: &str = "/opt/colo-qemu/bin/qemu-system-x86_64";

/// How long starting a process and connecting its four sockets may take.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// QEMU's main loop attaches colo-compare's read handlers to a chardev some time after the
/// connection is accepted; frames sent before that are still read later, but the first frames of
/// the two inputs could then be taken in either order. Waiting this long after connecting makes
/// the first frames behave like all the others.
const QEMU_SETTLE: Duration = Duration::from_millis(100);

/// The QEMU binary to use: `$COLO_QEMU`, else [`DEFAULT_QEMU`].
pub fn qemu_path() -> PathBuf {
    std::env::var_os("COLO_QEMU").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(DEFAULT_QEMU))
}

/// The QEMU of [`qemu_path`] if it is usable for colo-compare, else the reason it is not (for
/// `colo_tests::skip`).
pub fn qemu_available() -> Result<PathBuf, String> {
    check_qemu(&qemu_path())
}

/// Whether `path` is a QEMU that runs and has the colo-compare object; `Err` says why not.
pub fn check_qemu(path: &Path) -> Result<PathBuf, String> {
    let hint = "install it with `sudo scripts/install-qemu.sh` or point $COLO_QEMU at a qemu-system-x86_64";
    if !path.exists() {
        return Err(format!("QEMU not found at {} ({hint})", path.display()));
    }
    let out = Command::new(path)
        .args(["-object", "help"])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {}: {e} ({hint})", path.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || !text.lines().any(|l| l.trim() == "colo-compare") {
        return Err(format!(
            "{} does not list the colo-compare object ({hint}); stderr: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(path.to_path_buf())
}

/// Our `colo-proxy` binary: `$COLO_PROXY`, else next to the running executable (a binary of
/// this workspace, e.g. `target/release/compare-bench`), else one directory up (a test in
/// `target/<profile>/deps/`).
pub fn colo_proxy_path() -> PathBuf {
    if let Some(p) = std::env::var_os("COLO_PROXY") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current executable path");
    let dir = exe.parent().expect("executable directory");
    let here = dir.join("colo-proxy");
    if here.exists() {
        return here;
    }
    dir.parent().map(|d| d.join("colo-proxy")).unwrap_or(here)
}

/// Which colo-compare implementation to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Compare {
    /// QEMU 7.2's colo-compare object (the behavioural reference).
    Qemu,
    /// `colo-proxy compare` (this project).
    Ours,
}

impl Compare {
    /// Both implementations, QEMU first.
    pub const BOTH: [Compare; 2] = [Compare::Qemu, Compare::Ours];

    /// A short name for reports and assertion messages.
    pub fn name(self) -> &'static str {
        match self {
            Compare::Qemu => "qemu",
            Compare::Ours => "ours",
        }
    }

    /// Starts this implementation with `cfg` and connects to its four sockets.
    ///
    /// The process is killed when the returned [`Running`] is dropped, and also when the thread
    /// that called `start` exits (so an aborted test run leaves no QEMU behind): keep the
    /// `Running` on the thread that started it.
    pub fn start(self, cfg: &CompareConfig) -> anyhow::Result<Running> {
        let dir = TempDir::new(self.name());
        let sock = |n: &str| dir.path(&format!("{n}.sock"));
        let mut cmd = match self {
            Compare::Qemu => {
                let mut cmd = Command::new(&cfg.qemu);
                cmd.args(["-M", "none", "-nodefaults", "-display", "none", "-object", "iothread,id=io0"]);
                for n in ["pri", "sec", "out", "notify"] {
                    cmd.arg("-chardev").arg(format!("socket,id={n},path={},server=on,wait=off", sock(n).display()));
                }
                let mut obj = String::from(
                    "colo-compare,id=c0,primary_in=pri,secondary_in=sec,outdev=out,iothread=io0,notify_dev=notify",
                );
                if cfg.vnet {
                    obj.push_str(",vnet_hdr_support=on");
                }
                if let Some(n) = cfg.max_queue_size {
                    obj.push_str(&format!(",max_queue_size={n}"));
                }
                if let Some(ms) = cfg.compare_timeout_ms {
                    obj.push_str(&format!(",compare_timeout={ms}"));
                }
                cmd.arg("-object").arg(obj);
                cmd
            }
            Compare::Ours => {
                let ep = |n: &str| format!("unix:{},server", sock(n).display());
                let mut cmd = Command::new(&cfg.ours);
                cmd.arg("compare").args(["--primary-in", &ep("pri"), "--secondary-in", &ep("sec")]).args([
                    "--outdev",
                    &ep("out"),
                    "--notify-dev",
                    &ep("notify"),
                ]);
                if cfg.vnet {
                    cmd.arg("--vnet-hdr");
                }
                if let Some(n) = cfg.max_queue_size {
                    cmd.args(["--max-queue-size", &n.to_string()]);
                }
                if let Some(ms) = cfg.compare_timeout_ms {
                    cmd.args(["--compare-timeout", &ms.to_string()]);
                }
                cmd
            }
        };
        cmd.stdout(Stdio::null());
        // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches no memory of ours.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let mut proc = Proc::spawn(self.name(), cmd);
        let deadline = Instant::now() + START_TIMEOUT;
        let mut connect = |n: &str| -> anyhow::Result<QPeer> {
            let path = sock(n);
            loop {
                match UnixStream::connect(&path) {
                    Ok(s) => return Ok(QPeer::from_stream(s, cfg.vnet)),
                    Err(e) => {
                        if !proc.is_running() {
                            bail!(
                                "{} exited before {} accepted; stderr:\n{}",
                                self.name(),
                                path.display(),
                                proc.stderr()
                            );
                        }
                        if Instant::now() > deadline {
                            return Err(e).with_context(|| format!("connecting to {}", path.display()));
                        }
                        std::thread::sleep(Duration::from_millis(10));
                    }
                }
            }
        };
        let pri = connect("pri")?;
        let sec = connect("sec")?;
        let out = connect("out")?;
        let notify = connect("notify")?;
        if self == Compare::Qemu {
            std::thread::sleep(QEMU_SETTLE);
        }
        Ok(Running { kind: self, vnet: cfg.vnet, pri, sec, out, notify, proc, dir })
    }
}

/// How to start either implementation; fields without a value keep both defaults (which are the
/// same: compare_timeout 3000 ms, max_queue_size 1024).
#[derive(Clone, Debug)]
pub struct CompareConfig {
    /// Frames carry the vnet header length field (QEMU `vnet_hdr_support=on`, ours `--vnet-hdr`).
    pub vnet: bool,
    /// QEMU binary.
    pub qemu: PathBuf,
    /// Our `colo-proxy` binary.
    pub ours: PathBuf,
    /// Most frames held per queue.
    pub max_queue_size: Option<u32>,
    /// Age (ms) at which a held frame requests a checkpoint.
    pub compare_timeout_ms: Option<u32>,
}

impl CompareConfig {
    /// Defaults: binaries from [`qemu_path`] and [`colo_proxy_path`], no vnet header.
    pub fn new() -> CompareConfig {
        CompareConfig {
            vnet: false,
            qemu: qemu_path(),
            ours: colo_proxy_path(),
            max_queue_size: None,
            compare_timeout_ms: None,
        }
    }

    /// The same with the vnet header field on or off.
    pub fn vnet(mut self, on: bool) -> CompareConfig {
        self.vnet = on;
        self
    }
}

impl Default for CompareConfig {
    fn default() -> CompareConfig {
        CompareConfig::new()
    }
}

/// A started implementation and our end of its four sockets. Dropping it closes the sockets,
/// kills the process and removes its directory (fields drop in this order). The fields are public
/// so a driver can move the peers into threads and keep `proc` and `dir` alive alongside.
pub struct Running {
    /// Which implementation this is.
    pub kind: Compare,
    /// Whether frames carry the vnet header length field.
    pub vnet: bool,
    /// Primary input (QEMU: `primary_in`, fed by filter-mirror).
    pub pri: QPeer,
    /// Secondary input (QEMU: `secondary_in`, fed by filter-redirector).
    pub sec: QPeer,
    /// Released primary frames (QEMU: `outdev`).
    pub out: QPeer,
    /// notify_dev: `DO_CHECKPOINT` out (never with a vnet field), `COLO_CHECKPOINT` in (with the
    /// vnet field in vnet mode, as QEMU expects).
    pub notify: QPeer,
    /// The process.
    pub proc: Proc,
    /// Its socket directory.
    pub dir: TempDir,
}

impl Running {
    /// Sends `COLO_CHECKPOINT` on notify_dev (the controller's "secondary has the checkpoint":
    /// flush).
    pub fn send_checkpoint(&mut self) -> std::io::Result<()> {
        self.notify.send(colo_proxy::notify_dev::CHECKPOINT, 0)
    }
}
