//! A pcapng writer for captures of Ethernet frames, with an optional comment per packet (so a
//! capture can say why a frame was released or dropped).
//!
//! Format: draft-ietf-opsawg-pcapng. One section (Section Header Block), one interface (Interface
//! Description Block, `LINKTYPE_ETHERNET`, microsecond timestamps), then one Enhanced Packet Block
//! per frame. Little-endian, which every reader handles via the byte-order magic; every block and
//! option value is padded to 32 bits and every block repeats its total length at its end.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

/// Section Header Block type; a palindrome so the byte order can be detected after it.
const SHB_TYPE: u32 = 0x0A0D_0D0A;
/// Interface Description Block type.
const IDB_TYPE: u32 = 0x0000_0001;
/// Enhanced Packet Block type.
const EPB_TYPE: u32 = 0x0000_0006;
/// Written as-is; a reader sees 0x4D3C2B1A if the file's byte order differs from its own.
const BYTE_ORDER_MAGIC: u32 = 0x1A2B_3C4D;

/// Ethernet II, as in pcap's LINKTYPE_ETHERNET.
pub const LINKTYPE_ETHERNET: u16 = 1;
/// Largest frame length recorded, libpcap's `MAXIMUM_SNAPLEN`; well above any frame we carry.
pub const SNAPLEN: u32 = 262_144;

/// Terminates an option list.
const OPT_ENDOFOPT: u16 = 0;
/// A UTF-8 comment, valid in every block.
const OPT_COMMENT: u16 = 1;
/// SHB: the application that wrote the file.
const SHB_USERAPPL: u16 = 4;
/// IDB: the interface's name.
const IF_NAME: u16 = 2;

/// Writes a pcapng capture to `W`.
///
/// Each block is assembled in a reusable buffer and handed to `W` in one `write_all`, so an
/// unbuffered `W` costs one system call per packet; use [`create`] for a buffered file.
#[derive(Debug)]
pub struct PcapWriter<W: Write> {
    w: W,
    /// Scratch space for the block being built.
    block: Vec<u8>,
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
        let mut pw = PcapWriter { w, block: Vec::with_capacity(2048) };

        begin_block(&mut pw.block, SHB_TYPE);
        put_u32(&mut pw.block, BYTE_ORDER_MAGIC);
        put_u16(&mut pw.block, 1); // major version
        put_u16(&mut pw.block, 0); // minor version
        pw.block.extend_from_slice(&(-1i64).to_le_bytes()); // section length: not known
        let userappl = concat!("colo-proxy ", env!("CARGO_PKG_VERSION"));
        put_option(&mut pw.block, SHB_USERAPPL, userappl.as_bytes());
        end_block(&mut pw.block, true)?;
        pw.w.write_all(&pw.block)?;

        begin_block(&mut pw.block, IDB_TYPE);
        put_u16(&mut pw.block, LINKTYPE_ETHERNET);
        put_u16(&mut pw.block, 0); // reserved
        put_u32(&mut pw.block, SNAPLEN);
        // if_tsresol is left out: its default is microseconds, which is what we write.
        if let Some(name) = if_name {
            put_option(&mut pw.block, IF_NAME, truncate_utf8(name, u16::MAX as usize).as_bytes());
        }
        end_block(&mut pw.block, if_name.is_some())?;
        pw.w.write_all(&pw.block)?;

        Ok(pw)
    }

    /// Appends one Ethernet frame (without any virtio-net header) captured at `timestamp`, with
    /// an optional comment. Timestamps have microsecond resolution; ones before 1970 are written
    /// as 0. A comment over 65535 bytes is truncated at a character boundary.
    pub fn write_packet(&mut self, timestamp: SystemTime, frame: &[u8], comment: Option<&str>) -> io::Result<()> {
        let len = u32::try_from(frame.len()).map_err(|_| invalid("frame too long for pcapng"))?;
        let micros = timestamp.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64);

        begin_block(&mut self.block, EPB_TYPE);
        put_u32(&mut self.block, 0); // interface id: our only interface
        put_u32(&mut self.block, (micros >> 32) as u32);
        put_u32(&mut self.block, micros as u32);
        put_u32(&mut self.block, len); // captured length
        put_u32(&mut self.block, len); // original length
        self.block.extend_from_slice(frame);
        pad32(&mut self.block);
        if let Some(text) = comment {
            put_option(&mut self.block, OPT_COMMENT, truncate_utf8(text, u16::MAX as usize).as_bytes());
        }
        end_block(&mut self.block, comment.is_some())?;
        self.w.write_all(&self.block)
    }

    /// Flushes the underlying writer.
    pub fn flush(&mut self) -> io::Result<()> {
        self.w.flush()
    }

    /// The underlying writer, not flushed.
    pub fn into_inner(self) -> W {
        self.w
    }
}

/// Creates (or truncates) the file at `path` and starts a capture in it, buffered.
pub fn create(path: &Path) -> io::Result<PcapWriter<BufWriter<File>>> {
    PcapWriter::new(BufWriter::new(File::create(path)?))
}

fn invalid(what: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, what)
}

fn put_u16(buf: &mut Vec<u8>, v: u16) {
    buf.extend_from_slice(&v.to_le_bytes());
}

fn put_u32(buf: &mut Vec<u8>, v: u32) {
    buf.extend_from_slice(&v.to_le_bytes());
}

/// Zero-pads `buf` to a multiple of 4 bytes (blocks always start aligned, so this aligns the
/// block's contents too).
fn pad32(buf: &mut Vec<u8>) {
    buf.resize(buf.len().next_multiple_of(4), 0);
}

/// Clears `buf` and starts a block: type and a total-length placeholder.
fn begin_block(buf: &mut Vec<u8>, block_type: u32) {
    buf.clear();
    put_u32(buf, block_type);
    put_u32(buf, 0);
}

/// Appends one option; `value` must be at most 65535 bytes.
fn put_option(buf: &mut Vec<u8>, code: u16, value: &[u8]) {
    put_u16(buf, code);
    put_u16(buf, value.len() as u16);
    buf.extend_from_slice(value);
    pad32(buf);
}

/// Ends the options (if any were written) and the block: total length at both ends.
fn end_block(buf: &mut Vec<u8>, has_options: bool) -> io::Result<()> {
    if has_options {
        put_u16(buf, OPT_ENDOFOPT);
        put_u16(buf, 0);
    }
    let total = u32::try_from(buf.len() + 4).map_err(|_| invalid("pcapng block too long"))?;
    buf[4..8].copy_from_slice(&total.to_le_bytes());
    put_u32(buf, total);
    Ok(())
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
    use super::*;
    use std::process::Command;
    use std::time::Duration;

    fn le16(b: &[u8], at: usize) -> u16 {
        u16::from_le_bytes([b[at], b[at + 1]])
    }

    fn le32(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
    }

    /// A parsed block: type, body (between the length fields).
    fn blocks(file: &[u8]) -> Vec<(u32, &[u8])> {
        let mut out = Vec::new();
        let mut at = 0;
        while at < file.len() {
            let ty = le32(file, at);
            let len = le32(file, at + 4) as usize;
            assert_eq!(len % 4, 0, "block length {len} not aligned");
            assert!(len >= 12);
            assert_eq!(le32(file, at + len - 4) as usize, len, "trailing length differs");
            out.push((ty, &file[at + 8..at + len - 4]));
            at += len;
        }
        assert_eq!(at, file.len());
        out
    }

    /// Parses an option list, checking padding and the terminator.
    fn options(mut b: &[u8]) -> Vec<(u16, Vec<u8>)> {
        let mut out = Vec::new();
        if b.is_empty() {
            return out;
        }
        loop {
            let (code, len) = (le16(b, 0), le16(b, 2) as usize);
            if code == OPT_ENDOFOPT {
                assert_eq!(len, 0);
                assert_eq!(b.len(), 4, "bytes after opt_endofopt");
                return out;
            }
            out.push((code, b[4..4 + len].to_vec()));
            let padded = len.next_multiple_of(4);
            assert!(b[4 + len..4 + padded].iter().all(|&x| x == 0));
            b = &b[4 + padded..];
        }
    }

    fn frame(len: usize) -> Vec<u8> {
        (0..len).map(|i| i as u8).collect()
    }

    fn sample(w: Vec<u8>, name: Option<&str>) -> Vec<u8> {
        let mut pw = match name {
            Some(n) => PcapWriter::with_if_name(w, n).unwrap(),
            None => PcapWriter::new(w).unwrap(),
        };
        let t = UNIX_EPOCH + Duration::from_micros(0x1_2345_6789);
        pw.write_packet(t, &frame(60), None).unwrap();
        pw.write_packet(t, &frame(61), Some("primary released (miscompare: payload)")).unwrap();
        pw.write_packet(t, &frame(1514), Some("é")).unwrap();
        pw.flush().unwrap();
        pw.into_inner()
    }

    #[test]
    fn structure() {
        let file = sample(Vec::new(), Some("eth0"));
        let b = blocks(&file);
        assert_eq!(b.iter().map(|(t, _)| *t).collect::<Vec<_>>(), [SHB_TYPE, IDB_TYPE, EPB_TYPE, EPB_TYPE, EPB_TYPE]);

        let shb = b[0].1;
        assert_eq!(le32(shb, 0), BYTE_ORDER_MAGIC);
        assert_eq!((le16(shb, 4), le16(shb, 6)), (1, 0));
        assert_eq!(&shb[8..16], &[0xff; 8]);
        let opts = options(&shb[16..]);
        assert_eq!(opts[0].0, SHB_USERAPPL);
        assert!(opts[0].1.starts_with(b"colo-proxy "));

        let idb = b[1].1;
        assert_eq!((le16(idb, 0), le32(idb, 4)), (LINKTYPE_ETHERNET, SNAPLEN));
        assert_eq!(options(&idb[8..]), vec![(IF_NAME, b"eth0".to_vec())]);

        for (i, (len, comment)) in [(60, None), (61, Some("primary released (miscompare: payload)")), (1514, Some("é"))]
            .into_iter()
            .enumerate()
        {
            let epb = b[2 + i].1;
            assert_eq!(le32(epb, 0), 0);
            let ts = (le32(epb, 4) as u64) << 32 | le32(epb, 8) as u64;
            assert_eq!(ts, 0x1_2345_6789);
            assert_eq!((le32(epb, 12), le32(epb, 16)), (len as u32, len as u32));
            assert_eq!(&epb[20..20 + len], &frame(len)[..]);
            let padded = 20 + len.next_multiple_of(4);
            assert!(epb[20 + len..padded].iter().all(|&x| x == 0));
            let want: Vec<(u16, Vec<u8>)> = comment.map(|c| (OPT_COMMENT, c.as_bytes().to_vec())).into_iter().collect();
            assert_eq!(options(&epb[padded..]), want);
        }
    }

    #[test]
    fn no_if_name_means_no_idb_options() {
        let file = sample(Vec::new(), None);
        let b = blocks(&file);
        assert_eq!(b[1].1.len(), 8);
    }

    #[test]
    fn pre_epoch_timestamp_and_long_comment() {
        let mut pw = PcapWriter::new(Vec::new()).unwrap();
        let long = "é".repeat(40_000); // 80000 bytes
        pw.write_packet(UNIX_EPOCH - Duration::from_secs(1), &frame(14), Some(&long)).unwrap();
        let file = pw.into_inner();
        let b = blocks(&file);
        let epb = b[2].1;
        assert_eq!((le32(epb, 4), le32(epb, 8)), (0, 0));
        let opts = options(&epb[36..]);
        assert_eq!(opts[0].1.len(), 65534);
        assert!(std::str::from_utf8(&opts[0].1).is_ok());
    }

    /// Removes the file when dropped, whether the test passes or not.
    struct TempFile(std::path::PathBuf);

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

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
        let t = SystemTime::now();
        pw.write_packet(t, &frame(60), None).unwrap();
        pw.write_packet(t, &frame(61), Some("primary released (miscompare: payload)")).unwrap();
        pw.write_packet(t, &frame(1514), Some("secondary dropped")).unwrap();
        pw.flush().unwrap();
        drop(pw);

        // tshark 4.0 names the comment field `frame.comment` (`pkt_comment` is the protocol).
        let out = Command::new(tshark)
            .args(["-n", "-r"])
            .arg(&tmp.0)
            .args(["-T", "fields", "-e", "frame.len", "-e", "frame.comment"])
            .output()
            .unwrap();
        assert!(out.status.success(), "tshark failed: {}", String::from_utf8_lossy(&out.stderr));
        let stdout = String::from_utf8(out.stdout).unwrap();
        let lines: Vec<&str> = stdout.lines().collect();
        assert_eq!(lines, ["60\t", "61\tprimary released (miscompare: payload)", "1514\tsecondary dropped"]);
    }
}
