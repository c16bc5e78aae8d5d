//! The TCP/IP stack: smoltcp over the virtio-net device, with a static IPv4 address.
//!
//! smoltcp answers ARP and ICMP echo itself; the services own TCP and UDP sockets in
//! [`Net::sockets`].

mod device;

use alloc::vec::Vec;

use smoltcp::iface::{Config, Interface, SocketSet};
use smoltcp::time::Instant;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpCidr, Ipv4Address, Ipv4Cidr};

use colo_guest::cmdline;

use crate::virtio::net::VirtioNet;

/// The network: interface, device and sockets.
pub struct Net {
    iface: Interface,
    device: VirtioNet,
    /// Every socket of every service.
    pub sockets: SocketSet<'static>,
}

impl Net {
    /// Brings the interface up on `device` with address `ip` and default route `gateway`.
    /// `seed` seeds smoltcp's random numbers (initial sequence numbers, ephemeral ports).
    pub fn new(
        mut device: VirtioNet,
        ip: cmdline::Ipv4Cidr,
        gateway: Option<[u8; 4]>,
        seed: u64,
        now: Instant,
    ) -> Result<Net, &'static str> {
        let mut config = Config::new(HardwareAddress::Ethernet(EthernetAddress(device.mac())));
        config.random_seed = seed;
        let mut iface = Interface::new(config, &mut device, now);
        let cidr = Ipv4Cidr::new(Ipv4Address::from(ip.addr), ip.prefix_len);
        let mut pushed = Ok(());
        iface.update_ip_addrs(|addrs| pushed = addrs.push(IpCidr::Ipv4(cidr)));
        pushed.map_err(|_| "cannot add the interface address")?;
        if let Some(gateway) = gateway {
            iface
                .routes_mut()
                .add_default_ipv4_route(Ipv4Address::from(gateway))
                .map_err(|_| "cannot add the default route")?;
        }
        Ok(Net { iface, device, sockets: SocketSet::new(Vec::new()) })
    }

    /// The device's MAC address.
    pub fn mac(&self) -> [u8; 6] {
        self.device.mac()
    }

    /// Processes every received frame and sends what the sockets have queued.
    pub fn poll(&mut self, now: Instant) {
        self.iface.poll(now, &mut self.device, &mut self.sockets);
    }

    /// Sends what the sockets have queued (after the services ran), then notifies the device.
    pub fn transmit(&mut self, now: Instant) {
        self.iface.poll_egress(now, &mut self.device, &mut self.sockets);
        self.device.flush();
    }

    /// When smoltcp next needs a poll; `None` if only a frame (or a free transmit buffer) can
    /// give it work — both come with a device signal, which ends the halt.
    pub fn deadline(&mut self, now: Instant) -> Option<Instant> {
        self.device.tx.reclaim();
        if self.device.tx.is_full() {
            // Whatever smoltcp wants to send waits for a buffer; polling now would spin.
            return None;
        }
        self.iface.poll_at(now, &self.sockets)
    }

    /// Whether received frames wait to be processed (a memory read, no exit) and can be: a
    /// frame is taken only with a free transmit buffer (see the device).
    pub fn has_work(&mut self) -> bool {
        self.device.rx.has_frames() && {
            self.device.tx.reclaim();
            !self.device.tx.is_full()
        }
    }

    /// Frames received, sent, and received unusable.
    pub fn frame_counts(&self) -> (u64, u64, u64) {
        (self.device.rx.frames, self.device.tx.frames, self.device.rx.errors)
    }
}
