//! The `kv` protocol (TCP port 9200): one command per line, one reply line per command.
//!
//! - `put KEY VALUE` — stores VALUE (the rest of the line, at most 400 bytes) under KEY (1 to
//!   64 bytes, no spaces); replies `ok` once the record is on the disk;
//! - `get KEY` — the latest value, or `none`;
//! - `scan` — reads the whole log again: `records=N keys=K repeated=R mismatch=0|1`;
//! - `fill MIB`, `read MIB` — write or read MIB MiB of the disk's scratch area (after the log),
//!   in large requests, then `ok` (a throughput workload for the benchmarks).
//!
//! Errors: `err ...`; an empty line gets no reply.

use crate::kvlog::{MAX_KEY, MAX_VALUE};

/// Longest command line kept.
pub const MAX_LINE: usize = 4 + MAX_KEY + 1 + MAX_VALUE + 16;
/// Most MiB one `fill` or `read` may ask for.
pub const MAX_BENCH_MIB: u32 = 4096;

/// A parsed command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command<'a> {
    /// `put`.
    Put {
        /// The key.
        key: &'a [u8],
        /// The value.
        value: &'a [u8],
    },
    /// `get`.
    Get {
        /// The key.
        key: &'a [u8],
    },
    /// `scan`.
    Scan,
    /// `fill`.
    Fill {
        /// MiB.
        mib: u32,
    },
    /// `read`.
    Read {
        /// MiB.
        mib: u32,
    },
    /// An empty line.
    Empty,
    /// Anything else: the reply, without `err ` and the newline.
    Bad(&'static str),
}

fn key(k: &[u8]) -> Result<&[u8], &'static str> {
    if k.is_empty() || k.len() > MAX_KEY || !k.iter().all(|b| b.is_ascii_graphic()) {
        return Err("a key is 1 to 64 printable bytes without spaces");
    }
    Ok(k)
}

fn mib(v: &[u8]) -> Result<u32, &'static str> {
    core::str::from_utf8(v)
        .ok()
        .and_then(|s| s.parse().ok())
        .filter(|m| (1..=MAX_BENCH_MIB).contains(m))
        .ok_or("expected MiB, 1 to 4096")
}

/// Parses one line (without its newline).
pub fn parse(line: &[u8]) -> Command<'_> {
    let line = line.trim_ascii();
    if line.is_empty() {
        return Command::Empty;
    }
    let (verb, rest) = match line.iter().position(|&b| b == b' ') {
        Some(i) => (&line[..i], line[i + 1..].trim_ascii_start()),
        None => (line, &b""[..]),
    };
    let parsed = match verb {
        b"put" => {
            let (k, v) = match rest.iter().position(|&b| b == b' ') {
                Some(i) => (&rest[..i], &rest[i + 1..]),
                None => (rest, &b""[..]),
            };
            key(k).and_then(|key| match v.len() {
                0 => Err("put KEY VALUE"),
                n if n > MAX_VALUE => Err("a value is at most 400 bytes"),
                _ if !v.iter().all(|&b| b == b' ' || b.is_ascii_graphic()) => Err("a value is printable text"),
                _ => Ok(Command::Put { key, value: v }),
            })
        }
        b"get" => key(rest).map(|key| Command::Get { key }),
        b"scan" if rest.is_empty() => Ok(Command::Scan),
        b"fill" => mib(rest).map(|mib| Command::Fill { mib }),
        b"read" => mib(rest).map(|mib| Command::Read { mib }),
        _ => Err("unknown command (put, get, scan, fill, read)"),
    };
    parsed.unwrap_or_else(Command::Bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands() {
        assert_eq!(parse(b"put k1 hello world"), Command::Put { key: b"k1", value: b"hello world" });
        assert_eq!(parse(b"  get k1 "), Command::Get { key: b"k1" });
        assert_eq!(parse(b"scan"), Command::Scan);
        assert_eq!(parse(b"fill 64"), Command::Fill { mib: 64 });
        assert_eq!(parse(b"read 1"), Command::Read { mib: 1 });
        assert_eq!(parse(b""), Command::Empty);
    }

    #[test]
    fn bad_input() {
        for bad in [
            &b"put"[..],
            b"put k",
            b"get",
            b"get two keys",
            b"put k \x01",
            b"fill 0",
            b"fill 99999",
            b"fill x",
            b"scan now",
            b"PUT k v",
            b"drop k",
        ] {
            assert!(matches!(parse(bad), Command::Bad(_)), "{:?}", core::str::from_utf8(bad));
        }
        let long_key = [b'k'; MAX_KEY + 1];
        let mut line = b"get ".to_vec();
        line.extend_from_slice(&long_key);
        assert!(matches!(parse(&line), Command::Bad(_)));
        let mut line = b"put k ".to_vec();
        line.extend_from_slice(&[b'v'; MAX_VALUE + 1]);
        assert!(matches!(parse(&line), Command::Bad(_)));
    }
}
