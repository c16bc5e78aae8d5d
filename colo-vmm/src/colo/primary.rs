//! The primary: `colo-start` migrates the running VM to the secondary and, instead of handing
//! it over, keeps checkpointing it there (docs/colo.md). The checkpoint controller runs hybrid
//! mode: it waits for a miscompare, `max-time`, a user request or the end of a passive interval;
//! runs the transaction in the spec's order; and fails over to `primary-only` when the
//! secondary is lost.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use colo_proxy::compare::Mode;

use super::blocks::PendingBlocks;
use super::compare::{CompareError, CompareSet};
use super::hybrid::{CheckpointKind, Decision, Hybrid};
use super::link::{Incoming, Link, Silence};
use super::message::Control;
use super::params::{ms, ColoParams};
use super::shared::ColoShared;
use super::status::{unix_ms, Role, State, Trigger};
use crate::migratable::{block_digests, page_digests, Migratable};
use crate::migration::protocol::Purpose;
use crate::migration::source::{self, MigrationError, Transfer};
use crate::migration::status::{MigrationParams, StatusHandle};
use crate::migration::uri::{Channel, MigrationUri};
use crate::persist::state::StateRecord;
use crate::persist::stream::PAGE_SIZE;
use crate::vstate::dirty::DirtyBitmap;

/// How long the secondary may take to load the initial state and start.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the secondary may take for one step of a checkpoint, heartbeats notwithstanding.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);
/// How often dirty pages are gathered between checkpoints for the background transfer.
const BACKGROUND_EVERY: Duration = Duration::from_millis(100);
/// Longest single wait of the controller, so commands and the link are checked often.
const TICK: Duration = Duration::from_millis(10);

/// Test-only options of `colo-start`, for the end-to-end tests; production leaves them off.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TestOptions {
    /// `verify=true`: every checkpoint carries the digest of every page of the paused PVM, and
    /// the secondary refuses a checkpoint after which its memory differs (proves that the RAM
    /// cache and the union of dirty pages miss nothing).
    pub verify: bool,
    /// `test-checkpoint-delay=MS`: each checkpoint waits this long after its pages and before
    /// the device state, so tests can kill the primary in the middle of a checkpoint.
    pub checkpoint_delay: Option<Duration>,
}

/// Why COLO did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// This VMM is a secondary.
    #[error("this VMM runs a secondary; start COLO on the primary")]
    Secondary,
    /// COLO runs already.
    #[error("COLO is already running")]
    Running,
    /// No `--compare-socket`.
    #[error("COLO needs the VM's traffic to pass a compare process: start colo-vmm with --compare-socket")]
    NoCompare,
    /// The initial transfer failed.
    #[error(transparent)]
    Transfer(#[from] MigrationError),
    /// The compare processes could not be set to COLO.
    #[error(transparent)]
    Compare(#[from] CompareError),
    /// The secondary refused the VM.
    #[error("the secondary refused: {0}")]
    Refused(String),
    /// The secondary answered out of turn.
    #[error("unexpected answer from the secondary: {0}")]
    Unexpected(String),
    /// The PVM did not restart after the transfer.
    #[error("{0}")]
    Restart(String),
    /// The COLO thread could not start.
    #[error("starting the COLO thread: {0}")]
    Spawn(#[source] std::io::Error),
    /// The arbiter could not record the new pair.
    #[error("arbiter: {0}")]
    Arbiter(String),
    /// A survivor of a one-host pair.
    #[error(
        "this VM took over from its primary behind a compare process that serves both VMs (one host): \
         re-protection needs one backend per VM (vhost-net-compare --vm-socket, colo-proxy run --vm)"
    )]
    PairSurvivor,
}

/// A primary-to-be connects to its compare processes at once and sets them `primary-only`, so
/// its traffic flows before COLO starts (docs/control.md, "Initial mode").
pub fn prepare(colo: &ColoShared) -> Result<(), CompareError> {
    let mut c = CompareSet::connect(&colo.compare_sockets, Duration::from_secs(10))?;
    // With an arbiter, only once this replica holds the VM's key (see `serving`).
    if colo.arbiter().is_none() {
        c.serve_alone()?;
    }
    *colo.compare() = Some(c);
    Ok(())
}

/// `colo-start uri=…`: checks that COLO can start and starts it on its own thread.
pub fn start<V: Migratable + 'static>(
    vm: &Arc<V>,
    colo: &Arc<ColoShared>,
    uri: MigrationUri,
    test: TestOptions,
) -> Result<(), StartError> {
    let s = colo.status();
    // A secondary that took over may protect itself again (re-protection); one in COLO not.
    let survivor = s.role == Role::Secondary && s.state == State::FailedOver;
    if s.role == Role::Secondary && !survivor {
        return Err(StartError::Secondary);
    }
    if matches!(s.state, State::Starting | State::Running) {
        return Err(StartError::Running);
    }
    if colo.compare_sockets.is_empty() {
        return Err(StartError::NoCompare);
    }
    if survivor {
        // Its VM sits on the secondary's side of a backend that serves both VMs (one host):
        // that backend cannot compare it against a new secondary.
        let c = CompareSet::connect(&colo.compare_sockets, Duration::from_secs(5))?;
        if !c.one_vm() {
            return Err(StartError::PairSurvivor);
        }
        *colo.compare() = Some(c);
    }
    colo.update(|s| {
        s.role = Role::Primary;
        s.state = State::Starting;
        s.error = None;
    });
    let (vm, colo) = (vm.clone(), colo.clone());
    std::thread::Builder::new()
        .name("colo-primary".into())
        .spawn(move || run(&*vm, &colo, &uri, test))
        .map_err(StartError::Spawn)?;
    Ok(())
}

fn run<V: Migratable>(vm: &V, colo: &ColoShared, uri: &MigrationUri, test: TestOptions) {
    let ctl = match begin(vm, colo, uri, test) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(target: "colo", uri = %uri, error = %e, "COLO did not start; the VM runs unprotected");
            colo.update(|s| {
                s.state = State::Inactive;
                s.error = Some(e.to_string());
            });
            return;
        }
    };
    ctl.run();
}

/// The initial transfer: a migration up to the device state, then the secondary starts its
/// copy instead of taking over.
fn begin<'a, V: Migratable>(
    vm: &'a V,
    colo: &'a ColoShared,
    uri: &MigrationUri,
    test: TestOptions,
) -> Result<Controller<'a, V>, StartError> {
    let started = Instant::now();
    let progress = StatusHandle::default();
    let mut t = source::connect(vm, uri, Purpose::Colo)?;
    let abandon = |t: Transfer, e: StartError| {
        t.chan.shutdown();
        vm.stop_dirty_log();
        e
    };
    let dirty = match source::precopy(vm, &mut t, MigrationParams::default(), &progress, started) {
        Ok(d) => d,
        Err(e) => return Err(abandon(t, e.into())),
    };
    if let Err(e) = source::pause_and_send_state(vm, &mut t, dirty, &progress, false) {
        return Err(abandon(t, e.into()));
    }
    // From here the PVM is paused: every way out restarts it.
    let ready = source::answer(&t, READY_TIMEOUT).map_err(StartError::from).and_then(|(r, c)| match c {
        Control::CheckpointReady { frame_links, replica } => Ok((r, frame_links, replica)),
        Control::Error { message } => Err(StartError::Refused(message)),
        other => Err(StartError::Unexpected(format!("{other:?}"))),
    });
    let (reader, frame_links, secondary) = match ready {
        Ok(r) => r,
        Err(e) => return Err(abandon(t, restart(vm, e))),
    };
    // With an arbiter: the secondary may take over only once the pair record names it, and
    // it must, before anything of the pair is released.
    if let Err(e) = record_pair(colo, secondary.as_deref()) {
        let _ = crate::persist::message::send(&mut t.w, &Control::Error { message: e.to_string() });
        return Err(abandon(t, restart(vm, e)));
    }
    let _ = t.chan.set_read_timeout(None);
    // Two hosts: this host's backends connect their frame links to the secondary's now, while
    // the PVM is still paused, so the SVM gets every inbound frame the PVM has not taken.
    let lease_ms = lease_ms(&colo.params());
    let compare = match take_compare(colo).and_then(|mut c| c.start_colo(&frame_links, lease_ms).map(|()| c)) {
        Ok(mut c) => {
            c.forget_miscompares();
            c
        }
        Err(e) => {
            let _ = crate::persist::message::send(&mut t.w, &Control::Error { message: e.to_string() });
            return Err(abandon(t, restart(vm, e.into())));
        }
    };
    let Transfer { w, chan, .. } = t;
    let link = Link::new(reader, w, chan, colo.heartbeat_ms.clone());
    colo.watch_link(link.watch());
    let mut ctl = Controller::new(vm, colo, link, compare, test);
    if let Err(End::Error(e) | End::Lost(e)) = ctl.resume() {
        ctl.fail_over(End::Error(e.clone()));
        return Err(StartError::Restart(e));
    }
    colo.update(|s| {
        s.state = State::Running;
        s.mode = Some(CheckpointKind::Colo);
        s.hybrid = Some(Hybrid::default());
        s.started_unix_ms = unix_ms();
    });
    tracing::info!(target: "colo", uri = %uri, ms = started.elapsed().as_millis() as u64, "COLO started");
    Ok(ctl)
}

/// With an arbiter: records in etcd that `secondary` has this VM's state (see
/// [`crate::arbiter::claim`]).
fn record_pair(colo: &ColoShared, secondary: Option<&str>) -> Result<(), StartError> {
    let Some(claim) = colo.arbiter() else { return Ok(()) };
    let secondary = secondary
        .ok_or_else(|| StartError::Arbiter("the secondary runs without --arbiter: it could never take over".into()))?;
    match claim.protect_with(secondary) {
        Ok(true) => Ok(()),
        Ok(false) => Err(StartError::Arbiter("this replica no longer holds the VM's key".into())),
        Err(e) => Err(StartError::Arbiter(format!("recording the pair: {e}"))),
    }
}

/// The lease under which a primary's one-VM backends release output: half the heartbeat
/// timeout, so a primary cut off from its secondary stops releasing well before the secondary
/// can take over.
fn lease_ms(p: &ColoParams) -> u64 {
    (p.heartbeat_timeout / 2).clamp(20, 60_000)
}

/// Restarts the PVM after a start that led nowhere; a failure to is reported with `why`.
fn restart<V: Migratable>(vm: &V, why: StartError) -> StartError {
    match vm.resume() {
        Ok(()) => why,
        Err(e) => StartError::Restart(format!("{why}; restarting the VM also failed: {e}")),
    }
}

/// The primary's compare connection, made at start-up to set `primary-only`, or a new one.
fn take_compare(colo: &ColoShared) -> Result<CompareSet, CompareError> {
    match colo.compare().take() {
        Some(c) => Ok(c),
        None => CompareSet::connect(&colo.compare_sockets, Duration::from_secs(5)),
    }
}

/// What a transaction sent and released, and what each of its steps cost.
struct Sent {
    pages: u64,
    blocks: u64,
    bytes: u64,
    released: u64,
    dropped: u64,
    steps: Steps,
}

/// How long each step of a checkpoint took, ms, in the transaction's order (logged with every
/// checkpoint, so a pause can be taken apart: colo-bench's step table reads them).
#[derive(Debug, Default, Clone, Copy)]
struct Steps {
    /// Stopping the vCPUs and the devices' rings (`vm.pause`).
    pause: f64,
    /// Reading the dirty logs (KVM's, the VMM's, the backends').
    dirty: f64,
    /// Copying the dirty pages and disk blocks into the link.
    pages: f64,
    /// The compare processes' receive marks (two hosts; a round trip each).
    marks: f64,
    /// Saving the vCPUs', the VM's and the devices' state, encoding it (with the digests in
    /// verify mode) and sending it.
    state: f64,
    /// Until `vmstate-received`: the secondary took in everything.
    received: f64,
    /// The output commit (and a mode switch) at the compare processes.
    commit: f64,
    /// Until `vmstate-loaded`: the secondary applied its cache and the state (0 with
    /// `resume-before-load`, where the PVM does not wait for it).
    loaded: f64,
    /// Restarting the devices and the vCPUs.
    resume: f64,
}

/// Measures the steps of a transaction one after the other.
struct StepClock(Instant);

impl StepClock {
    fn start() -> StepClock {
        StepClock(Instant::now())
    }

    /// Ms since the previous lap.
    fn lap(&mut self) -> f64 {
        let now = Instant::now();
        let ms = (now - self.0).as_secs_f64() * 1000.0;
        self.0 = now;
        ms
    }
}

/// Why COLO ended on the primary.
enum End {
    /// The secondary is gone, silent, or declared lost: carry on alone.
    Lost(String),
    /// Something went wrong on this side or in what the secondary sent: carry on alone and
    /// report the error.
    Error(String),
    /// The secondary took over (it believed this side dead): step down, the VM paused.
    Replaced(String),
}

/// The checkpoint controller.
struct Controller<'a, V: Migratable> {
    vm: &'a V,
    colo: &'a ColoShared,
    link: Link<Channel>,
    compare: Option<CompareSet>,
    /// The VM's dirty tracking is on (until failover).
    tracking: bool,
    hybrid: Hybrid,
    /// Pages dirtied since the last checkpoint and not yet streamed in the background.
    pending: DirtyBitmap,
    /// The same for the disk's blocks.
    pending_blocks: PendingBlocks,
    seq: u64,
    /// When the PVM last resumed: intervals count running time only.
    resumed_at: Instant,
    test: TestOptions,
    /// The heartbeat parameters last sent to the secondary (interval, timeout).
    heartbeat_sent: (u64, u64),
    /// The checkpoint the secondary is still loading: the PVM resumed once its output was
    /// committed, and its `vmstate-loaded` is due before the next checkpoint.
    loading: Option<(u64, Instant)>,
}

impl<'a, V: Migratable> Controller<'a, V> {
    /// The controller of a PVM whose initial transfer is done (dirty tracking on, the PVM
    /// paused at the transfer's end).
    fn new(
        vm: &'a V,
        colo: &'a ColoShared,
        link: Link<Channel>,
        compare: CompareSet,
        test: TestOptions,
    ) -> Controller<'a, V> {
        Controller {
            vm,
            colo,
            link,
            compare: Some(compare),
            tracking: true,
            hybrid: Hybrid::default(),
            pending: DirtyBitmap::empty(vm.page_count()),
            pending_blocks: PendingBlocks::new(vm),
            seq: 0,
            resumed_at: Instant::now(),
            test,
            heartbeat_sent: (0, 0),
            loading: None,
        }
    }

    fn compare(&mut self) -> &mut CompareSet {
        self.compare.as_mut().expect("present until failover")
    }

    /// Restarts the devices and the vCPU after a pause.
    fn resume(&mut self) -> Result<(), End> {
        let r = self.vm.resume();
        self.resumed_at = Instant::now();
        r.map_err(|e| End::Error(format!("restarting the VM: {e}")))
    }

    fn run(mut self) {
        let end = loop {
            let step = crate::panic_guard::catch(|| {
                self.wait().and_then(|trigger| {
                    let p = self.colo.params();
                    self.checkpoint(trigger, &p)
                })
            });
            match step {
                Ok(Ok(())) => {}
                Ok(Err(end)) => break end,
                Err(e) => break End::Error(format!("the checkpoint controller failed: {e}")),
            }
        };
        self.fail_over(end);
    }

    /// A write to the secondary failed: if it said why before closing, that is the reason.
    fn write_failed(&mut self, e: impl std::fmt::Display) -> End {
        match self.link.last_words(Duration::from_millis(200)) {
            Some(Control::Error { message }) => End::Error(format!("the secondary gave up: {message}")),
            Some(Control::TakenOver { reason }) => End::Replaced(reason),
            _ => End::Lost(e.to_string()),
        }
    }

    /// Gives the secondary the heartbeat parameters when COLO starts and after each change, so
    /// both sides beat and judge silence alike.
    fn send_heartbeat_parameters(&mut self) -> Result<(), End> {
        let p = self.colo.params();
        let now = (p.heartbeat_interval, p.heartbeat_timeout);
        if now != self.heartbeat_sent {
            let msg = Control::HeartbeatParameters { interval_ms: now.0, timeout_ms: now.1 };
            self.link.send(&msg).map_err(|e| self.write_failed(e))?;
            self.heartbeat_sent = now;
        }
        Ok(())
    }

    /// Hears the secondary between and during checkpoints: a heartbeat timeout, a broken link,
    /// an error from it or `lost-heartbeat` end COLO.
    fn check_peer(&mut self, wait: Duration) -> Result<Option<Control>, End> {
        if self.colo.lost_heartbeat.swap(false, Ordering::Relaxed) {
            return Err(End::Lost("lost-heartbeat command".into()));
        }
        self.send_heartbeat_parameters()?;
        // Read before judging silence: after this process was descheduled (or stopped), what
        // the secondary sent meanwhile must count, and an error from it must be seen.
        match self.link.recv(wait) {
            Err(Silence::Timeout) => {
                let timeout = ms(self.colo.params().heartbeat_timeout);
                if self.link.peer_silent(timeout) {
                    return Err(End::Lost(format!("no heartbeat from the secondary for {} ms", timeout.as_millis())));
                }
                Ok(None)
            }
            Err(Silence::Closed(why)) => Err(End::Lost(format!("checkpoint link broken: {why}"))),
            Err(Silence::Corrupt(why)) => {
                Err(End::Error(format!("corrupt checkpoint stream from the secondary: {why}")))
            }
            Ok(Incoming::Control(Control::TakenOver { reason })) => Err(End::Replaced(reason)),
            Ok(Incoming::Control(Control::Error { message })) => {
                Err(End::Error(format!("the secondary gave up: {message}")))
            }
            Ok(Incoming::Control(c)) => Ok(Some(c)),
            Ok(other) => Err(End::Error(format!("unexpected data from the secondary: {}", describe(&other)))),
        }
    }

    /// Step 2 of the hybrid cycle: until the limit, a miscompare (COLO only, not before
    /// `min-time`), or a user request. Streams dirty RAM in the background meanwhile.
    fn wait(&mut self) -> Result<Trigger, End> {
        let colo_mode = self.hybrid.mode() == CheckpointKind::Colo;
        let mut early: Option<String> = None;
        let mut last_background = Instant::now();
        loop {
            match self.check_peer(Duration::ZERO)? {
                Some(Control::VmstateLoaded { seq }) if self.loading.is_some_and(|(s, _)| s == seq) => {
                    let since = self.loading.take().map(|(_, t)| t.elapsed()).unwrap_or_default();
                    tracing::debug!(target: "colo", seq, ms = since.as_secs_f64() * 1000.0, "the secondary loaded the checkpoint");
                }
                Some(c) => {
                    return Err(End::Error(format!("unexpected message from the secondary between checkpoints: {c:?}")))
                }
                None => {}
            }
            // Parameters apply at once, also within an interval.
            let p = self.colo.params();
            if self.colo.user_checkpoint.swap(false, Ordering::Relaxed) {
                return Ok(Trigger::User);
            }
            let ran = self.resumed_at.elapsed();
            if let Some(reason) = &early {
                if ran >= ms(p.min_time) {
                    return Ok(Trigger::Miscompare(reason.clone()));
                }
            }
            let limit = self.hybrid.limit(&p);
            if ran >= limit {
                return Ok(if colo_mode { Trigger::Periodic } else { Trigger::Passive });
            }
            if p.ram_background_limit > 0 && last_background.elapsed() >= BACKGROUND_EVERY {
                self.background(p.ram_background_limit)?;
                last_background = Instant::now();
            }
            let slice = TICK.min(limit - ran);
            let asked = Instant::now();
            let heard = match colo_mode && early.is_none() {
                true => self.compare().next_miscompare(slice),
                false => {
                    std::thread::sleep(slice);
                    Ok(None)
                }
            };
            self.link.note_wait(asked, slice);
            match heard {
                Ok(Some(m)) => {
                    tracing::debug!(target: "colo", nic = %m.nic, reason = %m.reason, "miscompare");
                    early = Some(m.reason);
                }
                Ok(None) => {}
                Err(e) => return Err(End::Error(format!("compare process: {e}"))),
            }
        }
    }

    /// Adds the pages dirtied since the last look (by anyone) to the pending set.
    fn gather(&mut self) -> Result<(), End> {
        let more = self.vm.dirty_pages().map_err(|e| End::Error(e.to_string()))?;
        self.pending.union(more.words());
        Ok(())
    }

    /// Sends the pending pages as they are now and empties the set; returns how many. The last
    /// of them leave with the next flush.
    fn send_pending(&mut self) -> Result<u64, End> {
        let (vm, pending) = (self.vm, &self.pending);
        let n = self
            .link
            .with_writer_queued(|w| source::send_pages(w, vm, pending.iter(), false))
            .map_err(|e| self.write_failed(e))?;
        self.pending = DirtyBitmap::empty(self.pending.words().len() * 64);
        Ok(n)
    }

    /// Streams the pending disk blocks once enough have gathered (as [`Self::background`] does
    /// pages).
    fn background_blocks(&mut self, limit: u64) -> Result<(), End> {
        self.pending_blocks.gather(self.vm);
        if self.pending_blocks.bytes() < limit {
            return Ok(());
        }
        let n = self.pending_blocks.send(&self.link, self.vm).map_err(|e| self.write_failed(e))?;
        self.link.flush().map_err(|e| self.write_failed(e))?;
        self.colo.update(|s| s.disk.background_blocks += n);
        Ok(())
    }

    /// Streams pending dirty pages to the secondary's RAM cache once enough have gathered.
    fn background(&mut self, limit: u64) -> Result<(), End> {
        self.background_blocks(limit)?;
        self.gather()?;
        if (self.pending.count() as u64) * (PAGE_SIZE as u64) < limit {
            return Ok(());
        }
        let n = self.send_pending()?;
        self.link.flush().map_err(|e| self.write_failed(e))?;
        self.colo.update(|s| s.background_pages += n);
        tracing::debug!(target: "colo", pages = n, "dirty pages streamed in the background");
        Ok(())
    }

    /// Waits for the secondary's message `want` (named `what` in errors).
    fn expect(&mut self, what: &str, want: &Control) -> Result<(), End> {
        let deadline = Instant::now() + STEP_TIMEOUT;
        loop {
            match self.check_peer(TICK)? {
                Some(c) if &c == want => return Ok(()),
                Some(c) => return Err(End::Error(format!("expected {what} from the secondary, got {c:?}"))),
                None if Instant::now() >= deadline => {
                    return Err(End::Lost(format!("the secondary sent no {what} within {} s", STEP_TIMEOUT.as_secs())))
                }
                None => {}
            }
        }
    }

    /// Steps 3–6 of the hybrid cycle: decide, run the transaction, record it.
    fn checkpoint(&mut self, trigger: Trigger, p: &ColoParams) -> Result<(), End> {
        let interval = self.resumed_at.elapsed();
        let before = self.hybrid.clone();
        let decision = self.hybrid.cycle(interval, p);
        self.seq += 1;
        let seq = self.seq;
        let passive = decision.kind == CheckpointKind::Passive;
        // The secondary loads one checkpoint at a time: the previous one first.
        if let Some((prev, _)) = self.loading.take() {
            self.expect("vmstate-loaded", &Control::VmstateLoaded { seq: prev })?;
        }
        self.link
            .send(&Control::CheckpointRequest { seq, passive, trigger: trigger.to_string() })
            .map_err(|e| self.write_failed(e))?;
        if matches!(trigger, Trigger::Miscompare(_)) && p.relax_time > 0 {
            // Useful work while the secondary gets ready.
            std::thread::sleep(ms(p.relax_time));
        }
        self.expect("checkpoint-reply", &Control::CheckpointReply { seq })?;
        let paused_at = Instant::now();
        let mut clock = StepClock::start();
        // The vCPU threads read their state while the rings stop.
        self.vm.pause_to_save().map_err(|e| End::Error(format!("pausing the VM: {e}")))?;
        let paused_ms = clock.lap();
        let sent = self.transaction(seq, decision);
        clock.lap();
        // Whatever happened, the PVM runs on.
        let resumed = self.resume();
        let resume_ms = clock.lap();
        let pause = paused_at.elapsed();
        let Sent { pages, blocks, bytes, released, dropped, mut steps } = sent?;
        resumed?;
        steps.pause = paused_ms;
        steps.resume = resume_ms;
        let kind = decision.kind;
        let hybrid = self.hybrid.clone();
        self.colo.update(|s| {
            s.checkpoint(kind, &trigger, interval, pause, pages, bytes);
            s.checkpoint_blocks(blocks);
            s.frames_released += released;
            s.frames_dropped += dropped;
            s.mode = Some(kind);
            s.hybrid = Some(hybrid.clone());
            if decision.switched {
                s.checkpoints.mode_switches += 1;
            }
        });
        tracing::info!(
            target: "colo",
            seq,
            kind = ?kind,
            trigger = %trigger,
            interval_ms = interval.as_millis() as u64,
            pause_ms = pause.as_secs_f64() * 1000.0,
            pages,
            blocks,
            released,
            step_pause_ms = steps.pause,
            step_dirty_ms = steps.dirty,
            step_pages_ms = steps.pages,
            step_marks_ms = steps.marks,
            step_state_ms = steps.state,
            step_received_ms = steps.received,
            step_commit_ms = steps.commit,
            step_loaded_ms = steps.loaded,
            step_resume_ms = steps.resume,
            "checkpoint"
        );
        if decision.switched {
            tracing::info!(
                target: "colo",
                from = ?before.mode(),
                to = ?kind,
                mean_ms = before.mean_ms * 0.7 + 0.3 * interval.as_secs_f64() * 1000.0,
                cycles = before.count + 1,
                "mode switch"
            );
        }
        Ok(())
    }

    /// With the PVM paused: send the pages and state, commit the output once the secondary
    /// holds them, switch the compare mode if the kind changed, tell the secondary `committed`
    /// (its vCPUs wait for it), wait until it loaded — or, with
    /// `resume-before-load`, not: the PVM resumes then, while the secondary loads (its
    /// `vmstate-loaded` is awaited before the next checkpoint): everything released so far was produced before the checkpoint the secondary holds, and what the PVM
    /// sends from now on is held until the SVM, loaded and running, sends the same (or until
    /// the next checkpoint), so the secondary's load need not stop the PVM. Loading applies
    /// every page of the interval, those streamed in the background too, and that grows with
    /// the interval, not with what the pause sent.
    /// Returns pages, bytes, frames released and dropped.
    fn transaction(&mut self, seq: u64, decision: Decision) -> Result<Sent, End> {
        let vm = self.vm;
        let mut steps = Steps::default();
        let mut clock = StepClock::start();
        self.gather()?;
        self.pending_blocks.gather(vm);
        steps.dirty = clock.lap();
        // Queued: `vmstate-send`, the pages and the state leave in as few writes as fit.
        self.link.queue(&Control::VmstateSend { seq }).map_err(|e| self.write_failed(e))?;
        let pages = self.send_pending()?;
        let blocks = self.pending_blocks.send(&self.link, vm).map_err(|e| self.write_failed(e))?;
        steps.pages = clock.lap();
        if let Some(d) = self.test.checkpoint_delay {
            // The secondary is to see the checkpoint begun.
            self.link.flush().map_err(|e| self.write_failed(e))?;
            tracing::warn!(target: "colo", ms = d.as_millis() as u64, "test hook: pausing inside the checkpoint");
            std::thread::sleep(d);
            clock.lap();
        }
        // Two hosts: where the secondary's backends restart its VM's inbound frames.
        let rx_marks = if self.compare().one_vm() {
            self.compare().rx_marks().map_err(|e| End::Error(format!("compare process: {e}")))?
        } else {
            vec![]
        };
        steps.marks = clock.lap();
        let state = Box::new(vm.save_state().map_err(|e| End::Error(format!("saving the VM state: {e}")))?);
        let page_digests = match self.test.verify {
            true => Some(page_digests(vm).map_err(|e| End::Error(e.to_string()))?),
            false => None,
        };
        let block_digests = match self.test.verify {
            true => block_digests(vm).map_err(|e| End::Error(e.to_string()))?,
            false => None,
        };
        let record = StateRecord::Paused { state, page_digests, block_digests }.encode();
        let encoded = record.len() as u64;
        let size = Control::VmstateSize { seq, pages, blocks, rx_marks };
        self.link.send_state_then(&record, &size).map_err(|e| self.write_failed(e))?;
        steps.state = clock.lap();
        self.expect("vmstate-received", &Control::VmstateReceived { seq })?;
        steps.received = clock.lap();
        // Output commit: only now may the frames of the interval leave.
        let (released, dropped) =
            self.compare().checkpoint().map_err(|e| End::Error(format!("compare process: {e}")))?;
        if decision.switched {
            let mode = match decision.kind {
                CheckpointKind::Colo => Mode::Colo,
                CheckpointKind::Passive => Mode::Passive,
            };
            self.compare().set_mode(mode).map_err(|e| End::Error(format!("compare process: {e}")))?;
        }
        self.compare().forget_miscompares();
        // The SVM may run now: its output from here on belongs to the next interval.
        self.link.send(&Control::Committed { seq }).map_err(|e| self.write_failed(e))?;
        steps.commit = clock.lap();
        if self.colo.params().resume_before_load {
            self.loading = Some((seq, Instant::now()));
        } else {
            self.expect("vmstate-loaded", &Control::VmstateLoaded { seq })?;
            steps.loaded = clock.lap();
        }
        Ok(Sent { pages, blocks, bytes: (pages + blocks) * PAGE_SIZE as u64 + encoded, released, dropped, steps })
    }

    /// The secondary is lost: release what the compare processes hold and run alone.
    fn fail_over(mut self, end: End) {
        let (reason, error) = match end {
            End::Lost(r) => (r, None),
            End::Error(e) => (e.clone(), Some(e)),
            End::Replaced(why) => return self.step_down(why),
        };
        // The secondary may still be alive (slow, or declared lost by a cluster manager): tell
        // it not to take over. On a broken link this fails, and it does not matter.
        let _ = self.link.send(&Control::Error { message: format!("the primary continues alone: {reason}") });
        tracing::warn!(target: "colo", reason = %reason, "failover: the primary continues unprotected");
        self.link.close();
        let mut compare = self.compare.take();
        let set = match compare.as_mut() {
            // With an arbiter this replica serves alone only while it holds the VM's key: the
            // serving thread decides (within its next look).
            Some(_) if self.colo.arbiter().is_some() => Ok(()),
            Some(c) => c.serve_alone(),
            None => Err(CompareError::Closed),
        };
        if let Err(e) = set {
            // Reconnect: a compare process may have restarted.
            tracing::warn!(target: "colo", error = %e, "serving alone; reconnecting to the compare processes");
            let arbiter = self.colo.arbiter().is_some();
            compare = CompareSet::connect(&self.colo.compare_sockets, Duration::from_secs(5))
                .and_then(|mut c| if arbiter { Ok(c) } else { c.serve_alone().map(|()| c) })
                .map_err(|e| tracing::error!(target: "colo", error = %e, "could not make the compare processes serve this VM alone"))
                .ok();
        }
        *self.colo.compare() = compare;
        self.stop_tracking();
        // The PVM runs whatever happened (a failure in the middle of a checkpoint included).
        if let Err(e) = self.vm.resume() {
            tracing::error!(target: "colo", error = %e, "restarting the PVM");
        }
        self.colo.update(|s| {
            s.failed_over(Role::Primary, &reason, "the PVM's current state");
            s.error = error;
        });
        tracing::info!(target: "colo", "failover complete: the primary runs alone");
    }
}

impl<V: Migratable> Controller<'_, V> {
    fn stop_tracking(&mut self) {
        if std::mem::take(&mut self.tracking) {
            self.vm.stop_dirty_log();
        }
    }

    /// The secondary serves now: this VM must not. It stays paused (for inspection, or `quit`),
    /// and its compare processes release nothing more.
    fn step_down(mut self, why: String) {
        // First of all, nothing more of this VM may reach the LAN: a one-VM backend drops what
        // it holds (a backend of both VMs follows the secondary, which set it already).
        if let Some(c) = self.compare.as_mut() {
            if let Err(e) = c.serve_as_secondary() {
                tracing::error!(target: "colo", error = %e, "could not fence the compare processes");
            }
        }
        self.link.close();
        if let Err(e) = self.vm.pause() {
            tracing::error!(target: "colo", error = %e, "pausing the replaced VM");
        }
        self.stop_tracking();
        let error = format!("the secondary took over ({why}); this VM is paused and must not run again");
        tracing::error!(target: "colo", "{error}");
        self.colo.update(|s| {
            s.state = State::Stopped;
            s.mode = None;
            s.error = Some(error);
        });
    }
}

fn describe(m: &Incoming) -> String {
    match m {
        Incoming::Control(c) => format!("{c:?}"),
        Incoming::Pages(p) => format!("{} bytes of pages", p.len()),
        Incoming::Blocks(b) => format!("{} bytes of disk blocks", b.len()),
        Incoming::State(s) => format!("{} bytes of device state", s.len()),
        Incoming::Closed(w) | Incoming::Corrupt(w) => w.clone(),
    }
}

#[cfg(test)]
#[path = "primary_tests.rs"]
mod tests;
