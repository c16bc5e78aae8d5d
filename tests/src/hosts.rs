//! Several hosts on one machine, for the two- and three-host tests:
//!
//! ```text
//!  client ns: eth0 10.0.0.1 ─┐
//!                            │ switch ns: bridge br0 (the LAN), one port per host
//!  host a ns: eth0 ──────────┤    inside each host: bridge brvm joins eth0 and the VM's tap
//!  host b ns: eth0 ──────────┘
//!  host a ns: rep0 10.99.0.1 ─┐
//!                             │ repl ns: bridge br0 (the replication network)
//!  host b ns: rep0 10.99.0.2 ─┘
//! ```
//! Each host's processes run inside its namespace; a host dies by killing them all and taking
//! its links down (then no reset ever reaches a peer), freezes by SIGSTOP. The switch's ports
//! are named `p<i>` (hosts) and `pc` (the client), so a capture on a port with `-Q in` records
//! exactly what that host sent onto the LAN. Everything is removed on drop.

use std::path::Path;
use std::time::Duration;

use crate::netns::{veth, Netns};
use crate::Proc;

/// The client's address on the LAN.
pub const CLIENT_IP: &str = "10.0.0.1";
/// The witness's address on the replication network.
pub const WITNESS_IP: &str = "10.99.0.250";

/// Whether this machine can build the topology, else why not.
pub fn prerequisites() -> Result<(), String> {
    crate::netns::prerequisites(&["ip", "tcpdump"])?;
    if !Path::new("/dev/net/tun").exists() {
        return Err("needs /dev/net/tun".into());
    }
    Ok(())
}

/// The frames of a capture (classic pcap as tcpdump writes it, or pcapng as the compare
/// processes write theirs), with their times since the epoch.
pub fn read_capture(path: &Path) -> Vec<(Duration, Vec<u8>)> {
    // A capture cut short by its process's end ends with a partial packet: keep what is whole.
    std::fs::read(path).ok().and_then(|bytes| crate::pcapread::try_packets(&bytes).ok()).unwrap_or_default()
}

/// One host.
pub struct Host {
    /// Its namespace.
    pub ns: Netns,
    /// `a`, `b`, `c`...
    pub name: String,
    /// Its port on the LAN switch (in the switch namespace).
    pub switch_port: String,
    /// Its address on the replication network.
    pub repl_ip: String,
}

impl Host {
    /// Creates the VM's tap `tap` (persistent, with a virtio-net header, as the backends open
    /// it) and bridges it with the host's LAN link, so the VM sits on the LAN.
    pub fn add_vm_tap(&self, tap: &str) {
        self.ns.exec(&["ip", "tuntap", "add", "dev", tap, "mode", "tap", "vnet_hdr"]);
        self.ns.exec(&["ip", "link", "set", "dev", tap, "master", "brvm", "up"]);
    }

    /// Starts a process inside the host.
    pub fn spawn(&self, name: &str, program: &Path, args: &[&str]) -> Proc {
        self.ns.spawn(&format!("{}-{name}", self.name), program.to_str().expect("utf-8 path"), args)
    }

    /// Takes the host's links down (LAN and replication), as when its power fails.
    pub fn cut_links(&self) {
        for link in ["eth0", "rep0"] {
            let _ = self.ns.try_exec(&["ip", "link", "set", "dev", link, "down"]);
        }
    }
}

/// The hosts, the client and the two switches.
pub struct Lan {
    /// The hosts (a, b, c, ...).
    pub hosts: Vec<Host>,
    /// The client's namespace (eth0 at 10.0.0.1/24).
    pub client: Netns,
    /// The LAN switch.
    pub switch: Netns,
    /// The replication network's switch.
    pub repl: Netns,
}

impl Lan {
    /// `n` hosts, a client, the LAN and the replication network.
    pub fn new(n: usize) -> Lan {
        let switch = Netns::new("sw");
        let repl = Netns::new("rs");
        for ns in [&switch, &repl] {
            // Forwarding entries age as on a real switch; no spanning tree delay.
            ns.exec(&["ip", "link", "add", "br0", "type", "bridge", "stp_state", "0", "forward_delay", "0"]);
            ns.exec(&["ip", "link", "set", "br0", "up"]);
        }
        let client = Netns::new("cl");
        veth("eth0", &client, "pc", &switch);
        switch.exec(&["ip", "link", "set", "pc", "master", "br0"]);
        client.exec(&["ip", "addr", "add", &format!("{CLIENT_IP}/24"), "dev", "eth0"]);
        let mut hosts = Vec::new();
        for i in 0..n {
            let name = ((b'a' + i as u8) as char).to_string();
            let ns = Netns::new(&format!("h{name}"));
            let switch_port = format!("p{i}");
            veth("eth0", &ns, &switch_port, &switch);
            switch.exec(&["ip", "link", "set", &switch_port, "master", "br0"]);
            ns.exec(&["ip", "link", "add", "brvm", "type", "bridge", "stp_state", "0", "forward_delay", "0"]);
            ns.exec(&["ip", "link", "set", "eth0", "master", "brvm"]);
            ns.exec(&["ip", "link", "set", "brvm", "up"]);
            let repl_port = format!("r{i}");
            veth("rep0", &ns, &repl_port, &repl);
            repl.exec(&["ip", "link", "set", &repl_port, "master", "br0"]);
            let repl_ip = format!("10.99.0.{}", i + 1);
            ns.exec(&["ip", "addr", "add", &format!("{repl_ip}/24"), "dev", "rep0"]);
            hosts.push(Host { ns, name, switch_port, repl_ip });
        }
        Lan { hosts, client, switch, repl }
    }

    /// Host `i`.
    pub fn host(&self, i: usize) -> &Host {
        &self.hosts[i]
    }

    /// A witness host on the replication network at [`WITNESS_IP`] (where the arbiter runs):
    /// reachable from every host, and from none once its replication link is cut.
    pub fn add_witness(&self) -> Netns {
        let ns = Netns::new("wt");
        veth("rep0", &ns, "rw", &self.repl);
        self.repl.exec(&["ip", "link", "set", "rw", "master", "br0"]);
        ns.exec(&["ip", "addr", "add", &format!("{WITNESS_IP}/24"), "dev", "rep0"]);
        ns
    }

    /// Cuts the replication network between hosts `a` and `b` only (each still reaches the
    /// others and the witness): nftables rules in `a` drop everything to and from `b`.
    pub fn partition(&self, a: usize, b: usize) {
        let (ha, peer) = (&self.hosts[a].ns, &self.hosts[b].repl_ip);
        ha.exec(&["nft", "add", "table", "inet", "colo_partition"]);
        for chain in ["input", "output"] {
            let hook = format!("{{ type filter hook {chain} priority 0 ; }}");
            ha.exec(&["nft", "add", "chain", "inet", "colo_partition", chain, &hook]);
        }
        ha.exec(&["nft", "add", "rule", "inet", "colo_partition", "input", "ip", "saddr", peer, "drop"]);
        ha.exec(&["nft", "add", "rule", "inet", "colo_partition", "output", "ip", "daddr", peer, "drop"]);
    }

    /// Heals what [`Lan::partition`] cut in host `a`.
    pub fn heal(&self, a: usize) {
        let _ = self.hosts[a].ns.try_exec(&["nft", "delete", "table", "inet", "colo_partition"]);
    }

    /// Starts a capture of what host `i` sends onto the LAN (its switch port, inbound
    /// direction), into `file` (pcap). Returns once tcpdump listens.
    pub fn capture_host(&self, i: usize, file: &Path) -> Proc {
        let port = self.hosts[i].switch_port.clone();
        let path = file.to_str().expect("utf-8 path").to_string();
        let mut p = self.switch.spawn(
            &format!("tcpdump-{port}"),
            "tcpdump",
            &["-i", &port, "-Q", "in", "-n", "-U", "-s", "256", "-w", &path],
        );
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !p.stderr().contains("listening on") {
            assert!(p.is_running() && std::time::Instant::now() < deadline, "tcpdump did not start: {}", p.stderr());
            std::thread::sleep(Duration::from_millis(20));
        }
        p
    }
}
