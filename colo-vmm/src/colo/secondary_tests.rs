//! The secondary's side of the checkpoint transaction and its failover rules, against a fake
//! VM, a real compare control server and a scripted primary (no KVM).

use std::time::Duration;

use super::*;
use crate::colo::testing::{link_ends, FakeCompare, FakeVm, Log, Peer};
use crate::persist::stream::PAGE_SIZE;

/// Runs the secondary's loop on `vm` (16 pages, tracking on) until it fails over; `f` is the
/// primary meanwhile. Returns the COLO state.
fn with_secondary(log: &Log, vm: &FakeVm, f: impl FnOnce(&ColoShared, &mut Peer<Channel>)) -> Arc<ColoShared> {
    let compare = FakeCompare::start(log);
    let colo = Arc::new(ColoShared::new(vec![compare.path().to_path_buf()]));
    colo.update(|s| {
        s.role = Role::Secondary;
        s.state = State::Running;
    });
    let (p, s) = link_ends();
    let mut primary = Peer::new("primary", p, log);
    vm.start_dirty_log().unwrap();
    let cache = RamCache::copy_of_vm(vm).unwrap();
    let blocks = BlockCache::new(vm.disk()).unwrap();
    let runner = SecondaryRunner {
        reader: s.reader,
        writer: s.writer,
        chan: s.chan,
        cache,
        colo: colo.clone(),
        compare: None,
        primary_name: None,
        blocks,
    };
    std::thread::scope(|scope| {
        let running = scope.spawn(move || runner.run(vm));
        // A failing check must not leave the role waiting for ever: it is told to fail over.
        let checked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&colo, &mut primary)));
        if checked.is_err() {
            colo.lost_heartbeat.store(true, Ordering::Relaxed);
        }
        running.join().unwrap();
        if let Err(p) = checked {
            std::panic::resume_unwind(p);
        }
    });
    colo
}

/// The primary's side of checkpoint `seq`, carrying page 5 filled with `byte`.
fn send_checkpoint(primary: &mut Peer<Channel>, vm: &FakeVm, seq: u64, passive: bool, byte: u8) {
    load_checkpoint(primary, vm, seq, passive, byte);
    // Held, so that an SVM resuming before the commit would be seen doing it.
    std::thread::sleep(Duration::from_millis(50));
    primary.send(&Control::Committed { seq });
}

/// [`send_checkpoint`] up to the secondary's `vmstate-loaded`, without `committed`.
fn load_checkpoint(primary: &mut Peer<Channel>, vm: &FakeVm, seq: u64, passive: bool, byte: u8) {
    primary.send(&Control::CheckpointRequest { seq, passive, trigger: "user".into() });
    primary.expect("checkpoint-reply");
    primary.send(&Control::VmstateSend { seq });
    let page = vec![byte; PAGE_SIZE];
    primary.link.with_writer(|w| w.pages([(5 * PAGE_SIZE as u64, &page[..])])).unwrap();
    primary.link.send_state(&FakeVm::state_record()).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    assert_ne!(vm.first_byte(5), byte, "pages wait in the RAM cache until the checkpoint is complete");
    primary.send(&Control::VmstateSize { seq, pages: 1, blocks: 0, rx_marks: vec![] });
    primary.expect("vmstate-received");
    primary.expect("vmstate-loaded");
}

#[test]
fn a_checkpoint_is_loaded_in_the_spec_order() {
    let log = Log::default();
    let mut vm = FakeVm::new(&log, 16);
    // Loading takes a while, so that a reply sent only after it would be seen late.
    vm.restore_time = Duration::from_millis(200);
    let colo = with_secondary(&log, &vm, |colo, primary| {
        // The SVM's own write since the last checkpoint: undone by the checkpoint.
        vm.guest_writes(9, 0x55);
        send_checkpoint(primary, &vm, 1, false, 0xaa);
        // Resumed by `committed`, not by the failover below.
        log.wait_for("vm: resume");
        colo.lost_heartbeat.store(true, Ordering::Relaxed);
        primary.expect("taken-over");
    });
    log.assert_order(&[
        ("primary: sent checkpoint-request", "vm: pause"),
        // The SVM and its rings stop before the primary may pause.
        ("vm: pause", "primary: got checkpoint-reply"),
        ("primary: sent vmstate-size", "primary: got vmstate-received"),
        // The checkpoint is acknowledged as received before it is loaded...
        ("primary: got vmstate-received", "vm: restore-state"),
        // ...and as loaded once it holds it.
        ("vm: restore-state", "primary: got vmstate-loaded"),
        // The SVM runs only once the primary's output commit is done: nothing it sends can
        // meet that flush.
        ("primary: sent committed", "vm: resume"),
    ]);
    assert_eq!(vm.first_byte(5), 0xaa, "the primary's page");
    assert_eq!(vm.first_byte(9), 0, "the SVM's own write is replaced by the cache's copy");
    let s = colo.status();
    assert_eq!((s.checkpoints.total, s.checkpoints.colo, s.checkpoints.user), (1, 1, 1));
    assert_eq!(s.state, State::FailedOver);
}

#[test]
fn a_passive_checkpoint_leaves_the_svm_paused() {
    let log = Log::default();
    let vm = FakeVm::new(&log, 16);
    with_secondary(&log, &vm, |colo, primary| {
        send_checkpoint(primary, &vm, 1, true, 0xbb);
        // Time for `committed` to be taken.
        std::thread::sleep(Duration::from_millis(100));
        assert!(vm.is_paused(), "passive: the SVM stays paused after loading");
        assert!(!log.contains("vm: resume"));
        colo.lost_heartbeat.store(true, Ordering::Relaxed);
        primary.expect("taken-over");
    });
    assert!(!vm.is_paused(), "failover resumes it");
}

#[test]
fn a_loaded_checkpoint_waits_for_committed_and_a_failover_meanwhile_resumes_from_it() {
    let log = Log::default();
    let vm = FakeVm::new(&log, 16);
    let colo = with_secondary(&log, &vm, |colo, primary| {
        load_checkpoint(primary, &vm, 1, false, 0xcc);
        std::thread::sleep(Duration::from_millis(100));
        assert!(vm.is_paused(), "loaded, the SVM waits for the primary's commit");
        // The primary is lost before it said `committed`: its output may have been released
        // (it heard `vmstate-received`), so the SVM goes on from the checkpoint.
        colo.lost_heartbeat.store(true, Ordering::Relaxed);
        primary.expect("taken-over");
    });
    assert!(!vm.is_paused(), "the failover resumes it");
    assert_eq!(vm.first_byte(5), 0xcc, "from the loaded checkpoint");
    let s = colo.status();
    assert_eq!((s.checkpoints.total, s.state), (1, State::FailedOver));
}

#[test]
fn a_lost_primary_makes_the_secondary_take_over_in_secondary_only() {
    let log = Log::default();
    let vm = FakeVm::new(&log, 16);
    let colo = with_secondary(&log, &vm, |_, primary| primary.link.close());
    let s = colo.status();
    assert_eq!(s.state, State::FailedOver);
    assert_eq!(s.last_failover.as_ref().unwrap().survivor, Role::Secondary);
    log.assert_order(&[("compare: mode SecondaryOnly", "vm: resume")]);
    assert!(log.contains("vm: stop-dirty-log"));
    assert!(!vm.is_paused());
}

#[test]
fn a_primary_lost_mid_checkpoint_leaves_the_svm_on_its_own_state() {
    let log = Log::default();
    let vm = FakeVm::new(&log, 16);
    let colo = with_secondary(&log, &vm, |_, primary| {
        primary.send(&Control::CheckpointRequest { seq: 1, passive: false, trigger: "periodic".into() });
        primary.expect("checkpoint-reply");
        primary.send(&Control::VmstateSend { seq: 1 });
        let page = vec![0xcc; PAGE_SIZE];
        primary.link.with_writer(|w| w.pages([(5 * PAGE_SIZE as u64, &page[..])])).unwrap();
        primary.link.close();
    });
    let s = colo.status();
    assert_eq!(s.state, State::FailedOver);
    assert!(s.last_failover.unwrap().resumed_from.contains("incomplete"));
    assert!(!log.contains("vm: restore-state"), "half a checkpoint is never loaded");
    assert_eq!(vm.first_byte(5), 0);
    assert!(!vm.is_paused(), "its rings and vCPU run again");
}

#[test]
fn an_error_makes_the_secondary_wait_paused_until_lost_heartbeat() {
    let log = Log::default();
    let vm = FakeVm::new(&log, 16);
    let colo = with_secondary(&log, &vm, |colo, primary| {
        // Out of order: the secondary cannot go on, but the primary may be alive and serving.
        primary.send(&Control::VmstateLoaded { seq: 7 });
        let Control::Error { message } = primary.expect("error") else { unreachable!() };
        assert!(message.contains("unexpected"), "{message}");
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while colo.status().state != State::Stopped {
            assert!(std::time::Instant::now() < deadline, "{:?}", colo.status());
            std::thread::sleep(Duration::from_millis(10));
        }
        std::thread::sleep(Duration::from_millis(200));
        assert!(vm.is_paused(), "waits paused");
        assert!(!log.contains("compare: mode SecondaryOnly"), "and does not take over by itself");
        colo.lost_heartbeat.store(true, Ordering::Relaxed);
    });
    let s = colo.status();
    assert_eq!(s.state, State::FailedOver);
    assert!(s.last_failover.unwrap().reason.contains("lost-heartbeat"));
    assert!(log.contains("compare: mode SecondaryOnly"));
    assert!(!vm.is_paused());
}

#[test]
fn a_primary_that_continues_alone_makes_the_secondary_wait_without_answering() {
    let log = Log::default();
    let vm = FakeVm::new(&log, 16);
    let colo = with_secondary(&log, &vm, |colo, primary| {
        primary.send(&Control::Error { message: "the primary continues alone: test".into() });
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while colo.status().state != State::Stopped {
            assert!(std::time::Instant::now() < deadline, "{:?}", colo.status());
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(colo.status().error.unwrap().contains("continues alone"));
        assert!(vm.is_paused());
        colo.lost_heartbeat.store(true, Ordering::Relaxed);
    });
    assert_eq!(colo.status().state, State::FailedOver);
    assert!(!log.entries().iter().any(|e| e == "primary: got error"), "it told the primary nothing");
}

/// Waits until the secondary's COLO state is `Stopped` (it gave up and waits for a decision).
fn wait_stopped(colo: &ColoShared) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while colo.status().state != State::Stopped {
        assert!(std::time::Instant::now() < deadline, "{:?}", colo.status());
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_page_at_the_top_of_the_address_space_ends_colo_with_an_error_and_failover_stays_possible() {
    // Issue 12, item 1: the RAM cache's bound check wrapped, the COLO thread panicked and the
    // secondary went on reporting `running`, deaf to lost-heartbeat.
    let log = Log::default();
    let vm = FakeVm::new(&log, 16);
    let colo = with_secondary(&log, &vm, |colo, primary| {
        primary.send(&Control::CheckpointRequest { seq: 1, passive: false, trigger: "periodic".into() });
        primary.expect("checkpoint-reply");
        primary.send(&Control::VmstateSend { seq: 1 });
        let page = vec![0xdd; PAGE_SIZE];
        let top = 0xFFFF_FFFF_FFFF_F000u64;
        primary.link.with_writer(|w| w.pages([(top, &page[..])])).unwrap();
        let Control::Error { message } = primary.expect("error") else { unreachable!() };
        assert!(message.contains("0xfffffffffffff000") && message.contains("outside guest memory"), "{message}");
        wait_stopped(colo);
        assert!(colo.status().error.unwrap().contains("outside guest memory"));
        assert!(vm.is_paused(), "the SVM waits paused at its last complete checkpoint");
        colo.lost_heartbeat.store(true, Ordering::Relaxed);
    });
    let s = colo.status();
    assert_eq!(s.state, State::FailedOver, "lost-heartbeat still fails over");
    assert!(!vm.is_paused());
}

#[test]
fn a_panic_in_the_secondary_ends_colo_with_an_error_and_failover_stays_possible() {
    let log = Log::default();
    let vm = FakeVm::new(&log, 16);
    let colo = with_secondary(&log, &vm, |colo, primary| {
        vm.dirty_pages_panic.store(true, Ordering::Relaxed);
        primary.send(&Control::CheckpointRequest { seq: 1, passive: false, trigger: "periodic".into() });
        primary.expect("checkpoint-reply");
        primary.send(&Control::VmstateSend { seq: 1 });
        primary.link.send_state(&FakeVm::state_record()).unwrap();
        primary.send(&Control::VmstateSize { seq: 1, pages: 0, blocks: 0, rx_marks: vec![] });
        primary.expect("vmstate-received");
        let Control::Error { message } = primary.expect("error") else { unreachable!() };
        assert!(message.contains("internal error") && message.contains("dirty log broke"), "{message}");
        wait_stopped(colo);
        assert!(colo.status().error.unwrap().contains("the secondary failed"), "{:?}", colo.status().error);
        vm.dirty_pages_panic.store(false, Ordering::Relaxed);
        colo.lost_heartbeat.store(true, Ordering::Relaxed);
    });
    assert_eq!(colo.status().state, State::FailedOver);
    assert!(!vm.is_paused());
}

/// A fake SVM with a disk whose writes go to its overlay (as `start` sets it up), the SVM
/// having written block 3 itself.
fn svm_with_disk(log: &Log) -> (colo_test_support::TempDir, std::path::PathBuf, FakeVm) {
    let (dir, config) = crate::devices::block::testing::image(1);
    let disk = crate::devices::block::disk::Disk::open(&config).unwrap();
    disk.buffer_writes().unwrap();
    disk.write(3 * 4096, &[0x33; 4096]).unwrap();
    (dir, config.path, FakeVm::new(log, 16).with_disk(disk))
}

fn image_block(path: &std::path::Path, b: u64) -> u8 {
    use std::os::unix::fs::FileExt;
    let mut buf = [0u8; 4096];
    std::fs::File::open(path).unwrap().read_exact_at(&mut buf, b * 4096).unwrap();
    assert!(buf.iter().all(|&x| x == buf[0]), "block {b} is uniform");
    buf[0]
}

/// The primary's side of a checkpoint up to its blocks: block 7 filled with 0x77.
fn send_checkpoint_blocks(primary: &mut Peer<Channel>, seq: u64) {
    primary.send(&Control::CheckpointRequest { seq, passive: false, trigger: "user".into() });
    primary.expect("checkpoint-reply");
    primary.send(&Control::VmstateSend { seq });
    let block = vec![0x77u8; 4096];
    primary.link.with_writer(|w| w.blocks([(7u64, &block[..])])).unwrap();
}

#[test]
fn a_checkpoint_discards_the_svms_own_disk_writes_and_writes_the_primarys_blocks_into_the_image() {
    let log = Log::default();
    let (_dir, image, vm) = svm_with_disk(&log);
    let colo = with_secondary(&log, &vm, |colo, primary| {
        send_checkpoint_blocks(primary, 1);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(image_block(&image, 7), 0, "the primary's blocks wait until the checkpoint is complete");
        primary.link.send_state(&FakeVm::state_record()).unwrap();
        primary.send(&Control::VmstateSize { seq: 1, pages: 0, blocks: 1, rx_marks: vec![] });
        primary.expect("vmstate-received");
        primary.expect("vmstate-loaded");
        let mut buf = vec![0u8; 4096];
        vm.disk().unwrap().read_block(3, &mut buf).unwrap();
        assert_eq!(buf, vec![0u8; 4096], "the SVM's own write is gone");
        colo.lost_heartbeat.store(true, Ordering::Relaxed);
        primary.expect("taken-over");
    });
    assert_eq!(image_block(&image, 7), 0x77, "the primary's block is in the image");
    assert_eq!(image_block(&image, 3), 0, "the SVM's own write never reached the image");
    let s = colo.status();
    assert_eq!((s.disk.blocks_last, s.disk.svm_blocks_discarded), (1, 1));
}

#[test]
fn a_primary_lost_mid_checkpoint_leaves_the_svm_the_disk_of_its_own_writes() {
    let log = Log::default();
    let (_dir, image, vm) = svm_with_disk(&log);
    with_secondary(&log, &vm, |_, primary| {
        send_checkpoint_blocks(primary, 1);
        std::thread::sleep(Duration::from_millis(50));
        primary.link.close();
    });
    assert_eq!(image_block(&image, 3), 0x33, "the SVM's own write is its disk's now");
    assert_eq!(image_block(&image, 7), 0, "the incomplete checkpoint's block is dropped");
    // And the survivor writes its image directly from now on.
    vm.disk().unwrap().write(5 * 4096, &[0x55; 4096]).unwrap();
    assert_eq!(image_block(&image, 5), 0x55);
}

#[test]
fn a_checkpoint_whose_block_count_does_not_match_is_refused() {
    let log = Log::default();
    let (_dir, image, vm) = svm_with_disk(&log);
    let colo = with_secondary(&log, &vm, |colo, primary| {
        send_checkpoint_blocks(primary, 1);
        primary.link.send_state(&FakeVm::state_record()).unwrap();
        primary.send(&Control::VmstateSize { seq: 1, pages: 0, blocks: 2, rx_marks: vec![] });
        let Control::Error { message } = primary.expect("error") else { unreachable!() };
        assert!(message.contains("2 disk blocks") && message.contains("1 blocks arrived"), "{message}");
        colo.lost_heartbeat.store(true, Ordering::Relaxed);
    });
    assert_eq!(image_block(&image, 7), 0, "nothing of it was applied");
    assert_eq!(colo.status().checkpoints.total, 0);
}
