//! The TX queue: frames the guest transmits.
//!
//! Each chain is device-readable only: the guest's virtio-net header, then the Ethernet frame
//! (possibly split anywhere over several descriptors). A chain is completed with used length 0
//! once its frame has been handed on — or refused. When the compare engine has no room for
//! the frame, the chain is left on the ring (the queue goes back one position) and processing
//! stops until room appears: the guest waits instead of losing the frame.

use vm_memory::bitmap::Bitmap;
use vm_memory::{Bytes, GuestMemoryMmap};

use colo_proxy::Frame;
use virtio_queue::{Queue, QueueOwnedT, QueueT};

use crate::chain::{self, BadChain};
use crate::device::{ETH_HLEN, MAX_ETH_FRAME, VNET_HDR_LEN};
use crate::port::Port;
use crate::router::Transmit;
use crate::stats::add;

/// Chains taken per call before the worker gives its other work (RX) a turn.
pub const TX_BUDGET: usize = 256;

/// What one pass over the TX ring did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TxOutcome {
    /// Chains taken off the ring (handed on or refused).
    pub chains: usize,
    /// Entries were added to the used ring (the guest may need an interrupt).
    pub used: bool,
    /// Stopped on a full compare queue; the chain is still on the ring.
    pub blocked: bool,
    /// Stopped after [`TX_BUDGET`] chains with more possibly waiting.
    pub budget_exhausted: bool,
}

/// Reads the frame a TX chain carries. The guest's header (`hdr_len` bytes) must not ask for
/// offloads, since none were negotiated; the frame returned carries a zeroed 12-byte header
/// (what the tap expects), whatever header size the guest uses.
pub fn read_frame<B: Bitmap + 'static>(
    chain: virtio_queue::DescriptorChain<&GuestMemoryMmap<B>>,
    mem: &GuestMemoryMmap<B>,
    hdr_len: usize,
) -> Result<Frame, BadChain> {
    let bufs = chain::walk(chain, mem, false, (hdr_len + MAX_ETH_FRAME) as u64)?;
    if bufs.len < (hdr_len + ETH_HLEN) as u64 {
        return Err(BadChain::TooShort(bufs.len));
    }
    // Read so that the guest's header ends where a 12-byte one would.
    let pad = VNET_HDR_LEN - hdr_len;
    let mut data = vec![0u8; pad + bufs.len as usize];
    let mut off = pad;
    for (addr, len) in bufs.regions {
        mem.read_slice(&mut data[off..off + len], addr).map_err(|_| BadChain::OutsideMemory)?;
        off += len;
    }
    // flags (NEEDS_CSUM, DATA_VALID) and gso_type need CSUM / HOST_TSO*, which are never
    // offered; hdr_len, gso_size and csum_* are meaningless without them, and num_buffers is
    // unused on TX, so those are ignored and zeroed.
    let (flags, gso_type) = (data[pad], data[pad + 1]);
    if flags != 0 || gso_type != 0 {
        return Err(BadChain::BadHeader { flags, gso_type });
    }
    data[..VNET_HDR_LEN].fill(0);
    Ok(Frame::with_vnet_hdr(data, VNET_HDR_LEN))
}

/// Takes frames off the TX ring and hands each to `send`, until the ring is empty, `send`
/// reports a full compare queue, or [`TX_BUDGET`] chains were taken. Refused chains go to
/// `refused` and are completed with used length 0. Errors are ring errors (an avail index the
/// guest moved too far, a used ring outside memory): nothing more can be done on this ring.
pub fn process<B: Bitmap + 'static>(
    queue: &mut Queue,
    mem: &GuestMemoryMmap<B>,
    hdr_len: usize,
    port: &Port,
    mut send: impl FnMut(Frame) -> Transmit,
    mut refused: impl FnMut(&BadChain),
) -> Result<TxOutcome, virtio_queue::Error> {
    let mut out = TxOutcome::default();
    loop {
        queue.disable_notification(mem)?;
        while let Some(chain) = queue.iter(mem)?.next() {
            if out.chains == TX_BUDGET {
                // Leave it for the next turn; notifications stay off, the caller reschedules.
                queue.go_to_previous_position();
                out.budget_exhausted = true;
                return Ok(out);
            }
            out.chains += 1;
            let head = chain.head_index();
            match read_frame(chain, mem, hdr_len) {
                Err(why) => {
                    refused(&why);
                    out.used |= complete(queue, mem, head)?;
                }
                Ok(frame) => {
                    let len = frame.ethernet().len() as u64;
                    match send(frame) {
                        Transmit::Sent => {
                            add(&port.stats.tx_frames, 1);
                            add(&port.stats.tx_bytes, len);
                            out.used |= complete(queue, mem, head)?;
                        }
                        Transmit::Full => {
                            queue.go_to_previous_position();
                            out.chains -= 1;
                            out.blocked = true;
                            return Ok(out);
                        }
                    }
                }
            }
        }
        // Re-enable kicks; if the guest added chains meanwhile, take them too.
        if !queue.enable_notification(mem)? {
            return Ok(out);
        }
    }
}

/// Completes a TX chain (used length 0: the device wrote nothing). A head index outside the
/// ring cannot be completed (the chain was refused as empty); that is not a ring error.
fn complete<B: Bitmap + 'static>(
    queue: &mut Queue,
    mem: &GuestMemoryMmap<B>,
    head: u16,
) -> Result<bool, virtio_queue::Error> {
    match queue.add_used(mem, head, 0) {
        Ok(()) => Ok(true),
        Err(virtio_queue::Error::InvalidDescriptorIndex) => Ok(false),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use colo_proxy::Side;

    use super::*;
    use crate::testutil::*;

    struct Run {
        sent: Vec<Vec<u8>>,
        refused: Vec<BadChain>,
        out: TxOutcome,
    }

    fn run(ring: &Ring<'_>, queue: &mut Queue, mem: &GuestMemoryMmap<()>, full_after: usize) -> Run {
        let port = Port::new(Side::Primary).unwrap();
        let (mut sent, mut refused) = (vec![], vec![]);
        let _ = ring;
        let out = process(
            queue,
            mem,
            VNET_HDR_LEN,
            &port,
            |f| {
                if sent.len() == full_after {
                    Transmit::Full
                } else {
                    sent.push(f.data);
                    Transmit::Sent
                }
            },
            |why| refused.push(*why),
        )
        .unwrap();
        Run { sent, refused, out }
    }

    #[test]
    fn a_frame_split_over_descriptors_is_read_whole_with_a_clean_header() {
        let mem = memory();
        let mut ring = Ring::new(&mem, 16);
        let mut bytes = frame_bytes(60, 0xab);
        bytes[10] = 7; // num_buffers: ignored on TX, zeroed
        ring.write(BUFFERS, &bytes[..5]);
        ring.write(BUFFERS + 0x1000, &bytes[5..]);
        ring.desc(0, BUFFERS, 5, NEXT, 3);
        ring.desc(3, BUFFERS + 0x1000, (bytes.len() - 5) as u32, 0, 0);
        ring.offer(0);
        let mut q = ring.queue();
        let r = run(&ring, &mut q, &mem, usize::MAX);
        assert_eq!(r.sent, vec![frame_bytes(60, 0xab)]);
        assert!(r.refused.is_empty());
        assert_eq!(ring.used(), vec![(0, 0)]);
    }

    #[test]
    fn malformed_chains_are_completed_empty_and_counted() {
        let mem = memory();
        let mut ring = Ring::new(&mem, 32);
        let good = frame_bytes(50, 1);
        ring.write(BUFFERS, &good);
        let mut garbage = good.clone();
        garbage[0] = 0xff;
        garbage[1] = 0x42;
        ring.write(BUFFERS + 0x1000, &garbage);
        // 0,1: a loop
        ring.desc(0, BUFFERS, 32, NEXT, 1);
        ring.desc(1, BUFFERS, 32, NEXT, 0);
        ring.offer(0);
        // 2: outside memory
        ring.desc(2, 0x10_0000_0000, 100, 0, 0);
        ring.offer(2);
        // 3: too short for header + Ethernet header
        ring.desc(3, BUFFERS, 20, 0, 0);
        ring.offer(3);
        // 4: device-writable descriptor on TX
        ring.desc(4, BUFFERS, good.len() as u32, WRITE, 0);
        ring.offer(4);
        // 5: garbage header
        ring.desc(5, BUFFERS + 0x1000, garbage.len() as u32, 0, 0);
        ring.offer(5);
        // 16..=25: absurdly long (10 x 64 KiB)
        for i in 16..26 {
            ring.desc(i, BUFFERS, 0x10000, if i < 25 { NEXT } else { 0 }, i + 1);
        }
        ring.offer(16);
        // a head index outside the ring
        ring.offer(999);
        // `next` outside the table
        ring.desc(7, BUFFERS, 10, NEXT, 500);
        ring.offer(7);
        // finally a good one
        ring.desc(8, BUFFERS, good.len() as u32, 0, 0);
        ring.offer(8);
        let mut q = ring.queue();
        let r = run(&ring, &mut q, &mem, usize::MAX);
        assert_eq!(
            r.refused,
            vec![
                BadChain::Unterminated,
                BadChain::OutsideMemory,
                BadChain::TooShort(20),
                BadChain::WrongDirection,
                BadChain::BadHeader { flags: 0xff, gso_type: 0x42 },
                BadChain::TooLong(10 * 0x10000),
                BadChain::Empty(999),
                BadChain::Unterminated,
            ]
        );
        assert_eq!(r.sent, vec![good]);
        let used = ring.used();
        assert_eq!(used, vec![(0, 0), (2, 0), (3, 0), (4, 0), (5, 0), (16, 0), (7, 0), (8, 0)], "all but head 999");
    }

    #[test]
    fn a_full_compare_queue_leaves_the_chain_on_the_ring() {
        let mem = memory();
        let mut ring = Ring::new(&mem, 16);
        let f = frame_bytes(40, 9);
        ring.write(BUFFERS, &f);
        for i in 0..3 {
            ring.desc(i, BUFFERS, f.len() as u32, 0, 0);
            ring.offer(i);
        }
        let mut q = ring.queue();
        let r = run(&ring, &mut q, &mem, 1);
        assert!(r.out.blocked);
        assert_eq!(r.sent.len(), 1);
        assert_eq!(ring.used(), vec![(0, 0)]);
        // Room again: the same chain is taken first.
        let r = run(&ring, &mut q, &mem, usize::MAX);
        assert_eq!(r.sent.len(), 2);
        assert_eq!(ring.used(), vec![(1, 0), (2, 0)]);
    }

    #[test]
    fn the_budget_bounds_one_pass() {
        let mem = memory();
        let size = 1024u16;
        let mut ring = Ring::new(&mem, size);
        let f = frame_bytes(40, 9);
        ring.write(BUFFERS + 0x8000, &f);
        for i in 0..(TX_BUDGET as u16 + 10) {
            ring.desc(i, BUFFERS + 0x8000, f.len() as u32, 0, 0);
            ring.offer(i);
        }
        let mut q = ring.queue();
        let r = run(&ring, &mut q, &mem, usize::MAX);
        assert!(r.out.budget_exhausted);
        assert_eq!(r.sent.len(), TX_BUDGET);
        let r = run(&ring, &mut q, &mem, usize::MAX);
        assert!(!r.out.budget_exhausted);
        assert_eq!(r.sent.len(), 10);
    }

    #[test]
    fn legacy_headers_are_widened_to_twelve_bytes() {
        let mem = memory();
        let mut ring = Ring::new(&mem, 16);
        let mut legacy = vec![0u8; 10];
        legacy.extend([5u8; 30]);
        ring.write(BUFFERS, &legacy);
        ring.desc(0, BUFFERS, legacy.len() as u32, 0, 0);
        ring.offer(0);
        let mut q = ring.queue();
        let port = Port::new(Side::Primary).unwrap();
        let mut sent = vec![];
        process(
            &mut q,
            &mem,
            crate::device::LEGACY_VNET_HDR_LEN,
            &port,
            |f| {
                sent.push(f);
                Transmit::Sent
            },
            |_| panic!("refused"),
        )
        .unwrap();
        assert_eq!(sent[0].data, frame_bytes(30, 5));
        assert_eq!(sent[0].vnet_hdr_len, 12);
    }
}
