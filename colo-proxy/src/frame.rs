//! A frame as it travels through the proxy: owned bytes, optionally led by a virtio-net header.

/// Which VM a frame came from (or, for inbound traffic, is going to).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Side {
    /// The primary VM (PVM): its output is what the world sees.
    Primary,
    /// The secondary VM (SVM): its output is only compared.
    Secondary,
}

impl Side {
    /// Index for per-side arrays: 0 for primary, 1 for secondary.
    pub fn index(self) -> usize {
        match self {
            Side::Primary => 0,
            Side::Secondary => 1,
        }
    }

    /// The lower-case name used in logs and the control protocol.
    pub fn name(self) -> &'static str {
        match self {
            Side::Primary => "primary",
            Side::Secondary => "secondary",
        }
    }
}

/// One frame: `data` holds the virtio-net header (`vnet_hdr_len` bytes, possibly none) followed
/// by the Ethernet frame. The engine never copies it; it moves from input to output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Header and frame bytes.
    pub data: Vec<u8>,
    /// Length of the leading virtio-net header.
    pub vnet_hdr_len: usize,
}

impl Frame {
    /// A frame without virtio-net header.
    pub fn new(data: Vec<u8>) -> Frame {
        Frame { data, vnet_hdr_len: 0 }
    }

    /// A frame whose first `vnet_hdr_len` bytes are a virtio-net header. A header length beyond
    /// the data is clamped, leaving an empty (and unparsable) Ethernet frame.
    pub fn with_vnet_hdr(data: Vec<u8>, vnet_hdr_len: usize) -> Frame {
        let vnet_hdr_len = vnet_hdr_len.min(data.len());
        Frame { data, vnet_hdr_len }
    }

    /// The Ethernet frame, after the virtio-net header.
    pub fn ethernet(&self) -> &[u8] {
        &self.data[self.vnet_hdr_len..]
    }

    /// The Ethernet frame, mutable.
    pub fn ethernet_mut(&mut self) -> &mut [u8] {
        &mut self.data[self.vnet_hdr_len..]
    }

    /// The virtio-net header bytes.
    pub fn vnet_hdr(&self) -> &[u8] {
        &self.data[..self.vnet_hdr_len]
    }

    /// Whether the virtio-net header says the transport checksum is still to be completed
    /// (`VIRTIO_NET_HDR_F_NEEDS_CSUM`): the checksum field then holds only the pseudo-header sum
    /// and must not be updated incrementally.
    pub fn needs_csum(&self) -> bool {
        self.vnet_hdr_len > 0 && self.data[0] & 1 != 0
    }
}
