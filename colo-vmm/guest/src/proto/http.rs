//! A small HTTP/1.1 server's protocol (TCP port 80): request heads in, responses out.
//!
//! | request | response |
//! |---|---|
//! | `GET /` | 200, `text/html`, [`INDEX_PAGE`] |
//! | `GET /stats` | 200, `text/plain`, one `key=value` line per counter ([`Stats`]) |
//! | `GET /bytes/<n>` | 200, `application/octet-stream`, `n` bytes (≤ [`MAX_STREAM`]) of `abc…z` repeated, byte `i` being `b'a' + i % 26` — for throughput measurements |
//! | `GET` anything else | 404 |
//! | `HEAD` | as `GET`, without the body |
//! | other methods | 405, connection closed |
//! | malformed head / head over [`MAX_HEAD`] bytes / not HTTP/1.x | 400 / 431 / 505, connection closed |
//!
//! Connections are persistent unless the client asks otherwise (`Connection: close`, or
//! HTTP/1.0 without `Connection: keep-alive`); pipelined requests are answered in order.
//! Request bodies are not read: a request that announces one is answered and the connection
//! closed. Responses carry no `Date` (the guest has no wall clock).

use core::fmt::{self, Write};

use crate::fmt::SliceWriter;
use crate::stats::{self, Stats};

/// Most bytes of a request head (request line and headers).
pub const MAX_HEAD: usize = 4096;
/// Most bytes of a response built in memory (head plus a non-streamed body).
pub const MAX_RESPONSE: usize = 2048;
/// Largest `/bytes/<n>`.
pub const MAX_STREAM: u64 = 1 << 40;

/// The page at `/`.
pub const INDEX_PAGE: &str = "<!DOCTYPE html>\n<html><head><title>colo-guest</title></head>\n<body><h1>colo-guest</h1>\n<p>The reference guest of colo-vmm: echo, http, counter, top, burn, dirty.</p>\n<p><a href=\"/stats\">/stats</a></p></body></html>\n";

/// A request method.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// `GET`.
    Get,
    /// `HEAD`.
    Head,
    /// Anything else.
    Other,
}

/// A parsed request head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request<'a> {
    /// The method.
    pub method: Method,
    /// The request target (origin form: a path and maybe a query).
    pub target: &'a str,
    /// Whether the connection stays open after the response.
    pub keep_alive: bool,
    /// Whether a body follows the head (which this server does not read).
    pub has_body: bool,
}

/// Why a request head was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadError {
    /// Longer than [`MAX_HEAD`].
    TooLarge,
    /// Not a well-formed HTTP/1.x head.
    Malformed,
    /// An HTTP version other than 1.0 and 1.1.
    Version,
}

/// Accumulates a request head up to its empty line, keeping at most [`MAX_HEAD`] bytes.
#[derive(Debug, Clone)]
pub struct HeadReader {
    buf: [u8; MAX_HEAD],
    len: usize,
    /// The previous call returned a head, which lives in `buf` until the next call.
    head_returned: bool,
}

impl Default for HeadReader {
    fn default() -> Self {
        HeadReader { buf: [0; MAX_HEAD], len: 0, head_returned: false }
    }
}

impl HeadReader {
    /// Takes bytes from `data` until a head is complete. Returns how many bytes it took and,
    /// once the head is complete (or refused), the request. Bytes after the head are left for
    /// the next call (pipelining).
    pub fn feed(&mut self, data: &[u8]) -> (usize, Option<Result<Request<'_>, HeadError>>) {
        if self.head_returned {
            self.len = 0;
            self.head_returned = false;
        }
        for (i, &byte) in data.iter().enumerate() {
            // Empty lines before a request line are allowed (RFC 9112 §2.2).
            if self.len == 0 && (byte == b'\r' || byte == b'\n') {
                continue;
            }
            if self.len == MAX_HEAD {
                self.head_returned = true;
                return (i, Some(Err(HeadError::TooLarge)));
            }
            self.buf[self.len] = byte;
            self.len += 1;
            let head = &self.buf[..self.len];
            if byte == b'\n' && (head.ends_with(b"\n\n") || head.ends_with(b"\n\r\n")) {
                self.head_returned = true;
                return (i + 1, Some(parse_head(&self.buf[..self.len])));
            }
        }
        (data.len(), None)
    }

    /// Whether part of a head is buffered.
    pub fn has_partial_head(&self) -> bool {
        !self.head_returned && self.len > 0
    }
}

/// Parses a complete head (request line, headers, empty line).
pub fn parse_head(head: &[u8]) -> Result<Request<'_>, HeadError> {
    let mut lines = head.split(|&b| b == b'\n').map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    let request_line = lines.next().ok_or(HeadError::Malformed)?;
    let mut parts = request_line.split(|&b| b == b' ');
    let (Some(method), Some(target), Some(version), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(HeadError::Malformed);
    };
    let method = match method {
        b"GET" => Method::Get,
        b"HEAD" => Method::Head,
        m if !m.is_empty() && m.iter().all(|b| b.is_ascii_uppercase()) => Method::Other,
        _ => return Err(HeadError::Malformed),
    };
    let target = core::str::from_utf8(target).map_err(|_| HeadError::Malformed)?;
    if !target.starts_with('/') {
        return Err(HeadError::Malformed);
    }
    let http11 = match version {
        b"HTTP/1.1" => true,
        b"HTTP/1.0" => false,
        v if v.starts_with(b"HTTP/") => return Err(HeadError::Version),
        _ => return Err(HeadError::Malformed),
    };
    let (mut close, mut keep_alive, mut has_body) = (false, false, false);
    for line in lines.filter(|l| !l.is_empty()) {
        let colon = line.iter().position(|&b| b == b':').ok_or(HeadError::Malformed)?;
        let (name, value) = (&line[..colon], line[colon + 1..].trim_ascii());
        // No whitespace between a field name and its colon (RFC 9112 §5.1).
        if name.is_empty() || name.iter().any(|b| b.is_ascii_whitespace()) {
            return Err(HeadError::Malformed);
        }
        if name.eq_ignore_ascii_case(b"connection") {
            for option in value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                close |= option.eq_ignore_ascii_case(b"close");
                keep_alive |= option.eq_ignore_ascii_case(b"keep-alive");
            }
        } else if name.eq_ignore_ascii_case(b"content-length") {
            has_body |= parse_decimal(value).ok_or(HeadError::Malformed)? > 0;
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            has_body = true;
        }
    }
    let keep_alive = !close && (keep_alive || http11);
    Ok(Request { method, target, keep_alive, has_body })
}

/// Parses a non-empty run of ASCII digits that fits a u64.
fn parse_decimal(s: &[u8]) -> Option<u64> {
    if s.is_empty() {
        return None;
    }
    s.iter().try_fold(0u64, |n, &b| {
        let digit = (b as char).to_digit(10)?;
        n.checked_mul(10)?.checked_add(u64::from(digit))
    })
}

/// What a request target asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// `/`.
    Index,
    /// `/stats`.
    Stats,
    /// `/bytes/<n>`.
    Bytes(u64),
    /// Anything else.
    NotFound,
}

/// Maps a request target (the query is ignored) to a route.
pub fn route(target: &str) -> Route {
    let path = target.split('?').next().unwrap_or(target);
    match path {
        "/" => Route::Index,
        "/stats" => Route::Stats,
        _ => match path.strip_prefix("/bytes/").and_then(|n| parse_decimal(n.as_bytes())) {
            Some(n) if n <= MAX_STREAM => Route::Bytes(n),
            _ => Route::NotFound,
        },
    }
}

/// A response as planned by [`respond`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Response {
    /// Bytes of head and in-memory body written to the output buffer.
    pub len: usize,
    /// Bytes of generated body ([`fill_stream`]) to send after them.
    pub stream: u64,
    /// Whether to close the connection once it is sent.
    pub close: bool,
}

/// A response status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Ok,
    BadRequest,
    NotFound,
    MethodNotAllowed,
    HeadTooLarge,
    VersionNotSupported,
}

impl Status {
    fn line(self) -> &'static str {
        match self {
            Status::Ok => "200 OK",
            Status::BadRequest => "400 Bad Request",
            Status::NotFound => "404 Not Found",
            Status::MethodNotAllowed => "405 Method Not Allowed",
            Status::HeadTooLarge => "431 Request Header Fields Too Large",
            Status::VersionNotSupported => "505 HTTP Version Not Supported",
        }
    }
}

/// Builds the response to a head (or to the reason it was refused) into `out`.
pub fn respond(request: Result<Request<'_>, HeadError>, stats: &Stats, out: &mut [u8; MAX_RESPONSE]) -> Response {
    let mut stats_text = [0u8; stats::MAX_FORMATTED];
    let mut w = SliceWriter::new(out);
    let request = match request {
        Ok(request) => request,
        Err(error) => {
            let status = match error {
                HeadError::TooLarge => Status::HeadTooLarge,
                HeadError::Malformed => Status::BadRequest,
                HeadError::Version => Status::VersionNotSupported,
            };
            let body = status.line();
            // The head and a short body fit MAX_RESPONSE; so does every write below.
            let _ = write_head(&mut w, status, "text/plain", body.len() as u64 + 1, false, "")
                .and_then(|_| writeln!(w, "{body}"));
            return Response { len: w.len(), stream: 0, close: true };
        }
    };
    let close = !request.keep_alive || request.has_body;
    if request.method == Method::Other {
        let body = "method not allowed\n";
        let _ = write_head(
            &mut w,
            Status::MethodNotAllowed,
            "text/plain",
            body.len() as u64,
            false,
            "Allow: GET, HEAD\r\n",
        )
        .and_then(|_| w.write_str(body));
        return Response { len: w.len(), stream: 0, close: true };
    }
    let (status, content_type, body, stream): (_, _, &[u8], _) = match route(request.target) {
        Route::Index => (Status::Ok, "text/html", INDEX_PAGE.as_bytes(), 0),
        Route::Stats => {
            let mut sw = SliceWriter::new(&mut stats_text);
            let _ = write!(sw, "{stats}");
            let len = sw.len();
            (Status::Ok, "text/plain", &stats_text[..len], 0)
        }
        Route::Bytes(n) => (Status::Ok, "application/octet-stream", b"", n),
        Route::NotFound => (Status::NotFound, "text/plain", b"not found\n", 0),
    };
    let _ = write_head(&mut w, status, content_type, body.len() as u64 + stream, !close, "");
    let head_len = w.len();
    let is_head = request.method == Method::Head;
    let body_len = if is_head { 0 } else { body.len().min(MAX_RESPONSE - head_len) };
    out[head_len..head_len + body_len].copy_from_slice(&body[..body_len]);
    Response { len: head_len + body_len, stream: if is_head { 0 } else { stream }, close }
}

fn write_head(
    w: &mut SliceWriter<'_>,
    status: Status,
    content_type: &str,
    content_length: u64,
    keep_alive: bool,
    extra_headers: &str,
) -> fmt::Result {
    let connection = if keep_alive { "keep-alive" } else { "close" };
    write!(
        w,
        "HTTP/1.1 {}\r\nServer: colo-guest\r\nContent-Type: {content_type}\r\nContent-Length: {content_length}\r\n{extra_headers}Connection: {connection}\r\n\r\n",
        status.line()
    )
}

/// `abc…z` repeated, long enough to copy large chunks of the stream from any phase.
static PATTERN: [u8; 26 * 64] = {
    let mut p = [0u8; 26 * 64];
    let mut i = 0;
    while i < p.len() {
        p[i] = b'a' + (i % 26) as u8;
        i += 1;
    }
    p
};

/// Fills `buf` with the `/bytes` stream starting at stream offset `offset`.
pub fn fill_stream(offset: u64, buf: &mut [u8]) {
    let mut done = 0;
    while done < buf.len() {
        let phase = ((offset + done as u64) % 26) as usize;
        let n = (buf.len() - done).min(PATTERN.len() - 26);
        buf[done..done + n].copy_from_slice(&PATTERN[phase..phase + n]);
        done += n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::string::String;
    use std::vec::Vec;

    fn read_all(r: &mut HeadReader, data: &[u8]) -> Vec<Result<(Method, String, bool, bool), HeadError>> {
        let mut out = Vec::new();
        let mut rest = data;
        while !rest.is_empty() {
            let (n, got) = r.feed(rest);
            if let Some(got) = got {
                out.push(got.map(|q| (q.method, String::from(q.target), q.keep_alive, q.has_body)));
            }
            rest = &rest[n..];
        }
        out
    }

    #[test]
    fn pipelined_requests_split_anywhere() {
        let data =
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\nHEAD /stats HTTP/1.0\r\n\r\nGET /x HTTP/1.1\nConnection: close\n\n";
        for split in 0..data.len() {
            let mut r = HeadReader::default();
            let mut got = read_all(&mut r, &data[..split]);
            got.extend(read_all(&mut r, &data[split..]));
            assert_eq!(
                got,
                [
                    Ok((Method::Get, "/".into(), true, false)),
                    Ok((Method::Head, "/stats".into(), false, false)),
                    Ok((Method::Get, "/x".into(), false, false)),
                ],
                "split at {split}"
            );
            assert!(!r.has_partial_head());
        }
    }

    #[test]
    fn connection_and_body_headers() {
        let p = |s: &str| parse_head(s.as_bytes()).map(|q| (q.keep_alive, q.has_body));
        assert_eq!(p("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n"), Ok((true, false)));
        assert_eq!(p("GET / HTTP/1.1\r\nconnection: keep-alive, close\r\n\r\n"), Ok((false, false)));
        assert_eq!(p("GET / HTTP/1.1\r\nContent-Length: 0\r\n\r\n"), Ok((true, false)));
        assert_eq!(p("GET / HTTP/1.1\r\nContent-Length: 5\r\n\r\n"), Ok((true, true)));
        assert_eq!(p("GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"), Ok((true, true)));
        assert_eq!(p("GET / HTTP/1.1\r\nContent-Length: x\r\n\r\n"), Err(HeadError::Malformed));
    }

    #[test]
    fn malformed_heads() {
        for bad in [
            "GET /\r\n\r\n",
            "GET  / HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.1 x\r\n\r\n",
            "get / HTTP/1.1\r\n\r\n",
            "GET x HTTP/1.1\r\n\r\n",
            "GET / FTP/1.1\r\n\r\n",
            "GET / HTTP/1.1\r\nNoColon\r\n\r\n",
            "GET / HTTP/1.1\r\nBad : x\r\n\r\n",
            "GET / HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n",
        ] {
            assert_eq!(parse_head(bad.as_bytes()), Err(HeadError::Malformed), "{bad:?}");
        }
        assert_eq!(parse_head(b"GET / HTTP/2.0\r\n\r\n"), Err(HeadError::Version));
        assert_eq!(parse_head(b"GET /\xff HTTP/1.1\r\n\r\n"), Err(HeadError::Malformed));
    }

    #[test]
    fn oversized_head_is_refused() {
        let mut r = HeadReader::default();
        let mut data = Vec::from(&b"GET / HTTP/1.1\r\nX: "[..]);
        data.resize(MAX_HEAD + 10, b'a');
        let (n, got) = r.feed(&data);
        assert_eq!(n, MAX_HEAD);
        assert!(matches!(got, Some(Err(HeadError::TooLarge))));
    }

    #[test]
    fn routes() {
        assert_eq!(route("/"), Route::Index);
        assert_eq!(route("/?a=b"), Route::Index);
        assert_eq!(route("/stats"), Route::Stats);
        assert_eq!(route("/bytes/1000"), Route::Bytes(1000));
        assert_eq!(route("/bytes/"), Route::NotFound);
        assert_eq!(route("/bytes/1x"), Route::NotFound);
        assert_eq!(route("/bytes/99999999999999"), Route::NotFound);
        assert_eq!(route("/nope"), Route::NotFound);
    }

    fn respond_to(head: &str, stats: &Stats) -> (String, Response) {
        let mut out = [0; MAX_RESPONSE];
        let r = respond(parse_head(head.as_bytes()), stats, &mut out);
        (String::from_utf8(out[..r.len].to_vec()).unwrap(), r)
    }

    fn content_length(response: &str) -> usize {
        let line = response.lines().find(|l| l.starts_with("Content-Length: ")).unwrap();
        line["Content-Length: ".len()..].parse().unwrap()
    }

    #[test]
    fn index_and_stats() {
        let stats = Stats { counter: 7, ..Stats::default() };
        let (text, r) = respond_to("GET / HTTP/1.1\r\n\r\n", &stats);
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"));
        assert!(text.contains("Connection: keep-alive\r\n"));
        let body = text.split_once("\r\n\r\n").unwrap().1;
        assert_eq!(body, INDEX_PAGE);
        assert_eq!(content_length(&text), body.len());
        assert_eq!((r.stream, r.close), (0, false));

        let (text, _) = respond_to("GET /stats HTTP/1.1\r\n\r\n", &stats);
        let body = text.split_once("\r\n\r\n").unwrap().1;
        assert!(body.contains("counter=7\n"));
        assert_eq!(content_length(&text), body.len());
    }

    #[test]
    fn worst_case_stats_fit() {
        let stats = Stats::worst_case();
        let (text, _) = respond_to("GET /stats HTTP/1.1\r\n\r\n", &stats);
        assert_eq!(content_length(&text), text.split_once("\r\n\r\n").unwrap().1.len());
    }

    #[test]
    fn head_not_found_bytes_and_errors() {
        let stats = Stats::default();
        let (text, r) = respond_to("HEAD / HTTP/1.1\r\n\r\n", &stats);
        assert!(text.ends_with("\r\n\r\n"));
        assert_eq!(content_length(&text), INDEX_PAGE.len());
        assert_eq!(r.stream, 0);

        let (text, r) = respond_to("GET /missing HTTP/1.0\r\n\r\n", &stats);
        assert!(text.starts_with("HTTP/1.1 404 Not Found\r\n"));
        assert!(r.close);

        let (text, r) = respond_to("GET /bytes/5000 HTTP/1.1\r\n\r\n", &stats);
        assert_eq!(content_length(&text), 5000);
        assert!(text.ends_with("\r\n\r\n"));
        assert_eq!((r.stream, r.close), (5000, false));

        let (text, r) = respond_to("POST / HTTP/1.1\r\nContent-Length: 3\r\n\r\n", &stats);
        assert!(text.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"));
        assert!(text.contains("Allow: GET, HEAD\r\n") && r.close);

        let (text, r) = respond_to("GET / HTTP/1.1\r\nContent-Length: 3\r\n\r\n", &stats);
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n") && text.contains("Connection: close\r\n") && r.close);

        for (error, status) in
            [(HeadError::TooLarge, "431 "), (HeadError::Malformed, "400 "), (HeadError::Version, "505 ")]
        {
            let mut out = [0; MAX_RESPONSE];
            let r = respond(Err(error), &stats, &mut out);
            let text = core::str::from_utf8(&out[..r.len]).unwrap();
            assert!(text.starts_with(&std::format!("HTTP/1.1 {status}")), "{text}");
            assert_eq!(content_length(text), text.split_once("\r\n\r\n").unwrap().1.len());
            assert!(r.close);
        }
    }

    #[test]
    fn stream_pattern_is_continuous() {
        let mut whole = [0u8; 5000];
        fill_stream(0, &mut whole);
        assert!(whole.iter().enumerate().all(|(i, &b)| b == b'a' + (i % 26) as u8));
        let mut part = [0u8; 777];
        fill_stream(1234, &mut part);
        assert_eq!(&part[..], &whole[1234..1234 + 777]);
    }
}
