//! The secondary: it receives the primary's VM by the initial transfer, runs it as the SVM with
//! its own backend connection, and serves checkpoints (docs/colo.md):
//! 1. `checkpoint-request` → pause the SVM and quiesce its rings, `checkpoint-reply`;
//! 3. and 4. pages go to the RAM cache, then the device state; `vmstate-received`;
//! 6. copy into guest memory every page either side dirtied since the last checkpoint
//!    (received ∪ the SVM's own, from KVM, the VMM and its backend's log), load the vCPU, VM and
//!    device state (the rings restart where the primary's stood), `vmstate-loaded`; on the
//!    primary's `committed` (its output commit is done), resume the vCPUs unless passive.
//!
//! The rings stop at step 1, before the primary stops its own (it pauses only after our reply):
//! an inbound frame then either reaches the PVM before its pause (and the SVM with the
//! checkpoint) or waits in the SVM's backend until the rings restart. Stopped only at step 6, a
//! frame arriving in between would be written into the SVM's ring and overwritten by the
//! checkpoint, lost to the SVM — a backend that cannot see the primary's rings (colo-proxy on
//! taps) could not repair that. The price: a frame that arrives between the two pauses reaches
//! the SVM twice (in the checkpoint and after it), which TCP ignores.
//!
//! Failover (link broken, heartbeat silent, or `lost-heartbeat`): a checkpoint received
//! completely is loaded first (its output may have been released); otherwise the SVM resumes
//! as it is (COLO: its state agrees with everything released; passive: it holds the last
//! checkpoint), its rings where they stopped. Every compare process is set to `secondary-only`
//! first, so none takes the SVM for a VM loading a checkpoint of the primary.

use std::io::BufReader;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::blocks::BlockCache;
use super::cache::RamCache;
use super::compare::CompareSet;
use super::hybrid::CheckpointKind;
use super::link::{Incoming, Link, Silence};
use super::message::Control;
use super::params::ms;
use super::shared::ColoShared;
use super::status::{Role, State, Trigger};
use super::takeover;
use crate::migratable::{differing_blocks, differing_pages, Migratable};
use crate::migration::uri::Channel;
use crate::persist::state::{MachineState, StateRecord};
use crate::persist::stream::{pages as stream_pages, StreamReader, StreamWriter};
use crate::vmm::{BootError, Core, VmConfig, Vmm};
use crate::vstate::dirty::DirtyBitmap;

/// What still has to run once the secondary's VMM exists.
pub struct SecondaryRunner {
    reader: StreamReader<BufReader<Channel>>,
    writer: StreamWriter<Channel>,
    chan: Channel,
    cache: RamCache,
    colo: Arc<ColoShared>,
    /// The compare processes, when they serve this VM only (two hosts): told the role now,
    /// the marks at each checkpoint, the takeover at failover.
    compare: Option<CompareSet>,
    /// With an arbiter: the primary's replica name (the key's holder at COLO start).
    primary_name: Option<String>,
    /// The primary's disk blocks of the checkpoint in flight.
    blocks: BlockCache,
}

/// Starts the SVM from the initial transfer: attaches this VMM's own backends, takes over the
/// state, fills the RAM cache (from the pages the transfer `written`), starts dirty tracking
/// and the vCPU, says `checkpoint-ready`.
#[allow(clippy::too_many_arguments)]
pub fn start(
    config: &VmConfig,
    core: Core,
    state: MachineState,
    written: &DirtyBitmap,
    reader: StreamReader<BufReader<Channel>>,
    mut writer: StreamWriter<Channel>,
    chan: Channel,
    colo: &Arc<ColoShared>,
) -> Result<(Vmm, SecondaryRunner), BootError> {
    let err = |what: &'static str| move |e: &dyn std::fmt::Display| BootError::Other { what, error: e.to_string() };
    // Two hosts: this host's backends must know the VM is a secondary before it runs (until
    // then they pass nothing), and the primary must know where their frame links listen.
    let compare = secondary_backends(colo).map_err(|e| err("compare processes")(&e))?;
    let frame_links = compare.as_ref().map(CompareSet::frame_links).unwrap_or_default();
    // The SVM's own writes go to its disk's overlay from its first instruction on.
    if let Some(disk) = core.disk() {
        disk.buffer_writes()?;
    }
    let blocks = BlockCache::new(core.disk())?;
    let mut machine = core.attach(config)?;
    Vmm::apply_state(&mut machine, state, &config.serial)?;
    // Only the pages the migration wrote: the primary waits paused meanwhile.
    let cache = RamCache::copy_pages_of(machine.ram().memory(), machine.ram().size(), written)
        .map_err(|e| err("RAM cache")(&e))?;
    machine.start_dirty_log().map_err(|e| err("dirty tracking")(&e))?;
    let vmm = machine.start()?;
    let replica = colo.arbiter().map(|c| c.me().to_string());
    crate::persist::message::send(&mut writer, &Control::CheckpointReady { frame_links, replica })?;
    colo.update(|s| {
        s.role = Role::Secondary;
        s.state = State::Running;
        s.mode = Some(CheckpointKind::Colo);
    });
    tracing::info!(target: "colo", "secondary running; COLO started");
    // With an arbiter: the serving primary holds the VM's key; a standby is one no more.
    let primary_name = colo.arbiter().and_then(|c| {
        c.unregister_standby();
        c.holder().ok().flatten()
    });
    Ok((vmm, SecondaryRunner { reader, writer, chan, cache, colo: colo.clone(), compare, primary_name, blocks }))
}

/// Connects to the compare processes when they serve this VM only and sets them secondary;
/// `None` when they serve both VMs (one host: the primary drives them until a failover).
fn secondary_backends(colo: &ColoShared) -> Result<Option<CompareSet>, super::compare::CompareError> {
    if colo.compare_sockets.is_empty() {
        return Ok(None);
    }
    let mut c = CompareSet::connect(&colo.compare_sockets, Duration::from_secs(10))?;
    if !c.one_vm() {
        return Ok(None);
    }
    c.serve_as_secondary()?;
    Ok(Some(c))
}

/// Why a complete checkpoint could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// Its state does not decode.
    #[error(transparent)]
    State(#[from] crate::persist::stream::StreamError),
    /// The SVM refused it (dirty log, memory, vCPU, devices).
    #[error(transparent)]
    Vm(#[from] crate::migratable::MigratableError),
    /// Verify mode: memory differs from the paused PVM's.
    #[error("verify: {count} pages differ from the primary's (first: {first})")]
    Verify {
        /// How many.
        count: usize,
        /// The first few addresses.
        first: String,
    },
    /// The disk failed.
    #[error(transparent)]
    Disk(#[from] crate::devices::block::disk::DiskError),
    /// Verify mode: the disk differs from the paused PVM's.
    #[error("verify: {count} disk blocks differ from the primary's (first: {first})")]
    VerifyBlocks {
        /// How many.
        count: usize,
        /// The first few block numbers.
        first: String,
    },
}

/// Where a checkpoint stands on this side.
enum Phase {
    /// Between checkpoints.
    Idle,
    /// Paused for checkpoint `seq`; receiving.
    Receiving { seq: u64, passive: bool, trigger: Trigger, pages: u64, state: Option<Vec<u8>>, started: Instant },
    /// Checkpoint `seq` is loaded; the SVM waits paused for the primary's `committed`, and
    /// then resumes unless the checkpoint is passive.
    Loaded { seq: u64, passive: bool },
}

/// Why COLO ended on the secondary.
enum End {
    /// The primary is gone or declared lost: take over. `gone`: its process is known to be
    /// gone (the link ended with a reset or EOF) or the operator said so (`lost-heartbeat`);
    /// otherwise it fell silent, and may be alive behind a cut link.
    Lost { reason: String, gone: bool },
    /// COLO cannot go on, but the primary may be alive and serving: keep the SVM paused at the
    /// last complete checkpoint and wait for a failover decision. `tell`: say so to the primary.
    Error { why: String, tell: bool },
}

impl SecondaryRunner {
    /// Runs the checkpoint loop on its own thread until failover.
    pub fn spawn<V: Migratable + 'static>(self, vm: Arc<V>) {
        std::thread::Builder::new()
            .name("colo-secondary".into())
            .spawn(move || self.run(&*vm))
            .expect("spawn the secondary");
    }

    fn run<V: Migratable>(self, vm: &V) {
        let SecondaryRunner { reader, writer, chan, cache, colo, compare, primary_name, blocks } = self;
        let colo = &*colo;
        let received = DirtyBitmap::empty(vm.page_count());
        let mut svm = Svm { cache, received, compare, blocks };
        let mut link = Link::new(reader, writer, chan, colo.heartbeat_ms.clone());
        colo.watch_link(link.watch());
        let mut phase = Phase::Idle;
        let end = loop {
            match crate::panic_guard::catch(|| svm.step(vm, colo, &mut link, &mut phase)) {
                Ok(Ok(())) => {}
                Ok(Err(end)) => break end,
                // COLO cannot go on, but a failover decision must stay possible.
                Err(e) => break End::Error { why: format!("the secondary failed: {e}"), tell: true },
            }
        };
        let mid_checkpoint = matches!(phase, Phase::Receiving { .. });
        let reason = match end {
            End::Lost { reason, gone } => {
                if let Some(claim) = colo.arbiter() {
                    // The arbiter decides who serves: take over only with the VM's key.
                    takeover::wait_for_key(claim, colo, gone, primary_name.as_deref());
                }
                // If the primary is alive after all (stopped, or cut off only one way), it must
                // step down rather than serve alongside.
                let _ = link.send(&Control::TakenOver { reason: reason.clone() });
                reason
            }
            End::Error { why, tell } => {
                if tell {
                    let _ = link.send(&Control::Error { message: why.clone() });
                }
                link.close();
                if let Err(e) = vm.pause() {
                    tracing::error!(target: "colo", error = %e, "pausing the SVM");
                }
                tracing::error!(target: "colo", error = %why, "COLO ended; the SVM waits paused for a failover decision (lost-heartbeat)");
                colo.update(|s| {
                    s.state = State::Stopped;
                    s.error = Some(why.clone());
                });
                while !colo.lost_heartbeat.swap(false, Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(50));
                }
                format!("lost-heartbeat command after: {why}")
            }
        };
        drop(link);
        svm.failover(vm, colo, &reason, mid_checkpoint);
    }
}

/// A write to the primary failed: if it said why before closing (it continues alone), this
/// side must not take over.
fn write_failed<W: std::io::Write + Send + 'static>(link: &mut Link<W>, e: impl std::fmt::Display) -> End {
    match link.last_words(Duration::from_millis(200)) {
        Some(Control::Error { message }) => {
            End::Error { why: format!("the primary ended COLO: {message}"), tell: false }
        }
        _ => End::Lost { reason: e.to_string(), gone: true },
    }
}

/// The SVM's side of checkpoints: the RAM cache (the SVM's own writes are tracked by the VM's
/// dirty log, on since the start). Between the pause at step 1 and the checkpoint's load, the
/// VM keeps the SVM's own device state: what a failover resumes its rings from.
struct Svm {
    cache: RamCache,
    /// Pages received from the primary since the last checkpoint was loaded.
    received: DirtyBitmap,
    /// The compare processes when they serve this VM only (two hosts).
    compare: Option<CompareSet>,
    /// The primary's disk blocks since the last loaded checkpoint.
    blocks: BlockCache,
}

impl Svm {
    /// Handles one message (or a quiet moment) from the primary.
    fn step<V: Migratable>(
        &mut self,
        vm: &V,
        colo: &ColoShared,
        link: &mut Link<Channel>,
        phase: &mut Phase,
    ) -> Result<(), End> {
        let error = |why: String| End::Error { why, tell: true };
        if colo.lost_heartbeat.swap(false, Ordering::Relaxed) {
            return Err(End::Lost { reason: "lost-heartbeat command".into(), gone: true });
        }
        // Read before judging silence (see the primary's check_peer).
        let msg = match link.recv(Duration::from_millis(20)) {
            Ok(m) => m,
            Err(Silence::Timeout) => {
                let timeout = ms(colo.params().heartbeat_timeout);
                if link.peer_silent(timeout) {
                    let reason = format!("no heartbeat from the primary for {} ms", timeout.as_millis());
                    return Err(End::Lost { reason, gone: false });
                }
                return Ok(());
            }
            Err(Silence::Closed(why)) => {
                return Err(End::Lost { reason: format!("checkpoint link broken: {why}"), gone: true })
            }
            Err(Silence::Corrupt(why)) => {
                return Err(error(format!("corrupt checkpoint stream from the primary: {why}")))
            }
        };
        match (msg, &mut *phase) {
            (Incoming::Pages(p), ph) => {
                let mut n = 0;
                for (gpa, data) in stream_pages(&p) {
                    if !self.cache.store(gpa, data) {
                        return Err(error(format!("the primary sent page {gpa:#x}, outside guest memory")));
                    }
                    self.received.set((gpa / 4096) as usize);
                    n += 1;
                }
                if let Phase::Receiving { pages, .. } = ph {
                    *pages += n;
                }
                link.recycle(p);
            }
            (Incoming::Control(Control::CheckpointRequest { seq, passive, trigger }), Phase::Idle) => {
                // Stop the rings before replying: see the module's comment.
                vm.pause().map_err(|e| error(format!("checkpoint {seq}: stopping the SVM and its rings: {e}")))?;
                link.send(&Control::CheckpointReply { seq }).map_err(|e| write_failed(link, e))?;
                let trigger = Trigger::parse(&trigger);
                *phase = Phase::Receiving { seq, passive, trigger, pages: 0, state: None, started: Instant::now() };
            }
            (Incoming::Blocks(b), _) => {
                self.blocks.store(&b).map_err(|e| error(format!("disk blocks from the primary: {e}")))?;
                link.recycle(b);
            }
            (Incoming::Control(Control::VmstateSend { seq }), Phase::Receiving { seq: s, pages, .. }) if seq == *s => {
                // Pages (and blocks) streamed in the background before this point are not part
                // of the count.
                *pages = 0;
                self.blocks.start_checkpoint();
            }
            (Incoming::State(st), Phase::Receiving { state, .. }) => *state = Some(st),
            (
                Incoming::Control(Control::VmstateSize { seq, pages: n, blocks, rx_marks }),
                Phase::Receiving { seq: s, pages, state, .. },
            ) if seq == *s => {
                if n != *pages || state.is_none() || blocks != self.blocks.received() {
                    return Err(error(format!(
                        "checkpoint {seq}: the primary sent {n} pages, {blocks} disk blocks and {} device state, {} pages and {} blocks arrived",
                        if state.is_some() { "its" } else { "no" },
                        pages,
                        self.blocks.received()
                    )));
                }
                let Phase::Receiving { passive, trigger, state, started, .. } = std::mem::replace(phase, Phase::Idle)
                else {
                    unreachable!("matched above")
                };
                let state = state.expect("checked");
                // The checkpoint is complete here: from the moment the primary hears this, it may
                // release the interval's output, so the SVM loads it whatever happens next.
                let told = link.send(&Control::VmstateReceived { seq });
                if let Some(c) = self.compare.as_mut() {
                    // The SVM's rings are stopped: its inbound queue restarts at the mark, so it
                    // gets exactly the frames the PVM had not taken at its pause.
                    c.resync(&rx_marks).map_err(|e| error(format!("checkpoint {seq}: compare process: {e}")))?;
                    c.forget_miscompares();
                }
                self.load(vm, colo, state, passive, &trigger, started)
                    .map_err(|e| error(format!("loading checkpoint {seq}: {e}")))?;
                *phase = Phase::Loaded { seq, passive };
                told.map_err(|e| write_failed(link, e))?;
                link.send(&Control::VmstateLoaded { seq }).map_err(|e| write_failed(link, e))?;
            }
            (Incoming::Control(Control::Committed { seq }), Phase::Loaded { seq: s, passive }) if seq == *s => {
                // Resumed any earlier, the SVM could send before the primary's compare
                // processes flush the interval: its first answers would be dropped with the
                // interval's output, and the next one start with a miscompare.
                if !*passive {
                    vm.resume().map_err(|e| error(format!("checkpoint {seq}: resuming the SVM: {e}")))?;
                }
                *phase = Phase::Idle;
            }
            (Incoming::Control(Control::HeartbeatParameters { interval_ms, timeout_ms }), _) => {
                colo.set_heartbeat(interval_ms, timeout_ms)
                    .map_err(|e| error(format!("bad heartbeat parameters from the primary: {e}")))?;
                tracing::info!(target: "colo", interval_ms, timeout_ms, "heartbeat parameters from the primary");
            }
            (Incoming::Control(Control::Error { message }), _) => {
                return Err(End::Error { why: format!("the primary ended COLO: {message}"), tell: false })
            }
            (Incoming::Control(other), _) => {
                return Err(error(format!("unexpected message from the primary: {other:?}")))
            }
            (Incoming::State(_), _) => return Err(error("device state outside a checkpoint".into())),
            (Incoming::Closed(why), _) => return Err(End::Lost { reason: why, gone: true }),
            (Incoming::Corrupt(why), _) => return Err(error(why)),
        }
        Ok(())
    }

    /// Step 6: the SVM takes the checkpoint.
    fn load<V: Migratable>(
        &mut self,
        vm: &V,
        colo: &ColoShared,
        state: Vec<u8>,
        passive: bool,
        trigger: &Trigger,
        started: Instant,
    ) -> Result<(), LoadError> {
        let len = state.len() as u64;
        let (machine, digests, block_digests) = StateRecord::decode(&state)?.into_parts()?;
        // The rings stopped at step 1, so the backend no longer writes guest memory: gather
        // what the SVM changed since the last checkpoint.
        let own = vm.dirty_pages()?;
        self.received.union(own.words());
        let n = self.cache.apply(self.received.iter(), |p, data| vm.write_page(p, data))?;
        if let Some(digests) = digests {
            // Test mode: memory must now equal the paused PVM's, page for page.
            let diff = differing_pages(vm, &digests)?;
            if !diff.is_empty() {
                let first: Vec<String> = diff.iter().take(8).map(|a| format!("{a:#x}")).collect();
                return Err(LoadError::Verify { count: diff.len(), first: first.join(", ") });
            }
            tracing::info!(target: "colo", "verified: the SVM's memory equals the PVM's page for page");
        }
        vm.restore_state(machine)?;
        // The disk: the SVM's own writes go, the primary's blocks go into the image.
        let disk = self.blocks.load(vm)?;
        if let Some(digests) = block_digests {
            let diff = differing_blocks(vm, &digests)?;
            if !diff.is_empty() {
                let first: Vec<String> = diff.iter().take(8).map(u64::to_string).collect();
                return Err(LoadError::VerifyBlocks { count: diff.len(), first: first.join(", ") });
            }
            tracing::info!(target: "colo", "verified: the SVM's disk equals the PVM's block for block");
        }
        // Our own copying is not the SVM's writing.
        let _ = vm.dirty_pages();
        self.received = DirtyBitmap::empty(self.received.words().len() * 64);
        let kind = if passive { CheckpointKind::Passive } else { CheckpointKind::Colo };
        colo.update(|s| {
            s.mode = Some(kind);
            s.checkpoint(kind, trigger, Duration::ZERO, started.elapsed(), n, n * 4096 + len);
            s.checkpoint_blocks(disk.applied);
            s.disk.svm_blocks_discarded += disk.discarded;
        });
        tracing::info!(target: "colo", kind = ?kind, trigger = %trigger, pages = n, ms = started.elapsed().as_millis() as u64, "checkpoint loaded");
        Ok(())
    }

    fn failover<V: Migratable>(mut self, vm: &V, colo: &ColoShared, reason: &str, mid_checkpoint: bool) {
        let from = if mid_checkpoint {
            "the SVM's own state (the checkpoint in flight was incomplete)"
        } else {
            "the SVM's current state"
        };
        tracing::warn!(target: "colo", reason, "failover: the secondary takes over");
        vm.stop_dirty_log();
        // The disk that matches the SVM's memory: its own writes since the last loaded
        // checkpoint, not the primary's blocks of a checkpoint in flight.
        match self.blocks.fail_over(vm) {
            Ok(kept) => tracing::info!(target: "colo", blocks = kept, "the SVM's own disk writes are its disk's now"),
            Err(e) => tracing::error!(target: "colo", error = %e, "keeping the SVM's disk writes failed"),
        }
        // Before the rings restart: a compare process in COLO mode would take a secondary
        // restarting its rings for one that loaded a checkpoint of the primary.
        // A connection made at the start may be gone (a backend restarted): then a new one.
        let took = match self.compare.as_mut().map(CompareSet::take_over) {
            Some(Ok(())) => Ok(()),
            _ => CompareSet::connect(&colo.compare_sockets, Duration::from_secs(5)).and_then(|mut c| c.take_over()),
        };
        if let Err(e) = took {
            tracing::error!(target: "colo", error = %e, "could not make the compare processes serve the survivor")
        }
        // The SVM's rings restart where they stopped (if a checkpoint had stopped them).
        if let Err(e) = vm.resume() {
            tracing::error!(target: "colo", error = %e, "restarting the SVM failed: it may have no network");
        }
        colo.update(|s| s.failed_over(Role::Secondary, reason, from));
        tracing::info!(target: "colo", "failover complete: the secondary runs alone");
    }
}

#[cfg(test)]
#[path = "secondary_tests.rs"]
mod tests;
