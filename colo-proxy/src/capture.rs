//! `--capture FILE.pcap`: every frame that took part in an inconsistency, from both sides, with
//! its verdict in the packet comment ("primary released (miscompare: payload)").

use std::fs::File;
use std::io::{self, BufWriter};
use std::path::Path;
use std::time::SystemTime;

use crate::compare::{Disposal, DropCause, Verdict};
use crate::frame::Frame;
use crate::pcap::{self, PcapWriter};

/// A pcapng file of miscompared frames.
pub struct Capture {
    writer: PcapWriter<BufWriter<File>>,
    frames: u64,
    failed: bool,
}

impl Capture {
    /// Creates (truncates) the capture file.
    pub fn create(path: &Path) -> io::Result<Capture> {
        Ok(Capture { writer: pcap::create(path)?, frames: 0, failed: false })
    }

    /// Frames written so far.
    pub fn frames(&self) -> u64 {
        self.frames
    }

    /// Records `frame` if it took part in an inconsistency. A write error is logged once and
    /// capturing stops; the proxy carries on.
    pub fn record(&mut self, frame: &Frame, d: &Disposal) {
        let Some(reason) = d.miscompare else { return };
        if self.failed {
            return;
        }
        let comment = format!("{} {} (miscompare: {})", d.side.name(), verdict_text(d.verdict), reason.name());
        if let Err(e) = self.writer.write_packet(SystemTime::now(), frame.ethernet(), Some(&comment)) {
            tracing::error!(error = %e, "capture write failed; capture stopped");
            self.failed = true;
            return;
        }
        self.frames += 1;
    }

    /// Writes buffered frames to the file (call after each batch, so the file is readable while
    /// the proxy runs).
    pub fn flush(&mut self) {
        if !self.failed {
            if let Err(e) = self.writer.flush() {
                tracing::error!(error = %e, "capture flush failed; capture stopped");
                self.failed = true;
            }
        }
    }
}

fn verdict_text(v: Verdict) -> &'static str {
    match v {
        Verdict::Released => "released",
        Verdict::Dropped(DropCause::Matched) => "dropped (matched)",
        Verdict::Dropped(DropCause::Flushed) => "dropped (flushed at checkpoint)",
        Verdict::Dropped(DropCause::Mode) => "dropped (mode)",
        Verdict::Dropped(DropCause::Uncompared) => "dropped (uncompared)",
        Verdict::Dropped(DropCause::Overflow) => "dropped (queue overflow)",
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builder::udp4;
    use crate::compare::Reason;
    use crate::frame::Side;

    #[test]
    fn only_miscompared_frames_are_recorded_with_their_verdict() {
        let path = std::env::temp_dir().join(format!("colo-capture-{}.pcapng", std::process::id()));
        let mut c = Capture::create(&path).unwrap();
        let f = Frame::new(udp4(1, 2, b"x"));
        c.record(&f, &Disposal { side: Side::Primary, verdict: Verdict::Released, miscompare: None });
        c.record(&f, &Disposal { side: Side::Primary, verdict: Verdict::Released, miscompare: Some(Reason::Payload) });
        let d = Disposal {
            side: Side::Secondary,
            verdict: Verdict::Dropped(DropCause::Flushed),
            miscompare: Some(Reason::Payload),
        };
        c.record(&f, &d);
        assert_eq!(c.frames(), 2);
        drop(c);
        let bytes = std::fs::read(&path).unwrap();
        let text = String::from_utf8_lossy(&bytes);
        assert!(text.contains("primary released (miscompare: payload)"));
        assert!(text.contains("secondary dropped (flushed at checkpoint) (miscompare: payload)"));
        std::fs::remove_file(&path).unwrap();
    }
}
