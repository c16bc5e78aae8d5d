//! smoltcp's `Device` over the virtio-net queues, without copying frames: smoltcp reads
//! received frames in place and writes frames to send straight into transmit buffers.

use smoltcp::phy::{self, DeviceCapabilities, Medium};
use smoltcp::time::Instant;

use crate::virtio::net::{RxQueue, TxQueue, VirtioNet, MAX_FRAME};

impl phy::Device for VirtioNet {
    type RxToken<'a> = RxToken<'a>;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, _now: Instant) -> Option<(RxToken<'_>, TxToken<'_>)> {
        // Only take a frame when an answer can be sent (smoltcp may answer at once: ARP,
        // ICMP echo, TCP ACK). With every transmit buffer out, frames wait in the ring until
        // the device returns some — it signals that, so the halt ends.
        self.tx.reclaim();
        let tx_id = self.tx.alloc()?;
        let Some((rx_id, len)) = self.rx.take() else {
            self.tx.release(tx_id);
            return None;
        };
        Some((RxToken { rx: &mut self.rx, id: rx_id, len }, TxToken { tx: &mut self.tx, id: tx_id, sent: false }))
    }

    fn transmit(&mut self, _now: Instant) -> Option<TxToken<'_>> {
        self.tx.reclaim();
        let id = self.tx.alloc()?;
        Some(TxToken { tx: &mut self.tx, id, sent: false })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = MAX_FRAME;
        caps
    }
}

/// A received frame; its buffer goes back to the device when the token is dropped.
pub struct RxToken<'a> {
    rx: &'a mut RxQueue,
    id: u16,
    len: usize,
}

impl phy::RxToken for RxToken<'_> {
    fn consume<R, F>(self, f: F) -> R
    where
        F: FnOnce(&[u8]) -> R,
    {
        f(self.rx.frame(self.id, self.len))
    }
}

impl Drop for RxToken<'_> {
    fn drop(&mut self) {
        self.rx.give(self.id);
    }
}

/// A transmit buffer; sent by `consume`, returned unused if dropped.
pub struct TxToken<'a> {
    tx: &'a mut TxQueue,
    id: u16,
    sent: bool,
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F>(mut self, len: usize, f: F) -> R
    where
        F: FnOnce(&mut [u8]) -> R,
    {
        // smoltcp never builds a frame over max_transmission_unit, which fits a buffer.
        let frame = self.tx.frame_mut(self.id);
        let len = len.min(frame.len());
        let result = f(&mut frame[..len]);
        self.tx.send(self.id, len);
        self.sent = true;
        result
    }
}

impl Drop for TxToken<'_> {
    fn drop(&mut self) {
        if !self.sent {
            self.tx.release(self.id);
        }
    }
}
