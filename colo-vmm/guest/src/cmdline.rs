//! The guest's command line: whitespace-separated `key=value` tokens.
//!
//! | key | value | default |
//! |---|---|---|
//! | `ip` | `A.B.C.D/P` (without `/P`: /24) | `10.0.0.2/24` |
//! | `gw` | `A.B.C.D` (the default route) | none |
//! | `app` | comma-separated services: `echo`, `http`, `counter`, `top`, `kv`, `burn`, `dirty`, `diskdirty`, `badblk`, `exit`; `none` for no service | `echo,http,counter,top` |
//! | `top_ms` | period of the `top` lines in ms, 1..=3600000 | 200 |
//! | `dirty` | pages per second the `dirty` service writes | 1000 |
//! | `dirty_mib` | MiB of memory the `dirty` service writes over, 1..=65536 | 16 |
//! | `disk_dirty` | 4 KiB blocks per second the `diskdirty` service writes | 100 |
//! | `exit` | exit code: exit right after boot with it | none |
//! | `seed` | seed of the TCP/IP stack's random numbers (default: from the TSC) | none |
//!
//! `app=exit` exits right after boot with the `exit=` code (0 without one). Unknown keys are
//! reported and ignored (the VMM may pass options meant for someone else); a known key with a
//! bad value is an error, so a misconfigured guest fails loudly instead of running with
//! defaults nobody asked for.

use core::fmt;

/// An IPv4 address with a prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Cidr {
    /// The address.
    pub addr: [u8; 4],
    /// The prefix length, 0..=32.
    pub prefix_len: u8,
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", Ipv4(self.addr), self.prefix_len)
    }
}

/// Displays four octets as a dotted quad.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4(pub [u8; 4]);

impl fmt::Display for Ipv4 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d] = self.0;
        write!(f, "{a}.{b}.{c}.{d}")
    }
}

/// The services the guest can run, as chosen by `app=`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Apps {
    /// TCP and UDP echo on port 7.
    pub echo: bool,
    /// HTTP/1.1 on port 80.
    pub http: bool,
    /// The shared counter on TCP port 9000.
    pub counter: bool,
    /// Timing-dependent lines on TCP port 9100.
    pub top: bool,
    /// The key-value store on the disk, TCP port 9200.
    pub kv: bool,
    /// A CPU loop.
    pub burn: bool,
    /// A memory dirtier.
    pub dirty: bool,
    /// A disk dirtier.
    pub diskdirty: bool,
    /// Malformed disk requests at boot (a test of the VMM).
    pub badblk: bool,
    /// Exit right after boot.
    pub exit: bool,
}

impl Apps {
    /// The default set: the network services, without the CPU and memory loads.
    pub const DEFAULT: Apps = Apps {
        echo: true,
        http: true,
        counter: true,
        top: true,
        kv: false,
        burn: false,
        dirty: false,
        diskdirty: false,
        badblk: false,
        exit: false,
    };

    /// Whether any service needs the network.
    pub fn needs_network(&self) -> bool {
        self.echo || self.http || self.counter || self.top || self.kv
    }

    /// Whether any service needs the disk.
    pub fn needs_disk(&self) -> bool {
        self.kv || self.diskdirty || self.badblk
    }
}

/// The parsed command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    /// The interface address.
    pub ip: Ipv4Cidr,
    /// The default gateway.
    pub gateway: Option<[u8; 4]>,
    /// The services to run.
    pub apps: Apps,
    /// Period of the `top` lines, in milliseconds.
    pub top_ms: u32,
    /// Pages per second the `dirty` service writes.
    pub dirty_pages_per_sec: u32,
    /// Size of the region the `dirty` service writes over, in MiB.
    pub dirty_mib: u32,
    /// Blocks per second the `diskdirty` service writes.
    pub disk_dirty_blocks_per_sec: u32,
    /// Exit code for `exit=`.
    pub exit_code: Option<u32>,
    /// Seed for the TCP/IP stack.
    pub seed: Option<u64>,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            ip: Ipv4Cidr { addr: [10, 0, 0, 2], prefix_len: 24 },
            gateway: None,
            apps: Apps::DEFAULT,
            top_ms: 200,
            dirty_pages_per_sec: 1000,
            dirty_mib: 16,
            disk_dirty_blocks_per_sec: 100,
            exit_code: None,
            seed: None,
        }
    }
}

impl Config {
    /// The exit code to exit with right after boot, if the command line asks for that.
    pub fn exit_now(&self) -> Option<u32> {
        match (self.exit_code, self.apps.exit) {
            (Some(code), _) => Some(code),
            (None, true) => Some(0),
            (None, false) => None,
        }
    }
}

/// A bad value for a known key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParseError<'a> {
    /// The whole `key=value` token.
    pub token: &'a str,
    /// What is wrong with it.
    pub why: &'static str,
}

impl fmt::Display for ParseError<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.token, self.why)
    }
}

/// Parses a command line. `unknown` is called with each token whose key is not ours.
pub fn parse<'a>(cmdline: &'a str, mut unknown: impl FnMut(&'a str)) -> Result<Config, ParseError<'a>> {
    let mut config = Config::default();
    for token in cmdline.split_ascii_whitespace() {
        let Some((key, value)) = token.split_once('=') else {
            unknown(token);
            continue;
        };
        let error = |why| ParseError { token, why };
        match key {
            "ip" => config.ip = parse_cidr(value).ok_or(error("expected A.B.C.D/P"))?,
            "gw" => config.gateway = Some(parse_ipv4(value).ok_or(error("expected A.B.C.D"))?),
            "app" => config.apps = parse_apps(value).map_err(error)?,
            "top_ms" => config.top_ms = parse_in_range(value, 1, 3_600_000).ok_or(error("expected 1..=3600000"))?,
            "dirty" => config.dirty_pages_per_sec = value.parse().map_err(|_| error("expected pages per second"))?,
            "dirty_mib" => config.dirty_mib = parse_in_range(value, 1, 65536).ok_or(error("expected 1..=65536"))?,
            "disk_dirty" => {
                config.disk_dirty_blocks_per_sec = value.parse().map_err(|_| error("expected blocks per second"))?
            }
            "exit" => config.exit_code = Some(value.parse().map_err(|_| error("expected an exit code"))?),
            "seed" => config.seed = Some(value.parse().map_err(|_| error("expected a 64-bit number"))?),
            _ => unknown(token),
        }
    }
    Ok(config)
}

fn parse_in_range(value: &str, min: u32, max: u32) -> Option<u32> {
    value.parse().ok().filter(|v| (min..=max).contains(v))
}

fn parse_apps(value: &str) -> Result<Apps, &'static str> {
    let mut apps = Apps::default();
    for name in value.split(',') {
        match name {
            "echo" => apps.echo = true,
            "http" => apps.http = true,
            "counter" => apps.counter = true,
            "top" => apps.top = true,
            "kv" => apps.kv = true,
            "diskdirty" => apps.diskdirty = true,
            "badblk" => apps.badblk = true,
            "burn" => apps.burn = true,
            "dirty" => apps.dirty = true,
            "exit" => apps.exit = true,
            "none" => {}
            _ => {
                return Err(
                    "unknown service (echo, http, counter, top, kv, burn, dirty, diskdirty, badblk, exit, none)",
                )
            }
        }
    }
    Ok(apps)
}

/// Parses `A.B.C.D`: exactly four decimal octets.
pub fn parse_ipv4(s: &str) -> Option<[u8; 4]> {
    let mut octets = [0u8; 4];
    let mut parts = s.split('.');
    for octet in &mut octets {
        let part = parts.next()?;
        // `u8::from_str` accepts a leading '+'; an address does not.
        if part.is_empty() || part.len() > 3 || !part.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        *octet = part.parse().ok()?;
    }
    parts.next().is_none().then_some(octets)
}

/// Parses `A.B.C.D/P`, or `A.B.C.D` meaning /24.
pub fn parse_cidr(s: &str) -> Option<Ipv4Cidr> {
    let (addr, prefix_len) = match s.split_once('/') {
        Some((addr, len)) => {
            if len.is_empty() || !len.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            (addr, len.parse().ok().filter(|&l| l <= 32)?)
        }
        None => (s, 24),
    };
    Some(Ipv4Cidr { addr: parse_ipv4(addr)?, prefix_len })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::string::ToString;
    use std::vec::Vec;

    fn parse_ok(s: &str) -> Config {
        parse(s, |t| panic!("unexpected unknown token {t}")).unwrap()
    }

    #[test]
    fn defaults() {
        let c = parse_ok("");
        assert_eq!(c, Config::default());
        assert_eq!(c.ip.to_string(), "10.0.0.2/24");
        assert!(c.apps.echo && c.apps.http && c.apps.counter && c.apps.top);
        assert!(!c.apps.burn && !c.apps.dirty);
        assert_eq!(c.top_ms, 200);
        assert_eq!(c.exit_now(), None);
    }

    #[test]
    fn full_line() {
        let c = parse_ok(
            "ip=10.1.2.3/16 gw=10.1.0.1 app=echo,http,counter,top,burn,dirty top_ms=50 dirty=500 dirty_mib=8 seed=7",
        );
        let d = parse_ok("app=kv,diskdirty,badblk disk_dirty=250");
        assert!(d.apps.kv && d.apps.diskdirty && d.apps.badblk && d.apps.needs_disk() && d.apps.needs_network());
        assert_eq!(d.disk_dirty_blocks_per_sec, 250);
        assert_eq!(c.ip, Ipv4Cidr { addr: [10, 1, 2, 3], prefix_len: 16 });
        assert_eq!(c.gateway, Some([10, 1, 0, 1]));
        assert!(c.apps.burn && c.apps.dirty && c.apps.echo);
        assert_eq!((c.top_ms, c.dirty_pages_per_sec, c.dirty_mib, c.seed), (50, 500, 8, Some(7)));
    }

    #[test]
    fn app_replaces_the_default_set() {
        let c = parse_ok("app=counter");
        assert_eq!(c.apps, Apps { counter: true, ..Apps::default() });
        assert_eq!(parse_ok("app=none").apps, Apps::default());
        assert!(!Apps::default().needs_network());
    }

    #[test]
    fn exit_options() {
        assert_eq!(parse_ok("exit=3").exit_now(), Some(3));
        assert_eq!(parse_ok("app=exit").exit_now(), Some(0));
        assert_eq!(parse_ok("app=exit exit=42").exit_now(), Some(42));
    }

    #[test]
    fn unknown_tokens_are_reported_not_fatal() {
        let mut unknown = Vec::new();
        let c = parse("console=ttyS0 quiet ip=10.0.0.9/24", |t| unknown.push(t)).unwrap();
        assert_eq!(unknown, ["console=ttyS0", "quiet"]);
        assert_eq!(c.ip.addr, [10, 0, 0, 9]);
    }

    #[test]
    fn bad_values_are_errors() {
        for bad in [
            "ip=10.0.0/24",
            "ip=10.0.0.256/24",
            "ip=10.0.0.1/33",
            "ip=10.0.0.1/",
            "ip=+1.0.0.1/8",
            "ip=1.2.3.4.5/8",
            "gw=x",
            "app=echo,bogus",
            "app=",
            "top_ms=0",
            "top_ms=abc",
            "dirty=-1",
            "dirty_mib=0",
            "disk_dirty=x",
            "exit=x",
        ] {
            let err = parse(bad, |_| {}).unwrap_err();
            assert_eq!(err.token, bad, "{bad}");
        }
    }

    #[test]
    fn cidr_without_prefix_is_a_slash_24() {
        assert_eq!(parse_cidr("192.168.1.5"), Some(Ipv4Cidr { addr: [192, 168, 1, 5], prefix_len: 24 }));
    }
}
