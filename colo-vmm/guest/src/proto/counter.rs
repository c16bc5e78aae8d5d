//! The counter protocol (TCP port 9000): one command per line, one reply line per command.
//!
//! - `inc` — adds one to the counter and replies with the new value (the first `inc` after
//!   boot gets `1`);
//! - `get` — replies with the current value;
//! - an empty line gets no reply; anything else gets `err unknown command`, and a line longer
//!   than [`MAX_LINE`] bytes gets `err line too long`.
//!
//! Commands may end in `\r\n` or `\n`; surrounding spaces are ignored. The counter is shared
//! by every client and lives in guest memory, so a checkpoint carries it and a failover must
//! neither lose nor repeat an increment.

use core::fmt::Write;

use super::line::Line;
use crate::fmt::SliceWriter;

/// Longest command line kept.
pub const MAX_LINE: usize = 64;
/// Longest reply, newline included: a u64 has at most 20 digits.
pub const MAX_REPLY: usize = 24;

/// Applies one line to `counter` and writes the reply (nothing for an empty line) into `out`,
/// which must hold [`MAX_REPLY`] bytes. Returns the number of bytes written.
pub fn respond(line: Line<'_>, counter: &mut u64, out: &mut [u8; MAX_REPLY]) -> usize {
    let mut w = SliceWriter::new(out);
    // The replies fit MAX_REPLY by construction, so the writes cannot fail.
    let _ = match line {
        Line::TooLong => w.write_str("err line too long\n"),
        Line::Text(text) => match text.trim_ascii() {
            b"" => Ok(()),
            b"inc" => {
                *counter = counter.wrapping_add(1);
                writeln!(w, "{counter}")
            }
            b"get" => writeln!(w, "{counter}"),
            _ => w.write_str("err unknown command\n"),
        },
    };
    w.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(line: Line<'_>, counter: &mut u64) -> std::string::String {
        let mut out = [0; MAX_REPLY];
        let n = respond(line, counter, &mut out);
        std::string::String::from_utf8(out[..n].to_vec()).unwrap()
    }

    #[test]
    fn inc_and_get() {
        let mut c = 0;
        assert_eq!(reply(Line::Text(b"get"), &mut c), "0\n");
        for i in 1..=1000u64 {
            assert_eq!(reply(Line::Text(b"inc"), &mut c), std::format!("{i}\n"));
        }
        assert_eq!(reply(Line::Text(b" get "), &mut c), "1000\n");
        assert_eq!(c, 1000);
    }

    #[test]
    fn errors_and_empty_lines() {
        let mut c = 5;
        assert_eq!(reply(Line::Text(b""), &mut c), "");
        assert_eq!(reply(Line::Text(b"INC"), &mut c), "err unknown command\n");
        assert_eq!(reply(Line::TooLong, &mut c), "err line too long\n");
        assert_eq!(c, 5);
    }

    #[test]
    fn largest_value_fits() {
        let mut c = u64::MAX - 1;
        assert_eq!(reply(Line::Text(b"inc"), &mut c), "18446744073709551615\n");
    }
}
