//! The MAC address: one type for the wire views, the options of all three programs and the
//! virtio-net config space.

use std::fmt;
use std::str::FromStr;

/// A six-byte Ethernet MAC address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// The broadcast address.
    pub const BROADCAST: MacAddr = MacAddr([0xff; 6]);

    /// The six octets.
    pub const fn octets(self) -> [u8; 6] {
        self.0
    }

    /// The group bit (bit 0 of the first octet) is set: multicast or broadcast.
    pub const fn is_multicast(self) -> bool {
        self.0[0] & 1 != 0
    }

    /// The first six bytes of `b` (`None` if it is shorter).
    pub fn from_prefix(b: &[u8]) -> Option<MacAddr> {
        Some(MacAddr(b.get(..6)?.try_into().ok()?))
    }
}

impl From<[u8; 6]> for MacAddr {
    fn from(octets: [u8; 6]) -> Self {
        MacAddr(octets)
    }
}

impl PartialEq<[u8; 6]> for MacAddr {
    fn eq(&self, other: &[u8; 6]) -> bool {
        self.0 == *other
    }
}

impl PartialEq<[u8]> for MacAddr {
    fn eq(&self, other: &[u8]) -> bool {
        self.0[..] == *other
    }
}

impl PartialEq<MacAddr> for [u8] {
    fn eq(&self, other: &MacAddr) -> bool {
        *self == other.0[..]
    }
}

/// Why a MAC address given as text was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MacError {
    /// Not six two-digit hex octets separated by `:` or `-`.
    #[error("'{0}' is not a MAC address (expected six hex octets such as 02:00:00:c0:10:01)")]
    Syntax(String),
    /// The group bit is set: a NIC needs a unicast address.
    #[error("'{0}' is a multicast address; a NIC needs a unicast MAC")]
    Multicast(String),
}

/// Parses a NIC's address, `aa:bb:cc:dd:ee:ff` (or with `-`): multicast addresses are refused,
/// since every address given on a command line names a NIC.
impl FromStr for MacAddr {
    type Err = MacError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut mac = [0u8; 6];
        let mut parts = s.split([':', '-']);
        for byte in mac.iter_mut() {
            let part = parts
                .next()
                .filter(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()))
                .ok_or_else(|| MacError::Syntax(s.to_string()))?;
            *byte = u8::from_str_radix(part, 16).map_err(|_| MacError::Syntax(s.to_string()))?;
        }
        if parts.next().is_some() {
            return Err(MacError::Syntax(s.to_string()));
        }
        let mac = MacAddr(mac);
        if mac.is_multicast() {
            return Err(MacError::Multicast(s.to_string()));
        }
        Ok(mac)
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(f, "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", m[0], m[1], m[2], m[3], m[4], m[5])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_print() {
        let m: MacAddr = "02:AA:bb:00:01:ff".parse().unwrap();
        assert_eq!(m, [0x02, 0xaa, 0xbb, 0, 1, 0xff]);
        assert_eq!(m.to_string(), "02:aa:bb:00:01:ff");
        let bytes = [0x02, 0xaa, 0xbb, 0, 1, 0xff];
        assert_eq!(m, bytes[..]);
        assert_eq!(bytes[..], m);
        assert_eq!("02-00-00-00-00-01".parse(), Ok(MacAddr([2, 0, 0, 0, 0, 1])));
        assert!(matches!("01:00:5e:00:00:01".parse::<MacAddr>(), Err(MacError::Multicast(_))));
        for bad in
            ["", "02:00:00:00:00", "02:00:00:00:00:00:00", "0g:00:00:00:00:00", "2:0:0:0:0:0", "+2:00:00:00:00:00"]
        {
            assert!(matches!(bad.parse::<MacAddr>(), Err(MacError::Syntax(_))), "{bad}");
        }
        assert!(MacAddr::BROADCAST.is_multicast());
        assert_eq!(MacAddr::from_prefix(&[1, 2, 3, 4, 5, 6, 7]), Some(MacAddr([1, 2, 3, 4, 5, 6])));
        assert_eq!(MacAddr::from_prefix(&[1, 2, 3]), None);
    }
}
