//! A stream socket's address as the programs take it on their command lines and control
//! sockets: `tcp:HOST:PORT` or `unix:PATH`. colo-proxy's endpoints add `,server` to it;
//! colo-vmm's migration and checkpoint links use it as it is.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

/// `tcp:HOST:PORT` or `unix:PATH` (as text in serialized requests).
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum StreamAddr {
    /// TCP `HOST:PORT` (a name, an IPv4 address or a bracketed IPv6 address).
    Tcp(String),
    /// A Unix socket path.
    Unix(PathBuf),
}

/// Text that is neither `tcp:HOST:PORT` nor `unix:PATH`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("'{0}': expected tcp:HOST:PORT or unix:PATH")]
pub struct AddrError(pub String);

impl FromStr for StreamAddr {
    type Err = AddrError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(a) = s.strip_prefix("tcp:") {
            match a.rsplit_once(':') {
                Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => Ok(StreamAddr::Tcp(a.into())),
                _ => Err(AddrError(s.into())),
            }
        } else if let Some(p) = s.strip_prefix("unix:").filter(|p| !p.is_empty()) {
            Ok(StreamAddr::Unix(PathBuf::from(p)))
        } else {
            Err(AddrError(s.into()))
        }
    }
}

impl TryFrom<String> for StreamAddr {
    type Error = AddrError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<StreamAddr> for String {
    fn from(a: StreamAddr) -> String {
        a.to_string()
    }
}

impl fmt::Display for StreamAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StreamAddr::Tcp(a) => write!(f, "tcp:{a}"),
            StreamAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        assert_eq!("tcp:127.0.0.1:4444".parse(), Ok(StreamAddr::Tcp("127.0.0.1:4444".into())));
        assert_eq!("unix:/tmp/m.sock".parse(), Ok(StreamAddr::Unix("/tmp/m.sock".into())));
        for bad in ["", "tcp:host", "unix:", "udp:1:2", "tcp::1", "tcp:h:99999", "/tmp/x"] {
            assert_eq!(bad.parse::<StreamAddr>(), Err(AddrError(bad.into())), "{bad}");
        }
        for text in ["tcp:[::1]:9", "tcp:localhost:80", "unix:/run/a b.sock"] {
            assert_eq!(text.parse::<StreamAddr>().unwrap().to_string(), text);
        }
        let json = serde_json::to_string(&StreamAddr::Unix("/x".into())).unwrap();
        assert_eq!(json, "\"unix:/x\"");
        assert!(serde_json::from_str::<StreamAddr>("\"bogus:x\"").is_err());
    }
}
