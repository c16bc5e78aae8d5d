//! The replicated disk on one VM (`--disk`): the reference guest's `kv` service keeps what it
//! acknowledged on the disk across a reboot; a read-only disk refuses writes; bad images are
//! refused at start with a clear error; malformed descriptor chains fail alone, are counted,
//! and the VMM goes on; snapshot/restore and live migration carry the disk (into a fresh image),
//! the migration verified block for block.

use std::process::Command;
use std::time::Duration;

use colo_tests::kv::{log_in_image, make_image, KvClient};
use colo_tests::vm_topology::{prerequisites, VmNet, GUEST_MAC};
use colo_tests::{bin, run, wait_for_path, Proc, TempDir};

fn check(test: &str) -> bool {
    colo_tests::can_run(test, prerequisites())
}

fn disk_arg(path: &std::path::Path) -> String {
    format!("path={}", path.display())
}

/// A VM with `--disk IMAGE` (created, 16 MiB, unless it exists).
fn vm_with_disk(images: &TempDir, name: &str, cmdline: &str, more: &[&str]) -> (VmNet, std::path::PathBuf) {
    let image = images.path(name);
    if !image.exists() {
        make_image(&image, 16);
    }
    let disk = disk_arg(&image);
    let mut args = vec!["--disk", &disk];
    args.extend_from_slice(more);
    (VmNet::start_with(cmdline, &args), image)
}

#[test]
fn kv_keeps_what_it_acknowledged_on_the_disk_across_a_reboot() {
    if !check("kv_keeps_what_it_acknowledged_on_the_disk_across_a_reboot") {
        return;
    }
    let images = TempDir::new("disk");
    let (mut vm, image) = vm_with_disk(&images, "a.img", "app=kv", &[]);
    assert!(vm.serial_log().contains("colo-guest: disk up sectors=32768 readonly=0"), "{}", vm.serial_log());
    let mut kv = KvClient::over(vm.connect(9200));
    for i in 0..50 {
        kv.put(&format!("key{i}"), &format!("value {i} with spaces")).unwrap();
    }
    kv.put("key7", "seven again").unwrap();
    assert_eq!(kv.get("key3").unwrap().as_deref(), Some("value 3 with spaces"));
    assert_eq!(kv.get("key7").unwrap().as_deref(), Some("seven again"));
    assert_eq!(kv.get("nokey").unwrap(), None);
    let scan = kv.scan().unwrap();
    assert_eq!((scan["records"], scan["keys"], scan["repeated"], scan["mismatch"]), (51, 50, 1, 0));
    for bad in ["put", "get", "put k", "fill 0", "bogus"] {
        assert!(kv.ask(bad).unwrap().starts_with("err"), "{bad}");
    }
    // Acknowledged means on the disk: the image holds every record, already now.
    let log = log_in_image(&image);
    assert_eq!(log.len(), 51);
    assert_eq!(log[50], ("key7".to_string(), "seven again".to_string()));
    // A new VM on the same image reads the log back.
    vm.ctl("quit", &[]);
    vm.vmm.take().unwrap().wait_timeout(Duration::from_secs(5));
    let disk = disk_arg(&image);
    vm.launch_vmm(&["run".into(), "--cmdline".into(), "ip=10.0.0.2/24 app=kv".into(), "--disk".into(), disk]);
    vm.wait_serial("kv log records=51 keys=50", Duration::from_secs(20));
    let mut kv = KvClient::over(vm.connect(9200));
    assert_eq!(kv.get("key49").unwrap().as_deref(), Some("value 49 with spaces"));
    assert_eq!(kv.get("key7").unwrap().as_deref(), Some("seven again"));
}

#[test]
fn a_read_only_disk_serves_reads_and_refuses_writes() {
    if !check("a_read_only_disk_serves_reads_and_refuses_writes") {
        return;
    }
    let images = TempDir::new("disk");
    let (mut vm, image) = vm_with_disk(&images, "ro.img", "app=kv", &[]);
    KvClient::over(vm.connect(9200)).put("k", "written before").unwrap();
    vm.ctl("quit", &[]);
    vm.vmm.take().unwrap().wait_timeout(Duration::from_secs(5));
    std::fs::set_permissions(&image, std::os::unix::fs::PermissionsExt::from_mode(0o444)).unwrap();
    let disk = format!("{},readonly", disk_arg(&image));
    vm.launch_vmm(&["run".into(), "--cmdline".into(), "ip=10.0.0.2/24 app=kv".into(), "--disk".into(), disk]);
    vm.wait_serial("kv log records=1", Duration::from_secs(20));
    assert!(vm.serial_log().contains("readonly=1"), "{}", vm.serial_log());
    let mut kv = KvClient::over(vm.connect(9200));
    assert_eq!(kv.get("k").unwrap().as_deref(), Some("written before"));
    let e = kv.put("k2", "v").unwrap_err();
    assert!(e.contains("err disk"), "{e}");
    let before = std::fs::read(&image).unwrap();
    assert_eq!(log_in_image(&image).len(), 1, "the image is unchanged");
    assert_eq!(std::fs::read(&image).unwrap(), before);
}

#[test]
fn bad_images_are_refused_at_start_with_a_clear_error() {
    if !std::path::Path::new("/dev/kvm").exists() {
        return colo_tests::skip("bad_images_are_refused_at_start_with_a_clear_error", "needs /dev/kvm");
    }
    let dir = TempDir::new("diskerr");
    let fail = |disk: String, needle: &str| {
        let (st, out) = run(Command::new(bin("colo-vmm")).args(["run", "--serial", "none", "--disk", &disk]));
        assert_eq!(st.code(), Some(1), "{disk}: exit code 1; output:\n{out}");
        assert!(out.contains(needle), "{disk}: expected '{needle}' in:\n{out}");
    };
    fail(disk_arg(&dir.path("missing.img")), "No such file");
    let small = dir.path("small.img");
    std::fs::write(&small, vec![0u8; 4096]).unwrap();
    fail(disk_arg(&small), "at least 1048576 bytes");
    let odd = dir.path("odd.img");
    std::fs::write(&odd, vec![0u8; (1 << 20) + 100]).unwrap();
    fail(disk_arg(&odd), "whole number of 4096-byte blocks");
    let ro = dir.path("ro.img");
    make_image(&ro, 1);
    std::fs::set_permissions(&ro, std::os::unix::fs::PermissionsExt::from_mode(0o444)).unwrap();
    fail(disk_arg(&ro), "read-only");
    fail(disk_arg(&dir.path("")), "not a regular file");
    // A malformed option is a usage error (clap's exit code 2).
    for (disk, needle) in [("path=".to_string(), "path=FILE"), (format!("{},ro", disk_arg(&ro)), "readonly")] {
        let (st, out) = run(Command::new(bin("colo-vmm")).args(["run", "--serial", "none", "--disk", &disk]));
        assert!(!st.success() && out.contains(needle), "{disk}: {out}");
    }
}

#[test]
fn malformed_disk_requests_fail_alone_are_counted_and_the_vmm_goes_on() {
    if !check("malformed_disk_requests_fail_alone_are_counted_and_the_vmm_goes_on") {
        return;
    }
    let images = TempDir::new("disk");
    let (vm, _) = vm_with_disk(&images, "bad.img", "app=kv,badblk", &[]);
    assert!(vm.serial_log().contains("bad disk requests sent=5, each failed alone"), "{}", vm.serial_log());
    let (ok, st) = vm.ctl("query-status", &[]);
    assert!(ok, "{st}");
    let st: serde_json::Value = serde_json::from_str(&st).unwrap();
    assert_eq!(st["return"]["disk"]["stats"]["bad-requests"], 5, "{st:#}");
    assert!(vm.vmm_stderr().contains("virtio-blk: refused a request"), "logged");
    let mut kv = KvClient::over(vm.connect(9200));
    kv.put("after", "the bad requests").unwrap();
    assert_eq!(kv.get("after").unwrap().as_deref(), Some("the bad requests"));
}

#[test]
fn snapshot_and_restore_carry_the_disk_into_a_fresh_image() {
    if !check("snapshot_and_restore_carry_the_disk_into_a_fresh_image") {
        return;
    }
    let images = TempDir::new("disk");
    let (mut vm, _) = vm_with_disk(&images, "a.img", "app=kv", &[]);
    let mut kv = KvClient::over(vm.connect(9200));
    for i in 0..40 {
        kv.put(&format!("k{i}"), &format!("v{i}")).unwrap();
    }
    assert_eq!(kv.ask("fill 2").unwrap(), "ok", "2 MiB of the scratch area written too");
    let snap = vm.dir.path("vm.snap");
    assert!(vm.ctl("stop", &[]).0);
    let (ok, out) = vm.ctl("snapshot", &[&format!("path={}", snap.display())]);
    assert!(ok, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(v["return"]["blocks"].as_u64().unwrap() >= 512 + 5, "the disk's blocks are in the snapshot: {v}");
    assert!(vm.ctl("quit", &[]).0);
    vm.vmm.take().unwrap().wait_timeout(Duration::from_secs(5));
    // A fresh, zeroed image: the restore must make it the saved disk.
    let fresh = images.path("fresh.img");
    make_image(&fresh, 16);
    // An image of another size is refused, clearly.
    let other = images.path("other.img");
    make_image(&other, 8);
    let (st, text) = run(Command::new(bin("colo-vmm"))
        .args(["run", "--serial", "none", "--restore"])
        .arg(&snap)
        .args(["--disk", &disk_arg(&other), "--net"])
        .arg(format!("vhost-user={},mac={GUEST_MAC}", vm.vhost_socket.display())));
    assert!(!st.success() && text.contains("bytes"), "{text}");
    let (st, text) = run(Command::new(bin("colo-vmm")).args(["run", "--serial", "none", "--restore"]).arg(&snap));
    assert!(!st.success() && text.contains("--disk"), "a restore without the disk is refused: {text}");
    vm.launch_vmm(&["run".into(), "--restore".into(), snap.display().to_string(), "--disk".into(), disk_arg(&fresh)]);
    kv.set_timeout(Duration::from_secs(10));
    for i in 0..40 {
        assert_eq!(kv.get(&format!("k{i}")).unwrap(), Some(format!("v{i}")), "the same session, on the restored disk");
    }
    let scan = kv.scan().unwrap();
    assert_eq!((scan["records"], scan["mismatch"]), (40, 0), "the restored image is the log the memory expects");
    assert_eq!(log_in_image(&fresh).len(), 40);
}

#[test]
fn live_migration_carries_the_disk_verified_block_for_block() {
    if !check("live_migration_carries_the_disk_verified_block_for_block") {
        return;
    }
    let images = TempDir::new("disk");
    let (mut vm, _) = vm_with_disk(&images, "src.img", "app=kv,diskdirty disk_dirty=500", &[]);
    let dst_image = images.path("dst.img");
    make_image(&dst_image, 16);
    let uri = format!("unix:{}", vm.dir.path("migrate.sock").display());
    let api = vm.dir.path("dst-api.sock");
    let mut c = Command::new(bin("colo-vmm"));
    c.args(["run", "--incoming", &uri, "--disk", &disk_arg(&dst_image)])
        .arg("--net")
        .arg(format!("vhost-user={},mac={GUEST_MAC}", vm.vhost_socket.display()))
        .arg("--api")
        .arg(&api)
        .args(["--serial", "none"]);
    let mut dst = Proc::spawn("destination", c);
    assert!(wait_for_path(&vm.dir.path("migrate.sock"), Duration::from_secs(10)), "destination not listening");
    // Puts all along the migration, on one connection.
    let kv_conn = vm.connect(9200);
    let writer = std::thread::spawn(move || {
        let mut kv = KvClient::over(kv_conn);
        kv.set_timeout(Duration::from_secs(15));
        let mut acked = vec![];
        let t = std::time::Instant::now();
        while t.elapsed() < Duration::from_secs(4) {
            let k = format!("m{}", acked.len());
            kv.put(&k, &format!("during migration {}", acked.len())).map(|()| acked.push(k)).unwrap();
        }
        (kv, acked)
    });
    std::thread::sleep(Duration::from_millis(700));
    let (ok, out) = vm.ctl("migrate", &[&format!("uri={uri}"), "verify=true", "downtime-limit=30"]);
    assert!(ok, "migration failed:\n{out}\nsource:\n{}\ndestination:\n{}", vm.vmm_stderr(), dst.stderr());
    let status: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(status["blocks-sent"].as_u64().unwrap() > 0, "{status:#}");
    let (mut kv, acked) = writer.join().unwrap();
    eprintln!("{} puts acknowledged across the migration; {status}", acked.len());
    assert!(acked.len() > 10);
    assert!(dst.stderr().contains("verified: the disk equals the source's block for block"), "{}", dst.stderr());
    for (i, k) in acked.iter().enumerate() {
        assert_eq!(kv.get(k).unwrap(), Some(format!("during migration {i}")));
    }
    assert_eq!(kv.scan().unwrap()["mismatch"], 0);
    vm.ctl("quit", &[]);
    vm.vmm.take();
    let _ = colo_tests::colo_topology::ctl(&api, "quit", &[]);
    dst.wait_timeout(Duration::from_secs(5));
    assert_eq!(log_in_image(&dst_image).len(), acked.len(), "the destination's image holds the log");
}
