//! The `kv` service on TCP port 9200 (protocol: [`colo_guest::proto::kv`]; store:
//! [`colo_guest::kvlog`]), on the disk's first sectors; `fill`/`read` use the rest.
//!
//! A `put` is answered `ok` only once its record is written and flushed. A `fill` or `read`
//! runs in steps of [`BENCH_STEP`] per pass of the network task (and keeps that task due at
//! once until it is done), so the network is served in between; its `ok` comes at the end.

use smoltcp::iface::SocketSet;
use smoltcp::socket::tcp;

use colo_guest::kvlog::{PutError, Store, MAX_VALUE};
use colo_guest::proto::kv::{parse, Command, MAX_LINE};
use colo_guest::proto::line::LineReader;
use colo_guest::stats::Stats;

use super::pool::{client_finished, send_room, Flow, TcpPool};
use crate::time;
use crate::virtio::blk::{Locked, VirtioBlk, SECTOR};

/// The kv port.
pub const PORT: u16 = 9200;
const MAX_CLIENTS: usize = 16;
const BUFFER: usize = 4096;
/// Longest reply, newline included.
const MAX_REPLY: usize = MAX_VALUE + 64;
/// Bytes a `fill` or `read` moves per pass.
pub const BENCH_STEP: u64 = 1 << 20;

/// The disk, shared with the disk dirtier.
pub type Disk = spinning_top::Spinlock<VirtioBlk>;

/// A `fill` or `read` in progress.
#[derive(Debug, Clone, Copy)]
struct Bench {
    write: bool,
    left: u64,
}

/// One client.
#[derive(Default)]
struct Client {
    reader: LineReader<MAX_LINE>,
    bench: Option<Bench>,
}

/// Where things are on the disk.
#[derive(Debug, Clone, Copy)]
pub struct Layout {
    /// Sectors of the log (from sector 0).
    pub log: u64,
    /// First sector of the scratch area (`fill`, `read`, the disk dirtier).
    pub scratch: u64,
    /// Sectors of the scratch area.
    pub scratch_len: u64,
}

impl Layout {
    /// The log takes up to 4 MiB, at most half the disk; the scratch area the rest.
    pub fn of(sectors: u64) -> Layout {
        let log = (4 << 20) / SECTOR;
        let log = log.min(sectors / 2);
        Layout { log, scratch: log, scratch_len: sectors - log }
    }
}

/// The service.
pub struct Kv {
    pool: TcpPool<Client>,
    store: Store,
    disk: &'static Disk,
    layout: Layout,
    /// Where the next `fill` or `read` step starts in the scratch area (sectors).
    cursor: u64,
}

impl Kv {
    /// Reads the log and listens on port 9200.
    pub fn start(sockets: &mut SocketSet<'static>, disk: &'static Disk) -> Result<Kv, &'static str> {
        let layout = Layout::of(disk.lock().sectors());
        let store = Store::open(&mut Locked(disk), layout.log)?;
        status!("kv log records={} keys={} capacity={}", store.records(), store.keys(), layout.log);
        Ok(Kv { pool: TcpPool::new(sockets, PORT, MAX_CLIENTS, BUFFER, BUFFER)?, store, disk, layout, cursor: 0 })
    }

    /// Serves every client.
    pub fn poll(&mut self, sockets: &mut SocketSet<'static>, stats: &mut Stats) {
        let Kv { pool, store, disk, layout, cursor } = self;
        stats.tcp_accepted += pool.poll(sockets, |socket, client| serve(socket, client, store, disk, layout, cursor));
    }

    /// Whether a client's `fill` or `read` is in progress (the task must run again at once).
    pub fn busy(&self) -> bool {
        self.pool.any(|c| c.bench.is_some())
    }
}

fn serve(
    socket: &mut tcp::Socket<'_>,
    client: &mut Client,
    store: &mut Store,
    disk: &'static Disk,
    layout: &Layout,
    cursor: &mut u64,
) -> Flow {
    if let Some(bench) = client.bench.as_mut() {
        if send_room(socket) < MAX_REPLY {
            return Flow::Open;
        }
        let step = bench.left.min(BENCH_STEP);
        let result = bench_step(disk, layout, cursor, bench.write, step);
        bench.left -= step;
        match result {
            Err(e) => {
                reply(socket, format_args!("err disk: {e}"));
                client.bench = None;
            }
            Ok(()) if bench.left == 0 => {
                let done = if bench.write { disk.lock().flush() } else { Ok(()) };
                match done {
                    Ok(()) => reply(socket, format_args!("ok")),
                    Err(e) => reply(socket, format_args!("err disk: {e}")),
                }
                client.bench = None;
            }
            Ok(()) => return Flow::Open,
        }
    }
    while client.bench.is_none() && send_room(socket) >= MAX_REPLY {
        let mut line = [0u8; MAX_LINE];
        let mut line_len = None;
        let taken = socket.recv(|data| {
            let (taken, line_read) = client.reader.feed(data);
            match line_read {
                Some(colo_guest::proto::line::Line::Text(t)) => {
                    line[..t.len()].copy_from_slice(t);
                    line_len = Some(t.len());
                }
                Some(colo_guest::proto::line::Line::TooLong) => line_len = Some(usize::MAX),
                None => {}
            }
            (taken, taken)
        });
        match line_len {
            Some(usize::MAX) => reply(socket, format_args!("err line too long")),
            Some(n) => respond(socket, client, store, disk, &line[..n]),
            None => {}
        }
        if !matches!(taken, Ok(1..)) {
            break;
        }
    }
    if client.bench.is_none() && client_finished(socket) {
        Flow::Close
    } else {
        Flow::Open
    }
}

fn respond(socket: &mut tcp::Socket<'_>, client: &mut Client, store: &mut Store, disk: &'static Disk, line: &[u8]) {
    match parse(line) {
        Command::Empty => {}
        Command::Put { key, value } => match store.put(&mut Locked(disk), key, value, time::rdtsc()) {
            Ok(()) => reply(socket, format_args!("ok")),
            Err(PutError::Full) => reply(socket, format_args!("err the log is full")),
            Err(PutError::Disk(e)) => reply(socket, format_args!("err disk: {e}")),
        },
        Command::Get { key } => {
            let mut value = [0u8; MAX_VALUE];
            match store.get(&mut Locked(disk), key, &mut value) {
                Ok(Some(n)) => {
                    let _ = socket.send_slice(&value[..n]);
                    let _ = socket.send_slice(b"\n");
                }
                Ok(None) => reply(socket, format_args!("none")),
                Err(e) => reply(socket, format_args!("err disk: {e}")),
            }
        }
        Command::Scan => match store.scan(&mut Locked(disk)) {
            Ok(r) => reply(
                socket,
                format_args!(
                    "records={} keys={} repeated={} mismatch={}",
                    r.records,
                    r.keys,
                    r.repeated,
                    u8::from(r.mismatch)
                ),
            ),
            Err(e) => reply(socket, format_args!("err disk: {e}")),
        },
        Command::Fill { mib } => client.bench = Some(Bench { write: true, left: u64::from(mib) << 20 }),
        Command::Read { mib } => client.bench = Some(Bench { write: false, left: u64::from(mib) << 20 }),
        Command::Bad(why) => reply(socket, format_args!("err {why}")),
    }
}

/// Writes or reads `bytes` of the scratch area from the cursor on (wrapping at its end).
fn bench_step(disk: &Disk, layout: &Layout, cursor: &mut u64, write: bool, bytes: u64) -> Result<(), &'static str> {
    let mut left = bytes / SECTOR;
    let mut d = disk.lock();
    while left > 0 {
        if *cursor >= layout.scratch_len {
            *cursor = 0;
        }
        let n = left.min(layout.scratch_len - *cursor);
        let (sector, len) = (layout.scratch + *cursor, (n * SECTOR) as usize);
        if write {
            d.fill(sector, len, 0x5a)?;
        } else {
            d.read_through(sector, len)?;
        }
        *cursor += n;
        left -= n;
    }
    Ok(())
}

/// Sends one reply line (the caller checked there is room for [`MAX_REPLY`]).
fn reply(socket: &mut tcp::Socket<'_>, args: core::fmt::Arguments<'_>) {
    let mut out = [0u8; MAX_REPLY];
    let mut w = colo_guest::fmt::SliceWriter::new(&mut out);
    let _ = core::fmt::write(&mut w, args);
    let _ = core::fmt::Write::write_str(&mut w, "\n");
    let n = w.len();
    let _ = socket.send_slice(&out[..n]);
}
