//! What the virtio-net device offers: feature bits, vhost-user protocol features, queue layout,
//! the config space (MAC and link status), and the virtio-net header size.
//!
//! The device deliberately offers no checksum or segmentation offloads: frames must leave both
//! guests complete and byte for byte comparable, and the tap is set to the same (no offloads).

use colo_proxy::virtio_net::{feature, FEATURES};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::{virtio_net_hdr, virtio_net_hdr_v1, VIRTIO_NET_F_MRG_RXBUF};

/// Queue 0 receives (host to guest).
pub const RX_QUEUE: usize = 0;
/// Queue 1 transmits (guest to host).
pub const TX_QUEUE: usize = 1;
/// One RX/TX pair; no multiqueue, no control queue.
pub const NUM_QUEUES: usize = 2;
/// Largest ring a frontend may configure (QEMU allows up to 1024 for virtio-net).
pub const MAX_QUEUE_SIZE: usize = 1024;

/// The virtio-net header with VERSION_1 or MRG_RXBUF (`virtio_net_hdr_v1`): flags, gso_type,
/// hdr_len, gso_size, csum_start, csum_offset, num_buffers. Frames exchanged with the tap carry
/// a header of this size too (TUNSETVNETHDRSZ).
pub const VNET_HDR_LEN: usize = std::mem::size_of::<virtio_net_hdr_v1>();
/// The legacy header (neither VERSION_1 nor MRG_RXBUF acknowledged): no num_buffers.
pub const LEGACY_VNET_HDR_LEN: usize = std::mem::size_of::<virtio_net_hdr>();
/// Offset of `num_buffers` (little endian u16) in the 12-byte header.
pub const NUM_BUFFERS_OFFSET: usize = 10;

/// Ethernet header: the shortest frame worth handing on.
pub const ETH_HLEN: usize = 14;
/// Longest Ethernet frame accepted from a guest or the tap: the largest MTU a virtio-net or tap
/// interface can have (65535) plus an Ethernet header and one VLAN tag. Without segmentation
/// offloads nothing longer is legitimate.
pub const MAX_ETH_FRAME: usize = 65535 + ETH_HLEN + 4;

/// The virtio feature bits offered to the frontend: the guest's ([`FEATURES`]) and two that
/// only vhost-user knows.
pub fn features() -> u64 {
    FEATURES
        // vhost-user only (never shown to the guest): the protocol-features handshake, and
        // LOG_ALL so a frontend can turn on dirty logging for checkpoints and migration.
        | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
        | VhostUserVirtioFeatures::LOG_ALL.bits()
}

/// The vhost-user protocol features offered: acknowledged requests (checkpoints must know when
/// a ring is really stopped), the shared-memory dirty log, and config-space access. No MQ.
pub fn protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::REPLY_ACK | VhostUserProtocolFeatures::LOG_SHMFD | VhostUserProtocolFeatures::CONFIG
}

/// Whether mergeable RX buffers were negotiated.
pub fn mrg_rxbuf(acked: u64) -> bool {
    acked & feature(VIRTIO_NET_F_MRG_RXBUF) != 0
}

/// The header length the guest uses, from the acknowledged features: 12 bytes with VERSION_1 or
/// MRG_RXBUF (as Linux decides), 10 otherwise.
pub fn header_len(acked: u64) -> usize {
    if acked & (feature(VIRTIO_F_VERSION_1) | feature(VIRTIO_NET_F_MRG_RXBUF)) != 0 {
        VNET_HDR_LEN
    } else {
        LEGACY_VNET_HDR_LEN
    }
}

pub use colo_proxy::wire::{MacAddr, MacError};

/// The MAC given to guests when `--mac` is absent: fixed (both COLO VMs must have the same one)
/// and locally administered (bit 1 of the first octet), so it never collides with a vendor's
/// address.
pub const DEFAULT_MAC: MacAddr = MacAddr([0x02, 0x00, 0x00, 0xc0, 0x10, 0x01]);

pub use colo_proxy::virtio_net::NetConfig;

/// The config-space bytes at `offset..offset + size`, or an empty vector (which the vhost-user
/// frontend reports as an error) when the range is outside the config space.
pub fn read_config(config: &NetConfig, offset: u32, size: u32) -> Vec<u8> {
    config.read(offset.into(), size.into()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offers_exactly_the_documented_features() {
        let f = features();
        for bit in [5, 15, 16, 26, 29, 30, 32] {
            assert!(f & (1 << bit) != 0, "bit {bit} offered");
        }
        // No CSUM (0), GUEST_CSUM (1), TSO/UFO (7..=14), CTRL_VQ (17), MQ (22), RING_PACKED (34),
        // INDIRECT_DESC (28).
        for bit in [0, 1, 7, 8, 9, 10, 11, 12, 13, 14, 17, 22, 28, 34] {
            assert!(f & (1 << bit) == 0, "bit {bit} not offered");
        }
        assert!(!protocol_features().contains(VhostUserProtocolFeatures::MQ));
    }

    #[test]
    fn header_length_follows_linux() {
        assert_eq!(header_len(1 << 32), 12);
        assert_eq!(header_len(1 << 15), 12);
        assert_eq!(header_len(1 << 5), 10);
    }

    #[test]
    fn the_default_mac_is_locally_administered_unicast() {
        assert_eq!(DEFAULT_MAC.0[0] & 3, 2);
    }

    #[test]
    fn config_space_holds_mac_and_link_up() {
        let c = NetConfig { mac: DEFAULT_MAC };
        let all = read_config(&c, 0, 10);
        assert_eq!(&all[..6], &DEFAULT_MAC.0);
        assert_eq!(&all[6..8], &[1, 0]);
        assert_eq!(read_config(&c, 6, 2), vec![1, 0]);
        assert_eq!(read_config(&c, 20, 4), vec![0; 4]);
        assert!(read_config(&c, 250, 10).is_empty());
        assert!(read_config(&c, u32::MAX, 2).is_empty());
    }
}
