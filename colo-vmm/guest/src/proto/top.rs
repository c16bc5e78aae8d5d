//! The `top` line (TCP port 9100): every `top_ms` milliseconds each client gets
//!
//! ```text
//! top seq=<n> t=<tsc> up_ms=<ms since boot> burn=<burn iterations since the last line> dirty=<pages written so far>
//! ```
//!
//! The values depend on timing, so two replicas of the guest print different lines: this is
//! the divergent service COLO has to checkpoint for.

use core::fmt::Write;

use crate::fmt::SliceWriter;

/// Longest line: the fixed text plus five u64s.
pub const MAX_LINE: usize = 160;

/// The values of one line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TopLine {
    /// Lines sent before this one (per guest, not per client).
    pub seq: u64,
    /// The TSC when the line was made.
    pub tsc: u64,
    /// Milliseconds since boot.
    pub up_ms: u64,
    /// Burn iterations since the previous line.
    pub burn: u64,
    /// Pages the dirtier has written since boot.
    pub dirty: u64,
}

impl TopLine {
    /// Formats the line (with its newline) into `out`; returns its length.
    pub fn write(&self, out: &mut [u8; MAX_LINE]) -> usize {
        let mut w = SliceWriter::new(out);
        let TopLine { seq, tsc, up_ms, burn, dirty } = self;
        // Five u64s and the fixed text fit MAX_LINE, so this cannot fail.
        let _ = writeln!(w, "top seq={seq} t={tsc} up_ms={up_ms} burn={burn} dirty={dirty}");
        w.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format() {
        let mut out = [0; MAX_LINE];
        let n = TopLine { seq: 1, tsc: 2, up_ms: 3, burn: 4, dirty: 5 }.write(&mut out);
        assert_eq!(&out[..n], b"top seq=1 t=2 up_ms=3 burn=4 dirty=5\n");
        let max = TopLine { seq: u64::MAX, tsc: u64::MAX, up_ms: u64::MAX, burn: u64::MAX, dirty: u64::MAX };
        let n = max.write(&mut out);
        assert_eq!(out[n - 1], b'\n');
    }
}
