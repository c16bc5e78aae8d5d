//! The destination side: `colo-vmm run --incoming URI`.

use std::io::BufReader;
use std::sync::Arc;
use std::time::Instant;

use super::protocol::{Control, Purpose};
use super::uri::{Channel, MigrationEnds, MigrationUri};
use crate::colo::shared::ColoShared;
use crate::persist::message as protocol;
use crate::persist::snapshot::{self, load_pages, Meta};
use crate::persist::state::{MachineState, StateRecord};
use crate::persist::stream::{pages, Kind, StreamError, StreamReader, StreamWriter, PAGE_SIZE};
use crate::vmm::{BootError, Core, VmConfig, Vmm};
use crate::vstate::dirty::DirtyBitmap;

/// The stream reader of an incoming transfer.
pub type Reader = StreamReader<BufReader<Channel>>;

/// The incoming stream's read buffer: headers, control messages and the tails of records.
const READ_BUFFER: usize = 64 << 10;

/// What arrived: the running VM and, for a COLO start, the secondary's checkpoint loop to run.
pub struct Arrived {
    /// The VM.
    pub vmm: Vmm,
    /// The secondary's loop (COLO).
    pub secondary: Option<crate::colo::secondary::SecondaryRunner>,
}

/// Waits for one incoming migration (or COLO start) on `uri` and returns the running VM.
/// Nothing runs unless the whole state arrived and verified; any failure ends with an error
/// (and tells the source).
/// A COLO start makes this VMM a secondary with the COLO state `colo`.
pub fn incoming(config: &VmConfig, uri: &MigrationUri, colo: &Arc<ColoShared>) -> Result<Arrived, BootError> {
    let err = |what: &'static str| move |e: std::io::Error| BootError::Other { what, error: e.to_string() };
    let listener = uri.listen().map_err(err("listening for the migration"))?;
    tracing::info!(uri = %uri, "waiting for an incoming migration");
    let chan = listener.accept().map_err(err("accepting the migration"))?;
    drop(listener);
    let started = Instant::now();
    let mut w = Some(
        StreamWriter::new(chan.try_clone().map_err(err("migration channel"))?).map_err(err("answering the source"))?,
    );
    let result = receive(config, chan, &mut w, colo);
    match &result {
        Ok(_) => tracing::info!(uri = %uri, ms = started.elapsed().as_millis() as u64, "state received; running"),
        Err(e) => {
            if let Some(w) = w.as_mut() {
                let _ = protocol::send(w, &Control::Error { message: e.to_string() });
            }
        }
    }
    result
}

fn receive(
    config: &VmConfig,
    chan: Channel,
    w: &mut Option<StreamWriter<Channel>>,
    colo: &Arc<ColoShared>,
) -> Result<Arrived, BootError> {
    let reader_chan =
        chan.try_clone().map_err(|e| BootError::Other { what: "migration channel", error: e.to_string() })?;
    // A small buffer: `BufReader` reads a request larger than its buffer straight into the
    // caller's memory, so a megabyte of pages goes from the socket into its record in one copy
    // (through a buffer as large as a record it would be copied twice).
    let mut r =
        StreamReader::from_link(BufReader::with_capacity(READ_BUFFER, reader_chan), chan.delivers_bytes_intact())?;
    let purpose = match protocol::recv(&mut r)? {
        Control::Hello { purpose } => purpose,
        other => return Err(StreamError::Corrupt(format!("expected hello, got {other:?}")).into()),
    };
    let meta = snapshot::read_meta(&mut r)?;
    let core = Core::build(meta.mem_size, meta.vcpus, config.disk.as_ref())?;
    core.check_disk(&meta)?;
    let (state, written) = receive_state(&core, &meta, &mut r)?;
    match purpose {
        Purpose::Migrate => {
            let vmm = take_over(config, core, state, r, w.as_mut().expect("writer present"))?;
            Ok(Arrived { vmm, secondary: None })
        }
        Purpose::Colo => {
            let writer = w.take().expect("writer present");
            let (vmm, runner) = crate::colo::secondary::start(config, core, state, &written, r, writer, chan, colo)?;
            Ok(Arrived { vmm, secondary: Some(runner) })
        }
    }
}

/// Receives pages (into `core`'s memory), disk blocks (into a stage beside the image) and the
/// device state, up to `state-complete`, and checks the counts; then makes the image the
/// source's disk (only now: nothing is written before the whole state arrived) and, in verify
/// mode, checks every page and block. Returns the state and the pages written (the others are
/// zero).
fn receive_state(core: &Core, meta: &Meta, r: &mut Reader) -> Result<(MachineState, DirtyBitmap), BootError> {
    let mut received = 0u64;
    let mut written = DirtyBitmap::empty((meta.mem_size / PAGE_SIZE as u64) as usize);
    let mut received_blocks = 0u64;
    let mut stage = snapshot::disk_stage(core.disk())?;
    #[allow(clippy::type_complexity)]
    let mut state: Option<(MachineState, Option<Vec<u64>>, Option<Vec<u64>>)> = None;
    loop {
        let rec = r.next_record().map_err(|e| match e {
            StreamError::Truncated(_) => BootError::Other {
                what: "migration",
                error: "the source went away before the migration completed".into(),
            },
            other => other.into(),
        })?;
        let Some(rec) = rec else {
            return Err(BootError::Other {
                what: "migration",
                error: "the stream ended before the state was complete".into(),
            });
        };
        match rec.kind {
            Kind::Pages => {
                load_pages(&rec.payload, core.ram().memory(), meta.mem_size)?;
                for (gpa, _) in pages(&rec.payload) {
                    written.set((gpa / PAGE_SIZE as u64) as usize);
                    received += 1;
                }
            }
            Kind::Blocks => received_blocks += snapshot::stage_blocks(&rec.payload, stage.as_mut())?,
            Kind::State => state = Some(StateRecord::decode(&rec.payload)?.into_parts()?),
            Kind::Control => match protocol::parse(&rec.payload)? {
                Control::Round { round, pages, blocks } => {
                    tracing::debug!(round, pages, blocks, "pre-copy round received")
                }
                Control::StateComplete { pages, blocks } if pages == received && blocks == received_blocks => break,
                Control::StateComplete { pages, blocks } => {
                    return Err(StreamError::Corrupt(format!(
                        "source sent {pages} pages and {blocks} disk blocks, {received} and {received_blocks} arrived"
                    ))
                    .into())
                }
                Control::Error { message } => {
                    return Err(BootError::Other { what: "migration", error: format!("the source gave up: {message}") })
                }
                other => return Err(StreamError::Corrupt(format!("unexpected {other:?} from the source")).into()),
            },
            Kind::End => unreachable!("the reader consumes end records"),
        }
    }
    let (state, digests, block_digests) =
        state.ok_or_else(|| StreamError::Corrupt("no device state in the migration".into()))?;
    if let (Some(disk), Some(stage)) = (core.disk(), &stage) {
        let blocks_written = disk.replace_with(stage)?;
        tracing::info!(disk = %disk.path().display(), blocks = stage.len(), written = blocks_written, "disk received");
    }
    if let Some(digests) = digests {
        verify_pages(core, meta, &digests)?;
    }
    if let Some(digests) = block_digests {
        verify_blocks(core, &digests)?;
    }
    Ok((state, written))
}

/// Verify mode: refuses to go on unless the disk equals the source's at the pause.
fn verify_blocks(core: &Core, digests: &[u64]) -> Result<(), BootError> {
    let ours = core.disk().map(|d| d.digests()).transpose()?.unwrap_or_default();
    let diff = snapshot::compare_digests(&ours, digests)?;
    if !diff.is_empty() {
        let first: Vec<String> = diff.iter().take(8).map(|a| (a / 4096).to_string()).collect();
        return Err(BootError::Other {
            what: "verifying the migration",
            error: format!(
                "{} disk blocks differ from the source's at the pause (first: {})",
                diff.len(),
                first.join(", ")
            ),
        });
    }
    tracing::info!(blocks = ours.len(), "verified: the disk equals the source's block for block");
    Ok(())
}

/// Verify mode: refuses to go on unless memory equals the source's at the pause.
fn verify_pages(core: &Core, meta: &Meta, digests: &[u64]) -> Result<(), BootError> {
    {
        let diff = snapshot::differing_pages(core.ram().memory(), meta.mem_size, digests)?;
        if !diff.is_empty() {
            let first: Vec<String> = diff.iter().take(8).map(|a| format!("{a:#x}")).collect();
            return Err(BootError::Other {
                what: "verifying the migration",
                error: format!(
                    "{} pages differ from the source's at the pause (first: {})",
                    diff.len(),
                    first.join(", ")
                ),
            });
        }
        tracing::info!(pages = meta.mem_size / 4096, "verified: memory equals the source's page for page");
    }
    Ok(())
}

/// Migration's ending: `ready`, wait for `go`, attach the backends, start, `running`.
fn take_over(
    config: &VmConfig,
    core: Core,
    state: MachineState,
    mut r: Reader,
    w: &mut StreamWriter<Channel>,
) -> Result<Vmm, BootError> {
    protocol::send(w, &Control::Ready)?;
    match protocol::recv(&mut r)? {
        Control::Go => {}
        Control::Error { message } => {
            return Err(BootError::Other { what: "migration", error: format!("the source gave up: {message}") })
        }
        other => return Err(StreamError::Corrupt(format!("expected go, got {other:?}")).into()),
    }
    // The source has released the backends: attach them and start where the source stopped.
    let mut machine = core.attach(config)?;
    Vmm::apply_state(&mut machine, state, &config.serial)?;
    let vmm = machine.start()?;
    protocol::send(w, &Control::Running)?;
    Ok(vmm)
}
