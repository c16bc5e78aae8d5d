//! The machines of a `colo-proxy run` setup, as network namespaces on one host:
//!
//! ```text
//!  client ns            proxy ns                   primary ns / secondary ns
//!  eth0 10.0.0.1 ── uplink  [colo-proxy run]  pri ── eth0 10.0.0.2 (same MAC)
//!                                             sec ── eth0 10.0.0.2 (same MAC)
//! ```
//!
//! Both "VMs" run the same real services: kernel ICMP, UDP echo and TCP echo on port 7 (socat),
//! and a UDP service on port 9 whose answer names the machine (like a hostname or a random
//! token), so it always miscompares. Everything is removed on drop.

use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::netns::{veth, Netns};
use crate::{bin, wait_for_path, Proc};

/// Address of the VMs.
pub const VM_IP: &str = "10.0.0.2";
/// MAC address of both VMs.
pub const VM_MAC: &str = "52:54:00:12:34:56";
/// Address of the client.
pub const CLIENT_IP: &str = "10.0.0.1";
/// MAC address of the client.
pub const CLIENT_MAC: &str = "52:54:00:00:00:01";
/// The UDP port whose answer differs between the VMs.
pub const DIVERGENT_PORT: u16 = 9;

/// A UDP service inside a namespace that answers every datagram with a fixed reply.
pub struct Responder {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Responder {
    /// Binds `port` inside `ns` and answers with `reply`.
    pub fn start(ns: &Netns, port: u16, reply: &'static [u8]) -> Responder {
        let sock = ns.enter(move || UdpSocket::bind(("0.0.0.0", port)).expect("bind responder"));
        sock.set_read_timeout(Some(Duration::from_millis(50))).expect("timeout");
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 1500];
            while !flag.load(Ordering::Relaxed) {
                if let Ok((_, from)) = sock.recv_from(&mut buf) {
                    let _ = sock.send_to(reply, from);
                }
            }
        });
        Responder { stop, thread: Some(thread) }
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Processes of the topology, dropped (killed) before the namespaces.
struct Processes {
    proxy: Proc,
    /// tcpdump on the uplink and on the primary's interface.
    tcpdumps: Vec<Proc>,
    services: Vec<Proc>,
    responders: Vec<Responder>,
}

/// The running topology. Field order matters: processes go before namespaces.
pub struct ProxyTopology {
    procs: Option<Processes>,
    /// The client's namespace.
    pub client: Netns,
    /// The proxy's namespace.
    pub proxy_ns: Netns,
    /// The primary VM's namespace.
    pub primary: Netns,
    /// The secondary VM's namespace.
    pub secondary: Netns,
    /// Control socket of the proxy.
    pub control: PathBuf,
    /// The proxy's capture of miscompared frames.
    pub capture: PathBuf,
    /// tcpdump's capture of the uplink.
    pub uplink_pcap: PathBuf,
    /// tcpdump's capture of the primary's interface: what the primary sent, so a test can
    /// tell the proxy's releases from the primary kernel's own retransmissions.
    pub primary_pcap: PathBuf,
}

impl ProxyTopology {
    /// Builds the namespaces, starts the VMs' services, tcpdump on the uplink and on the
    /// primary's interface (writing to `dir/uplink.pcap` and `dir/primary.pcap`) and
    /// `colo-proxy run` with `extra` arguments.
    pub fn start(dir: &Path, extra: &[&str]) -> ProxyTopology {
        let client = Netns::new("cl");
        let proxy_ns = Netns::new("px");
        let primary = Netns::new("pv");
        let secondary = Netns::new("sv");
        veth("eth0", &client, "uplink", &proxy_ns);
        veth("eth0", &primary, "pri", &proxy_ns);
        veth("eth0", &secondary, "sec", &proxy_ns);
        client.exec(&["ip", "link", "set", "dev", "eth0", "address", CLIENT_MAC]);
        client.exec(&["ip", "addr", "add", "10.0.0.1/24", "dev", "eth0"]);
        for vm in [&primary, &secondary] {
            vm.exec(&["ip", "link", "set", "dev", "eth0", "address", VM_MAC]);
            vm.exec(&["ip", "addr", "add", "10.0.0.2/24", "dev", "eth0"]);
            // Two independent kernels age their neighbour caches at different random times,
            // and the proxy (rightly) drops the secondary's own ARP requests. Real COLO VMs
            // share this state through checkpoints; here, pin it.
            vm.exec(&["ip", "neigh", "replace", CLIENT_IP, "lladdr", CLIENT_MAC, "dev", "eth0", "nud", "permanent"]);
        }
        let control = dir.join("ctl.sock");
        let capture = dir.join("miscompares.pcapng");
        let uplink_pcap = dir.join("uplink.pcap");
        let primary_pcap = dir.join("primary.pcap");
        let tcpdumps = vec![tcpdump(&proxy_ns, "uplink", &uplink_pcap), tcpdump(&proxy_ns, "pri", &primary_pcap)];
        let proxy = {
            let mut c = proxy_ns.command(bin("colo-proxy").to_str().expect("utf-8 path"));
            c.args(["run", "--uplink", "uplink", "--primary", "pri", "--secondary", "sec"])
                .arg("--control-socket")
                .arg(&control)
                .arg("--capture")
                .arg(&capture)
                .args(extra);
            Proc::spawn("colo-proxy", c)
        };
        let mut services = vec![];
        for vm in [&primary, &secondary] {
            services.push(vm.spawn("udp-echo", "socat", &["UDP4-RECVFROM:7,fork", "EXEC:cat"]));
            services.push(vm.spawn("tcp-echo", "socat", &["TCP4-LISTEN:7,reuseaddr,fork", "EXEC:cat"]));
        }
        let responders = vec![
            Responder::start(&primary, DIVERGENT_PORT, b"primary\n"),
            Responder::start(&secondary, DIVERGENT_PORT, b"secondary\n"),
        ];
        assert!(wait_for_path(&control, Duration::from_secs(10)), "the proxy's control socket did not appear");
        // tcpdump and socat need a moment before they listen.
        std::thread::sleep(Duration::from_millis(500));
        ProxyTopology {
            procs: Some(Processes { proxy, tcpdumps, services, responders }),
            client,
            proxy_ns,
            primary,
            secondary,
            control,
            capture,
            uplink_pcap,
            primary_pcap,
        }
    }

    /// The proxy process.
    pub fn proxy(&mut self) -> &mut Proc {
        &mut self.procs.as_mut().expect("running").proxy
    }

    /// Stops the tcpdumps so their capture files are complete.
    pub fn stop_tcpdump(&mut self) {
        let mut tcpdumps = self.procs.as_mut().map(|p| std::mem::take(&mut p.tcpdumps)).unwrap_or_default();
        tcpdumps.iter_mut().for_each(|t| t.signal(libc::SIGINT));
        for t in &mut tcpdumps {
            t.wait_timeout(Duration::from_secs(5));
        }
    }

    /// Stops the proxy with SIGTERM (so it flushes its capture) and says whether it exited
    /// cleanly.
    pub fn stop_proxy(&mut self) -> bool {
        let p = self.proxy();
        p.signal(libc::SIGTERM);
        p.wait_timeout(Duration::from_secs(5)).is_some_and(|s| s.success())
    }
}

/// tcpdump on `interface` of `ns`, every frame in full, written at once to `pcap`.
fn tcpdump(ns: &Netns, interface: &str, pcap: &Path) -> Proc {
    let pcap = pcap.to_str().expect("utf-8 path");
    ns.spawn("tcpdump", "tcpdump", &["-i", interface, "-n", "-U", "--immediate-mode", "-s", "0", "-w", pcap])
}

impl Drop for ProxyTopology {
    fn drop(&mut self) {
        if let Some(p) = self.procs.take() {
            drop(p.responders);
            drop(p.services);
            drop(p.tcpdumps);
            drop(p.proxy);
        }
    }
}
