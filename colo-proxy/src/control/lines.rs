//! Splitting a byte stream into bounded lines.
//!
//! A peer that sends a line longer than the bound gets one error for it, and the rest of that
//! line (up to the next `\n`) is skipped, so memory stays bounded whatever the peer sends and the
//! stream recovers at the next line.

/// What [`LineBuffer::push`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Line<'a> {
    /// A complete line, without its `\n`.
    Complete(&'a [u8]),
    /// A line exceeded the bound; it is skipped up to its `\n`.
    TooLong,
}

/// Collects bytes until a `\n` completes a line.
#[derive(Debug)]
pub struct LineBuffer {
    partial: Vec<u8>,
    max: usize,
    discarding: bool,
}

impl LineBuffer {
    /// A buffer for lines of at most `max` bytes (not counting the `\n`).
    pub fn new(max: usize) -> LineBuffer {
        LineBuffer { partial: Vec::new(), max, discarding: false }
    }

    /// Adds `data` and calls `f` for every line it completes, and once for every line that
    /// exceeds the bound.
    pub fn push(&mut self, data: &[u8], mut f: impl FnMut(Line<'_>)) {
        let mut rest = data;
        while let Some(end) = rest.iter().position(|&b| b == b'\n') {
            let segment = &rest[..end];
            rest = &rest[end + 1..];
            if self.discarding {
                // The error was reported when the bound was crossed.
                self.discarding = false;
            } else if self.partial.len() + segment.len() > self.max {
                self.partial.clear();
                f(Line::TooLong);
            } else if self.partial.is_empty() {
                // The common case, a whole line inside one read: no copy.
                f(Line::Complete(segment));
            } else {
                self.partial.extend_from_slice(segment);
                f(Line::Complete(&self.partial));
                self.partial.clear();
            }
        }
        if self.discarding || rest.is_empty() {
            return;
        }
        if self.partial.len() + rest.len() > self.max {
            // Report now rather than at the `\n`, which may never come.
            self.partial = Vec::new();
            self.discarding = true;
            f(Line::TooLong);
        } else {
            self.partial.extend_from_slice(rest);
        }
    }

    /// Bytes of an incomplete line held now.
    pub fn pending(&self) -> usize {
        self.partial.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, Eq)]
    enum Got {
        Line(String),
        TooLong,
    }

    fn feed(buffer: &mut LineBuffer, data: &[u8]) -> Vec<Got> {
        let mut got = Vec::new();
        buffer.push(data, |line| {
            got.push(match line {
                Line::Complete(l) => Got::Line(String::from_utf8(l.to_vec()).unwrap()),
                Line::TooLong => Got::TooLong,
            })
        });
        got
    }

    fn line(s: &str) -> Got {
        Got::Line(s.to_string())
    }

    #[test]
    fn splits_lines_across_and_within_chunks() {
        let mut b = LineBuffer::new(100);
        assert_eq!(feed(&mut b, b"ab"), vec![]);
        assert_eq!(b.pending(), 2);
        assert_eq!(feed(&mut b, b"c\nde\n\nf"), vec![line("abc"), line("de"), line("")]);
        assert_eq!(feed(&mut b, b"\n"), vec![line("f")]);
        assert_eq!(b.pending(), 0);
    }

    #[test]
    fn a_line_of_exactly_the_bound_is_accepted() {
        let mut b = LineBuffer::new(4);
        assert_eq!(feed(&mut b, b"abcd\n"), vec![line("abcd")]);
        assert_eq!(feed(&mut b, b"ab"), vec![]);
        assert_eq!(feed(&mut b, b"cd"), vec![]);
        assert_eq!(feed(&mut b, b"\nabcde\nx\n"), vec![line("abcd"), Got::TooLong, line("x")]);
    }

    #[test]
    fn an_over_long_line_is_reported_once_and_skipped_to_its_newline() {
        let mut b = LineBuffer::new(4);
        assert_eq!(feed(&mut b, b"abc"), vec![]);
        assert_eq!(feed(&mut b, b"def"), vec![Got::TooLong]);
        assert_eq!(b.pending(), 0);
        assert_eq!(feed(&mut b, b"ghijklmnop"), vec![]);
        assert_eq!(b.pending(), 0);
        assert_eq!(feed(&mut b, b"qr\nok\n"), vec![line("ok")]);
    }
}
