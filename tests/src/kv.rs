//! The reference guest's `kv` service from outside: a client that records what was
//! acknowledged, and a reader of the store's log straight from a disk image (the format of
//! `colo-vmm/guest/src/kvlog.rs`), so a test can check a survivor's image file itself.

use std::collections::BTreeMap;
use std::net::TcpStream;
use std::path::Path;

use crate::vm_topology::LineClient;

/// A client of the `kv` service (port 9200).
pub struct KvClient {
    line: LineClient,
}

impl KvClient {
    /// A client on a connection to port 9200.
    pub fn over(stream: TcpStream) -> KvClient {
        KvClient { line: LineClient::new(stream) }
    }

    /// `put KEY VALUE`; `Ok(())` only on `ok`.
    pub fn put(&mut self, key: &str, value: &str) -> Result<(), String> {
        match self.line.ask(&format!("put {key} {value}")) {
            Ok(r) if r == "ok" => Ok(()),
            Ok(r) => Err(format!("put {key}: {r}")),
            Err(e) => Err(format!("put {key}: {e}")),
        }
    }

    /// `get KEY`: the value, or `None` for `none`.
    pub fn get(&mut self, key: &str) -> Result<Option<String>, String> {
        match self.line.ask(&format!("get {key}")) {
            Ok(r) if r == "none" => Ok(None),
            Ok(r) if r.starts_with("err") => Err(format!("get {key}: {r}")),
            Ok(r) => Ok(Some(r)),
            Err(e) => Err(format!("get {key}: {e}")),
        }
    }

    /// `scan`: the log read again, as key → number.
    pub fn scan(&mut self) -> Result<BTreeMap<String, u64>, String> {
        let r = self.line.ask("scan").map_err(|e| format!("scan: {e}"))?;
        r.split_whitespace()
            .map(|kv| {
                let (k, v) = kv.split_once('=').ok_or_else(|| format!("scan: {r}"))?;
                Ok((k.to_string(), v.parse().map_err(|_| format!("scan: {r}"))?))
            })
            .collect()
    }

    /// Sends a line and reads one back.
    pub fn ask(&mut self, line: &str) -> std::io::Result<String> {
        self.line.ask(line)
    }

    /// Sets the read timeout.
    pub fn set_timeout(&self, t: std::time::Duration) {
        self.line.set_timeout(t);
    }
}

const SECTOR: usize = 512;

fn fnv1a(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5u32, |h, &b| (h ^ u32::from(b)).wrapping_mul(0x0100_0193))
}

/// The records of the `kv` log in a disk image, in order: (key, value).
pub fn log_in_image(image: &Path) -> Vec<(String, String)> {
    let bytes = std::fs::read(image).unwrap_or_else(|e| panic!("reading {}: {e}", image.display()));
    let mut out = vec![];
    for (n, s) in bytes.chunks_exact(SECTOR).enumerate() {
        let valid = &s[..4] == b"KVR1"
            && u32::from_le_bytes(s[508..].try_into().unwrap()) == fnv1a(&s[..508])
            && u64::from_le_bytes(s[4..12].try_into().unwrap()) == n as u64;
        if !valid {
            break;
        }
        let klen = u16::from_le_bytes(s[20..22].try_into().unwrap()) as usize;
        let vlen = u16::from_le_bytes(s[22..24].try_into().unwrap()) as usize;
        let key = String::from_utf8_lossy(&s[24..24 + klen]).into_owned();
        let value = String::from_utf8_lossy(&s[24 + klen..24 + klen + vlen]).into_owned();
        out.push((key, value));
    }
    out
}

/// A zeroed image of `mib` MiB at `path`.
pub fn make_image(path: &Path, mib: u64) {
    std::fs::File::create(path).and_then(|f| f.set_len(mib << 20)).expect("create a disk image");
}
