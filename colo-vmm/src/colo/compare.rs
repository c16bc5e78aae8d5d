//! The controller's side of the compare processes' control sockets (docs/control.md): set their
//! mode, flush them at checkpoints, and hear their miscompares. One reader thread per process
//! forwards everything into one channel, so the controller waits on all of them at once.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use colo_proxy::compare::Mode;
use colo_proxy::control::{Command, Event, HelloReplica};
use colo_proxy::replica::Role;

/// How long a compare process may take to answer a command.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// Why talking to the compare processes failed.
#[derive(Debug, thiserror::Error)]
pub enum CompareError {
    /// Nothing answers at a control socket.
    #[error("cannot reach the compare process at {path}: {source}")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A compare process did not greet as docs/control.md says.
    #[error("{path}: expected hello, got {got}")]
    Hello {
        /// The socket.
        path: PathBuf,
        /// What came instead.
        got: String,
    },
    /// Reading or writing a control socket failed.
    #[error("compare process {path}: {source}")]
    Io {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A compare process refused a command.
    #[error("compare process {path} refused: {message}")]
    Refused {
        /// The socket.
        path: PathBuf,
        /// Its error.
        message: String,
    },
    /// A compare process closed its connection.
    #[error("compare process {0} went away")]
    Gone(PathBuf),
    /// A reply did not come in time.
    #[error("a compare process did not answer in time")]
    Timeout,
    /// Every connection's reader stopped.
    #[error("compare links closed")]
    Closed,
    /// A backend of this VM only, but the secondary named no frame link for it.
    #[error(
        "compare process {path} serves this VM only, but the secondary named no frame link for NIC #{nic} \
         (give its backend --peer-listen)"
    )]
    NoFrameLink {
        /// The socket.
        path: PathBuf,
        /// The NIC's position in --compare-socket order.
        nic: usize,
    },
}

/// One connected compare process.
struct Process {
    path: PathBuf,
    writer: UnixStream,
    nic: String,
    /// A backend of this VM only (two hosts): its role and frame-link address. `None`: one
    /// that serves both VMs (one host), driven by modes alone.
    replica: Option<HelloReplica>,
}

/// What one compare process is told when the VM's role changes: a backend of both VMs takes a
/// mode, a backend of this VM only takes a role.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Duty {
    /// Serve without a replica: `primary-only`, or role `alone`.
    Alone,
    /// The secondary serves now (this VM stepped down as primary, or is the secondary).
    Secondary,
    /// This secondary took over: `secondary-only`, or role `alone` (which announces it).
    TakeOver,
}

/// A miscompare reported by one of the compare processes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reported {
    /// The NIC.
    pub nic: String,
    /// The reason (docs/control.md names).
    pub reason: String,
}

/// The compare processes a controller drives.
pub struct CompareSet {
    procs: Vec<Process>,
    rx: Receiver<(usize, Option<Event>)>,
    stash: VecDeque<(usize, Event)>,
    next_id: u64,
}

impl CompareSet {
    /// Connects to every control socket (retrying each for up to `patience`).
    pub fn connect(paths: &[PathBuf], patience: Duration) -> Result<CompareSet, CompareError> {
        let (tx, rx) = channel();
        let mut procs = vec![];
        for (i, p) in paths.iter().enumerate() {
            procs.push(Self::connect_one(i, p, patience, tx.clone())?);
        }
        Ok(CompareSet { procs, rx, stash: VecDeque::new(), next_id: 1 })
    }

    fn connect_one(
        i: usize,
        path: &Path,
        patience: Duration,
        tx: Sender<(usize, Option<Event>)>,
    ) -> Result<Process, CompareError> {
        let deadline = Instant::now() + patience;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(source) if Instant::now() >= deadline => {
                    return Err(CompareError::Connect { path: path.into(), source })
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        };
        let io = |source| CompareError::Io { path: path.into(), source };
        let mut reader = BufReader::new(stream.try_clone().map_err(io)?);
        let mut hello = String::new();
        stream.set_read_timeout(Some(REPLY_TIMEOUT)).map_err(io)?;
        reader.read_line(&mut hello).map_err(io)?;
        let (nic, replica) = match Event::parse(hello.trim_end().as_bytes()) {
            Ok(Event::Hello { nic, replica, .. }) => (nic, replica),
            other => return Err(CompareError::Hello { path: path.into(), got: format!("{other:?}") }),
        };
        stream.set_read_timeout(None).map_err(io)?;
        std::thread::Builder::new()
            .name("colo-compare-rx".into())
            .spawn(move || {
                let mut line = String::new();
                loop {
                    line.clear();
                    match reader.read_line(&mut line) {
                        Ok(0) | Err(_) => {
                            let _ = tx.send((i, None));
                            return;
                        }
                        Ok(_) => {
                            if let Ok(ev) = Event::parse(line.trim_end().as_bytes()) {
                                if tx.send((i, Some(ev))).is_err() {
                                    return;
                                }
                            }
                        }
                    }
                }
            })
            .map_err(io)?;
        Ok(Process { path: path.to_path_buf(), writer: stream, nic, replica })
    }

    /// How many compare processes.
    pub fn len(&self) -> usize {
        self.procs.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.procs.is_empty()
    }

    fn send_all(&mut self, make: impl Fn(u64) -> Command) -> Result<Vec<u64>, CompareError> {
        let mut ids = vec![];
        for p in &mut self.procs {
            let id = self.next_id;
            self.next_id += 1;
            let mut line = make(id).to_line();
            if !line.ends_with('\n') {
                line.push('\n');
            }
            p.writer.write_all(line.as_bytes()).map_err(|source| CompareError::Io { path: p.path.clone(), source })?;
            ids.push(id);
        }
        Ok(ids)
    }

    /// Waits for one reply per id (in any order), stashing other events.
    fn wait_replies(&mut self, ids: &[u64]) -> Result<Vec<Event>, CompareError> {
        let deadline = Instant::now() + REPLY_TIMEOUT;
        let mut replies: Vec<Option<Event>> = vec![None; ids.len()];
        while replies.iter().any(Option::is_none) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok((i, Some(ev))) => match ev.reply_to().and_then(|id| ids.iter().position(|&x| x == id)) {
                    Some(k) => {
                        if let Event::Error { message, .. } = ev {
                            return Err(CompareError::Refused { path: self.procs[i].path.clone(), message });
                        }
                        replies[k] = Some(ev);
                    }
                    None => self.stash.push_back((i, ev)),
                },
                Ok((i, None)) => return Err(CompareError::Gone(self.procs[i].path.clone())),
                Err(RecvTimeoutError::Timeout) => return Err(CompareError::Timeout),
                Err(RecvTimeoutError::Disconnected) => return Err(CompareError::Closed),
            }
        }
        Ok(replies.into_iter().map(|r| r.expect("all answered")).collect())
    }

    /// Sets every compare process's mode.
    pub fn set_mode(&mut self, mode: Mode) -> Result<(), CompareError> {
        let ids = self.send_all(|id| Command::Mode { id, mode })?;
        self.wait_replies(&ids).map(|_| ())
    }

    /// Whether the VM's traffic goes through backends of this VM only (two hosts).
    pub fn one_vm(&self) -> bool {
        self.procs.iter().any(|p| p.replica.is_some())
    }

    /// Where each process's frame link listens (two hosts; `None` for a backend of both VMs),
    /// in `--compare-socket` order: what a secondary tells its primary.
    pub fn frame_links(&self) -> Vec<Option<String>> {
        self.procs.iter().map(|p| p.replica.as_ref().and_then(|r| r.peer_listen.clone())).collect()
    }

    /// Sends one command to each process (`make` decides per process; `None`: nothing for
    /// it) and waits for every reply.
    fn each(
        &mut self,
        make: impl Fn(usize, &Process, u64) -> Option<Command>,
    ) -> Result<Vec<Option<Event>>, CompareError> {
        let mut sent = vec![];
        for (i, p) in self.procs.iter_mut().enumerate() {
            let id = self.next_id;
            let Some(cmd) = make(i, p, id) else {
                sent.push(None);
                continue;
            };
            self.next_id += 1;
            let mut line = cmd.to_line();
            line.push('\n');
            p.writer.write_all(line.as_bytes()).map_err(|source| CompareError::Io { path: p.path.clone(), source })?;
            sent.push(Some(id));
        }
        let ids: Vec<u64> = sent.iter().flatten().copied().collect();
        let mut replies = self.wait_replies(&ids)?.into_iter();
        Ok(sent.into_iter().map(|s| s.and_then(|_| replies.next())).collect())
    }

    fn duty(&mut self, duty: Duty) -> Result<(), CompareError> {
        self.each(|_, p, id| match (duty, p.replica.is_some()) {
            (Duty::Alone, false) => Some(Command::Mode { id, mode: Mode::PrimaryOnly }),
            (Duty::TakeOver, false) => Some(Command::Mode { id, mode: Mode::SecondaryOnly }),
            // A backend of both VMs follows the secondary: it set it already.
            (Duty::Secondary, false) => None,
            (Duty::Alone | Duty::TakeOver, true) => {
                Some(Command::Role { id, role: Role::Alone, peer: None, lease_ms: None })
            }
            (Duty::Secondary, true) => Some(Command::Role { id, role: Role::Secondary, peer: None, lease_ms: None }),
        })
        .map(|_| ())
    }

    /// The VM serves alone (a primary before COLO, or after losing its secondary): released
    /// at once, and held output goes out.
    pub fn serve_alone(&mut self) -> Result<(), CompareError> {
        self.duty(Duty::Alone)
    }

    /// This VM is (or becomes) a secondary: nothing of it reaches its LAN, and a primary that
    /// stepped down drops what it held.
    pub fn serve_as_secondary(&mut self) -> Result<(), CompareError> {
        self.duty(Duty::Secondary)
    }

    /// This secondary took over: its output goes out (through the rewriter), and a one-VM
    /// backend announces it on the LAN.
    pub fn take_over(&mut self) -> Result<(), CompareError> {
        self.duty(Duty::TakeOver)
    }

    /// COLO starts on the primary: one-VM backends connect their frame links to the
    /// secondary's (`links`, in `--compare-socket` order, from the secondary) and release
    /// only under a lease of `lease_ms`; then every process compares (`colo`).
    pub fn start_colo(&mut self, links: &[Option<String>], lease_ms: u64) -> Result<(), CompareError> {
        for (i, p) in self.procs.iter().enumerate() {
            if p.replica.is_some() && links.get(i).cloned().flatten().is_none() {
                return Err(CompareError::NoFrameLink { path: p.path.clone(), nic: i });
            }
        }
        self.each(|i, p, id| {
            p.replica.as_ref().map(|_| Command::Role {
                id,
                role: Role::Primary,
                peer: links[i].clone(),
                lease_ms: Some(lease_ms),
            })
        })?;
        self.set_mode(Mode::Colo)
    }

    /// As primary with the VM paused: each one-VM backend's mark (the first inbound frame the
    /// VM has not taken), in order; `None` for backends of both VMs.
    pub fn rx_marks(&mut self) -> Result<Vec<Option<u64>>, CompareError> {
        let replies = self.each(|_, p, id| p.replica.as_ref().map(|_| Command::QueryRxMark { id }))?;
        Ok(replies
            .into_iter()
            .map(|r| match r {
                Some(Event::RxMark { mark, .. }) => Some(mark),
                _ => None,
            })
            .collect())
    }

    /// As secondary, once the VM loaded a checkpoint: each one-VM backend restarts the VM's
    /// inbound frames at the primary's mark.
    pub fn resync(&mut self, marks: &[Option<u64>]) -> Result<(), CompareError> {
        self.each(|i, p, id| {
            let mark = marks.get(i).copied().flatten()?;
            p.replica.as_ref().map(|_| Command::Resync { id, mark })
        })
        .map(|_| ())
    }

    /// Flushes every compare process (the checkpoint's output commit); returns frames
    /// released and dropped in total.
    pub fn checkpoint(&mut self) -> Result<(u64, u64), CompareError> {
        let ids = self.send_all(|id| Command::Checkpoint { id })?;
        let mut sum = (0, 0);
        for ev in self.wait_replies(&ids)? {
            if let Event::Flushed { released, dropped, .. } = ev {
                sum.0 += released;
                sum.1 += dropped;
            }
        }
        Ok(sum)
    }

    /// Drops miscompares reported so far (they belong to the interval a checkpoint just ended).
    pub fn forget_miscompares(&mut self) {
        self.stash.clear();
        while let Ok((_, Some(_))) = self.rx.try_recv() {}
    }

    /// The next miscompare, waiting at most `timeout`. `Err` if a compare process went away.
    pub fn next_miscompare(&mut self, timeout: Duration) -> Result<Option<Reported>, CompareError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some((i, ev)) = self.stash.pop_front() {
                if let Some(r) = self.as_miscompare(i, ev) {
                    return Ok(Some(r));
                }
                continue;
            }
            match self.rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok((i, Some(ev))) => {
                    if let Some(r) = self.as_miscompare(i, ev) {
                        return Ok(Some(r));
                    }
                }
                Ok((i, None)) => return Err(CompareError::Gone(self.procs[i].path.clone())),
                Err(RecvTimeoutError::Timeout) => return Ok(None),
                Err(RecvTimeoutError::Disconnected) => return Err(CompareError::Closed),
            }
        }
    }

    fn as_miscompare(&self, i: usize, ev: Event) -> Option<Reported> {
        match ev {
            Event::Miscompare { reason, .. } => {
                Some(Reported { nic: self.procs[i].nic.clone(), reason: reason.name().to_string() })
            }
            _ => None,
        }
    }
}
