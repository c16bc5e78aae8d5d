//! Control lines (docs/control.md) on any byte stream: the line splitter, command parsing (the
//! compare process's side) and event parsing (the controller's side).
//!
//! Invariants:
//! - nothing panics, and no more than one line's bound is ever held;
//! - any split of the stream into reads gives the same lines;
//! - a line that parses as a command is re-encoded into a line that parses as the same command;
//!   a refused line's error names the `id` only if the line had that `id`;
//! - an event that parses survives its own encoding.

#![no_main]

use arbitrary::Arbitrary;
use colo_proxy::control::lines::{Line, LineBuffer};
use colo_proxy::control::{Command, Event, MAX_LINE};
use libfuzzer_sys::fuzz_target;

#[derive(Debug, Arbitrary)]
struct Input {
    /// A smaller bound than MAX_LINE, so that over-long lines happen.
    max: u8,
    stream: Vec<u8>,
    cuts: Vec<u8>,
    /// Lines checked against the real bound.
    lines: Vec<String>,
}

#[derive(Debug, PartialEq)]
enum Got {
    Line(Vec<u8>),
    TooLong,
}

fn split(max: usize, pieces: impl Iterator<Item = Vec<u8>>) -> Vec<Got> {
    let mut buf = LineBuffer::new(max);
    let mut got = Vec::new();
    for piece in pieces {
        buf.push(&piece, |l| match l {
            Line::Complete(b) => {
                assert!(b.len() <= max && !b.contains(&b'\n'));
                got.push(Got::Line(b.to_vec()));
            }
            Line::TooLong => got.push(Got::TooLong),
        });
        assert!(buf.pending() <= max, "an incomplete line beyond the bound is held");
    }
    got
}

fuzz_target!(|input: Input| {
    let max = usize::from(input.max) + 1;
    let whole = split(max, std::iter::once(input.stream.clone()));
    let mut rest = &input.stream[..];
    let mut i = 0;
    let pieces = std::iter::from_fn(|| {
        if rest.is_empty() {
            return None;
        }
        let n = input.cuts.get(i % input.cuts.len().max(1)).map_or(rest.len(), |&c| usize::from(c) + 1).min(rest.len());
        i += 1;
        let (head, tail) = rest.split_at(n);
        rest = tail;
        Some(head.to_vec())
    });
    assert_eq!(whole, split(max, pieces), "the split of the stream changes nothing");

    let texts = input.lines.iter().map(|l| l.as_bytes().to_vec());
    for got in split(MAX_LINE, texts.chain(std::iter::once(input.stream.clone()))) {
        if let Got::Line(line) = got {
            line_checks(&line);
        }
    }
    for line in &input.lines {
        line_checks(line.as_bytes());
    }
});

fn line_checks(line: &[u8]) {
    let value: Option<serde_json::Value> = serde_json::from_slice(line).ok();
    match Command::parse(line) {
        Ok(cmd) => {
            let again = Command::parse(cmd.to_line().as_bytes()).expect("a command's own line parses");
            assert_eq!(again, cmd);
            assert_eq!(value.as_ref().and_then(|v| v.get("id")).and_then(|v| v.as_u64()), Some(cmd.id()));
        }
        Err(e) => {
            if let Some(id) = e.id {
                let line_id = value.as_ref().and_then(|v| v.get("id")).and_then(|v| v.as_u64());
                assert_eq!(line_id, Some(id), "an error names only the line's own id");
            }
            let _ = e.to_event().to_line();
        }
    }
    if let Ok(event) = Event::parse(line) {
        let again = Event::parse(event.to_line().as_bytes()).expect("an event's own line parses");
        assert_eq!(again, event);
        let _ = event.reply_to();
    }
}
