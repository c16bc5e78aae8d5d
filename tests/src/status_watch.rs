//! A watch on the replicas of one VM: a thread asks each replica's colo-vmm for
//! `query-colo-status` every [`PERIOD`] and records every change of what it is — role, state,
//! the arbiter's key holder as it sees it, fenced, waiting, its last re-protection — with the
//! time it was seen. The arbiter demo's timeline is this record; its waits read the latest
//! status from here instead of asking again.
//!
//! One connection per replica stays open (the API serves any number of requests on one), so
//! the watch costs no process per look: `colo-vmm ctl` would start 30 a second for 3 replicas.
//! A replica that does not answer (its process gone, or a standby that has no API until COLO
//! starts) is recorded as silent, and asked again at the next look.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;

/// How often each replica is asked.
pub const PERIOD: Duration = Duration::from_millis(100);
/// The longest wait for one answer; a replica slower than this counts as silent this time.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(2);
/// The longest answer read (a status with its checkpoint history is tens of KiB).
const MAX_ANSWER: u64 = 4 << 20;

/// What a replica is, as far as who serves goes: the fields of its status whose changes the
/// watch records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Look {
    /// `none`, `primary` or `secondary`.
    pub role: String,
    /// `inactive`, `starting`, `running`, `failed-over` or `stopped`.
    pub state: String,
    /// Who holds the VM's key in the arbiter, as this replica last saw it.
    pub holder: Option<String>,
    /// Why it fenced itself (releases nothing, its VM paused).
    pub fenced: Option<String>,
    /// What it waits for before it may serve (a takeover waiting for the key).
    pub waiting: Option<String>,
    /// Its last attempt to protect itself again with a registered standby.
    pub reprotect: Option<String>,
    /// When its last failover happened (ms since the Unix epoch): a takeover followed at once
    /// by a re-protection can fall between two looks, and still shows here.
    pub last_failover_unix_ms: Option<u64>,
}

impl Look {
    /// The look of a `query-colo-status` answer.
    pub fn of(status: &Value) -> Look {
        let text = |v: &Value| v.as_str().map(str::to_string);
        Look {
            role: text(&status["role"]).unwrap_or_else(|| "?".into()),
            state: text(&status["state"]).unwrap_or_else(|| "?".into()),
            holder: text(&status["arbiter"]["holder"]),
            fenced: text(&status["fenced"]),
            waiting: text(&status["waiting"]),
            reprotect: text(&status["reprotect"]),
            last_failover_unix_ms: status["last-failover"]["at-unix-ms"].as_u64(),
        }
    }

    /// Where it stands, in a few words.
    pub fn stands(&self) -> &'static str {
        if self.fenced.is_some() {
            return "fenced";
        }
        match (self.role.as_str(), self.state.as_str()) {
            (_, "failed-over") => "serving alone",
            ("none", _) => "serving alone, no COLO yet",
            ("primary", "running") => "primary in COLO",
            ("primary", "starting") => "primary, starting COLO",
            ("secondary", "running") if self.waiting.is_some() => "secondary, waiting to take over",
            ("secondary", "running") => "secondary in COLO",
            ("secondary", "starting") => "secondary, receiving the VM",
            (_, "stopped") => "stopped, waiting for a decision",
            _ => "?",
        }
    }
}

/// One change of a replica.
#[derive(Debug, Clone)]
pub struct Change {
    /// When the watch saw it.
    pub at: Instant,
    /// Which replica (its index in [`StatusWatch::start`]'s list).
    pub replica: usize,
    /// What it is now; `None`: it does not answer.
    pub look: Option<Look>,
}

struct Shared {
    apis: Vec<PathBuf>,
    stop: AtomicBool,
    changes: Mutex<Vec<Change>>,
    latest: Mutex<Vec<Option<Value>>>,
}

/// The running watch; it stops when dropped.
pub struct StatusWatch {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl StatusWatch {
    /// Starts watching the replicas whose API sockets are `apis`; `on_change` is called on the
    /// watch's thread with each change as it is recorded.
    pub fn start(apis: Vec<PathBuf>, on_change: impl Fn(&Change) + Send + 'static) -> StatusWatch {
        let n = apis.len();
        let shared = Arc::new(Shared {
            apis,
            stop: AtomicBool::new(false),
            changes: Mutex::default(),
            latest: Mutex::new(vec![None; n]),
        });
        let sh = shared.clone();
        let thread = std::thread::spawn(move || watch(&sh, on_change));
        StatusWatch { shared, thread: Some(thread) }
    }

    /// The last status replica `i` answered with, unless it was silent at the last look.
    pub fn latest(&self, i: usize) -> Option<Value> {
        self.shared.latest.lock().unwrap_or_else(|p| p.into_inner())[i].clone()
    }

    /// The changes so far, oldest first.
    pub fn changes(&self) -> Vec<Change> {
        self.shared.changes.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Waits until replica `i`'s status satisfies `pred`; returns it, or an error after
    /// `timeout` that says what it was waiting for and the last status. `cancelled` ends the
    /// wait early (with an error).
    pub fn wait(
        &self,
        i: usize,
        what: &str,
        timeout: Duration,
        cancelled: impl Fn() -> bool,
        pred: impl Fn(&Value) -> bool,
    ) -> Result<Value, String> {
        let deadline = Instant::now() + timeout;
        loop {
            let latest = self.latest(i);
            if let Some(s) = latest.as_ref().filter(|s| pred(s)) {
                return Ok(s.clone());
            }
            if cancelled() {
                return Err(format!("interrupted while waiting for {what}"));
            }
            if Instant::now() > deadline {
                let last = latest.map(|s| Look::of(&s)).map(|l| format!("{l:?}")).unwrap_or("no answer".into());
                return Err(format!("not {what} within {timeout:?} (last: {last})"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the watch; every change it recorded.
    pub fn stop(&mut self) -> Vec<Change> {
        self.halt();
        self.changes()
    }

    fn halt(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for StatusWatch {
    fn drop(&mut self) {
        self.halt();
    }
}

/// The watch's thread.
fn watch(sh: &Shared, on_change: impl Fn(&Change)) {
    let n = sh.apis.len();
    let mut conns: Vec<Option<ApiConn>> = (0..n).map(|_| None).collect();
    let mut last: Vec<Option<Option<Look>>> = vec![None; n];
    while !sh.stop.load(Ordering::SeqCst) {
        let started = Instant::now();
        for i in 0..n {
            let status = ask(&mut conns[i], &sh.apis[i]);
            let look = status.as_ref().map(Look::of);
            sh.latest.lock().unwrap_or_else(|p| p.into_inner())[i] = status;
            if last[i].as_ref() != Some(&look) {
                let change = Change { at: Instant::now(), replica: i, look: look.clone() };
                on_change(&change);
                sh.changes.lock().unwrap_or_else(|p| p.into_inner()).push(change);
                last[i] = Some(look);
            }
        }
        std::thread::sleep(PERIOD.saturating_sub(started.elapsed()));
    }
}

/// Replica's status over its open connection (opened again if needed); `None` if it does not
/// answer, and then the connection is dropped.
fn ask(conn: &mut Option<ApiConn>, api: &std::path::Path) -> Option<Value> {
    if conn.is_none() {
        *conn = ApiConn::connect(api);
    }
    let status = conn.as_mut()?.query_colo_status();
    if status.is_none() {
        *conn = None;
    }
    status
}

/// One connection to a colo-vmm's API (JSON lines: `{"execute": ...}` → `{"return": ...}`).
struct ApiConn {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl ApiConn {
    fn connect(api: &std::path::Path) -> Option<ApiConn> {
        let s = UnixStream::connect(api).ok()?;
        s.set_read_timeout(Some(ANSWER_TIMEOUT)).ok()?;
        s.set_write_timeout(Some(ANSWER_TIMEOUT)).ok()?;
        Some(ApiConn { writer: s.try_clone().ok()?, reader: BufReader::new(s) })
    }

    fn query_colo_status(&mut self) -> Option<Value> {
        self.writer.write_all(b"{\"execute\":\"query-colo-status\"}\n").ok()?;
        let mut line = String::new();
        let read = (&mut self.reader).take(MAX_ANSWER).read_line(&mut line).ok()?;
        if read == 0 || !line.ends_with('\n') {
            return None;
        }
        let mut reply: Value = serde_json::from_str(&line).ok()?;
        Some(reply.get_mut("return")?.take())
    }
}
