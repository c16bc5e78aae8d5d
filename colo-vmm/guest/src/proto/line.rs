//! Newline-terminated lines read from a byte stream, with a bounded buffer per client.

/// What [`LineReader::feed`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Line<'a> {
    /// A complete line, without its `\n` (and without a `\r` before it).
    Text(&'a [u8]),
    /// A line longer than the reader's capacity; its bytes were dropped.
    TooLong,
}

/// Collects bytes up to a newline. Holds at most `N` bytes of a line: a longer line is dropped
/// up to its newline and reported as [`Line::TooLong`], so a client cannot grow our memory.
#[derive(Debug, Clone)]
pub struct LineReader<const N: usize> {
    buf: [u8; N],
    len: usize,
    overflowed: bool,
    /// The previous call returned a line, which lives in `buf` until the next call.
    line_returned: bool,
}

impl<const N: usize> Default for LineReader<N> {
    fn default() -> Self {
        LineReader { buf: [0; N], len: 0, overflowed: false, line_returned: false }
    }
}

impl<const N: usize> LineReader<N> {
    /// Takes bytes from `data` until a line is complete. Returns how many bytes it took and
    /// the line, if one was completed; bytes after the newline are left for the next call.
    pub fn feed(&mut self, data: &[u8]) -> (usize, Option<Line<'_>>) {
        if self.line_returned {
            self.len = 0;
            self.overflowed = false;
            self.line_returned = false;
        }
        for (i, &byte) in data.iter().enumerate() {
            if byte == b'\n' {
                self.line_returned = true;
                let line = if self.overflowed {
                    Line::TooLong
                } else {
                    let text = &self.buf[..self.len];
                    Line::Text(text.strip_suffix(b"\r").unwrap_or(text))
                };
                return (i + 1, Some(line));
            }
            if self.len < N {
                self.buf[self.len] = byte;
                self.len += 1;
            } else {
                self.overflowed = true;
            }
        }
        (data.len(), None)
    }

    /// Whether part of a line is buffered.
    pub fn has_partial_line(&self) -> bool {
        !self.line_returned && (self.len > 0 || self.overflowed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_lines_and_leaves_the_rest() {
        let mut r = LineReader::<16>::default();
        let data = b"inc\r\nget\npart";
        let (n, line) = r.feed(data);
        assert_eq!((n, line), (5, Some(Line::Text(b"inc"))));
        let (m, line) = r.feed(&data[n..]);
        assert_eq!((m, line), (4, Some(Line::Text(b"get"))));
        let (k, line) = r.feed(&data[n + m..]);
        assert_eq!((k, line), (4, None));
        assert!(r.has_partial_line());
        assert_eq!(r.feed(b"ial\n"), (4, Some(Line::Text(b"partial"))));
        assert!(!r.has_partial_line());
    }

    #[test]
    fn long_lines_are_dropped_to_their_newline() {
        let mut r = LineReader::<4>::default();
        assert_eq!(r.feed(b"abcdefgh"), (8, None));
        assert_eq!(r.feed(b"ij\nget\n"), (3, Some(Line::TooLong)));
        assert_eq!(r.feed(b"get\n"), (4, Some(Line::Text(b"get"))));
        // Exactly N bytes still fit.
        assert_eq!(r.feed(b"abcd\n"), (5, Some(Line::Text(b"abcd"))));
    }

    #[test]
    fn empty_lines() {
        let mut r = LineReader::<4>::default();
        assert_eq!(r.feed(b"\n"), (1, Some(Line::Text(b""))));
        assert_eq!(r.feed(b"\r\n"), (2, Some(Line::Text(b""))));
        assert_eq!(r.feed(b""), (0, None));
    }
}
