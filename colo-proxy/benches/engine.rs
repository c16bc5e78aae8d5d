//! Engine throughput: matched UDP pairs (64 and 1400 bytes; 1 and 1024 flows) and a TCP stream
//! segmented differently on the two sides. Frames are built before timing; the timed part is
//! pushing them through the engine and dropping them in the sink.
//!
//! Run: `cargo bench -p colo-proxy --bench engine`

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};

use colo_proxy::builder::*;
use colo_proxy::compare::{Config, Disposal, Engine, Miscompare, Sink, Verdict};
use colo_proxy::wire::ipv4::protocol;
use colo_proxy::{Frame, MonotonicClock, Side};

/// Counts releases and drops the frames, as a transport that has sent them would.
#[derive(Default)]
struct Count {
    released: u64,
    events: u64,
}

impl Sink for Count {
    fn frame(&mut self, frame: Frame, d: Disposal) {
        if d.verdict == Verdict::Released {
            self.released += 1;
        }
        drop(frame);
    }
    fn miscompare(&mut self, _: &Miscompare) {
        self.events += 1;
    }
}

const BATCH: usize = 4096;

/// `BATCH` P/S pairs of UDP frames of `size` bytes spread over `flows` flows.
fn udp_pairs(size: usize, flows: usize) -> Vec<(Frame, Frame)> {
    let payload_len = size - 14 - 20 - 8;
    (0..BATCH)
        .map(|i| {
            let port = 1000 + (i % flows) as u16;
            let payload: Vec<u8> = (0..payload_len).map(|j| (i + j) as u8).collect();
            let f = udp4(port, 7, &payload);
            (Frame::new(f.clone()), Frame::new(f))
        })
        .collect()
}

fn bench_udp(c: &mut Criterion) {
    let mut g = c.benchmark_group("udp-matched-pairs");
    g.throughput(Throughput::Elements(BATCH as u64));
    for (size, flows) in [(64, 1), (64, 1024), (1400, 1), (1400, 1024)] {
        let pairs = udp_pairs(size, flows);
        let mut engine = Engine::new(Config::default(), MonotonicClock::new());
        let mut sink = Count::default();
        g.bench_with_input(BenchmarkId::new(format!("{size}B"), format!("{flows}flows")), &pairs, |b, pairs| {
            b.iter_batched(
                || pairs.clone(),
                |pairs| {
                    for (p, s) in pairs {
                        engine.push(Side::Primary, p, &mut sink);
                        engine.push(Side::Secondary, s, &mut sink);
                    }
                },
                BatchSize::LargeInput,
            )
        });
        assert_eq!(sink.events, 0);
        assert!(sink.released > 0);
    }
    g.finish();
}

/// The same 1 MiB stream cut into 1448-byte segments on P and 724/1000-byte segments on S.
fn tcp_stream() -> (Vec<Frame>, Vec<Frame>, usize) {
    let stream: Vec<u8> = (0..1 << 20).map(|i: u32| (i * 7) as u8).collect();
    let cut = |sizes: &[usize]| {
        let mut out = Vec::new();
        let mut at = 0;
        let mut k = 0;
        while at < stream.len() {
            let n = sizes[k % sizes.len()].min(stream.len() - at);
            let l4 = tcp_segment(80, 40000, 1 + at as u32, Some(1), 0, &stream[at..at + n]);
            out.push(Frame::new(ipv4_frame(VM_IP, CLIENT_IP, protocol::TCP, k as u16, l4, Some(16))));
            at += n;
            k += 1;
        }
        out
    };
    let p = cut(&[1448]);
    let s = cut(&[724, 1000]);
    (p, s, stream.len())
}

fn bench_tcp(c: &mut Criterion) {
    let (p, s, bytes) = tcp_stream();
    let mut g = c.benchmark_group("tcp-resegmented-stream");
    g.throughput(Throughput::Bytes(bytes as u64));
    g.bench_function("1MiB", |b| {
        b.iter_batched(
            || (p.clone(), s.clone(), Engine::new(Config::default(), MonotonicClock::new())),
            |(p, s, mut engine)| {
                let mut sink = Count::default();
                let mut s = s.into_iter();
                for f in p {
                    engine.push(Side::Primary, f, &mut sink);
                    // Interleave: about 1.5 S segments per P segment.
                    for f in s.by_ref().take(2) {
                        engine.push(Side::Secondary, f, &mut sink);
                    }
                }
                for f in s {
                    engine.push(Side::Secondary, f, &mut sink);
                }
                assert_eq!(sink.events, 0);
                sink.released
            },
            BatchSize::LargeInput,
        )
    });
    g.finish();
}

criterion_group!(benches, bench_udp, bench_tcp);
criterion_main!(benches);
