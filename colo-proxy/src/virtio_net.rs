//! The virtio-net device a protected guest sees, in one place for both programs that present
//! it: colo-vmm (which serves the configuration space itself) and vhost-net-compare (which
//! serves it over vhost-user `GET_CONFIG`). Bits and layout are virtio-bindings'.

use std::mem::{offset_of, size_of};

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::{
    virtio_net_config, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP,
};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;

use crate::wire::MacAddr;

/// The feature bit `bit` as a mask.
pub const fn feature(bit: u32) -> u64 {
    1 << bit
}

/// Every virtio-net feature a protected guest may negotiate: virtio 1.x, a MAC address and link
/// status in the configuration space, event-index notification suppression and mergeable
/// receive buffers. Deliberately no checksum or segmentation offloads, no control queue and no
/// multiqueue: frames must leave both guests complete and byte for byte comparable.
pub const FEATURES: u64 = feature(VIRTIO_F_VERSION_1)
    | feature(VIRTIO_NET_F_MAC)
    | feature(VIRTIO_NET_F_STATUS)
    | feature(VIRTIO_RING_F_EVENT_IDX)
    | feature(VIRTIO_NET_F_MRG_RXBUF);

/// Length of the configuration space (`struct virtio_net_config`).
pub const CONFIG_LEN: usize = size_of::<virtio_net_config>();

/// How far a configuration space may be read (its size in the virtio-mmio and PCI transports'
/// windows): past the fields everything reads as zero, beyond this a read is refused.
pub const CONFIG_WINDOW: usize = 256;

/// The configuration space: `mac`, `status` (link up) and `max_virtqueue_pairs` (1); the
/// fields of features not offered read as zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetConfig {
    /// The guest's MAC address.
    pub mac: MacAddr,
}

impl NetConfig {
    /// The whole configuration space, as the guest reads it (16-bit fields little endian, as
    /// virtio 1.x has them).
    pub fn bytes(&self) -> [u8; CONFIG_LEN] {
        let mut space = [0u8; CONFIG_LEN];
        let mut put = |at: usize, b: &[u8]| space[at..at + b.len()].copy_from_slice(b);
        put(offset_of!(virtio_net_config, mac), &self.mac.0);
        put(offset_of!(virtio_net_config, status), &(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        put(offset_of!(virtio_net_config, max_virtqueue_pairs), &1u16.to_le_bytes());
        space
    }

    /// The `len` bytes at `offset`, or `None` if they do not lie within [`CONFIG_WINDOW`].
    pub fn read(&self, offset: u64, len: u64) -> Option<Vec<u8>> {
        let start = usize::try_from(offset).ok()?;
        let end = start.checked_add(usize::try_from(len).ok()?).filter(|&end| end <= CONFIG_WINDOW)?;
        let mut window = [0u8; CONFIG_WINDOW];
        window[..CONFIG_LEN].copy_from_slice(&self.bytes());
        Some(window[start..end].to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offers_exactly_the_documented_features() {
        for bit in [5, 15, 16, 29, 32] {
            assert!(FEATURES & (1 << bit) != 0, "bit {bit} offered");
        }
        // No CSUM (0), GUEST_CSUM (1), TSO/UFO (7..=14), CTRL_VQ (17), MQ (22), INDIRECT_DESC
        // (28), the vhost-user bits (26, 30), RING_PACKED (34).
        for bit in [0, 1, 7, 8, 9, 10, 11, 12, 13, 14, 17, 22, 26, 28, 30, 34] {
            assert!(FEATURES & (1 << bit) == 0, "bit {bit} not offered");
        }
    }

    #[test]
    fn config_space_holds_mac_link_up_and_one_queue_pair() {
        let mac = MacAddr([0x02, 0, 0, 0xc0, 0x10, 0x01]);
        let space = NetConfig { mac }.bytes();
        assert_eq!(space.len(), 24);
        assert_eq!(space[..10], [0x02, 0, 0, 0xc0, 0x10, 0x01, 1, 0, 1, 0]);
        assert!(space[10..].iter().all(|&b| b == 0));
        let c = NetConfig { mac };
        assert_eq!(c.read(6, 2), Some(vec![1, 0]));
        assert_eq!(c.read(20, 8), Some(vec![0; 8]), "past the fields: zeros");
        assert_eq!(c.read(250, 6).map(|v| v.len()), Some(6));
        assert_eq!(c.read(250, 10), None);
        assert_eq!(c.read(u64::MAX, 2), None);
        assert_eq!(c.read(0, u64::MAX), None);
    }
}
