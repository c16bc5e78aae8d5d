//! Scraping a process's `--metrics` endpoint: one `GET /metrics`, samples looked up by name and
//! labels, and `promtool check metrics` (Debian's prometheus package) on the text.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::Duration;

/// `GET path` from `addr` (HOST:PORT): the body of a 200 response, or why not.
pub fn http_get(addr: &str, path: &str) -> Result<String, String> {
    let sock = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
    let mut s =
        TcpStream::connect_timeout(&sock, Duration::from_secs(5)).map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10))).map_err(|e| e.to_string())?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).map_err(|e| format!("read {addr}: {e}"))?;
    let text = String::from_utf8(raw).map_err(|e| format!("{addr}: not UTF-8: {e}"))?;
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(|| format!("{addr}: no response head: {text:?}"))?;
    if !head.starts_with("HTTP/1.1 200 ") {
        return Err(format!("{addr}: {head}\n{body}"));
    }
    Ok(body.to_string())
}

/// The value of the sample of `name` whose labels include all of `labels` (the first such).
pub fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|line| {
        let (series, value) = line.rsplit_once(' ')?;
        let (n, rest) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.strip_suffix('}')?),
            None => (series, ""),
        };
        let all = labels.iter().all(|(k, v)| rest.split(',').any(|kv| kv == format!("{k}=\"{v}\"")));
        (n == name && all).then(|| value.parse().ok()).flatten()
    })
}

/// [`sample`], or a panic that shows the scrape.
pub fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    sample(text, name, labels).unwrap_or_else(|| panic!("no sample {name}{labels:?} in:\n{text}"))
}

/// Runs `promtool check metrics` on `text`: Ok, or what it said.
pub fn promtool_check(text: &str) -> Result<(), String> {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("promtool: {e}"))?;
    child.stdin.take().expect("piped").write_all(text.as_bytes()).map_err(|e| e.to_string())?;
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "promtool check metrics: {}\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_are_found_by_name_and_labels() {
        let text = "# HELP a_total A.\n# TYPE a_total counter\na_total{side=\"primary\",nic=\"net0\"} 3\n\
                    a_total{side=\"secondary\",nic=\"net0\"} 4\nb 2.5\n";
        assert_eq!(sample(text, "a_total", &[("side", "secondary")]), Some(4.0));
        assert_eq!(sample(text, "a_total", &[("nic", "net0"), ("side", "primary")]), Some(3.0));
        assert_eq!(sample(text, "b", &[]), Some(2.5));
        assert_eq!(sample(text, "a", &[]), None);
        assert_eq!(sample(text, "a_total", &[("side", "none")]), None);
    }
}
