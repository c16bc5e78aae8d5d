//! Reading packet captures with the `pcap-file` crate: the classic pcap files tcpdump writes
//! (microsecond or nanosecond, either byte order) and pcapng (what the compare processes'
//! `--capture` writes, and tshark).

use std::time::Duration;

use pcap_file::pcap::PcapParser;
use pcap_file::pcapng::blocks::interface_description::InterfaceDescriptionOption;
use pcap_file::pcapng::{Block, PcapNgParser};
use pcap_file::{Endianness, PcapError};

/// The first bytes of a pcapng file (a Section Header Block's type).
const PCAPNG_MAGIC: [u8; 4] = [0x0a, 0x0d, 0x0d, 0x0a];

/// The frames of a pcap or pcapng file, in order. Panics on a malformed file (tests only); use
/// [`try_frames`] where a test must report something else first.
pub fn frames(bytes: &[u8]) -> Vec<Vec<u8>> {
    try_frames(bytes).unwrap_or_else(|e| panic!("{e}"))
}

/// The frames of a pcap or pcapng file, in order, or why the file cannot be read. A record cut
/// by the end of the file (a capture still being written) ends the list without error.
pub fn try_frames(bytes: &[u8]) -> Result<Vec<Vec<u8>>, String> {
    Ok(try_packets(bytes)?.into_iter().map(|(_, frame)| frame).collect())
}

/// The frames of a pcap or pcapng file with their times since the epoch, as [`try_frames`].
pub fn try_packets(bytes: &[u8]) -> Result<Vec<(Duration, Vec<u8>)>, String> {
    if bytes.len() < 4 {
        return Err("capture file too short".into());
    }
    if bytes.starts_with(&PCAPNG_MAGIC) {
        pcapng_packets(bytes)
    } else {
        pcap_packets(bytes)
    }
}

fn pcap_packets(bytes: &[u8]) -> Result<Vec<(Duration, Vec<u8>)>, String> {
    let (mut rest, parser) = PcapParser::new(bytes).map_err(|e| match e {
        PcapError::IncompleteBuffer => "pcap file too short".to_string(),
        e => format!("neither a pcap nor a pcapng file: {e}"),
    })?;
    let mut out = vec![];
    loop {
        match parser.next_packet(rest) {
            Ok((r, packet)) => {
                out.push((packet.timestamp, packet.data.into_owned()));
                rest = r;
            }
            Err(PcapError::IncompleteBuffer) => break, // the end, or a record cut by it
            Err(e) => return Err(format!("pcap record at byte {}: {e}", bytes.len() - rest.len())),
        }
    }
    Ok(out)
}

fn pcapng_packets(bytes: &[u8]) -> Result<Vec<(Duration, Vec<u8>)>, String> {
    let (mut rest, mut parser) = PcapNgParser::new(bytes).map_err(|e| format!("pcapng section header: {e}"))?;
    let mut out = vec![];
    loop {
        let at = bytes.len() - rest.len();
        let block = match parser.next_block(rest) {
            Ok((r, block)) => {
                rest = r;
                block
            }
            // The end, or a block cut by it (a capture still being written).
            Err(PcapError::IncompleteBuffer) if runs_past_the_end(rest, parser.section().endianness) => break,
            Err(e) => return Err(format!("pcapng block at byte {at}: {e}")),
        };
        let tsresol = |interface: u32| {
            parser.interfaces().get(interface as usize).map_or(DEFAULT_TSRESOL, |i| {
                i.options
                    .iter()
                    .find_map(|o| match o {
                        InterfaceDescriptionOption::IfTsResol(r) => Some(*r),
                        _ => None,
                    })
                    .unwrap_or(DEFAULT_TSRESOL)
            })
        };
        match block {
            // pcap-file reports the raw timestamp as nanoseconds; the interface says what it is.
            Block::EnhancedPacket(p) => {
                let ticks = p.timestamp.as_nanos() as u64;
                out.push((ticks_to_time(ticks, tsresol(p.interface_id)), p.data.into_owned()));
            }
            Block::Packet(p) => {
                out.push((ticks_to_time(p.timestamp, tsresol(p.interface_id.into())), p.data.into_owned()))
            }
            // No timestamp; the data is padded, the original length says how much is the frame.
            Block::SimplePacket(p) => {
                let len = (p.original_len as usize).min(p.data.len());
                out.push((Duration::ZERO, p.data[..len].to_vec()));
            }
            _ => {}
        }
    }
    Ok(out)
}

/// The block at the start of `rest` (or its header) needs more bytes than the file has.
fn runs_past_the_end(rest: &[u8], endianness: Endianness) -> bool {
    let Some(&[a, b, c, d]) = rest.get(4..8) else { return true };
    let total = match endianness {
        Endianness::Big => u32::from_be_bytes([a, b, c, d]),
        Endianness::Little => u32::from_le_bytes([a, b, c, d]),
    };
    total as usize > rest.len()
}

/// `if_tsresol` when an interface does not say: microseconds.
const DEFAULT_TSRESOL: u8 = 6;

/// A pcapng timestamp in units of `tsresol` (10^-n seconds, or 2^-n with the top bit set).
fn ticks_to_time(ticks: u64, tsresol: u8) -> Duration {
    let per_second: u128 =
        if tsresol & 0x80 == 0 { 10u128.pow(u32::from(tsresol.min(19))) } else { 1u128 << (tsresol & 0x7f).min(64) };
    let (secs, frac) = (u128::from(ticks) / per_second, u128::from(ticks) % per_second);
    Duration::new(secs as u64, (frac * 1_000_000_000 / per_second) as u32)
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;

    /// Block types and the byte-order magic (draft-ietf-opsawg-pcapng), for building files.
    const PCAPNG_SHB: u32 = 0x0a0d_0d0a;
    const PCAPNG_SIMPLE_PACKET: u32 = 3;
    const PCAPNG_BYTE_ORDER: u32 = 0x1a2b_3c4d;

    fn frame(len: usize, fill: u8) -> Vec<u8> {
        (0..len).map(|i| fill.wrapping_add(i as u8)).collect()
    }

    /// What the compare processes' `--capture` writes (colo-proxy's pcapng writer), with and
    /// without comments, frames of lengths that need padding.
    #[test]
    fn reads_the_pcapng_the_compare_processes_write() {
        let frames_in = [frame(60, 1), frame(61, 2), frame(1514, 3), frame(63, 4)];
        let mut w = colo_proxy::pcap::PcapWriter::with_if_name(Vec::new(), "net0").unwrap();
        for (i, f) in frames_in.iter().enumerate() {
            let comment = (i % 2 == 0).then_some("primary released (payload)");
            w.write_packet(UNIX_EPOCH + Duration::from_secs(i as u64), f, comment).unwrap();
        }
        let bytes = w.into_inner();
        assert_eq!(try_frames(&bytes).unwrap(), frames_in);
        // Its timestamps are nanoseconds (if_tsresol 9).
        let times: Vec<Duration> = try_packets(&bytes).unwrap().into_iter().map(|(t, _)| t).collect();
        assert_eq!(times, (0..4).map(Duration::from_secs).collect::<Vec<_>>());
        // Cut inside the last block: the complete ones are read.
        assert_eq!(try_frames(&bytes[..bytes.len() - 10]).unwrap(), frames_in[..3]);
    }

    #[test]
    fn reads_classic_pcap() {
        let mut bytes = vec![];
        for v in [0xa1b2c3d4u32, 0x0004_0002, 0, 0, 65535, 1] {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        bytes.truncate(24);
        for f in [frame(42, 9), frame(60, 7)] {
            for v in [0u32, 0, f.len() as u32, f.len() as u32] {
                bytes.extend_from_slice(&v.to_le_bytes());
            }
            bytes.extend_from_slice(&f);
        }
        assert_eq!(try_frames(&bytes).unwrap(), vec![frame(42, 9), frame(60, 7)]);
        // A record cut by the end of the file.
        assert_eq!(try_frames(&bytes[..bytes.len() - 1]).unwrap(), vec![frame(42, 9)]);
    }

    #[test]
    fn timestamps_follow_the_interface_resolution() {
        assert_eq!(ticks_to_time(1_500_000, DEFAULT_TSRESOL), Duration::from_millis(1500));
        assert_eq!(ticks_to_time(1_500_000_001, 9), Duration::new(1, 500_000_001));
        assert_eq!(ticks_to_time(3, 0x80 | 1), Duration::from_millis(1500), "2^-1 s");
        assert!(ticks_to_time(u64::MAX, 0xff) < Duration::from_secs(1), "2^-127 s taken as 2^-64 s, no panic");
    }

    #[test]
    fn big_endian_pcapng_and_simple_packet_blocks() {
        let mut bytes = vec![];
        let block = |bytes: &mut Vec<u8>, kind: u32, body: &[u8]| {
            let total = (12 + body.len()) as u32;
            bytes.extend_from_slice(&kind.to_be_bytes());
            bytes.extend_from_slice(&total.to_be_bytes());
            bytes.extend_from_slice(body);
            bytes.extend_from_slice(&total.to_be_bytes());
        };
        let mut shb = PCAPNG_BYTE_ORDER.to_be_bytes().to_vec();
        shb.extend_from_slice(&[0, 1, 0, 0]);
        shb.extend_from_slice(&u64::MAX.to_be_bytes());
        block(&mut bytes, PCAPNG_SHB, &shb);
        let mut spb = 5u32.to_be_bytes().to_vec();
        spb.extend_from_slice(b"hello\0\0\0");
        block(&mut bytes, PCAPNG_SIMPLE_PACKET, &spb);
        assert_eq!(try_frames(&bytes).unwrap(), vec![b"hello".to_vec()]);
    }

    #[test]
    fn malformed_files_are_errors_not_panics() {
        assert!(try_frames(b"").is_err());
        assert!(try_frames(b"not a capture file at all, really").unwrap_err().contains("neither a pcap nor a pcapng"));
        let mut bad = PCAPNG_SHB.to_le_bytes().to_vec();
        bad.extend_from_slice(&28u32.to_le_bytes());
        bad.extend_from_slice(&0xdead_beefu32.to_le_bytes());
        bad.resize(28, 0);
        assert!(try_frames(&bad).unwrap_err().contains("magic"));
    }
}
