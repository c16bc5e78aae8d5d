//! Reading the classic pcap files tcpdump writes (microsecond or nanosecond, either byte order).

/// The frames of a pcap file, in order. Panics on a malformed file (tests only).
pub fn frames(bytes: &[u8]) -> Vec<Vec<u8>> {
    assert!(bytes.len() >= 24, "pcap file too short");
    let magic = u32::from_le_bytes(bytes[0..4].try_into().unwrap());
    let le = match magic {
        0xa1b2c3d4 | 0xa1b23c4d => true,
        0xd4c3b2a1 | 0x4d3cb2a1 => false,
        m => panic!("not a pcap file (magic {m:#x})"),
    };
    let u32_at = |at: usize| {
        let b: [u8; 4] = bytes[at..at + 4].try_into().unwrap();
        if le {
            u32::from_le_bytes(b)
        } else {
            u32::from_be_bytes(b)
        }
    };
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
    out
}
