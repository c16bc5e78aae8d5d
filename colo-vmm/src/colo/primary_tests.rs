//! The primary's checkpoint transaction and failover rules, against a fake VM, a real compare
//! control server and a scripted secondary (no KVM).

use std::time::Duration;

use super::*;
use crate::colo::params::ColoParamsUpdate;
use crate::colo::testing::{link_ends, FakeCompare, FakeVm, Log, Peer};

/// A controller on a fake PVM of 16 pages, and the scripted secondary at the other end of its
/// link; `f` drives the secondary while the controller runs; returns when the controller ended.
fn with_controller(log: &Log, vm: &FakeVm, f: impl FnOnce(&ColoShared, &mut Peer)) -> ColoShared {
    let compare = FakeCompare::start(log);
    let colo = ColoShared::new(vec![compare.path().to_path_buf()]);
    let (p, s) = link_ends();
    let mut secondary = Peer::new("secondary", s, log);
    vm.start_dirty_log().unwrap();
    std::thread::scope(|scope| {
        let set = CompareSet::connect(&colo.compare_sockets, Duration::from_secs(5)).unwrap();
        let link = Link::new(p.reader, p.writer, p.chan, colo.heartbeat_ms.clone());
        let ctl = Controller::new(vm, &colo, link, set, TestOptions::default());
        let running = scope.spawn(move || ctl.run());
        // A failing check must not leave the role waiting for ever: it is told to fail over.
        let checked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&colo, &mut secondary)));
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

/// The secondary's side of one checkpoint, taking its time where the primary must wait.
fn serve_checkpoint(secondary: &mut Peer, seq: u64) {
    let Control::CheckpointRequest { seq: s, .. } = secondary.expect("checkpoint-request") else { unreachable!() };
    assert_eq!(s, seq);
    std::thread::sleep(Duration::from_millis(50));
    secondary.send(&Control::CheckpointReply { seq });
    secondary.expect("vmstate-send");
    loop {
        match secondary.recv() {
            Incoming::Pages(_) | Incoming::Control(Control::HeartbeatParameters { .. }) => {}
            Incoming::State(_) => break,
            other => panic!("expected pages or the state, got {other:?}"),
        }
    }
    secondary.expect("vmstate-size");
    // Held long enough that a primary flushing its output early would be seen doing it.
    std::thread::sleep(Duration::from_millis(100));
    secondary.send(&Control::VmstateReceived { seq });
    // The primary commits without waiting for the load (which follows, and takes its time).
    secondary.expect("committed");
    std::thread::sleep(Duration::from_millis(100));
    secondary.send(&Control::VmstateLoaded { seq });
}

#[test]
fn a_checkpoint_runs_the_transaction_in_the_spec_order() {
    checkpoint_transaction_order(false);
}

#[test]
fn with_resume_before_load_the_pvm_runs_while_the_secondary_loads() {
    checkpoint_transaction_order(true);
}

fn checkpoint_transaction_order(resume_before_load: bool) {
    let log = Log::default();
    let vm = FakeVm::new(&log, 16);
    vm.guest_writes(3, 0xaa);
    let colo = with_controller(&log, &vm, |colo, secondary| {
        let update = ColoParamsUpdate { resume_before_load: Some(resume_before_load), ..Default::default() };
        colo.set_params(&update).unwrap();
        colo.user_checkpoint.store(true, Ordering::Relaxed);
        serve_checkpoint(secondary, 1);
        log.wait_for("vm: resume");
        // The secondary goes away: the primary carries on alone.
        secondary.link.close();
    });
    log.assert_order(&[
        ("secondary: got checkpoint-request", "secondary: sent checkpoint-reply"),
        ("secondary: sent checkpoint-reply", "vm: pause"),
        ("vm: pause", "secondary: got vmstate-send"),
        ("vm: pause", "vm: save-state"),
        ("secondary: got vmstate-send", "secondary: got pages"),
        ("secondary: got pages", "secondary: got state"),
        ("vm: save-state", "secondary: got state"),
        ("secondary: got state", "secondary: got vmstate-size"),
        // Output commit only once the secondary holds the whole checkpoint...
        ("secondary: sent vmstate-received", "compare: checkpoint"),
        // ...and the SVM may resume only after it.
        ("compare: checkpoint", "secondary: got committed"),
    ]);
    if resume_before_load {
        // The PVM runs again right after the commit, while the SVM loads it.
        log.assert_order(&[("compare: checkpoint", "vm: resume"), ("vm: resume", "secondary: sent vmstate-loaded")]);
    } else {
        // The PVM runs again only once the SVM has loaded it.
        log.assert_order(&[
            ("compare: checkpoint", "secondary: sent vmstate-loaded"),
            ("secondary: sent vmstate-loaded", "vm: resume"),
        ]);
    }
    let entries = log.entries();
    assert_eq!(entries.iter().filter(|e| *e == "vm: pause").count(), 1, "{entries:#?}");
    let s = colo.status();
    assert_eq!((s.checkpoints.total, s.checkpoints.user, s.frames_released), (1, 1, 1));
    assert_eq!(s.pages_last, 1, "the page the guest wrote");
    assert_eq!(s.state, State::FailedOver);
    assert!(!vm.is_paused());
}

#[test]
fn a_lost_secondary_leaves_the_primary_running_alone_in_primary_only() {
    let log = Log::default();
    let vm = FakeVm::new(&log, 16);
    let colo = with_controller(&log, &vm, |_, secondary| {
        std::thread::sleep(Duration::from_millis(100));
        secondary.link.close();
    });
    let s = colo.status();
    assert_eq!(s.state, State::FailedOver);
    assert_eq!(s.last_failover.as_ref().unwrap().survivor, Role::Primary);
    assert_eq!(s.error, None, "a lost secondary is no error");
    assert!(log.contains("compare: mode PrimaryOnly"), "{:#?}", log.entries());
    assert!(log.contains("vm: stop-dirty-log"));
    assert!(!vm.is_paused() && !log.contains("vm: pause"), "the PVM never stopped");
}

#[test]
fn lost_heartbeat_on_the_primary_fails_over_and_tells_the_secondary_not_to_take_over() {
    let log = Log::default();
    let vm = FakeVm::new(&log, 16);
    let colo = with_controller(&log, &vm, |colo, secondary| {
        colo.lost_heartbeat.store(true, Ordering::Relaxed);
        let Control::Error { message } = secondary.expect("error") else { unreachable!() };
        assert!(message.contains("continues alone"), "{message}");
    });
    let s = colo.status();
    assert_eq!(s.state, State::FailedOver);
    assert!(s.last_failover.unwrap().reason.contains("lost-heartbeat"));
    assert!(log.contains("compare: mode PrimaryOnly"));
    assert!(!vm.is_paused());
}

#[test]
fn an_error_from_the_secondary_leaves_the_primary_running_alone_with_the_error() {
    let log = Log::default();
    let vm = FakeVm::new(&log, 16);
    let colo = with_controller(&log, &vm, |_, secondary| {
        secondary.send(&Control::Error { message: "disk on fire".into() });
    });
    let s = colo.status();
    assert_eq!(s.state, State::FailedOver);
    assert!(s.error.as_deref().unwrap_or_default().contains("disk on fire"), "{:?}", s.error);
    assert!(log.contains("compare: mode PrimaryOnly"));
    assert!(!vm.is_paused());
}

#[test]
fn a_secondary_that_took_over_makes_the_primary_step_down_paused() {
    let log = Log::default();
    let vm = FakeVm::new(&log, 16);
    let colo = with_controller(&log, &vm, |_, secondary| {
        secondary.send(&Control::TakenOver { reason: "no heartbeat".into() });
    });
    let s = colo.status();
    assert_eq!(s.state, State::Stopped);
    assert!(s.error.as_deref().unwrap_or_default().contains("took over"), "{:?}", s.error);
    assert!(vm.is_paused(), "a replaced primary must not run");
    assert!(!log.contains("compare: mode PrimaryOnly"), "the compare processes stay as the secondary set them");
}

#[test]
fn a_secondary_taking_over_mid_checkpoint_makes_the_primary_step_down_without_committing() {
    let log = Log::default();
    let vm = FakeVm::new(&log, 16);
    let colo = with_controller(&log, &vm, |colo, secondary| {
        colo.user_checkpoint.store(true, Ordering::Relaxed);
        secondary.expect("checkpoint-request");
        secondary.send(&Control::CheckpointReply { seq: 1 });
        secondary.expect("vmstate-send");
        secondary.send(&Control::TakenOver { reason: "lost-heartbeat command".into() });
    });
    assert_eq!(colo.status().state, State::Stopped);
    assert!(!log.contains("compare: checkpoint"), "nothing of the interval was released: {:#?}", log.entries());
    assert!(vm.is_paused());
}

#[test]
fn a_panic_in_the_controller_leaves_the_primary_running_alone_with_the_error() {
    let log = Log::default();
    let vm = FakeVm::new(&log, 16);
    let colo = with_controller(&log, &vm, |colo, secondary| {
        vm.dirty_pages_panic.store(true, Ordering::Relaxed);
        colo.user_checkpoint.store(true, Ordering::Relaxed);
        secondary.expect("checkpoint-request");
        secondary.send(&Control::CheckpointReply { seq: 1 });
        let Control::Error { message } = secondary.expect("error") else { unreachable!() };
        assert!(message.contains("internal error"), "{message}");
    });
    let s = colo.status();
    assert_eq!(s.state, State::FailedOver);
    assert!(s.error.as_deref().unwrap_or_default().contains("the checkpoint controller failed"), "{:?}", s.error);
    assert!(!vm.is_paused(), "the PVM paused for the checkpoint runs again");
    assert!(log.contains("compare: mode PrimaryOnly"));
}

#[test]
fn colo_start_is_refused_on_a_running_secondary_and_on_a_survivor_behind_a_backend_of_both_vms() {
    let log = Log::default();
    let vm = std::sync::Arc::new(FakeVm::new(&log, 16));
    let compare = FakeCompare::start(&log);
    let colo = std::sync::Arc::new(ColoShared::new(vec![compare.path().to_path_buf()]));
    let nowhere: MigrationUri = "unix:/nonexistent/colo-test.sock".parse().unwrap();
    colo.update(|s| {
        s.role = Role::Secondary;
        s.state = State::Running;
    });
    let e = start(&vm, &colo, nowhere.clone(), TestOptions::default()).unwrap_err();
    assert!(matches!(e, StartError::Secondary), "{e}");
    // The survivor of a failover may protect its VM again, but not through a backend that
    // serves both VMs of one host (the fake compare is one): it stays a survivor, running.
    colo.update(|s| s.failed_over(Role::Secondary, "test", "test"));
    let e = start(&vm, &colo, nowhere, TestOptions::default()).unwrap_err();
    assert!(matches!(e, StartError::PairSurvivor), "{e}");
    assert_eq!(colo.status().role, Role::Secondary);
    assert!(!vm.is_paused());
}

#[test]
fn a_checkpoint_carries_the_disk_blocks_the_guest_wrote_read_while_paused() {
    let log = Log::default();
    let (_dir, config) = crate::devices::block::testing::image(1);
    let vm = FakeVm::new(&log, 16).with_disk(crate::devices::block::disk::Disk::open(&config).unwrap());
    let colo = with_controller(&log, &vm, |colo, secondary| {
        let disk = vm.disk().unwrap();
        disk.write(2 * 4096, &[0x5a; 4096]).unwrap();
        disk.write(9 * 4096 + 512, &[0x9a; 512]).unwrap();
        colo.user_checkpoint.store(true, Ordering::Relaxed);
        let Control::CheckpointRequest { seq, .. } = secondary.expect("checkpoint-request") else { unreachable!() };
        secondary.send(&Control::CheckpointReply { seq });
        secondary.expect("vmstate-send");
        let mut blocks = vec![];
        loop {
            match secondary.recv() {
                Incoming::Blocks(b) => {
                    blocks.extend(crate::persist::stream::blocks(&b).map(|(n, d)| (n, d[0], d[512])))
                }
                Incoming::State(_) => break,
                _ => {}
            }
        }
        let Control::VmstateSize { blocks: n, .. } = secondary.expect("vmstate-size") else { unreachable!() };
        assert_eq!(blocks, vec![(2, 0x5a, 0x5a), (9, 0, 0x9a)], "whole blocks, as the PVM's disk holds them");
        assert_eq!(n, 2);
        secondary.send(&Control::VmstateReceived { seq });
        secondary.send(&Control::VmstateLoaded { seq });
        secondary.expect("committed");
        log.wait_for("vm: resume");
        secondary.link.close();
    });
    let s = colo.status();
    assert_eq!((s.disk.blocks_last, s.disk.blocks_total), (2, 2));
    assert_eq!(s.recent.back().map(|r| r.blocks), Some(2));
}
