//! Small Linux guests under QEMU TCG, for end-to-end tests that need a real guest kernel on the
//! other side of a tap or of a vhost-user backend.
//!
//! The image comes from `scripts/install-guest-image.sh` (Debian 12's cloud kernel, its virtio
//! modules and busybox-static, under [`DEFAULT_GUEST_DIR`] or `$COLO_GUEST_DIR`). At test time an
//! initramfs is written (uncompressed cpio newc, by [`Cpio`]) with busybox, the modules, a small
//! static service binary compiled from C with `cc -static` ([`SVC_SOURCE`]) and an `/init` that:
//!
//! 1. mounts proc, sysfs and devtmpfs, loads the virtio modules in order;
//! 2. reads `colo.*` parameters from the kernel command line: `colo.ip=A.B.C.D/N`, `colo.gw=`,
//!    `colo.svc=echo,httpd,token`, `colo.token=` (else a per-boot random UUID), `colo.neigh=IP,MAC`
//!    (repeatable: permanent neighbour entries), `colo.ipv6=1` (IPv6 stays off otherwise);
//! 3. configures eth0 and starts the services, waiting until each listens:
//!    - `echo`: UDP and TCP echo on port [`ECHO_PORT`] (7);
//!    - `httpd`: busybox httpd on port [`HTTP_PORT`] (80) serving [`INDEX_HTML`] as `/` and
//!      [`blob`] as `/blob.bin`;
//!    - `token`: UDP and TCP on [`TOKEN_PORT`]: each datagram, and each TCP read, is answered with
//!      the token and a newline (two guests answer differently unless given the same token);
//! 4. prints `COLO-GUEST-FEATURES <bits>` (the virtio-net feature bits the driver accepted, as
//!    `/sys/.../features` shows them: character i is bit i), `COLO-GUEST-TOKEN <token>` and
//!    `COLO-GUEST-READY <ip>` on the serial console; on any failure `COLO-GUEST-FAILED <why>`,
//!    then it powers the guest off (QEMU exits).
//!
//! [`LinuxGuest::start`] runs QEMU (`-M q35 -accel tcg -cpu max`, PVH vmlinux if installed, else
//! the bzImage) with the serial console in a file, and the network the caller chose: a tap, a
//! vhost-user socket (guest RAM is then a shared memfd) or none. QEMU is killed when the guest is
//! dropped; [`LinuxGuest::wait_ready`] waits for the READY marker and fails with the console's
//! tail if it does not come.
//!
//! QEMU 7.2 as a vhost-user-net frontend under TCG (measured with a vhost-user-backend 0.24
//! passthrough backend): the device must use INTx (`vectors=0`, which [`GuestOpts::device_arg`]
//! adds), since with MSI-X QEMU segfaults in `vhost_net_start` once the guest driver starts it.
//! QEMU sends `SET_VRING_ENABLE(1)` for both rings *before* `SET_FEATURES` (at device
//! realize/reset and again in `vhost_net_start`) and never after, so a backend must accept it
//! then and keep the rings enabled; the vhost crate 0.18 rejects it (`InactiveFeature
//! (PROTOCOL_FEATURES)`) and drops the connection. Without `PROTOCOL_FEATURES` offered, QEMU 7.2
//! fails with "unable to start vhost net: 22". The guest then negotiates VERSION_1, EVENT_IDX
//! and MRG_RXBUF when offered.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::{Proc, TempDir};

/// Where `scripts/install-guest-image.sh` installs the guest image.
pub const DEFAULT_GUEST_DIR: &str = "/opt/colo-guest";

/// The modules `/init` loads, in this order (all in the image's `modules/`).
pub const MODULES: [&str; 9] = [
    "virtio_ring",
    "virtio",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "virtio_mmio",
    "failover",
    "net_failover",
    "virtio_net",
];

/// UDP and TCP echo port of the `echo` service.
pub const ECHO_PORT: u16 = 7;
/// busybox httpd's port (the `httpd` service).
pub const HTTP_PORT: u16 = 80;
/// UDP and TCP port of the `token` service.
pub const TOKEN_PORT: u16 = 7777;
/// The page httpd serves as `/` (and `/index.html`).
pub const INDEX_HTML: &str = "<html><body><h1>colo test guest</h1></body></html>\n";
/// Console marker printed when the network and the services are up (followed by the IP).
pub const READY_MARKER: &str = "COLO-GUEST-READY";
/// Console marker printed when `/init` fails (followed by the reason); the guest then powers off.
pub const FAILED_MARKER: &str = "COLO-GUEST-FAILED";
/// Console marker followed by the service token.
pub const TOKEN_MARKER: &str = "COLO-GUEST-TOKEN";
/// Console marker followed by the negotiated virtio-net feature bits.
pub const FEATURES_MARKER: &str = "COLO-GUEST-FEATURES";

/// virtio-net feature bits worth checking in [`Ready::features`].
pub mod feature {
    /// VIRTIO_NET_F_CSUM (device handles partial checksums of guest output).
    pub const CSUM: u32 = 0;
    /// VIRTIO_NET_F_GUEST_CSUM.
    pub const GUEST_CSUM: u32 = 1;
    /// VIRTIO_NET_F_MAC.
    pub const MAC: u32 = 5;
    /// VIRTIO_NET_F_GUEST_TSO4.
    pub const GUEST_TSO4: u32 = 7;
    /// VIRTIO_NET_F_HOST_TSO4.
    pub const HOST_TSO4: u32 = 11;
    /// VIRTIO_NET_F_MRG_RXBUF.
    pub const MRG_RXBUF: u32 = 15;
    /// VIRTIO_NET_F_STATUS.
    pub const STATUS: u32 = 16;
    /// VIRTIO_NET_F_CTRL_VQ.
    pub const CTRL_VQ: u32 = 17;
    /// VIRTIO_RING_F_INDIRECT_DESC.
    pub const INDIRECT_DESC: u32 = 28;
    /// VIRTIO_RING_F_EVENT_IDX.
    pub const EVENT_IDX: u32 = 29;
    /// VIRTIO_F_VERSION_1.
    pub const VERSION_1: u32 = 32;
}

/// The guest's service program: UDP and TCP on one port; `echo PORT` echoes, `token PORT TOKEN`
/// answers every datagram and every TCP read with TOKEN and a newline. It forks into the
/// background once both sockets listen, so `/init` knows it is ready when it returns.
pub const SVC_SOURCE: &str = r#"/* colo-svc (generated by tests/src/linux_guest.rs) */
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static char buf[65536];

static int bound(int type, int port) {
    int s = socket(AF_INET, type, 0), one = 1;
    struct sockaddr_in a;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_port = htons(port);
    if (s < 0) { perror("colo-svc: socket"); exit(1); }
    setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(s, (struct sockaddr *)&a, sizeof a) < 0) { perror("colo-svc: bind"); exit(1); }
    if (type == SOCK_STREAM && listen(s, 64) < 0) { perror("colo-svc: listen"); exit(1); }
    return s;
}

static int write_all(int fd, const char *p, size_t n) {
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) return -1;
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

int main(int argc, char **argv) {
    int token = argc == 4 && !strcmp(argv[1], "token");
    if (!token && !(argc == 3 && !strcmp(argv[1], "echo"))) {
        fprintf(stderr, "usage: colo-svc echo PORT | colo-svc token PORT TOKEN\n");
        return 2;
    }
    int port = atoi(argv[2]);
    char reply[256];
    size_t rlen = token ? (size_t)snprintf(reply, sizeof reply, "%s\n", argv[3]) : 0;
    if (rlen >= sizeof reply) rlen = sizeof reply - 1;
    signal(SIGCHLD, SIG_IGN);
    signal(SIGPIPE, SIG_IGN);
    struct pollfd p[2] = {{bound(SOCK_DGRAM, port), POLLIN, 0}, {bound(SOCK_STREAM, port), POLLIN, 0}};
    pid_t bg = fork();
    if (bg < 0) { perror("colo-svc: fork"); return 1; }
    if (bg > 0) _exit(0);
    setsid();
    for (;;) {
        if (poll(p, 2, -1) < 0) continue;
        if (p[0].revents & POLLIN) {
            struct sockaddr_in from;
            socklen_t fl = sizeof from;
            ssize_t n = recvfrom(p[0].fd, buf, sizeof buf, 0, (struct sockaddr *)&from, &fl);
            if (n >= 0)
                sendto(p[0].fd, token ? reply : buf, token ? rlen : (size_t)n, 0, (struct sockaddr *)&from, fl);
        }
        if (p[1].revents & POLLIN) {
            int c = accept(p[1].fd, NULL, NULL);
            if (c < 0) continue;
            if (fork() == 0) {
                close(p[0].fd);
                close(p[1].fd);
                ssize_t n;
                while ((n = read(c, buf, sizeof buf)) != 0) {
                    if (n < 0 && errno == EINTR) continue;
                    if (n < 0 || write_all(c, token ? reply : buf, token ? rlen : (size_t)n) < 0) break;
                }
                _exit(0);
            }
            close(c);
        }
    }
}
"#;

/// The guest's `/init` (busybox sh).
pub const INIT_SCRIPT: &str = r#"#!/bin/sh
# /init of the colo test guest (generated by tests/src/linux_guest.rs)
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
fail() {
    dmesg -n 1
    echo "COLO-GUEST-FAILED $*"
    sync
    poweroff -f
    sleep 1000000
}
mount -t proc proc /proc || fail "mount /proc"
mount -t sysfs sysfs /sys || fail "mount /sys"
mount -t devtmpfs devtmpfs /dev 2>/dev/null || grep -q ' /dev ' /proc/mounts || fail "mount /dev"
mkdir -p /dev/pts /tmp /run
echo "colo-guest: /init started (uptime $(cut -d' ' -f1 /proc/uptime) s)"

IP= GW= SVC= TOKEN= IPV6=0 NEIGH=
for a in $(cat /proc/cmdline); do
    case "$a" in
        colo.ip=*) IP="${a#colo.ip=}" ;;
        colo.gw=*) GW="${a#colo.gw=}" ;;
        colo.svc=*) SVC="${a#colo.svc=}" ;;
        colo.token=*) TOKEN="${a#colo.token=}" ;;
        colo.ipv6=*) IPV6="${a#colo.ipv6=}" ;;
        colo.neigh=*) NEIGH="$NEIGH ${a#colo.neigh=}" ;;
    esac
done
[ -n "$TOKEN" ] || TOKEN="$(cat /proc/sys/kernel/random/uuid)"

if [ "$IPV6" != 1 ]; then
    echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6
    echo 1 > /proc/sys/net/ipv6/conf/default/disable_ipv6
fi

for m in $(cat /modules/order); do
    insmod "/modules/$m.ko" || fail "insmod $m"
done

ip link set lo up || fail "lo up"
if [ -n "$IP" ]; then
    n=0
    while [ ! -e /sys/class/net/eth0 ]; do
        n=$((n + 1))
        [ "$n" -le 500 ] || fail "no eth0 after 10 s"
        usleep 20000
    done
    ip link set eth0 up || fail "eth0 up"
    ip addr add "$IP" dev eth0 || fail "ip addr add $IP"
    [ -z "$GW" ] || ip route add default via "$GW" || fail "default route via $GW"
    for nb in $NEIGH; do
        ip neigh replace "${nb%%,*}" lladdr "${nb#*,}" dev eth0 nud permanent || fail "neighbour $nb"
    done
fi

PORTS=
for s in $(echo "$SVC" | tr , ' '); do
    case "$s" in
        echo) /bin/colo-svc echo 7 || fail "echo service"; PORTS="$PORTS 7" ;;
        httpd) httpd -p 80 -h /www || fail "httpd"; PORTS="$PORTS 80" ;;
        token) /bin/colo-svc token 7777 "$TOKEN" || fail "token service"; PORTS="$PORTS 7777" ;;
        *) fail "unknown service $s" ;;
    esac
done
for p in $PORTS; do
    hex="$(printf '%04X' "$p")"
    n=0
    until cat /proc/net/tcp /proc/net/tcp6 2>/dev/null | grep -q "^ *[0-9]*: [0-9A-F]*:$hex [0-9A-F]*:0000 0A"; do
        n=$((n + 1))
        [ "$n" -le 500 ] || fail "port $p not listening after 10 s"
        usleep 20000
    done
done

# Markers on lines of their own: keep kernel messages off the console while printing them.
dmesg -n 1
if [ -e /sys/class/net/eth0/device/features ]; then
    echo "COLO-GUEST-FEATURES $(cat /sys/class/net/eth0/device/features)"
fi
echo "COLO-GUEST-TOKEN $TOKEN"
echo "COLO-GUEST-READY ${IP:-none} uptime $(cut -d' ' -f1 /proc/uptime)"
dmesg -n 5
while :; do sleep 3600; done
"#;

/// The directory of the guest image: `$COLO_GUEST_DIR`, else [`DEFAULT_GUEST_DIR`].
pub fn guest_dir() -> PathBuf {
    std::env::var_os("COLO_GUEST_DIR").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(DEFAULT_GUEST_DIR))
}

/// The installed guest image's files.
#[derive(Clone, Debug)]
pub struct GuestImage {
    /// The kernel QEMU boots: `vmlinux` (PVH, faster under TCG) if installed, else `bzImage`.
    pub kernel: PathBuf,
    /// busybox-static.
    pub busybox: PathBuf,
    /// The modules of [`MODULES`], in that order.
    pub modules: Vec<PathBuf>,
}

impl GuestImage {
    /// The image in [`guest_dir`], or why it is not usable.
    pub fn find() -> Result<GuestImage, String> {
        Self::find_in(&guest_dir())
    }

    /// The image in `dir`, or why it is not usable.
    pub fn find_in(dir: &Path) -> Result<GuestImage, String> {
        let hint = "install it with `sudo scripts/install-guest-image.sh` (or point $COLO_GUEST_DIR at one)";
        let kernel = [dir.join("vmlinux"), dir.join("bzImage")]
            .into_iter()
            .find(|p| p.is_file())
            .ok_or_else(|| format!("no guest kernel (vmlinux or bzImage) in {} ({hint})", dir.display()))?;
        let busybox = dir.join("busybox");
        if !busybox.is_file() {
            return Err(format!("{} missing ({hint})", busybox.display()));
        }
        let mut modules = vec![];
        for m in MODULES {
            let p = dir.join("modules").join(format!("{m}.ko"));
            if !p.is_file() {
                return Err(format!("{} missing ({hint})", p.display()));
            }
            modules.push(p);
        }
        Ok(GuestImage { kernel, busybox, modules })
    }
}

/// Whether Linux guests can be booted here: QEMU runs, the guest image is installed, `cc` can
/// build the static service binary, and we are root (taps, namespaces). `Err` says what is
/// missing, for `colo_tests::skip`.
pub fn linux_guest_available() -> Result<(), String> {
    crate::qemu::qemu_available()?;
    GuestImage::find()?;
    if !crate::have("cc") {
        return Err("needs a C compiler `cc` with static glibc (apt-get install gcc libc6-dev)".into());
    }
    if !crate::is_root() {
        return Err("needs root (taps and network namespaces for the guest's network)".into());
    }
    Ok(())
}

/// How the guest's virtio-net-pci device is connected.
#[derive(Clone, Debug)]
pub enum GuestNet {
    /// No network device.
    None,
    /// `-netdev tap,ifname=NAME,script=no,downscript=no` (the tap is created by QEMU if absent;
    /// it must be in the namespace QEMU runs in, see [`GuestOpts::netns`]).
    Tap {
        /// The tap interface's name.
        ifname: String,
    },
    /// `-netdev vhost-user` on a Unix socket the backend listens on; guest RAM is a shared memfd.
    VhostUser {
        /// The backend's socket.
        socket: PathBuf,
        /// `reconnect=N` on the chardev: QEMU starts even when the socket is not there yet and
        /// reconnects every N seconds after a disconnect.
        reconnect: Option<u32>,
    },
}

/// The guest's services (`colo.svc=`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Service {
    /// UDP and TCP echo on [`ECHO_PORT`].
    Echo,
    /// busybox httpd on [`HTTP_PORT`].
    Httpd,
    /// The token service on [`TOKEN_PORT`].
    Token,
}

impl Service {
    /// Every service.
    pub const ALL: [Service; 3] = [Service::Echo, Service::Httpd, Service::Token];

    fn name(self) -> &'static str {
        match self {
            Service::Echo => "echo",
            Service::Httpd => "httpd",
            Service::Token => "token",
        }
    }
}

/// What to boot and how to connect it.
#[derive(Clone, Debug)]
pub struct GuestOpts {
    /// A short name for logs and temp files.
    pub name: String,
    /// The network device's backend.
    pub net: GuestNet,
    /// The device's MAC (two COLO guests use the same one).
    pub mac: String,
    /// `A.B.C.D/N` for eth0; `None` leaves eth0 unconfigured.
    pub ip: Option<String>,
    /// Default gateway.
    pub gw: Option<String>,
    /// Permanent neighbour entries (IP, MAC), e.g. the client, so that two COLO guests do not ARP
    /// at different times.
    pub neighbours: Vec<(String, String)>,
    /// Services to start.
    pub services: Vec<Service>,
    /// The token service's answer; `None`: a random UUID per boot.
    pub token: Option<String>,
    /// Keep IPv6 on (off by default: no autoconfiguration traffic).
    pub ipv6: bool,
    /// Size of `/blob.bin` on httpd (see [`blob`]).
    pub blob_bytes: usize,
    /// Guest RAM in MiB.
    pub mem_mib: u32,
    /// Turn the device's checksum and segmentation offloads off (`csum=off,gso=off,...`), so
    /// every frame the guest sends is complete. On by default.
    pub no_offloads: bool,
    /// More `virtio-net-pci` properties, e.g. `mrg_rxbuf=off`.
    pub device_props: Vec<String>,
    /// More kernel command line.
    pub append: String,
    /// Run QEMU inside this network namespace (`ip netns exec`), e.g. where the tap lives.
    pub netns: Option<String>,
    /// The kernel; `None`: the installed image's.
    pub kernel: Option<PathBuf>,
    /// More QEMU arguments.
    pub qemu_args: Vec<String>,
}

impl GuestOpts {
    /// Defaults: no network, MAC 52:54:00:12:34:56, no IP, no services, 256 MiB, no offloads.
    pub fn new(name: &str) -> GuestOpts {
        GuestOpts {
            name: name.to_string(),
            net: GuestNet::None,
            mac: "52:54:00:12:34:56".into(),
            ip: None,
            gw: None,
            neighbours: vec![],
            services: vec![],
            token: None,
            ipv6: false,
            blob_bytes: 64 * 1024,
            mem_mib: 256,
            no_offloads: true,
            device_props: vec![],
            append: String::new(),
            netns: None,
            kernel: None,
            qemu_args: vec![],
        }
    }

    /// A tap guest with `ip` and every service.
    pub fn tap(name: &str, ifname: &str, ip: &str) -> GuestOpts {
        let mut o = GuestOpts::new(name);
        o.net = GuestNet::Tap { ifname: ifname.to_string() };
        o.ip = Some(ip.to_string());
        o.services = Service::ALL.to_vec();
        o
    }

    /// A vhost-user guest with `ip` and every service.
    pub fn vhost_user(name: &str, socket: &Path, ip: &str) -> GuestOpts {
        let mut o = GuestOpts::new(name);
        o.net = GuestNet::VhostUser { socket: socket.to_path_buf(), reconnect: None };
        o.ip = Some(ip.to_string());
        o.services = Service::ALL.to_vec();
        o
    }

    /// The kernel command line.
    pub fn cmdline(&self) -> String {
        let mut s = String::from("console=ttyS0,115200 panic=-1 oops=panic nokaslr rdinit=/init");
        if let Some(ip) = &self.ip {
            let _ = write!(s, " colo.ip={ip}");
        }
        if let Some(gw) = &self.gw {
            let _ = write!(s, " colo.gw={gw}");
        }
        for (ip, mac) in &self.neighbours {
            let _ = write!(s, " colo.neigh={ip},{mac}");
        }
        if !self.services.is_empty() {
            let names: Vec<_> = self.services.iter().map(|s| s.name()).collect();
            let _ = write!(s, " colo.svc={}", names.join(","));
        }
        if let Some(t) = &self.token {
            let _ = write!(s, " colo.token={t}");
        }
        if self.ipv6 {
            s.push_str(" colo.ipv6=1");
        }
        if !self.append.is_empty() {
            s.push(' ');
            s.push_str(&self.append);
        }
        s
    }

    /// The `virtio-net-pci` device argument (without `-device`). For vhost-user it has
    /// `vectors=0` (INTx instead of MSI-X): QEMU 7.2 under TCG segfaults in `vhost_net_start`
    /// (`msix_set_vector_notifiers`) when the guest enables an MSI-X vhost-user device.
    pub fn device_arg(&self) -> String {
        let mut d = format!("virtio-net-pci,netdev=n0,mac={},romfile=", self.mac);
        if matches!(self.net, GuestNet::VhostUser { .. }) {
            d.push_str(",vectors=0");
        }
        if self.no_offloads {
            for p in [
                "csum",
                "gso",
                "host_tso4",
                "host_tso6",
                "host_ecn",
                "host_ufo",
                "guest_csum",
                "guest_tso4",
                "guest_tso6",
                "guest_ecn",
                "guest_ufo",
            ] {
                let _ = write!(d, ",{p}=off");
            }
        }
        for p in &self.device_props {
            d.push(',');
            d.push_str(p);
        }
        d
    }

    /// The QEMU arguments (after the binary) for an initramfs and a console log.
    pub fn qemu_args(&self, kernel: &Path, initrd: &Path, console: &Path) -> Vec<String> {
        let mut a: Vec<String> = [
            "-M",
            "q35",
            "-accel",
            "tcg",
            "-cpu",
            "max",
            "-smp",
            "1",
            "-nodefaults",
            "-display",
            "none",
            "-no-reboot",
            "-no-user-config",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a.push("-m".into());
        a.push(format!("{}M", self.mem_mib));
        a.push("-kernel".into());
        a.push(kernel.display().to_string());
        a.push("-initrd".into());
        a.push(initrd.display().to_string());
        a.push("-append".into());
        a.push(self.cmdline());
        a.push("-serial".into());
        a.push(format!("file:{}", console.display()));
        match &self.net {
            GuestNet::None => {}
            GuestNet::Tap { ifname } => {
                a.push("-netdev".into());
                a.push(format!("tap,id=n0,ifname={ifname},script=no,downscript=no"));
                a.push("-device".into());
                a.push(self.device_arg());
            }
            GuestNet::VhostUser { socket, reconnect } => {
                a.push("-object".into());
                a.push(format!("memory-backend-memfd,id=mem,size={}M,share=on", self.mem_mib));
                a.push("-machine".into());
                a.push("memory-backend=mem".into());
                a.push("-chardev".into());
                let mut c = format!("socket,id=vu0,path={}", socket.display());
                if let Some(r) = reconnect {
                    let _ = write!(c, ",reconnect={r}");
                }
                a.push(c);
                a.push("-netdev".into());
                a.push("vhost-user,id=n0,chardev=vu0".into());
                a.push("-device".into());
                a.push(self.device_arg());
            }
        }
        a.extend(self.qemu_args.iter().cloned());
        a
    }
}

/// The content of httpd's `/blob.bin` of `len` bytes (deterministic, not compressible by
/// accident: a 32-bit LCG's high bytes).
pub fn blob(len: usize) -> Vec<u8> {
    let mut x: u32 = 0x1234_5678;
    (0..len)
        .map(|_| {
            x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (x >> 24) as u8
        })
        .collect()
}

/// A cpio archive in the "newc" format the kernel unpacks as an initramfs (uncompressed: under
/// TCG that is faster than making the guest decompress it).
#[derive(Default)]
pub struct Cpio {
    buf: Vec<u8>,
    ino: u32,
}

impl Cpio {
    /// An empty archive.
    pub fn new() -> Cpio {
        Cpio { buf: vec![], ino: 300_000 }
    }

    fn entry(&mut self, name: &str, mode: u32, nlink: u32, rdev: (u32, u32), data: &[u8]) {
        let name = name.trim_start_matches('/');
        self.ino += 1;
        let fields = [
            self.ino,
            mode,
            0, // uid
            0, // gid
            nlink,
            0, // mtime
            u32::try_from(data.len()).expect("cpio member under 4 GiB"),
            0, // devmajor
            0, // devminor
            rdev.0,
            rdev.1,
            u32::try_from(name.len() + 1).expect("name length"),
            0, // check
        ];
        self.buf.extend_from_slice(b"070701");
        for f in fields {
            let _ = write!(self.buf, "{f:08X}");
        }
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.push(0);
        self.pad();
        self.buf.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        self.buf.resize(self.buf.len().next_multiple_of(4), 0);
    }

    /// A directory (parents must be added first).
    pub fn dir(&mut self, path: &str) {
        self.entry(path, 0o040755, 2, (0, 0), &[]);
    }

    /// A regular file with permission bits `perm` (e.g. 0o755).
    pub fn file(&mut self, path: &str, perm: u32, data: &[u8]) {
        self.entry(path, 0o100000 | (perm & 0o7777), 1, (0, 0), data);
    }

    /// A symbolic link `path` -> `target`.
    pub fn symlink(&mut self, path: &str, target: &str) {
        self.entry(path, 0o120777, 1, (0, 0), target.as_bytes());
    }

    /// A character device node.
    pub fn char_dev(&mut self, path: &str, perm: u32, major: u32, minor: u32) {
        self.entry(path, 0o020000 | (perm & 0o7777), 1, (major, minor), &[]);
    }

    /// Ends the archive (the `TRAILER!!!` entry) and returns its bytes.
    pub fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, 1, (0, 0), &[]);
        self.buf
    }
}

/// Compiles [`SVC_SOURCE`] with `cc -static` into `dir/colo-svc`.
pub fn build_svc(dir: &Path) -> anyhow::Result<PathBuf> {
    let src = dir.join("colo-svc.c");
    let out = dir.join("colo-svc");
    std::fs::write(&src, SVC_SOURCE)?;
    let res = Command::new("cc")
        .args(["-static", "-Os", "-s", "-Wall", "-o"])
        .arg(&out)
        .arg(&src)
        .stdin(Stdio::null())
        .output()
        .context("running cc (apt-get install gcc libc6-dev)")?;
    if !res.status.success() {
        bail!("cc -static colo-svc.c failed: {}", String::from_utf8_lossy(&res.stderr));
    }
    Ok(out)
}

/// Writes the initramfs for `opts` into `dir/initramfs.cpio` and returns its path.
pub fn build_initramfs(dir: &Path, image: &GuestImage, opts: &GuestOpts) -> anyhow::Result<PathBuf> {
    let svc = build_svc(dir)?;
    let mut c = Cpio::new();
    for d in ["bin", "sbin", "usr", "usr/bin", "usr/sbin", "dev", "proc", "sys", "tmp", "run", "etc", "modules", "www"]
    {
        c.dir(d);
    }
    c.char_dev("dev/console", 0o600, 5, 1);
    c.char_dev("dev/null", 0o666, 1, 3);
    let read = |p: &Path| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
    c.file("bin/busybox", 0o755, &read(&image.busybox)?);
    // Applet links from the busybox binary itself (the host runs the same static binary).
    let list = Command::new(&image.busybox).arg("--list-full").output().context("busybox --list-full")?;
    if !list.status.success() {
        bail!("{} --list-full failed", image.busybox.display());
    }
    for applet in String::from_utf8_lossy(&list.stdout).lines().map(str::trim) {
        if applet.is_empty() || applet == "bin/busybox" || applet.contains("..") {
            continue;
        }
        c.symlink(applet, "/bin/busybox");
    }
    c.file("bin/colo-svc", 0o755, &read(&svc)?);
    let mut order = String::new();
    for (name, path) in MODULES.iter().zip(&image.modules) {
        c.file(&format!("modules/{name}.ko"), 0o644, &read(path)?);
        order.push_str(name);
        order.push('\n');
    }
    c.file("modules/order", 0o644, order.as_bytes());
    c.file("etc/passwd", 0o644, b"root:x:0:0:root:/:/bin/sh\n");
    c.file("etc/group", 0o644, b"root:x:0:\n");
    c.file("www/index.html", 0o644, INDEX_HTML.as_bytes());
    c.file("www/blob.bin", 0o644, &blob(opts.blob_bytes));
    c.file("init", 0o755, INIT_SCRIPT.as_bytes());
    let path = dir.join("initramfs.cpio");
    std::fs::write(&path, c.finish()).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// What the guest printed once it was ready.
#[derive(Clone, Debug)]
pub struct Ready {
    /// From QEMU's start to the READY marker in the console log.
    pub boot: Duration,
    /// The token service's answer.
    pub token: String,
    /// The virtio-net feature bits the driver accepted (`None` without a network device).
    pub features: Option<u64>,
}

/// A running Linux guest (QEMU process); killed on drop. Keep it on the thread that started it.
pub struct LinuxGuest {
    // Declared first: QEMU dies before the directory with its files is removed.
    qemu: Proc,
    name: String,
    console: PathBuf,
    started: Instant,
    ready: Option<Ready>,
    args: Vec<String>,
    /// The console was already shown in an error (no second copy on drop).
    reported: bool,
    _dir: TempDir,
}

impl LinuxGuest {
    /// Builds the initramfs and starts QEMU. Returns once QEMU runs; see [`LinuxGuest::wait_ready`].
    pub fn start(opts: &GuestOpts) -> anyhow::Result<LinuxGuest> {
        let qemu_bin = crate::qemu::qemu_available().map_err(anyhow::Error::msg)?;
        let image = GuestImage::find().map_err(anyhow::Error::msg)?;
        let dir = TempDir::new(&format!("guest-{}", opts.name));
        let initrd = build_initramfs(&dir.path(""), &image, opts)?;
        let console = dir.path("console.log");
        let kernel = opts.kernel.clone().unwrap_or_else(|| image.kernel.clone());
        let args = opts.qemu_args(&kernel, &initrd, &console);
        let mut cmd = match &opts.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&qemu_bin);
                c
            }
            None => Command::new(&qemu_bin),
        };
        cmd.args(&args).stdout(Stdio::null());
        let started = Instant::now();
        let qemu = Proc::spawn(&format!("qemu-{}", opts.name), cmd);
        Ok(LinuxGuest {
            qemu,
            name: opts.name.clone(),
            console,
            started,
            ready: None,
            args,
            reported: false,
            _dir: dir,
        })
    }

    /// Starts the guest and waits until it is ready.
    pub fn boot(opts: &GuestOpts, timeout: Duration) -> anyhow::Result<(LinuxGuest, Ready)> {
        let mut g = LinuxGuest::start(opts)?;
        let r = g.wait_ready(timeout)?;
        Ok((g, r))
    }

    /// Waits for the READY marker; fails with the console's tail and QEMU's stderr if the
    /// guest reports a failure, QEMU exits, or `timeout` passes.
    pub fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<Ready> {
        if let Some(r) = &self.ready {
            return Ok(r.clone());
        }
        let deadline = Instant::now() + timeout;
        loop {
            let log = self.console();
            if let Some(why) = marker(&log, FAILED_MARKER) {
                self.reported = true;
                bail!("guest {} failed: {why}\n{}", self.name, self.diagnostics());
            }
            if marker(&log, READY_MARKER).is_some() {
                let boot = self.started.elapsed();
                let token = marker(&log, TOKEN_MARKER).unwrap_or_default();
                let features = marker(&log, FEATURES_MARKER).and_then(|bits| parse_features(&bits));
                let r = Ready { boot, token, features };
                self.ready = Some(r.clone());
                return Ok(r);
            }
            if !self.qemu.is_running() {
                self.reported = true;
                bail!("QEMU of guest {} exited before the guest was ready\n{}", self.name, self.diagnostics());
            }
            if Instant::now() > deadline {
                self.reported = true;
                bail!("guest {} not ready after {timeout:?}\n{}", self.name, self.diagnostics());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The serial console so far.
    pub fn console(&self) -> String {
        std::fs::read(&self.console).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default()
    }

    /// The last `n` lines of the console.
    pub fn console_tail(&self, n: usize) -> String {
        let log = self.console();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// The QEMU command line, console tail and QEMU's stderr, for error messages.
    pub fn diagnostics(&self) -> String {
        format!(
            "--- QEMU arguments ---\n{}\n--- console of {} (last 40 lines) ---\n{}\n--- QEMU stderr ---\n{}",
            self.args.join(" "),
            self.name,
            self.console_tail(40),
            self.qemu.stderr()
        )
    }

    /// What the guest reported when ready (after a successful [`LinuxGuest::wait_ready`]).
    pub fn ready(&self) -> Option<&Ready> {
        self.ready.as_ref()
    }

    /// The QEMU process.
    pub fn qemu(&mut self) -> &mut Proc {
        &mut self.qemu
    }

    /// QEMU's arguments (after the binary).
    pub fn args(&self) -> &[String] {
        &self.args
    }
}

impl Drop for LinuxGuest {
    fn drop(&mut self) {
        if std::thread::panicking() && !self.reported {
            eprintln!("--- console of guest {} (last 40 lines) ---\n{}", self.name, self.console_tail(40));
        }
    }
}

/// The rest of the line after the first `name ` marker in the console, trimmed.
fn marker(log: &str, name: &str) -> Option<String> {
    let at = log.find(&format!("{name} "))?;
    let rest = &log[at + name.len() + 1..];
    let line = rest.split(['\r', '\n']).next()?;
    // Only a complete line counts (the guest may still be writing it).
    (rest.len() > line.len()).then(|| line.trim().to_string())
}

/// virtio feature bits from sysfs's string ("1" at position i: bit i).
pub fn parse_features(bits: &str) -> Option<u64> {
    let bits = bits.split_whitespace().next()?;
    let mut f = 0u64;
    for (i, ch) in bits.chars().enumerate().take(64) {
        match ch {
            '1' => f |= 1 << i,
            '0' => {}
            _ => return None,
        }
    }
    Some(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_need_whole_lines() {
        let log = "boot\nCOLO-GUEST-TOKEN abc-123\r\nCOLO-GUEST-READY 10.0.0.2/24 uptime 1.2";
        assert_eq!(marker(log, TOKEN_MARKER).as_deref(), Some("abc-123"));
        assert_eq!(marker(log, READY_MARKER), None);
        assert_eq!(marker(&format!("{log}\n"), READY_MARKER).as_deref(), Some("10.0.0.2/24 uptime 1.2"));
    }

    #[test]
    fn feature_bits() {
        let f = parse_features("1000010000000001000000000000010010000000000000000000000000000000").unwrap();
        assert_eq!(f, 1 | 1 << 5 | 1 << 15 | 1 << 29 | 1 << 32);
        assert_eq!(parse_features("10x"), None);
    }

    #[test]
    fn cpio_newc_layout() {
        let mut c = Cpio::new();
        c.char_dev("/dev/console", 0o600, 5, 1);
        c.file("init", 0o755, b"#!/bin/sh\n");
        let a = c.finish();
        assert_eq!(&a[..6], b"070701");
        assert_eq!(a.len() % 4, 0);
        // mode of the first entry: 020600; rdev 5:1.
        assert_eq!(&a[14..22], b"00002180");
        assert_eq!(&a[78..94], b"0000000500000001");
        assert!(a.windows(10).any(|w| w == b"TRAILER!!!"));
    }
}
