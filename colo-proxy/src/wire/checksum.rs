//! The Internet checksum (RFC 1071) and its incremental update (RFC 1624).

use std::net::{Ipv4Addr, Ipv6Addr};

/// Adds `data` to a ones'-complement accumulator, as 16-bit big-endian words.
pub fn accumulate(mut acc: u64, data: &[u8]) -> u64 {
    let mut chunks = data.chunks_exact(8);
    for c in &mut chunks {
        let w = u64::from_be_bytes(c.try_into().expect("8 bytes"));
        // Adding the four 16-bit words of `w` one by one is the same, modulo 0xffff, as
        // adding its two 32-bit halves; carries are folded at the end.
        acc += (w >> 32) + (w & 0xffff_ffff);
    }
    let rest = chunks.remainder();
    let mut words = rest.chunks_exact(2);
    for w in &mut words {
        acc += u64::from(u16::from_be_bytes([w[0], w[1]]));
    }
    if let [last] = words.remainder() {
        acc += u64::from(*last) << 8;
    }
    acc
}

/// Folds an accumulator to 16 bits (without complementing).
pub fn fold(mut acc: u64) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// The Internet checksum of `data`: the complement of its folded ones'-complement sum.
pub fn internet(data: &[u8]) -> u16 {
    !fold(accumulate(0, data))
}

/// Accumulator seeded with the IPv4 pseudo-header of a transport segment.
pub fn pseudo_header_v4(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, length: usize) -> u64 {
    let mut acc = accumulate(0, &src.octets());
    acc = accumulate(acc, &dst.octets());
    acc + u64::from(protocol) + length as u64
}

/// Accumulator seeded with the IPv6 pseudo-header of a transport segment.
pub fn pseudo_header_v6(src: Ipv6Addr, dst: Ipv6Addr, next_header: u8, length: usize) -> u64 {
    let mut acc = accumulate(0, &src.octets());
    acc = accumulate(acc, &dst.octets());
    acc + u64::from(next_header) + length as u64
}

/// Updates checksum `check` for a 32-bit field changing from `old` to `new` (RFC 1624, eqn. 3:
/// `HC' = ~(~HC + ~m + m')`), without touching the rest of the data. The field must start at an
/// even offset of the checksummed data; see [`update_u32_at`] for any offset.
pub fn update_u32(check: u16, old: u32, new: u32) -> u16 {
    let mut acc = u64::from(!check);
    acc += u64::from(!(old >> 16) as u16) + u64::from(!(old as u16));
    acc += u64::from((new >> 16) as u16) + u64::from(new as u16);
    !fold(acc)
}

/// [`update_u32`] for a field at `offset` from the start of the checksummed data. At an odd
/// offset the field's bytes fall into the 16-bit words the other way round, and the sum of
/// byte-swapped words is the byte-swapped sum (RFC 1071, "byte order independence"), so the
/// update is made on the swapped checksum.
pub fn update_u32_at(check: u16, old: u32, new: u32, offset: usize) -> u16 {
    if offset.is_multiple_of(2) {
        update_u32(check, old, new)
    } else {
        update_u32(check.swap_bytes(), old, new).swap_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc1071_example() {
        // RFC 1071 section 3: the sum of these words is 0xddf2.
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(fold(accumulate(0, &data)), 0xddf2);
        assert_eq!(internet(&data), !0xddf2);
    }

    #[test]
    fn odd_length_pads_with_zero() {
        assert_eq!(internet(&[0xab]), internet(&[0xab, 0x00]));
        assert_eq!(internet(&[1, 2, 3, 4, 5, 6, 7, 8, 9]), internet(&[1, 2, 3, 4, 5, 6, 7, 8, 9, 0]));
    }

    #[test]
    fn incremental_update_matches_recompute() {
        let mut data: Vec<u8> = (0..64u8).map(|i| i.wrapping_mul(37)).collect();
        data[16..18].copy_from_slice(&[0, 0]);
        let c = internet(&data);
        data[16..18].copy_from_slice(&c.to_be_bytes());
        assert_eq!(internet(&data), 0);
        for new in [0u32, 1, 0xffff_ffff, 0x1234_5678, 0x8000_0000] {
            let mut d = data.clone();
            let old = u32::from_be_bytes(d[4..8].try_into().unwrap());
            d[4..8].copy_from_slice(&new.to_be_bytes());
            let updated = update_u32(c, old, new);
            d[16..18].copy_from_slice(&updated.to_be_bytes());
            assert_eq!(internet(&d), 0, "new={new:#x}");
        }
    }

    #[test]
    fn incremental_update_at_any_offset_matches_recompute() {
        for len in [63usize, 64] {
            let mut data: Vec<u8> = (0..len as u8).map(|i| i.wrapping_mul(91).wrapping_add(7)).collect();
            data[16..18].copy_from_slice(&[0, 0]);
            let c = internet(&data);
            data[16..18].copy_from_slice(&c.to_be_bytes());
            for at in (20..len - 4).chain([3, 5, 7, 9]) {
                for new in [0u32, 1, 0xffff_ffff, 0x1234_5678, 0x8000_0001] {
                    let mut d = data.clone();
                    let old = u32::from_be_bytes(d[at..at + 4].try_into().unwrap());
                    d[at..at + 4].copy_from_slice(&new.to_be_bytes());
                    let updated = update_u32_at(c, old, new, at);
                    d[16..18].copy_from_slice(&updated.to_be_bytes());
                    assert_eq!(internet(&d), 0, "len {len}, field at {at}, new {new:#x}");
                }
            }
        }
    }
}
