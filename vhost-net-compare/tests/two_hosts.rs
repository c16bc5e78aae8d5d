//! Two vhost-net-compare processes with `--vm-socket`, as on two hosts: each serves one "VM"
//! (a vhost-user frontend in this process) and has its own tap; their frame link runs over
//! loopback TCP. The roles are set as the VMs' colo-vmm would set them.

mod common;

use std::fs;
use std::io::Write;
use std::net::TcpListener;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::time::Duration;

use colo_proxy::builder::{udp4, udp4_to, CLIENT_IP, VM_IP};
use colo_proxy::compare::Mode;
use colo_proxy::control::{ControlClient, Event, HelloReplica};
use colo_proxy::replica::Role;
use colo_test_support::expect_event;
use common::*;

const T: Duration = Duration::from_secs(5);
const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0xab, 0xcd, 0xef];
const MAC_ARG: &str = "52:54:00:ab:cd:ef";

fn udp_payload(f: &[u8]) -> Option<&[u8]> {
    (f.len() >= 42 && f[12..14] == [0x08, 0x00] && f[23] == 17).then(|| &f[42..])
}

fn has_payload(p: &'static [u8]) -> impl Fn(&[u8]) -> bool {
    move |f| udp_payload(f) == Some(p)
}

fn is_rarp_from_vm(f: &[u8]) -> bool {
    f.len() >= 14 && f[6..12] == MAC && f[12..14] == [0x80, 0x35]
}

/// A free port on loopback.
fn free_addr() -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

fn key_file(dir: &TempDir, name: &str, byte: u8) -> PathBuf {
    let path = dir.path(name);
    let mut f = fs::OpenOptions::new().create(true).write(true).truncate(true).mode(0o600).open(&path).unwrap();
    f.write_all(&[byte; 32]).unwrap();
    path
}

/// One host: its backend, tap, the wire on the tap, a control connection and the VM.
struct Host {
    backend: Backend,
    wire: Wire,
    ctl: ControlClient,
    vm: Vm,
    _tap: TestTap,
}

fn host(dir: &TempDir, listen: Option<&str>, key: Option<&PathBuf>) -> Host {
    let tap = TestTap::new();
    let mut extra: Vec<String> = vec!["--mac".into(), MAC_ARG.into(), "--compare-timeout".into(), "600000".into()];
    if let Some(l) = listen {
        extra.extend(["--peer-listen".into(), l.into()]);
    }
    if let Some(k) = key {
        extra.extend(["--link-key".into(), k.display().to_string()]);
    }
    let backend =
        Backend::spawn(dir, BackendOpts { one_vm: true, tap: &tap.name, secondary: false, control: true, extra });
    let wire = Wire::open(&tap.name);
    let ctl = backend.control();
    let mut vm = Vm::connect(&backend.primary);
    vm.setup();
    Host { backend, wire, ctl, vm, _tap: tap }
}

/// Host A (primary) and host B (secondary) with the frame link up.
fn pair(dir: &TempDir, key: Option<&PathBuf>) -> (Host, Host, String) {
    let addr = free_addr();
    let mut b = host(dir, Some(&addr), key);
    let mut a = host(dir, None, key);
    assert_eq!(b.ctl.set_role(Role::Secondary, None, None).unwrap(), Role::Secondary);
    assert_eq!(a.ctl.set_role(Role::Primary, Some(&addr), Some(200)).unwrap(), Role::Primary);
    assert_eq!(a.ctl.set_mode(Mode::Colo).unwrap(), Mode::Colo);
    a.vm.post_rx(32);
    b.vm.post_rx(32);
    (a, b, addr)
}

#[test]
fn without_a_role_nothing_reaches_the_vm_or_the_lan() {
    if !prerequisites("without_a_role_nothing_reaches_the_vm_or_the_lan") {
        return;
    }
    let dir = TempDir::new("vnc");
    let mut h = host(&dir, None, None);
    assert!(matches!(
        h.ctl.hello(),
        Event::Hello { replica: Some(HelloReplica { role: Role::Unset, peer_listen: None }), .. }
    ));
    h.vm.post_rx(8);
    h.wire.send(&udp4_to(CLIENT_IP, VM_IP, 2, 1, b"to nobody"));
    h.vm.send(&udp4(1, 2, b"from nobody"));
    assert!(h.vm.recv(Duration::from_millis(300)).is_none());
    assert!(h.wire.recv_matching(Duration::from_millis(300), has_payload(b"from nobody")).is_none());
    let counters = h.ctl.stats().unwrap().replica.expect("a one-VM backend reports its routing");
    assert_eq!(counters.unset_dropped, 2);
    // Alone: a passthrough.
    assert_eq!(h.ctl.set_role(Role::Alone, None, None).unwrap(), Role::Alone);
    h.wire.send(&udp4_to(CLIENT_IP, VM_IP, 2, 1, b"in"));
    assert!(h.vm.recv_matching(T, has_payload(b"in")).is_some());
    h.vm.send(&udp4(1, 2, b"out"));
    assert!(h.wire.recv_matching(T, has_payload(b"out")).is_some());
    // Modes are for primaries; a peer only for them.
    assert!(h.ctl.set_mode(Mode::Colo).is_err());
    assert!(h.ctl.set_role(Role::Secondary, Some("127.0.0.1:1"), None).is_err());
}

#[test]
fn across_the_frame_link_inbound_reaches_both_vms_and_output_is_released_once_by_the_primary() {
    if !prerequisites("across_the_frame_link_inbound_reaches_both_vms_and_output_is_released_once_by_the_primary") {
        return;
    }
    let dir = TempDir::new("vnc");
    let key = key_file(&dir, "key", 7);
    let (mut a, mut b, addr) = pair(&dir, Some(&key));
    assert!(matches!(
        b.backend.control().hello(),
        Event::Hello { replica: Some(HelloReplica { role: Role::Secondary, peer_listen: Some(l) }), .. } if *l == addr
    ));
    // Inbound on A's LAN: both VMs, in order.
    for i in 0..5u8 {
        a.wire.send(&udp4_to(CLIENT_IP, VM_IP, 2, 1, &[b'i', i]));
    }
    for vm in [&mut a.vm, &mut b.vm] {
        for i in 0..5u8 {
            let f = vm.recv(T).expect("an inbound frame");
            assert_eq!(udp_payload(&f.eth), Some(&[b'i', i][..]));
        }
    }
    // B's LAN is not A's: a frame there never reaches B's VM (it takes inbound from A only).
    b.wire.send(&udp4_to(CLIENT_IP, VM_IP, 2, 1, b"broadcast on B"));
    assert!(b.vm.recv(Duration::from_millis(300)).is_none());
    // The same output from both: released once, on A's LAN only.
    b.vm.send(&udp4(1, 2, b"answer"));
    a.vm.send(&udp4(1, 2, b"answer"));
    let got = a.wire.collect(Duration::from_millis(500), has_payload(b"answer"));
    assert_eq!(got.len(), 1);
    assert!(b.wire.recv_matching(Duration::from_millis(300), has_payload(b"answer")).is_none());
    // Different output: held, and a miscompare for the controller.
    a.vm.send(&udp4(1, 2, b"primary says"));
    b.vm.send(&udp4(1, 2, b"secondary says"));
    expect_event(&mut a.ctl, T, "miscompare", |e| matches!(e, Event::Miscompare { .. }));
    assert!(a.wire.recv_matching(Duration::from_millis(300), has_payload(b"primary says")).is_none());
    assert_eq!(a.ctl.checkpoint().unwrap().released, 1);
    assert!(a.wire.recv_matching(T, has_payload(b"primary says")).is_some());
    assert!(b.wire.recv_matching(Duration::from_millis(300), has_payload(b"secondary says")).is_none());

    // Host A is gone: B takes over, announces the VM on its LAN, and serves.
    drop(a);
    assert_eq!(b.ctl.set_role(Role::Alone, None, None).unwrap(), Role::Alone);
    let rarps = b.wire.collect(Duration::from_millis(900), is_rarp_from_vm);
    assert!(rarps.len() >= 4, "a few rounds of RARP over half a second, got {}", rarps.len());
    b.vm.send(&udp4(1, 2, b"from the survivor"));
    assert!(b.wire.recv_matching(T, has_payload(b"from the survivor")).is_some());
    b.wire.send(&udp4_to(CLIENT_IP, VM_IP, 2, 1, b"to the survivor"));
    assert!(b.vm.recv_matching(T, has_payload(b"to the survivor")).is_some());
}

#[test]
fn a_primary_whose_peer_is_gone_holds_its_output_until_its_controller_decides() {
    if !prerequisites("a_primary_whose_peer_is_gone_holds_its_output_until_its_controller_decides") {
        return;
    }
    let dir = TempDir::new("vnc");
    let (mut a, b, _) = pair(&dir, None);
    // The secondary's host dies: nothing answers the primary's pings any more.
    drop(b);
    std::thread::sleep(Duration::from_millis(400));
    // Even what the engine would release at once (primary-only) waits: the lease has lapsed.
    a.ctl.set_mode(Mode::PrimaryOnly).unwrap();
    a.vm.send(&udp4(1, 2, b"held"));
    assert!(a.wire.recv_matching(Duration::from_millis(400), has_payload(b"held")).is_none());
    assert!(a.ctl.stats().unwrap().replica.unwrap().gated >= 1);
    // Its controller decides it serves alone: out it goes.
    a.ctl.set_role(Role::Alone, None, None).unwrap();
    assert!(a.wire.recv_matching(T, has_payload(b"held")).is_some());
}

#[test]
fn a_secondary_loading_a_checkpoint_gets_the_inbound_frames_from_the_primarys_mark() {
    if !prerequisites("a_secondary_loading_a_checkpoint_gets_the_inbound_frames_from_the_primarys_mark") {
        return;
    }
    let dir = TempDir::new("vnc");
    let addr = free_addr();
    let mut b = host(&dir, Some(&addr), None);
    let mut a = host(&dir, None, None);
    b.ctl.set_role(Role::Secondary, None, None).unwrap();
    // Frames that reach the primary's queue before the link is up are mirrored when it comes.
    a.ctl.set_role(Role::Alone, None, None).unwrap();
    a.wire.send(&udp4_to(CLIENT_IP, VM_IP, 2, 1, b"early"));
    std::thread::sleep(Duration::from_millis(200));
    a.ctl.set_role(Role::Primary, Some(&addr), None).unwrap();
    a.ctl.set_mode(Mode::Colo).unwrap();
    b.vm.post_rx(32);
    assert!(b.vm.recv_matching(T, has_payload(b"early")).is_some(), "the frame waiting before the link came up");
    for p in [&b"one"[..], b"two", b"three"] {
        a.wire.send(&udp4_to(CLIENT_IP, VM_IP, 2, 1, p));
    }
    for p in [&b"one"[..], b"two", b"three"] {
        assert_eq!(b.vm.recv(T).map(|f| udp_payload(&f.eth).map(<[u8]>::to_vec)), Some(Some(p.to_vec())));
    }
    // The primary's VM has taken nothing (no RX buffers): its mark is the first frame.
    assert_eq!(a.ctl.rx_mark().unwrap(), 0);
    a.vm.post_rx(2);
    assert!(a.vm.recv_matching(T, has_payload(b"early")).is_some());
    assert!(a.vm.recv_matching(T, has_payload(b"one")).is_some());
    assert_eq!(a.ctl.rx_mark().unwrap(), 2, "it took 'early' and 'one'");
    // The secondary loads a checkpoint of the primary as it is now: it must get exactly the
    // frames the primary had not taken, again.
    assert_eq!(b.ctl.resync(2).unwrap(), 2);
    assert!(b.vm.recv_matching(T, has_payload(b"two")).is_some());
    assert!(b.vm.recv_matching(T, has_payload(b"three")).is_some());
    assert!(b.vm.recv(Duration::from_millis(300)).is_none());
    // Its VM, loaded, answers before the primary's flush: the answer waits for the flush
    // instead of being dropped by it, and then pairs with the primary VM's.
    b.vm.send(&udp4(1, 2, b"answer"));
    std::thread::sleep(Duration::from_millis(300));
    let flushed = a.ctl.checkpoint().unwrap();
    assert_eq!(flushed.dropped, 0, "the answer came after the secondary's `loading`: kept for after the flush");
    a.vm.send(&udp4(1, 2, b"answer"));
    assert!(a.wire.recv_matching(T, has_payload(b"answer")).is_some(), "compared with the secondary's and released");
    let stats = a.ctl.stats().unwrap();
    assert_eq!(stats.miscompares.total(), 0, "{stats:?}");
    // Commands for the other role are refused with a reason.
    assert!(a.ctl.resync(0).is_err());
    assert!(b.ctl.rx_mark().is_err());
}

#[test]
fn the_frame_link_needs_the_same_key_on_both_hosts() {
    if !prerequisites("the_frame_link_needs_the_same_key_on_both_hosts") {
        return;
    }
    let dir = TempDir::new("vnc");
    let (k1, k2) = (key_file(&dir, "k1", 1), key_file(&dir, "k2", 2));
    let addr = free_addr();
    let mut b = host(&dir, Some(&addr), Some(&k1));
    b.ctl.set_role(Role::Secondary, None, None).unwrap();
    for (key, what) in [(Some(&k2), "another key"), (None, "no key")] {
        let mut a = host(&dir, None, key);
        let e = match a.ctl.set_role(Role::Primary, Some(&addr), None) {
            Ok(_) => panic!("{what}: the frame link came up"),
            Err(e) => e.to_string(),
        };
        assert!(e.contains("handshake") || e.contains("key"), "{what}: {e}");
    }
    let log = b.backend.log_text();
    assert!(log.contains("refused a link connection") && log.contains("does not verify"), "{log}");
    assert!(log.contains("has no --link-key"), "{log}");
    // A key readable by others is refused at start.
    let open = dir.path("open");
    fs::write(&open, [3u8; 32]).unwrap();
    fs::set_permissions(&open, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vhost-net-compare"))
        .args(["--vm-socket", &dir.path("x.sock").display().to_string(), "--tap", "unused0", "--link-key"])
        .arg(&open)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("0600 or 0400"), "{}", String::from_utf8_lossy(&out.stderr));
    // The right key still works after all that.
    let mut a = host(&dir, None, Some(&k1));
    assert_eq!(a.ctl.set_role(Role::Primary, Some(&addr), None).unwrap(), Role::Primary);
}
