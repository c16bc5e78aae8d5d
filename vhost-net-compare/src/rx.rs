//! The RX queue: inbound frames written into the guest's buffers.
//!
//! Runs only on the VM's worker thread (which owns the vrings), fed by the port's pending queue.
//! A frame is the virtio-net header (flags 0, gso_type NONE, `num_buffers`) followed by the
//! Ethernet frame. With mergeable RX buffers (MRG_RXBUF) a frame may span several chains and
//! `num_buffers` says how many; without, it must fit one chain.
//!
//! Chains for a frame are gathered first and completed together, in order, so a refused chain
//! (completed with used length 0) never lands in the middle of a frame's run of used entries,
//! where a mergeable-buffer driver would take it for part of the frame. If the guest has not
//! posted enough buffers, the gathered chains go back on the ring untouched and the frame waits.
//!
//! Every write into guest memory goes through vm-memory (`write_slice`, `add_used`), so pages
//! are marked in the dirty log.

use std::sync::atomic::Ordering;

use vm_memory::bitmap::Bitmap;
use vm_memory::{Bytes, GuestMemoryMmap};

use colo_proxy::Frame;
use virtio_queue::{Queue, QueueOwnedT, QueueT};

use crate::chain::{self, BadChain, Buffers};
use crate::device::{NUM_BUFFERS_OFFSET, VNET_HDR_LEN};
use crate::port::Port;
use crate::stats::add;

/// What one pass over the RX ring did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RxOutcome {
    /// Frames written.
    pub frames: usize,
    /// Entries were added to the used ring (the guest may need an interrupt).
    pub used: bool,
    /// Frames are still pending for lack of buffers (notifications are enabled).
    pub waiting: bool,
}

/// Fills the RX ring from `port`'s pending frames until none are left or the guest's buffers
/// run out. `hdr_len` is the guest's header size, `mrg` whether mergeable buffers were
/// negotiated. Refused chains go to `refused`. Errors are ring errors.
pub fn process<B: Bitmap + 'static>(
    queue: &mut Queue,
    mem: &GuestMemoryMmap<B>,
    hdr_len: usize,
    mrg: bool,
    port: &Port,
    mut refused: impl FnMut(&BadChain),
) -> Result<RxOutcome, virtio_queue::Error> {
    let mut out = RxOutcome::default();
    loop {
        let Some(frame) = port.next_rx() else {
            // Nothing to deliver: kicks for new buffers are useless until frames arrive (the
            // uplink wakes the worker then).
            queue.disable_notification(mem)?;
            return Ok(out);
        };
        let seen = queue.avail_idx(mem, Ordering::Acquire)?;
        let delivery = deliver(queue, mem, frame, hdr_len, mrg, port, &mut refused, &mut out);
        let delivery = match delivery {
            Ok(d) => d,
            Err(e) => {
                // The frame is lost with the ring.
                port.finish_rx();
                return Err(e);
            }
        };
        match delivery {
            Delivery::Done | Delivery::Dropped => port.finish_rx(),
            Delivery::NoBuffers(frame) => {
                port.unget_rx(frame);
                // Ask for a kick when the guest posts buffers; if it posted some meanwhile,
                // try again now.
                queue.enable_notification(mem)?;
                if queue.avail_idx(mem, Ordering::Acquire)? == seen {
                    out.waiting = true;
                    return Ok(out);
                }
            }
        }
    }
}

enum Delivery {
    Done,
    Dropped,
    NoBuffers(Frame),
}

#[allow(clippy::too_many_arguments)]
fn deliver<B: Bitmap + 'static>(
    queue: &mut Queue,
    mem: &GuestMemoryMmap<B>,
    mut frame: Frame,
    hdr_len: usize,
    mrg: bool,
    port: &Port,
    refused: &mut impl FnMut(&BadChain),
    out: &mut RxOutcome,
) -> Result<Delivery, virtio_queue::Error> {
    let eth_len = frame.ethernet().len();
    let total = (hdr_len + eth_len) as u64;
    let mut chains: Vec<Buffers> = Vec::new();
    let (mut capacity, mut descriptors) = (0u64, 0usize);
    while capacity < total {
        let Some(chain) = queue.iter(mem)?.next() else {
            if descriptors >= usize::from(queue.size()) {
                // Every descriptor the ring has is in `chains`: no buffer the guest can still
                // post would make room. Drop the frame, keep the buffers for the next ones.
                rewind(queue, chains.len());
                add(&port.stats.rx_too_big, 1);
                return Ok(Delivery::Dropped);
            }
            rewind(queue, chains.len());
            return Ok(Delivery::NoBuffers(frame));
        };
        let head = chain.head_index();
        let walked = chain::walk(chain, mem, true, u64::MAX).and_then(|b| {
            // The header must sit in the first buffer, and an empty buffer holds nothing.
            if b.len == 0 || (chains.is_empty() && b.len < hdr_len as u64) {
                Err(BadChain::TooShort(b.len))
            } else {
                Ok(b)
            }
        });
        match walked {
            Err(why) => {
                // Buffers already gathered for this frame are returned empty first, so the
                // refused chain does not land inside the frame's run of used entries.
                for c in chains.drain(..) {
                    out.used |= complete(queue, mem, c.head, 0)?;
                }
                (capacity, descriptors) = (0, 0);
                refused(&why);
                out.used |= complete(queue, mem, head, 0)?;
            }
            Ok(bufs) => {
                if !mrg && bufs.len < total {
                    // Without mergeable buffers the guest sized its buffers for its MTU; a
                    // longer frame cannot be delivered. The buffer stays for the next frame.
                    queue.go_to_previous_position();
                    add(&port.stats.rx_too_big, 1);
                    return Ok(Delivery::Dropped);
                }
                capacity += bufs.len;
                descriptors += bufs.descriptors;
                chains.push(bufs);
            }
        }
    }

    // `frame.data` is a zeroed 12-byte header followed by the Ethernet frame; a legacy 10-byte
    // header is its first 10 bytes (no num_buffers field).
    if hdr_len == VNET_HDR_LEN {
        // At most one chain per ring entry, so the count fits (rings have at most 32768).
        let n = chains.len() as u16;
        frame.data[NUM_BUFFERS_OFFSET..VNET_HDR_LEN].copy_from_slice(&n.to_le_bytes());
    }
    let stream = &frame.data[VNET_HDR_LEN - hdr_len..];
    let mut off = 0;
    let mut lens = Vec::with_capacity(chains.len());
    for c in &chains {
        let mut written = 0usize;
        for &(addr, len) in &c.regions {
            if off == stream.len() {
                break;
            }
            let n = len.min(stream.len() - off);
            if mem.write_slice(&stream[off..off + n], addr).is_err() {
                // Checked moments ago; only a memory table swapped under us gets here.
                for c in &chains {
                    out.used |= complete(queue, mem, c.head, 0)?;
                }
                add(&port.stats.ring_errors, 1);
                return Ok(Delivery::Dropped);
            }
            off += n;
            written += n;
        }
        lens.push(written as u32);
    }
    for (c, len) in chains.iter().zip(lens) {
        out.used |= complete(queue, mem, c.head, len)?;
    }
    out.frames += 1;
    add(&port.stats.rx_frames, 1);
    add(&port.stats.rx_bytes, eth_len as u64);
    Ok(Delivery::Done)
}

/// Puts `n` chains taken off the ring back on it (nothing was written into them).
fn rewind(queue: &mut Queue, n: usize) {
    for _ in 0..n {
        queue.go_to_previous_position();
    }
}

/// Adds a used entry; a head index outside the ring cannot be completed (the chain was refused
/// as empty), which is not a ring error. Returns whether an entry was added.
fn complete<B: Bitmap + 'static>(
    queue: &mut Queue,
    mem: &GuestMemoryMmap<B>,
    head: u16,
    len: u32,
) -> Result<bool, virtio_queue::Error> {
    match queue.add_used(mem, head, len) {
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

    fn pending(port: &Port, len: usize, fill: u8) -> Frame {
        let f = Frame::with_vnet_hdr(frame_bytes(len, fill), VNET_HDR_LEN);
        port.queue_rx(f.clone());
        f
    }

    fn run(q: &mut Queue, mem: &GuestMemoryMmap<()>, mrg: bool, port: &Port) -> (RxOutcome, Vec<BadChain>) {
        let mut refused = vec![];
        let out = process(q, mem, VNET_HDR_LEN, mrg, port, |w| refused.push(*w)).unwrap();
        (out, refused)
    }

    #[test]
    fn a_frame_fills_one_buffer_with_num_buffers_one() {
        let mem = memory();
        let mut ring = Ring::new(&mem, 16);
        ring.desc(0, BUFFERS, 2048, WRITE, 0);
        ring.offer(0);
        let port = Port::new(Side::Primary).unwrap();
        pending(&port, 100, 0x33);
        let mut q = ring.queue();
        let (out, refused) = run(&mut q, &mem, true, &port);
        assert_eq!((out.frames, out.waiting), (1, false));
        assert!(refused.is_empty());
        assert_eq!(ring.used(), vec![(0, 112)]);
        let got = ring.read(BUFFERS, 112);
        assert_eq!(&got[..12], &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]);
        assert!(got[12..].iter().all(|&b| b == 0x33));
        assert!(!port.rx_pending());
    }

    #[test]
    fn mergeable_buffers_carry_a_frame_over_several_chains() {
        let mem = memory();
        let mut ring = Ring::new(&mem, 16);
        for i in 0..4u16 {
            ring.desc(i, BUFFERS + u64::from(i) * 0x1000, 256, WRITE, 0);
            ring.offer(i);
        }
        let port = Port::new(Side::Primary).unwrap();
        pending(&port, 600, 0x44);
        let mut q = ring.queue();
        let (out, _) = run(&mut q, &mem, true, &port);
        assert_eq!(out.frames, 1);
        assert_eq!(ring.used(), vec![(0, 256), (1, 256), (2, 100)]);
        assert_eq!(&ring.read(BUFFERS + 10, 2), &[3, 0], "num_buffers");
        let mut body = ring.read(BUFFERS + 12, 244);
        body.extend(ring.read(BUFFERS + 0x1000, 256));
        body.extend(ring.read(BUFFERS + 0x2000, 100));
        assert_eq!(body, vec![0x44; 600]);
    }

    #[test]
    fn without_enough_buffers_the_frame_waits_and_the_chains_stay() {
        let mem = memory();
        let mut ring = Ring::new(&mem, 16);
        ring.desc(0, BUFFERS, 256, WRITE, 0);
        ring.offer(0);
        let port = Port::new(Side::Primary).unwrap();
        pending(&port, 600, 1);
        let mut q = ring.queue();
        let (out, _) = run(&mut q, &mem, true, &port);
        assert_eq!((out.frames, out.waiting, out.used), (0, true, false));
        assert!(port.rx_pending());
        assert!(ring.used().is_empty());
        for i in 1..3u16 {
            ring.desc(i, BUFFERS + u64::from(i) * 0x1000, 256, WRITE, 0);
            ring.offer(i);
        }
        let (out, _) = run(&mut q, &mem, true, &port);
        assert_eq!(out.frames, 1);
        assert_eq!(ring.used(), vec![(0, 256), (1, 256), (2, 100)]);
    }

    #[test]
    fn refused_chains_never_land_inside_a_frame() {
        let mem = memory();
        let mut ring = Ring::new(&mem, 16);
        ring.desc(0, BUFFERS, 256, WRITE, 0); // good but too small alone
        ring.offer(0);
        ring.desc(1, BUFFERS + 0x1000, 256, 0, 0); // device-readable: refused
        ring.offer(1);
        ring.desc(2, 0x10_0000_0000, 4096, WRITE, 0); // outside memory: refused
        ring.offer(2);
        ring.desc(3, BUFFERS + 0x3000, 4096, WRITE, 0); // holds the whole frame
        ring.offer(3);
        let port = Port::new(Side::Primary).unwrap();
        pending(&port, 600, 2);
        let mut q = ring.queue();
        let (out, refused) = run(&mut q, &mem, true, &port);
        assert_eq!(out.frames, 1);
        assert_eq!(refused, vec![BadChain::WrongDirection, BadChain::OutsideMemory]);
        assert_eq!(ring.used(), vec![(0, 0), (1, 0), (2, 0), (3, 612)]);
        assert_eq!(&ring.read(BUFFERS + 0x3000 + 10, 2), &[1, 0]);
    }

    #[test]
    fn without_mergeable_buffers_a_frame_longer_than_the_buffer_is_dropped() {
        let mem = memory();
        let mut ring = Ring::new(&mem, 16);
        ring.desc(0, BUFFERS, 256, WRITE, 0);
        ring.offer(0);
        let port = Port::new(Side::Primary).unwrap();
        pending(&port, 600, 1);
        pending(&port, 100, 2);
        let mut q = ring.queue();
        let (out, _) = run(&mut q, &mem, false, &port);
        assert_eq!(out.frames, 1);
        assert_eq!(port.stats.snapshot().rx_too_big, 1);
        assert_eq!(ring.used(), vec![(0, 112)]);
    }

    #[test]
    fn a_frame_no_ring_could_hold_is_dropped_not_kept_forever() {
        let mem = memory();
        let mut ring = Ring::new(&mem, 4);
        for i in 0..4u16 {
            ring.desc(i, BUFFERS + u64::from(i) * 0x1000, 64, WRITE, 0);
            ring.offer(i);
        }
        let port = Port::new(Side::Primary).unwrap();
        pending(&port, 1000, 1);
        pending(&port, 40, 2);
        let mut q = ring.queue();
        let (out, _) = run(&mut q, &mem, true, &port);
        assert_eq!(out.frames, 1);
        assert_eq!(port.stats.snapshot().rx_too_big, 1);
        assert_eq!(ring.used(), vec![(0, 52)]);
    }
}
