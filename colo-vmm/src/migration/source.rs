//! The source side: pre-copy rounds, the final pause, the handover.

use std::time::{Duration, Instant};

use std::sync::Arc;

use super::protocol::{Control, Purpose};
use super::status::{update, MigrationParams, MigrationState, MigrationStatus, StatusHandle};
use super::uri::{Channel, MigrationEnds, MigrationUri};
use crate::migratable::{block_digests, page_digests, Migratable, MigratableError};
use crate::persist::message as protocol;
use crate::persist::snapshot::is_zero;
use crate::persist::state::StateRecord;
use crate::persist::stream::{Kind, StreamError, StreamReader, StreamWriter, PAGES_PER_RECORD, PAGE_SIZE};
use crate::vstate::dirty::DirtyBitmap;

/// How long the destination may take to confirm it loaded everything.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long it may take to attach the backends and start.
const RUNNING_TIMEOUT: Duration = Duration::from_secs(30);

/// Fewest pages a round must send for its duration to say something about the per-page cost.
const MEASURABLE: u64 = 256;

/// Why a migration (or the initial transfer of a COLO start) failed.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// The destination cannot be reached.
    #[error("connecting to {uri}: {source}")]
    Connect {
        /// Where.
        uri: MigrationUri,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Writing the stream failed.
    #[error("sending: {0}")]
    Send(#[from] StreamError),
    /// The connection failed.
    #[error("sending: {0}")]
    Io(#[from] std::io::Error),
    /// Pausing, reading or saving the VM failed.
    #[error(transparent)]
    Vm(#[from] MigratableError),
    /// The destination said nothing valid.
    #[error("the destination did not answer: {0}")]
    NoAnswer(#[source] StreamError),
    /// The destination refused.
    #[error("the destination refused: {0}")]
    Refused(String),
    /// The destination answered out of turn.
    #[error("unexpected answer from the destination: {0}")]
    Unexpected(String),
    /// The destination did not confirm that it runs the VM.
    #[error("the destination did not start: {0}")]
    NotStarted(#[source] StreamError),
    /// Something failed, and restarting the VM here failed too.
    #[error("{error}; restarting the VM here also failed: {resume}")]
    NotResumed {
        /// What failed first.
        #[source]
        error: Box<MigrationError>,
        /// Why the VM did not restart.
        resume: MigratableError,
    },
    /// Another migration runs.
    #[error("a migration is already running")]
    Running,
    /// The migration thread could not start.
    #[error("starting the migration thread: {0}")]
    Spawn(#[source] std::io::Error),
}

/// The stream writer of a transfer.
pub type Writer = StreamWriter<Channel>;

/// Sends the pages of `set` (all pages, skipping zero ones, when `skip_zero`).
pub fn send_pages<V: Migratable + ?Sized>(
    w: &mut Writer,
    vm: &V,
    set: impl Iterator<Item = usize>,
    skip_zero: bool,
) -> Result<u64, MigrationError> {
    if !skip_zero {
        return send_pages_in_place(w, vm, set);
    }
    let mut batch: Vec<(u64, Vec<u8>)> = Vec::with_capacity(PAGES_PER_RECORD);
    let mut spare: Vec<Vec<u8>> = Vec::new();
    let mut sent = 0;
    for page in set {
        let gpa = page as u64 * PAGE_SIZE as u64;
        let mut buf = spare.pop().unwrap_or_else(|| vec![0u8; PAGE_SIZE]);
        vm.read_page(page, &mut buf)?;
        if skip_zero && is_zero(&buf) {
            spare.push(buf);
            continue;
        }
        batch.push((gpa, buf));
        if batch.len() == PAGES_PER_RECORD {
            sent += w.pages(batch.iter().map(|(a, d)| (*a, &d[..])))?;
            spare.extend(batch.drain(..).map(|(_, d)| d));
        }
    }
    sent += w.pages(batch.iter().map(|(a, d)| (*a, &d[..])))?;
    Ok(sent)
}

/// [`send_pages`] of every page of `set`. While the VM is paused for a save the pages go to
/// the link straight from guest memory; while it runs, each is read into its record first (its
/// checksum must match what is sent, and the guest may write it meanwhile).
fn send_pages_in_place<V: Migratable + ?Sized>(
    w: &mut Writer,
    vm: &V,
    set: impl Iterator<Item = usize>,
) -> Result<u64, MigrationError> {
    let mut pages = [0usize; PAGES_PER_RECORD];
    let mut addrs = [0u64; PAGES_PER_RECORD];
    let mut n = 0;
    let mut sent = 0;
    let flush = |w: &mut Writer, pages: &[usize], addrs: &[u64]| -> Result<u64, MigrationError> {
        if let Some(r) = vm.with_paused_pages(pages, |slices| w.page_record_from(addrs, slices))? {
            return Ok(r?);
        }
        w.page_record_with(addrs, |i, slot| vm.read_page(pages[i], slot).map_err(MigrationError::from))
    };
    for page in set {
        pages[n] = page;
        addrs[n] = page as u64 * PAGE_SIZE as u64;
        n += 1;
        if n == PAGES_PER_RECORD {
            sent += flush(w, &pages, &addrs)?;
            n = 0;
        }
    }
    if n > 0 {
        sent += flush(w, &pages[..n], &addrs[..n])?;
    }
    Ok(sent)
}

/// Sends the disk blocks of `set` (all blocks, skipping zero ones, when `skip_zero`); none for
/// a VM without a disk or with a read-only one (its blocks never change and are not carried).
pub fn send_blocks<V: Migratable + ?Sized>(
    w: &mut Writer,
    vm: &V,
    set: impl Iterator<Item = u64>,
    skip_zero: bool,
) -> Result<u64, MigrationError> {
    match vm.disk().filter(|d| !d.readonly()) {
        Some(disk) => Ok(crate::persist::snapshot::write_blocks(w, disk, set, skip_zero)?),
        None => Ok(0),
    }
}

/// The disk blocks the guest wrote since the last call, if it has a disk.
fn dirty_blocks<V: Migratable + ?Sized>(vm: &V) -> DirtyBitmap {
    match vm.disk() {
        Some(d) => d.dirty_blocks(),
        None => DirtyBitmap::empty(0),
    }
}

/// What is still dirty: pages and disk blocks.
pub struct DirtySets {
    /// Pages.
    pub pages: DirtyBitmap,
    /// Disk blocks.
    pub blocks: DirtyBitmap,
}

/// A transfer in progress (the VM's dirty tracking is on meanwhile): the channel and the writer.
pub struct Transfer {
    /// The stream towards the destination.
    pub w: Writer,
    /// The connection (for reading answers).
    pub chan: Channel,
    /// Pages sent so far.
    pub total: u64,
    /// Disk blocks sent so far.
    pub blocks: u64,
}

/// Connects, announces the purpose and the machine, and starts dirty tracking.
pub fn connect<V: Migratable + ?Sized>(
    vm: &V,
    uri: &MigrationUri,
    purpose: Purpose,
) -> Result<Transfer, MigrationError> {
    let chan = uri.connect().map_err(|source| MigrationError::Connect { uri: uri.clone(), source })?;
    // The channel gathers small writes itself and passes large ones through (no BufWriter:
    // it would copy gathered pages into its buffer).
    // Pages summed only where the link does not already guarantee them: a sum costs a pass
    // over every page on each side, about a fifth of a checkpoint's page time on one host.
    let mut w: Writer = match chan.delivers_bytes_intact() {
        true => StreamWriter::unsummed_pages(chan.try_clone()?)?,
        false => StreamWriter::new(chan.try_clone()?)?,
    };
    protocol::send(&mut w, &Control::Hello { purpose })?;
    w.record(Kind::State, &StateRecord::Machine(vm.describe()).encode())?;
    vm.start_dirty_log()?;
    Ok(Transfer { w, chan, total: 0, blocks: 0 })
}

/// When the final pause began.
pub struct Paused {
    /// When the vCPU stopped.
    pub at: Instant,
}

/// Restarts the devices and the vCPU after a pause that led nowhere.
pub fn rollback<V: Migratable + ?Sized, E: Into<MigrationError>>(vm: &V, why: E) -> MigrationError {
    match vm.resume() {
        Ok(()) => why.into(),
        Err(resume) => MigrationError::NotResumed { error: Box::new(why.into()), resume },
    }
}

/// Starts migrating `vm` to `uri` on a background thread, reporting progress in `status`;
/// `done` runs when it ends (with whether it completed).
pub fn start<V: Migratable + 'static>(
    vm: Arc<V>,
    uri: MigrationUri,
    params: MigrationParams,
    status: StatusHandle,
    done: impl FnOnce(bool) + Send + 'static,
) -> Result<(), MigrationError> {
    {
        let mut st = status.lock().unwrap_or_else(|p| p.into_inner());
        if st.status == MigrationState::Active {
            return Err(MigrationError::Running);
        }
        *st = MigrationStatus { status: MigrationState::Active, ..Default::default() };
    }
    std::thread::Builder::new()
        .name("migration".into())
        .spawn(move || {
            let ok = match crate::panic_guard::catch(|| migrate(&*vm, &uri, params, &status)) {
                Ok(result) => result.is_ok(),
                Err(e) => {
                    // Whatever it was doing, the VM runs here again.
                    tracing::error!(uri = %uri, error = %e, "migration failed; the VM keeps running here");
                    vm.stop_dirty_log();
                    let _ = vm.resume();
                    update(&status, |s| {
                        s.status = MigrationState::Failed;
                        s.error = Some(format!("the migration thread failed: {e}"));
                    });
                    false
                }
            };
            done(ok);
        })
        .map_err(MigrationError::Spawn)?;
    Ok(())
}

/// Migrates `vm` to `uri`. On success the VM runs at the destination and this one is stopped
/// (its backends released); on failure it runs here as before.
pub fn migrate<V: Migratable + ?Sized>(
    vm: &V,
    uri: &MigrationUri,
    params: MigrationParams,
    status: &StatusHandle,
) -> Result<(), MigrationError> {
    let started = Instant::now();
    let total_pages = vm.page_count() as u64;
    update(status, |s| *s = MigrationStatus { status: MigrationState::Active, total_pages, ..Default::default() });
    let result = run(vm, uri, params, status, started);
    update(status, |s| {
        s.total_time_ms = started.elapsed().as_millis() as u64;
        match &result {
            Ok(()) => s.status = MigrationState::Completed,
            Err(e) => {
                s.status = MigrationState::Failed;
                s.error = Some(e.to_string());
            }
        }
    });
    match &result {
        Ok(()) => tracing::info!(uri = %uri, ms = started.elapsed().as_millis() as u64, "migration completed"),
        Err(e) => tracing::error!(uri = %uri, error = %e, "migration failed; the VM keeps running here"),
    }
    result
}

fn run<V: Migratable + ?Sized>(
    vm: &V,
    uri: &MigrationUri,
    params: MigrationParams,
    status: &StatusHandle,
    started: Instant,
) -> Result<(), MigrationError> {
    let mut t = connect(vm, uri, Purpose::Migrate)?;
    let result = precopy(vm, &mut t, params, status, started)
        .and_then(|dirty| pause_and_send_state(vm, &mut t, dirty, status, params.verify))
        .and_then(|paused| handover(vm, &mut t, &paused, status));
    vm.stop_dirty_log();
    if result.is_err() {
        t.chan.shutdown();
    }
    result
}

/// Pre-copy: all non-zero pages and disk blocks, then rounds of dirty ones until the rest fits
/// the downtime limit (or the rounds run out). Returns the pages and blocks still dirty.
pub fn precopy<V: Migratable + ?Sized>(
    vm: &V,
    t: &mut Transfer,
    params: MigrationParams,
    status: &StatusHandle,
    started: Instant,
) -> Result<DirtySets, MigrationError> {
    let pages = vm.page_count();
    // Round 0: everything that is not zero (the destination starts from zeroed memory, and
    // makes its disk the blocks sent, zero elsewhere).
    let clock = Instant::now();
    t.total = send_pages(&mut t.w, vm, 0..pages, true)?;
    t.blocks = send_blocks(&mut t.w, vm, 0..vm.disk().map_or(0, |d| d.blocks()), true)?;
    protocol::send(&mut t.w, &Control::Round { round: 0, pages: t.total, blocks: t.blocks })?;
    // Seconds per page sent, learned from rounds that sent enough pages to measure (round 0
    // mostly skips zero pages, so its time says little); start from twice the local copy
    // budget (~0.8 µs per page).
    let mut per_page = 2e-6;
    if t.total >= MEASURABLE {
        per_page = (clock.elapsed().as_secs_f64() / t.total as f64).max(0.8e-6);
    }
    let (total, blocks) = (t.total, t.blocks);
    update(status, |s| {
        s.pages_sent = total;
        s.blocks_sent = blocks;
        s.bytes_sent = (total + blocks) * PAGE_SIZE as u64;
    });
    let mut last_collect = Instant::now();
    let mut round = 0;
    loop {
        let dirty = vm.dirty_pages()?;
        let dirty_blocks = dirty_blocks(vm);
        let since = last_collect.elapsed().as_secs_f64().max(1e-3);
        last_collect = Instant::now();
        // A block costs about what a page does (4 KiB read, sent, written).
        let expected_ms = ((dirty.count() + dirty_blocks.count()) as f64 * per_page * 1000.0) as u64;
        update(status, |s| {
            s.rounds = round;
            s.remaining_pages = dirty.count() as u64;
            s.dirty_rate = (dirty.count() as f64 / since) as u64;
            s.expected_downtime_ms = expected_ms;
            s.total_time_ms = started.elapsed().as_millis() as u64;
        });
        if expected_ms <= params.downtime_limit || round >= params.max_rounds {
            return Ok(DirtySets { pages: dirty, blocks: dirty_blocks });
        }
        round += 1;
        let clock = Instant::now();
        let n = send_pages(&mut t.w, vm, dirty.iter(), false)?;
        let b = send_blocks(&mut t.w, vm, dirty_blocks.iter().map(|b| b as u64), false)?;
        protocol::send(&mut t.w, &Control::Round { round, pages: n, blocks: b })?;
        if n + b >= MEASURABLE {
            per_page = (clock.elapsed().as_secs_f64() / (n + b) as f64).max(0.8e-6);
        }
        t.total += n;
        t.blocks += b;
        let (total, blocks) = (t.total, t.blocks);
        update(status, |s| {
            s.pages_sent = total;
            s.blocks_sent = blocks;
            s.bytes_sent = (total + blocks) * PAGE_SIZE as u64;
        });
    }
}

/// The pause: stop the vCPUs and the backends, send the last dirty pages and disk blocks and
/// the device state, and `state-complete`. On failure the VM is running again.
pub fn pause_and_send_state<V: Migratable + ?Sized>(
    vm: &V,
    t: &mut Transfer,
    mut dirty: DirtySets,
    status: &StatusHandle,
    verify: bool,
) -> Result<Paused, MigrationError> {
    let at = Instant::now();
    // vCPUs and backends stopped: from here nothing writes guest memory or the disk.
    vm.pause()?;
    let paused = Paused { at };
    let last = (|| -> Result<(), MigrationError> {
        let more = vm.dirty_pages()?;
        dirty.pages.union(more.words());
        dirty.blocks.union(dirty_blocks(vm).words());
        let last = send_pages(&mut t.w, vm, dirty.pages.iter(), false)?;
        let last_blocks = send_blocks(&mut t.w, vm, dirty.blocks.iter().map(|b| b as u64), false)?;
        update(status, |s| {
            s.final_pages = last;
            s.final_blocks = last_blocks;
        });
        t.total += last;
        t.blocks += last_blocks;
        let state = Box::new(vm.save_state()?);
        // Verify mode: everything is still, this is the memory and disk the destination must
        // end up with.
        let page_digests = if verify { Some(page_digests(vm)?) } else { None };
        let block_digests = if verify { block_digests(vm)? } else { None };
        t.w.record(Kind::State, &StateRecord::Paused { state, page_digests, block_digests }.encode())?;
        protocol::send(&mut t.w, &Control::StateComplete { pages: t.total, blocks: t.blocks })?;
        Ok(())
    })();
    if let Err(e) = last {
        return Err(rollback(vm, e));
    }
    let (total, blocks) = (t.total, t.blocks);
    update(status, |s| {
        s.pages_sent = total;
        s.blocks_sent = blocks;
        s.bytes_sent = (total + blocks) * PAGE_SIZE as u64;
        s.remaining_pages = 0;
    });
    Ok(paused)
}

/// Waits for the destination's first answer (after `state-complete`): a migration message, or
/// for a COLO start the checkpoint link's first.
pub fn answer<M: serde::de::DeserializeOwned>(
    t: &Transfer,
    timeout: Duration,
) -> Result<(StreamReader<Channel>, M), MigrationError> {
    let reader_chan = t.chan.try_clone()?;
    let _ = reader_chan.set_read_timeout(Some(timeout));
    let mut r = StreamReader::new(reader_chan).map_err(MigrationError::NoAnswer)?;
    let c = protocol::recv(&mut r).map_err(MigrationError::NoAnswer)?;
    Ok((r, c))
}

/// Migration's ending: `ready`, release the backends, `go`, `running`.
fn handover<V: Migratable + ?Sized>(
    vm: &V,
    t: &mut Transfer,
    paused: &Paused,
    status: &StatusHandle,
) -> Result<(), MigrationError> {
    let mut r = match answer(t, READY_TIMEOUT) {
        Ok((r, Control::Ready)) => r,
        Ok((_, Control::Error { message })) => return Err(rollback(vm, MigrationError::Refused(message))),
        Ok((_, other)) => return Err(rollback(vm, MigrationError::Unexpected(format!("{other:?}")))),
        Err(e) => return Err(rollback(vm, e)),
    };
    // Hand the backends over.
    vm.release_backends();
    let chan = &t.chan;
    let handed = protocol::send(&mut t.w, &Control::Go).map_err(MigrationError::from).and_then(|()| {
        let _ = chan.set_read_timeout(Some(RUNNING_TIMEOUT));
        match protocol::recv(&mut r) {
            Ok(Control::Running) => Ok(()),
            Ok(other) => Err(MigrationError::Unexpected(format!("{other:?}"))),
            Err(e) => Err(MigrationError::NotStarted(e)),
        }
    });
    if let Err(e) = handed {
        // Take the backends back and carry on here.
        let back = vm.reattach_backends();
        let resumed = vm.resume();
        return Err(match back.and(resumed) {
            Ok(()) => e,
            Err(resume) => MigrationError::NotResumed { error: Box::new(e), resume },
        });
    }
    update(status, |s| s.downtime_ms = paused.at.elapsed().as_millis() as u64);
    let _ = t.w.flush();
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;
    use std::sync::mpsc;

    use super::*;
    use crate::colo::testing::{FakeVm, Log};

    /// A destination that takes one connection and reads whatever comes until it closes.
    fn drain(uri: &MigrationUri) -> std::thread::JoinHandle<()> {
        let listener = uri.listen().expect("listen");
        std::thread::spawn(move || {
            if let Ok(mut c) = listener.accept() {
                let _ = std::io::copy(&mut c, &mut std::io::sink());
            }
        })
    }

    #[test]
    fn a_panic_in_the_migration_thread_fails_the_migration_with_its_message_and_the_vm_runs_on() {
        // Issue 12, item 1: a role's thread that died left its status as it was (`active` for
        // ever) and, mid-pause, the VM paused.
        for during_pause in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let uri: MigrationUri = format!("unix:{}", dir.path().join("m.sock").display()).parse().unwrap();
            let dest = drain(&uri);
            let log = Log::default();
            let vm = Arc::new(FakeVm::new(&log, 16));
            vm.guest_writes(3, 7);
            let which = if during_pause { &vm.paused_dirty_pages_panic } else { &vm.dirty_pages_panic };
            which.store(true, Ordering::Relaxed);
            let status = StatusHandle::default();
            let (tx, rx) = mpsc::channel();
            start(vm.clone(), uri, MigrationParams::default(), status.clone(), move |ok| tx.send(ok).unwrap()).unwrap();
            let ok = rx.recv_timeout(Duration::from_secs(10)).expect("the migration ends");
            assert!(!ok, "during pause: {during_pause}");
            let s = status.lock().unwrap().clone();
            assert_eq!(s.status, MigrationState::Failed, "during pause: {during_pause}");
            let error = s.error.unwrap_or_default();
            assert!(
                error.contains("the migration thread failed") && error.contains("the fake's dirty log broke"),
                "{error}"
            );
            assert!(!vm.is_paused(), "the VM runs again (during pause: {during_pause})");
            assert!(log.contains("vm: stop-dirty-log"));
            if during_pause {
                log.assert_order(&[("vm: pause", "vm: resume")]);
            }
            dest.join().unwrap();
        }
    }
}
