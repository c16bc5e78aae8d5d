//! Reading packet captures: the classic pcap files tcpdump writes (microsecond or nanosecond,
//! either byte order) and pcapng (what the compare processes' `--capture` writes, and tshark).

/// The frames of a pcap or pcapng file, in order. Panics on a malformed file (tests only); use
/// [`try_frames`] where a test must report something else first.
pub fn frames(bytes: &[u8]) -> Vec<Vec<u8>> {
    try_frames(bytes).unwrap_or_else(|e| panic!("{e}"))
}

/// The frames of a pcap or pcapng file, in order, or why the file cannot be read. A record cut
/// by the end of the file (a capture still being written) ends the list without error.
pub fn try_frames(bytes: &[u8]) -> Result<Vec<Vec<u8>>, String> {
    let magic = bytes.get(0..4).ok_or("capture file too short")?;
    if magic == PCAPNG_SHB.to_le_bytes() {
        pcapng_frames(bytes)
    } else {
        pcap_frames(bytes)
    }
}

fn pcap_frames(bytes: &[u8]) -> Result<Vec<Vec<u8>>, String> {
    if bytes.len() < 24 {
        return Err("pcap file too short".into());
    }
    let magic = u32::from_le_bytes(bytes[0..4].try_into().unwrap());
    let le = match magic {
        0xa1b2c3d4 | 0xa1b23c4d => true,
        0xd4c3b2a1 | 0x4d3cb2a1 => false,
        m => return Err(format!("neither a pcap nor a pcapng file (magic {m:#x})")),
    };
    let u32_at = |at: usize| read_u32(bytes, at, le);
    let mut out = vec![];
    let mut at = 24;
    while at + 16 <= bytes.len() {
        let caplen = u32_at(at + 8) as usize;
        let start = at + 16;
        if start + caplen > bytes.len() {
            break; // a record cut by the capture's end
        }
        out.push(bytes[start..start + caplen].to_vec());
        at = start + caplen;
    }
    Ok(out)
}

/// Block types (pcapng, draft-ietf-opsawg-pcapng).
const PCAPNG_SHB: u32 = 0x0a0d_0d0a;
const PCAPNG_OBSOLETE_PACKET: u32 = 2;
const PCAPNG_SIMPLE_PACKET: u32 = 3;
const PCAPNG_ENHANCED_PACKET: u32 = 6;
/// The Section Header Block's byte-order magic, as written by the capture's host.
const PCAPNG_BYTE_ORDER: u32 = 0x1a2b_3c4d;

fn pcapng_frames(bytes: &[u8]) -> Result<Vec<Vec<u8>>, String> {
    let mut out = vec![];
    let mut le = true;
    let mut at = 0;
    // Every block: type, total length, body, total length again.
    while at + 12 <= bytes.len() {
        if read_u32(bytes, at, true) == PCAPNG_SHB {
            // A section header sets the byte order of its section.
            le = match read_u32(bytes, at + 8, true) {
                PCAPNG_BYTE_ORDER => true,
                m if m.swap_bytes() == PCAPNG_BYTE_ORDER => false,
                m => return Err(format!("pcapng section at byte {at}: bad byte-order magic {m:#x}")),
            };
        }
        let block_type = read_u32(bytes, at, le);
        let total = read_u32(bytes, at + 4, le) as usize;
        if total < 12 || !total.is_multiple_of(4) {
            return Err(format!("pcapng block at byte {at}: bad length {total}"));
        }
        if at + total > bytes.len() {
            break; // a block cut by the capture's end
        }
        let body = &bytes[at + 8..at + total - 4];
        let packet = match block_type {
            // Enhanced: interface, timestamp (two words), captured length, original length,
            // data. Obsolete: interface and drops (16 bits each), then the same.
            PCAPNG_ENHANCED_PACKET | PCAPNG_OBSOLETE_PACKET => Some((20, 12)),
            // original length, data (as much as the block holds)
            PCAPNG_SIMPLE_PACKET => {
                if body.len() < 4 {
                    return Err(format!("pcapng simple packet block at byte {at} too short"));
                }
                let len = (read_u32(body, 0, le) as usize).min(body.len() - 4);
                out.push(body[4..4 + len].to_vec());
                None
            }
            _ => None,
        };
        if let Some((data_at, caplen_at)) = packet {
            if body.len() < data_at {
                return Err(format!("pcapng packet block at byte {at} too short"));
            }
            let caplen = read_u32(body, caplen_at, le) as usize;
            let data = body.get(data_at..data_at + caplen).ok_or_else(|| {
                format!("pcapng packet block at byte {at}: captured length {caplen} beyond the block")
            })?;
            out.push(data.to_vec());
        }
        at += total;
    }
    Ok(out)
}

fn read_u32(bytes: &[u8], at: usize, le: bool) -> u32 {
    let b: [u8; 4] = bytes[at..at + 4].try_into().unwrap();
    if le {
        u32::from_le_bytes(b)
    } else {
        u32::from_be_bytes(b)
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;

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
        assert!(try_frames(&bad).unwrap_err().contains("byte-order magic"));
    }
}
