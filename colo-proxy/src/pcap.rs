//! A pcapng writer for captures of Ethernet frames, with an optional comment per packet (so a
//! capture can say why a frame was released or dropped), on the `pcap-file` crate.
//!
//! Format: draft-ietf-opsawg-pcapng. One little-endian section (Section Header Block, naming
//! this program), one interface (Interface Description Block, `LINKTYPE_ETHERNET`, nanosecond
//! timestamps), then one Enhanced Packet Block per frame.
//!
//! Nanoseconds because `pcap-file` (2.0) writes and reads an Enhanced Packet Block's timestamp
//! in nanoseconds whatever the interface says; declaring `if_tsresol` 9 makes the file mean
//! what the crate writes, for every other reader (tshark, tcpdump) too.

use std::borrow::Cow;
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use pcap_file::pcapng::blocks::enhanced_packet::{EnhancedPacketBlock, EnhancedPacketOption};
use pcap_file::pcapng::blocks::interface_description::{InterfaceDescriptionBlock, InterfaceDescriptionOption};
use pcap_file::pcapng::blocks::section_header::{SectionHeaderBlock, SectionHeaderOption};
use pcap_file::pcapng::PcapNgWriter;
use pcap_file::{DataLink, Endianness, PcapError};

/// Largest frame length recorded, libpcap's `MAXIMUM_SNAPLEN`; well above any frame we carry.
pub const SNAPLEN: u32 = 262_144;
/// `if_tsresol`: timestamps in units of 10^-9 s.
pub const TSRESOL_NANOSECONDS: u8 = 9;
/// The longest option value pcapng can hold (its length is a `u16`).
const MAX_OPTION_LEN: usize = u16::MAX as usize;

/// Writes a pcapng capture to `W`.
///
/// `pcap-file` hands each block to `W` in several small writes; use [`create`] (buffered) for a
/// file.
pub struct PcapWriter<W: Write> {
    w: PcapNgWriter<W>,
}

impl<W: Write> PcapWriter<W> {
    /// Starts a capture on `w`: writes the Section Header and Interface Description Blocks.
    pub fn new(w: W) -> io::Result<Self> {
        Self::start(w, None)
    }

    /// Like [`PcapWriter::new`], naming the interface (`if_name`, shown by Wireshark).
    pub fn with_if_name(w: W, if_name: &str) -> io::Result<Self> {
        Self::start(w, Some(if_name))
    }

    fn start(w: W, if_name: Option<&str>) -> io::Result<Self> {
        let userappl = concat!("colo-proxy ", env!("CARGO_PKG_VERSION"));
        let section = SectionHeaderBlock {
            endianness: Endianness::Little,
            options: vec![SectionHeaderOption::UserApplication(Cow::Borrowed(userappl))],
            ..Default::default()
        };
        let mut w = PcapNgWriter::with_section_header(w, section).map_err(io_error)?;
        let mut options = vec![InterfaceDescriptionOption::IfTsResol(TSRESOL_NANOSECONDS)];
        if let Some(name) = if_name {
            options.push(InterfaceDescriptionOption::IfName(Cow::Borrowed(truncate_utf8(name, MAX_OPTION_LEN))));
        }
        let interface = InterfaceDescriptionBlock { linktype: DataLink::ETHERNET, snaplen: SNAPLEN, options };
        w.write_pcapng_block(interface).map_err(io_error)?;
        Ok(PcapWriter { w })
    }

    /// Appends one Ethernet frame (without any virtio-net header) captured at `timestamp`, with
    /// an optional comment. Timestamps before 1970 are written as 0. A comment over 65535 bytes
    /// is truncated at a character boundary.
    pub fn write_packet(&mut self, timestamp: SystemTime, frame: &[u8], comment: Option<&str>) -> io::Result<()> {
        let original_len = u32::try_from(frame.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "frame too long for pcapng"))?;
        let packet = EnhancedPacketBlock {
            interface_id: 0,
            timestamp: timestamp.duration_since(UNIX_EPOCH).unwrap_or_default(),
            original_len,
            data: Cow::Borrowed(frame),
            options: comment
                .map(|text| EnhancedPacketOption::Comment(Cow::Borrowed(truncate_utf8(text, MAX_OPTION_LEN))))
                .into_iter()
                .collect(),
        };
        self.w.write_pcapng_block(packet).map(drop).map_err(io_error)
    }

    /// Flushes the underlying writer.
    pub fn flush(&mut self) -> io::Result<()> {
        self.w.get_mut().flush()
    }

    /// The underlying writer, not flushed.
    pub fn into_inner(self) -> W {
        self.w.into_inner()
    }
}

/// Creates (or truncates) the file at `path` and starts a capture in it, buffered.
pub fn create(path: &Path) -> io::Result<PcapWriter<BufWriter<File>>> {
    PcapWriter::new(BufWriter::new(File::create(path)?))
}

fn io_error(e: PcapError) -> io::Error {
    match e {
        PcapError::IoError(e) => e,
        other => io::Error::other(other),
    }
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary.
fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use std::process::Command;
    use std::time::Duration;

    use pcap_file::pcapng::{Block, PcapNgParser};

    use super::*;

    fn frame(len: usize) -> Vec<u8> {
        (0..len).map(|i| i as u8).collect()
    }

    /// The blocks of `file`, which must hold nothing else.
    fn blocks(file: &[u8]) -> Vec<Block<'static>> {
        let (mut rest, mut parser) = PcapNgParser::new(file).unwrap();
        let mut out = vec![Block::SectionHeader(parser.section().clone())];
        while !rest.is_empty() {
            let (r, block) = parser.next_block(rest).unwrap();
            out.push(block.into_owned());
            rest = r;
        }
        out
    }

    fn sample(w: Vec<u8>, name: Option<&str>) -> Vec<u8> {
        let mut pw = match name {
            Some(n) => PcapWriter::with_if_name(w, n).unwrap(),
            None => PcapWriter::new(w).unwrap(),
        };
        let t = UNIX_EPOCH + Duration::from_nanos(0x1_2345_6789_abcd);
        pw.write_packet(t, &frame(60), None).unwrap();
        pw.write_packet(t, &frame(61), Some("primary released (miscompare: payload)")).unwrap();
        pw.write_packet(t, &frame(1514), Some("é")).unwrap();
        pw.flush().unwrap();
        pw.into_inner()
    }

    #[test]
    fn structure() {
        let file = sample(Vec::new(), Some("eth0"));
        assert_eq!(&file[..4], &[0x0a, 0x0d, 0x0d, 0x0a]);
        assert_eq!(&file[8..12], &0x1a2b_3c4du32.to_le_bytes(), "little-endian section");
        let b = blocks(&file);
        assert_eq!(b.len(), 5);
        let Block::SectionHeader(shb) = &b[0] else { panic!("{:?}", b[0]) };
        assert_eq!((shb.endianness, shb.major_version, shb.minor_version), (Endianness::Little, 1, 0));
        assert!(matches!(&shb.options[..], [SectionHeaderOption::UserApplication(a)] if a.starts_with("colo-proxy ")));
        let Block::InterfaceDescription(idb) = &b[1] else { panic!("{:?}", b[1]) };
        assert_eq!((idb.linktype, idb.snaplen), (DataLink::ETHERNET, SNAPLEN));
        assert_eq!(
            idb.options,
            [InterfaceDescriptionOption::IfTsResol(9), InterfaceDescriptionOption::IfName("eth0".into())]
        );
        for (block, (len, comment)) in
            b[2..].iter().zip([(60, None), (61, Some("primary released (miscompare: payload)")), (1514, Some("é"))])
        {
            let Block::EnhancedPacket(epb) = block else { panic!("{block:?}") };
            assert_eq!(epb.interface_id, 0);
            assert_eq!(epb.timestamp, Duration::from_nanos(0x1_2345_6789_abcd));
            assert_eq!((epb.data.as_ref(), epb.original_len), (&frame(len)[..], len as u32));
            let want: Vec<EnhancedPacketOption> =
                comment.map(|c| EnhancedPacketOption::Comment(c.into())).into_iter().collect();
            assert_eq!(epb.options, want);
        }
    }

    #[test]
    fn no_if_name_means_only_the_time_resolution() {
        let file = sample(Vec::new(), None);
        let Block::InterfaceDescription(idb) = &blocks(&file)[1] else { panic!() };
        assert_eq!(idb.options, [InterfaceDescriptionOption::IfTsResol(9)]);
    }

    #[test]
    fn pre_epoch_timestamp_and_long_comment() {
        let mut pw = PcapWriter::new(Vec::new()).unwrap();
        let long = "é".repeat(40_000); // 80000 bytes
        pw.write_packet(UNIX_EPOCH - Duration::from_secs(1), &frame(14), Some(&long)).unwrap();
        let file = pw.into_inner();
        let Block::EnhancedPacket(epb) = &blocks(&file)[2] else { panic!() };
        assert_eq!(epb.timestamp, Duration::ZERO);
        let [EnhancedPacketOption::Comment(c)] = &epb.options[..] else { panic!("{:?}", epb.options) };
        assert_eq!(c.len(), 65534, "cut at a character boundary");
    }

    /// Removes the file when dropped, whether the test passes or not.
    struct TempFile(std::path::PathBuf);

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    /// An independent reader: lengths, comments, and the nanosecond timestamps as tshark reads
    /// them.
    #[test]
    fn tshark_reads_it() {
        let tshark = std::env::var_os("PATH")
            .and_then(|paths| std::env::split_paths(&paths).map(|d| d.join("tshark")).find(|p| p.is_file()));
        let Some(tshark) = tshark else {
            eprintln!("pcap::tests::tshark_reads_it skipped: tshark not found");
            return;
        };
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().subsec_nanos();
        let tmp = TempFile(std::env::temp_dir().join(format!("colo-pcap-test-{}-{nanos}.pcapng", std::process::id())));
        let mut pw = create(&tmp.0).unwrap();
        let t = UNIX_EPOCH + Duration::new(1_700_000_000, 123_456_789);
        pw.write_packet(t, &frame(60), None).unwrap();
        pw.write_packet(t, &frame(61), Some("primary released (miscompare: payload)")).unwrap();
        pw.write_packet(t, &frame(1514), Some("secondary dropped")).unwrap();
        pw.flush().unwrap();
        drop(pw);

        // tshark 4.0 names the comment field `frame.comment` (`pkt_comment` is the protocol).
        let out = Command::new(tshark)
            .args(["-n", "-r"])
            .arg(&tmp.0)
            .args(["-T", "fields", "-e", "frame.time_epoch", "-e", "frame.len", "-e", "frame.comment"])
            .output()
            .unwrap();
        assert!(out.status.success(), "tshark failed: {}", String::from_utf8_lossy(&out.stderr));
        let stdout = String::from_utf8(out.stdout).unwrap();
        let lines: Vec<&str> = stdout.lines().collect();
        assert_eq!(
            lines,
            [
                "1700000000.123456789\t60\t",
                "1700000000.123456789\t61\tprimary released (miscompare: payload)",
                "1700000000.123456789\t1514\tsecondary dropped"
            ]
        );
    }
}
