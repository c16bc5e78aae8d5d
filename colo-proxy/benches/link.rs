//! Link throughput: 1 MiB records (as the checkpoint stream writes pages: an 8-byte head, the
//! payload, an 8-byte checksum, flushed after each) through a plain and a keyed (Noise,
//! AES-GCM) link over a Unix socket pair, a reader thread taking each record with `read_exact`.
//! What it isolates is the link's own work per byte (copies, sealing, opening), without the
//! network or the VMs.
//!
//! Run: `cargo bench -p colo-proxy --bench link`

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};

use colo_proxy::link::{accept, connect, LinkKey};

const RECORD: usize = 1 << 20;
const RECORDS: usize = 16;

fn link(c: &mut Criterion) {
    let mut g = c.benchmark_group("link");
    g.throughput(Throughput::Bytes((RECORD * RECORDS) as u64));
    g.sample_size(20);
    for keyed in [false, true] {
        let key = keyed.then(|| LinkKey::derive(&[7; 32]));
        let (a, b) = UnixStream::pair().unwrap();
        let k2 = key.clone();
        let t = std::thread::spawn(move || accept(b, k2.as_ref(), "bench", Duration::from_secs(5)).unwrap());
        let mut w = connect(a, key.as_ref(), "bench", Duration::from_secs(5)).unwrap();
        let mut r = t.join().unwrap();
        // The reader: takes records until told the run is over (a zero-length head).
        let reading = std::thread::spawn(move || {
            let mut head = [0u8; 8];
            let mut payload = vec![0u8; RECORD];
            let mut sum = [0u8; 8];
            loop {
                r.reader.read_exact(&mut head).unwrap();
                let len = u64::from_le_bytes(head) as usize;
                if len == 0 {
                    return;
                }
                r.reader.read_exact(&mut payload[..len]).unwrap();
                r.reader.read_exact(&mut sum).unwrap();
            }
        });
        let payload: Vec<u8> = (0..RECORD).map(|i| (i * 31) as u8).collect();
        let name = if keyed { "noise_aesgcm" } else { "plain" };
        g.bench_function(name, |bench| {
            bench.iter(|| {
                for _ in 0..RECORDS {
                    w.writer.write_all(&(RECORD as u64).to_le_bytes()).unwrap();
                    w.writer.write_all(&payload).unwrap();
                    w.writer.write_all(&[0u8; 8]).unwrap();
                    w.writer.flush().unwrap();
                }
            })
        });
        w.writer.write_all(&0u64.to_le_bytes()).unwrap();
        w.writer.flush().unwrap();
        reading.join().unwrap();
    }
    g.finish();
}

criterion_group!(benches, link);
criterion_main!(benches);
