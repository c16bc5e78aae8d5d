//! The source side: pre-copy rounds, the final pause, the handover.

use std::io::BufWriter;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};

use super::protocol::{self, Control};
use super::status::{update, MigrationParams, MigrationState, MigrationStatus, StatusHandle};
use super::uri::{Channel, MigrationUri};
use crate::persist::sections::Sections;
use crate::persist::snapshot::{self, is_zero};
use crate::persist::stream::{Kind, StreamReader, StreamWriter, PAGES_PER_RECORD, PAGE_SIZE};
use crate::persist::vm_state;
use crate::vmm::Vmm;
use crate::vstate::dirty::{DirtyBitmap, DirtyTracker};

/// How long the destination may take to confirm it loaded everything.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long it may take to attach the backends and start.
const RUNNING_TIMEOUT: Duration = Duration::from_secs(30);

/// State section carrying the source's page digests in verify mode.
pub const VERIFY_SECTION: &str = "verify.page-digests";

/// Fewest pages a round must send for its duration to say something about the per-page cost.
const MEASURABLE: u64 = 256;

type Writer = StreamWriter<BufWriter<Channel>>;

/// Sends the pages of `set` (all pages, skipping zero ones, when `skip_zero`).
fn send_pages(w: &mut Writer, vmm: &Vmm, set: impl Iterator<Item = usize>, skip_zero: bool) -> Result<u64, String> {
    let mem = vmm.ram().memory();
    let mut batch: Vec<(u64, Vec<u8>)> = Vec::with_capacity(PAGES_PER_RECORD);
    let mut spare: Vec<Vec<u8>> = Vec::new();
    let mut sent = 0;
    for page in set {
        let gpa = page as u64 * PAGE_SIZE as u64;
        let mut buf = spare.pop().unwrap_or_else(|| vec![0u8; PAGE_SIZE]);
        mem.read_slice(&mut buf, GuestAddress(gpa)).map_err(|e| format!("reading guest page {gpa:#x}: {e}"))?;
        if skip_zero && is_zero(&buf) {
            spare.push(buf);
            continue;
        }
        batch.push((gpa, buf));
        if batch.len() == PAGES_PER_RECORD {
            sent += w.pages(batch.iter().map(|(a, d)| (*a, &d[..]))).map_err(|e| format!("sending pages: {e}"))?;
            spare.extend(batch.drain(..).map(|(_, d)| d));
        }
    }
    sent += w.pages(batch.iter().map(|(a, d)| (*a, &d[..]))).map_err(|e| format!("sending pages: {e}"))?;
    Ok(sent)
}

/// Migrates `vmm` to `uri`. On success the VM runs at the destination and this one is stopped
/// (its backends released); on failure it runs here as before.
pub fn migrate(vmm: &Vmm, uri: &MigrationUri, params: MigrationParams, status: &StatusHandle) -> Result<(), String> {
    let started = Instant::now();
    let total_pages = vmm.ram().size() / PAGE_SIZE as u64;
    update(status, |s| *s = MigrationStatus { status: MigrationState::Active, total_pages, ..Default::default() });
    let result = run(vmm, uri, params, status, started);
    update(status, |s| {
        s.total_time_ms = started.elapsed().as_millis() as u64;
        match &result {
            Ok(()) => s.status = MigrationState::Completed,
            Err(e) => {
                s.status = MigrationState::Failed;
                s.error = Some(e.clone());
            }
        }
    });
    match &result {
        Ok(()) => tracing::info!(uri = %uri, ms = started.elapsed().as_millis() as u64, "migration completed"),
        Err(e) => tracing::error!(uri = %uri, error = %e, "migration failed; the VM keeps running here"),
    }
    result
}

fn run(
    vmm: &Vmm,
    uri: &MigrationUri,
    params: MigrationParams,
    status: &StatusHandle,
    started: Instant,
) -> Result<(), String> {
    let chan = uri.connect().map_err(|e| format!("connecting to {uri}: {e}"))?;
    let mut w: Writer =
        StreamWriter::new(BufWriter::with_capacity(1 << 20, chan.try_clone().map_err(|e| e.to_string())?))
            .map_err(|e| format!("starting the stream: {e}"))?;
    let mut meta = Sections::new();
    meta.put_json("meta", &vmm.meta());
    w.record(Kind::State, &meta.encode()).map_err(|e| format!("sending: {e}"))?;
    let tracker = DirtyTracker::start(vmm.vm(), vmm.ram(), vmm.dirty_logs()).map_err(|e| e.to_string())?;
    let result = precopy_and_handover(vmm, &mut w, &chan, &tracker, params, status, started);
    tracker.stop(vmm.vm(), vmm.ram());
    if result.is_err() {
        chan.shutdown();
    }
    result
}

fn precopy_and_handover(
    vmm: &Vmm,
    w: &mut Writer,
    chan: &Channel,
    tracker: &DirtyTracker,
    params: MigrationParams,
    status: &StatusHandle,
    started: Instant,
) -> Result<(), String> {
    let pages = (vmm.ram().size() / PAGE_SIZE as u64) as usize;
    // Round 0: everything that is not zero (the destination starts from zeroed memory).
    let t = Instant::now();
    let mut total = send_pages(w, vmm, 0..pages, true)?;
    protocol::send(w, &Control::Round { round: 0, pages: total }).map_err(|e| e.to_string())?;
    // Seconds per page sent, learned from rounds that sent enough pages to measure (round 0
    // mostly skips zero pages, so its time says little); start from twice the local copy
    // budget (~0.8 µs per page).
    let mut per_page = 2e-6;
    if total >= MEASURABLE {
        per_page = (t.elapsed().as_secs_f64() / total as f64).max(0.8e-6);
    }
    update(status, |s| {
        s.pages_sent = total;
        s.bytes_sent = total * PAGE_SIZE as u64;
    });
    let mut last_collect = Instant::now();
    let mut round = 0;
    loop {
        let dirty = tracker.collect(vmm.vm(), vmm.ram()).map_err(|e| e.to_string())?;
        let since = last_collect.elapsed().as_secs_f64().max(1e-3);
        last_collect = Instant::now();
        let expected_ms = (dirty.count() as f64 * per_page * 1000.0) as u64;
        update(status, |s| {
            s.rounds = round;
            s.remaining_pages = dirty.count() as u64;
            s.dirty_rate = (dirty.count() as f64 / since) as u64;
            s.expected_downtime_ms = expected_ms;
            s.total_time_ms = started.elapsed().as_millis() as u64;
        });
        if expected_ms <= params.downtime_limit || round >= params.max_rounds {
            return finish(vmm, w, chan, tracker, dirty, total, status, params.verify);
        }
        round += 1;
        let t = Instant::now();
        let n = send_pages(w, vmm, dirty.iter(), false)?;
        protocol::send(w, &Control::Round { round, pages: n }).map_err(|e| e.to_string())?;
        if n >= MEASURABLE {
            per_page = (t.elapsed().as_secs_f64() / n as f64).max(0.8e-6);
        }
        total += n;
        update(status, |s| {
            s.pages_sent = total;
            s.bytes_sent = total * PAGE_SIZE as u64;
        });
    }
}

/// The pause: last pages, device state, handover.
#[allow(clippy::too_many_arguments)]
fn finish(
    vmm: &Vmm,
    w: &mut Writer,
    chan: &Channel,
    tracker: &DirtyTracker,
    mut dirty: DirtyBitmap,
    mut total: u64,
    status: &StatusHandle,
    verify: bool,
) -> Result<(), String> {
    let paused_at = Instant::now();
    if !vmm.vcpu().pause() {
        return Err("the guest stopped during the migration".into());
    }
    // vCPU saved and backends quiesced: from here nothing writes guest memory.
    let (mut state, devices) = match vmm.save_vcpu_and_devices() {
        Ok(v) => v,
        Err(e) => {
            vmm.vcpu().resume();
            return Err(e.to_string());
        }
    };
    let rollback = |why: String| -> String {
        let resumed = vmm.vcpu().run_paused({
            let d = devices.clone();
            move |_, devs| devs.resume(&d)
        });
        vmm.vcpu().resume();
        match resumed {
            Some(Ok(())) => why,
            other => format!("{why}; restarting the devices also failed: {other:?}"),
        }
    };
    let last = (|| -> Result<(), String> {
        let more = tracker.collect(vmm.vm(), vmm.ram()).map_err(|e| e.to_string())?;
        dirty.union(more.words());
        let last = send_pages(w, vmm, dirty.iter(), false)?;
        update(status, |s| s.final_pages = last);
        total += last;
        vm_state::save(vmm.vm().fd(), &mut state).map_err(|e| e.to_string())?;
        if verify {
            // Everything is still: this is the memory the destination must end up with.
            let d = snapshot::page_digests(vmm.ram().memory(), vmm.ram().size()).map_err(|e| e.to_string())?;
            state.put_bytes(VERIFY_SECTION, snapshot::encode_digests(&d));
        }
        w.record(Kind::State, &state.encode()).map_err(|e| format!("sending the device state: {e}"))?;
        protocol::send(w, &Control::StateComplete { pages: total }).map_err(|e| e.to_string())?;
        Ok(())
    })();
    if let Err(e) = last {
        return Err(rollback(e));
    }
    update(status, |s| {
        s.pages_sent = total;
        s.bytes_sent = total * PAGE_SIZE as u64;
        s.remaining_pages = 0;
    });
    let reader_chan = chan.try_clone().map_err(|e| rollback(e.to_string()))?;
    let _ = reader_chan.set_read_timeout(Some(READY_TIMEOUT));
    let mut r = match StreamReader::new(reader_chan) {
        Ok(r) => r,
        Err(e) => return Err(rollback(format!("the destination did not answer: {e}"))),
    };
    match protocol::recv(&mut r) {
        Ok(Control::Ready) => {}
        Ok(Control::Error { message }) => return Err(rollback(format!("the destination refused: {message}"))),
        Ok(other) => return Err(rollback(format!("unexpected answer from the destination: {other:?}"))),
        Err(e) => return Err(rollback(format!("the destination did not confirm: {e}"))),
    }
    // Hand the backends over.
    vmm.vcpu().run_paused(|_, d| d.disconnect());
    let handed = protocol::send(w, &Control::Go).map_err(|e| e.to_string()).and_then(|()| {
        let _ = chan.set_read_timeout(Some(RUNNING_TIMEOUT));
        match protocol::recv(&mut r) {
            Ok(Control::Running) => Ok(()),
            Ok(other) => Err(format!("unexpected answer from the destination: {other:?}")),
            Err(e) => Err(format!("the destination did not start: {e}")),
        }
    });
    if let Err(e) = handed {
        // Take the backends back and carry on here.
        let back = vmm.vcpu().run_paused({
            let d = devices.clone();
            move |_, devs| devs.reconnect(&d)
        });
        vmm.vcpu().resume();
        return Err(match back {
            Some(Ok(())) => e,
            other => format!("{e}; re-attaching the backends failed too: {other:?}"),
        });
    }
    update(status, |s| s.downtime_ms = paused_at.elapsed().as_millis() as u64);
    let _ = w.flush();
    Ok(())
}
