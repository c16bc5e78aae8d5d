//! The destination side: `colo-vmm run --incoming URI`.

use std::io::BufReader;
use std::time::Instant;

use super::protocol::{self, Control};
use super::uri::{Channel, MigrationUri};
use crate::persist::sections::Sections;
use crate::persist::snapshot::{self, load_pages};
use crate::persist::stream::{pages, Kind, StreamError, StreamReader, StreamWriter};
use crate::vmm::{BootError, Core, VmConfig, Vmm};

/// Waits for one incoming migration on `uri` and returns the running VM. Nothing runs unless the
/// whole state arrived and verified; any failure ends with an error (and tells the source).
pub fn incoming(config: &VmConfig, uri: &MigrationUri) -> Result<Vmm, BootError> {
    let err = |what: &'static str| move |e: std::io::Error| BootError::Other { what, error: e.to_string() };
    let listener = uri.listen().map_err(err("listening for the migration"))?;
    tracing::info!(uri = %uri, "waiting for an incoming migration");
    let chan = listener.accept().map_err(err("accepting the migration"))?;
    drop(listener);
    let started = Instant::now();
    let mut w =
        StreamWriter::new(chan.try_clone().map_err(err("migration channel"))?).map_err(err("answering the source"))?;
    let result = receive(config, chan, &mut w);
    match &result {
        Ok(_) => tracing::info!(uri = %uri, ms = started.elapsed().as_millis() as u64, "migration received; running"),
        Err(e) => {
            let _ = protocol::send(&mut w, &Control::Error { message: e.to_string() });
        }
    }
    result
}

fn receive(config: &VmConfig, chan: Channel, w: &mut StreamWriter<Channel>) -> Result<Vmm, BootError> {
    let mut r = StreamReader::new(BufReader::with_capacity(1 << 20, chan))?;
    let meta = snapshot::read_meta(&mut r)?;
    let core = Core::build(meta.mem_size)?;
    let mut received = 0u64;
    let mut state: Option<Sections> = None;
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
                received += pages(&rec.payload).count() as u64;
            }
            Kind::State => state = Some(Sections::decode(&rec.payload)?),
            Kind::Control => match protocol::parse(&rec.payload)? {
                Control::Round { round, pages } => tracing::debug!(round, pages, "pre-copy round received"),
                Control::StateComplete { pages } if pages == received => break,
                Control::StateComplete { pages } => {
                    return Err(StreamError::Corrupt(format!("source sent {pages} pages, {received} arrived")).into())
                }
                Control::Error { message } => {
                    return Err(BootError::Other { what: "migration", error: format!("the source gave up: {message}") })
                }
                other => return Err(StreamError::Corrupt(format!("unexpected {other:?} from the source")).into()),
            },
            Kind::End => unreachable!("the reader consumes end records"),
        }
    }
    let state = state.ok_or_else(|| StreamError::Corrupt("no device state in the migration".into()))?;
    if let Ok(digests) = state.bytes(super::source::VERIFY_SECTION) {
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
    Vmm::apply_state(&mut machine, &state, &config.serial)?;
    let vmm = machine.start()?;
    protocol::send(w, &Control::Running)?;
    Ok(vmm)
}
