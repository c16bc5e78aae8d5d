//! Per-VM counters: traffic, refused descriptor chains by reason, and frames that could not be
//! delivered. Updated by the VM's worker and the uplink thread without locks (relaxed atomics:
//! they are statistics, not synchronisation), logged when the VM disconnects and at shutdown.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::chain::BadChain;

/// Counters of one VM connection.
#[derive(Debug, Default)]
pub struct PortStats {
    /// Frames taken from the guest's TX ring and handed on (tap or compare engine).
    pub tx_frames: AtomicU64,
    /// Their Ethernet bytes.
    pub tx_bytes: AtomicU64,
    /// Frames written into the guest's RX ring.
    pub rx_frames: AtomicU64,
    /// Their Ethernet bytes.
    pub rx_bytes: AtomicU64,
    /// Refused TX chains, by [`BadChain::kind`].
    pub tx_bad: [AtomicU64; BadChain::KINDS],
    /// Refused RX chains, by [`BadChain::kind`].
    pub rx_bad: [AtomicU64; BadChain::KINDS],
    /// Inbound frames dropped because the VM's pending RX queue was full (the guest did not
    /// post RX buffers fast enough, or its ring is not running).
    pub rx_overflow: AtomicU64,
    /// Inbound frames dropped because no RX buffer the guest can ever post would hold them.
    pub rx_too_big: AtomicU64,
    /// Times the TX ring was left waiting because the compare queue was full (backpressure).
    pub tx_backpressure: AtomicU64,
    /// Ring operations that failed on guest memory (used ring or avail ring unusable).
    pub ring_errors: AtomicU64,
}

/// Adds `n` to a counter.
pub fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

impl PortStats {
    /// Counts a refused TX chain.
    pub fn tx_refused(&self, why: &BadChain) {
        add(&self.tx_bad[why.kind()], 1);
    }

    /// Counts a refused RX chain.
    pub fn rx_refused(&self, why: &BadChain) {
        add(&self.rx_bad[why.kind()], 1);
    }

    /// A plain-number copy.
    pub fn snapshot(&self) -> PortCounts {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        PortCounts {
            tx_frames: get(&self.tx_frames),
            tx_bytes: get(&self.tx_bytes),
            rx_frames: get(&self.rx_frames),
            rx_bytes: get(&self.rx_bytes),
            tx_bad: self.tx_bad.each_ref().map(get),
            rx_bad: self.rx_bad.each_ref().map(get),
            rx_overflow: get(&self.rx_overflow),
            rx_too_big: get(&self.rx_too_big),
            tx_backpressure: get(&self.tx_backpressure),
            ring_errors: get(&self.ring_errors),
        }
    }
}

/// A snapshot of [`PortStats`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PortCounts {
    /// See [`PortStats::tx_frames`].
    pub tx_frames: u64,
    /// See [`PortStats::tx_bytes`].
    pub tx_bytes: u64,
    /// See [`PortStats::rx_frames`].
    pub rx_frames: u64,
    /// See [`PortStats::rx_bytes`].
    pub rx_bytes: u64,
    /// See [`PortStats::tx_bad`].
    pub tx_bad: [u64; BadChain::KINDS],
    /// See [`PortStats::rx_bad`].
    pub rx_bad: [u64; BadChain::KINDS],
    /// See [`PortStats::rx_overflow`].
    pub rx_overflow: u64,
    /// See [`PortStats::rx_too_big`].
    pub rx_too_big: u64,
    /// See [`PortStats::tx_backpressure`].
    pub tx_backpressure: u64,
    /// See [`PortStats::ring_errors`].
    pub ring_errors: u64,
}

impl PortCounts {
    /// Refused chains, both queues.
    pub fn bad_chains(&self) -> u64 {
        self.tx_bad.iter().chain(self.rx_bad.iter()).sum()
    }
}

impl fmt::Display for PortCounts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "tx {} frames / {} bytes, rx {} frames / {} bytes, rx dropped {} (queue full) + {} (too big), \
             tx backpressure {}, ring errors {}",
            self.tx_frames,
            self.tx_bytes,
            self.rx_frames,
            self.rx_bytes,
            self.rx_overflow,
            self.rx_too_big,
            self.tx_backpressure,
            self.ring_errors
        )?;
        for (queue, counts) in [("tx", &self.tx_bad), ("rx", &self.rx_bad)] {
            for (kind, n) in counts.iter().enumerate().filter(|(_, n)| **n > 0) {
                write!(f, ", {queue} refused {}: {n}", BadChain::kind_name(kind))?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_refusals_by_reason() {
        let s = PortStats::default();
        s.tx_refused(&BadChain::Unterminated);
        s.tx_refused(&BadChain::Unterminated);
        s.rx_refused(&BadChain::OutsideMemory);
        let c = s.snapshot();
        assert_eq!(c.bad_chains(), 3);
        let text = c.to_string();
        assert!(text.contains("tx refused unterminated: 2"), "{text}");
        assert!(text.contains("rx refused outside_memory: 1"), "{text}");
    }
}
