//! Captures of what hosts send onto the LAN (tcpdump on their switch ports, see
//! [`crate::hosts::Lan::capture_host`]), read back as the frames sent from the VM's MAC: who
//! spoke as the VM, and when.

use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::colo_hosts::ColoHosts;
use crate::hosts::read_capture;
use crate::vm_topology::GUEST_MAC;
use crate::Proc;

/// The running captures, one per host.
pub struct PortCaptures {
    files: Vec<PathBuf>,
    tcpdump: Vec<Proc>,
}

/// A frame a host sent from the VM's MAC.
#[derive(Debug, Clone)]
pub struct VmFrame {
    /// When it crossed the switch port (since the epoch: the captures' clock).
    pub at: Duration,
    /// Its EtherType (0x8035: a RARP, as a takeover's announcement sends).
    pub ethertype: u16,
}

/// EtherType of RARP, which a takeover's announcement sends first.
pub const ETHERTYPE_RARP: u16 = 0x8035;

impl PortCaptures {
    /// Starts a capture on the switch port of each of `hosts` (in the run's directory); returns
    /// once every tcpdump listens.
    pub fn start(net: &ColoHosts, hosts: &[usize]) -> PortCaptures {
        let files: Vec<_> = hosts.iter().map(|i| net.dir.path(&format!("port-{i}.pcap"))).collect();
        let tcpdump = hosts.iter().zip(&files).map(|(i, f)| net.lan.capture_host(*i, f)).collect();
        PortCaptures { files, tcpdump }
    }

    /// Stops the captures; per host (in the order given to [`PortCaptures::start`]), the frames
    /// it sent from the VM's MAC.
    pub fn finish_frames(mut self) -> Vec<Vec<VmFrame>> {
        for t in &mut self.tcpdump {
            t.signal(libc::SIGINT);
            t.wait_timeout(Duration::from_secs(5));
        }
        let mac: colo_proxy::wire::MacAddr = GUEST_MAC.parse().expect("the VM's MAC");
        self.files
            .iter()
            .map(|f| {
                read_capture(f)
                    .into_iter()
                    .filter(|(_, fr)| fr.len() >= 14 && fr[6..12] == mac)
                    .map(|(at, fr)| VmFrame { at, ethertype: u16::from_be_bytes([fr[12], fr[13]]) })
                    .collect()
            })
            .collect()
    }

    /// Stops the captures; per host, the times (since the epoch) of frames from the VM's MAC.
    pub fn finish(self) -> Vec<Vec<Duration>> {
        self.finish_frames().into_iter().map(|h| h.into_iter().map(|f| f.at).collect()).collect()
    }
}

/// `at` as time since the epoch (the captures' clock).
pub fn since_epoch(at: Instant) -> Duration {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().saturating_sub(at.elapsed())
}
