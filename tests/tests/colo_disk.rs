//! COLO with a disk (spec/colo.md, the disk beside RAM): each VM on its own image, the
//! reference guest's `kv` service writing records that differ between the two VMs (each record
//! carries the writer's TSC). Every checkpoint's disk is verified block for block against the
//! paused primary's, which proves the secondary discarded its own writes and applied the
//! primary's; SIGKILL of the primary while idle, during writes and in the middle of a
//! checkpoint: every acknowledged `put` is readable on the survivor, none is applied twice, and
//! the survivor's image file holds exactly that log.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use colo_tests::colo_topology::{prerequisites, Backend, ColoNet, Side};
use colo_tests::kv::{log_in_image, make_image, KvClient};
use colo_tests::TempDir;
use serde_json::Value;

/// One COLO test at a time (two VMs each).
fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

fn check(test: &str) -> bool {
    colo_tests::can_run(test, prerequisites(Backend::VhostNetCompare))
}

fn n(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

/// A COLO pair whose VMs have their own images (16 MiB each; the secondary's starts full of
/// garbage: COLO's start must make it the primary's).
fn pair(images: &TempDir, cmdline: &str) -> (ColoNet, std::path::PathBuf) {
    let (p, s) = (images.path("primary.img"), images.path("secondary.img"));
    make_image(&p, 16);
    std::fs::write(&s, vec![0xeeu8; 16 << 20]).unwrap();
    let (pd, sd) = (format!("path={}", p.display()), format!("path={}", s.display()));
    let net = ColoNet::start_sides(Backend::VhostNetCompare, cmdline, &[], &["--disk", &pd], &["--disk", &sd]);
    (net, s)
}

/// Puts `k0`, `k1`, … on one connection until stopped, recording what was acknowledged.
struct Writer {
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Vec<String>>>,
    thread: JoinHandle<Result<KvClient, String>>,
}

fn value_of(key: &str) -> String {
    format!("value of {key}")
}

impl Writer {
    fn start(mut kv: KvClient, first: usize) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(Mutex::new(vec![]));
        let (s, a) = (stop.clone(), acked.clone());
        kv.set_timeout(Duration::from_secs(15));
        let thread = std::thread::spawn(move || {
            let mut i = first;
            while !s.load(Ordering::Relaxed) {
                let k = format!("k{i}");
                kv.put(&k, &value_of(&k))?;
                a.lock().unwrap().push(k);
                i += 1;
                std::thread::sleep(Duration::from_millis(5));
            }
            Ok(kv)
        });
        Writer { stop, acked, thread }
    }

    fn count(&self) -> usize {
        self.acked.lock().unwrap().len()
    }

    fn finish(self) -> (KvClient, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        let kv = self.thread.join().expect("writer").unwrap_or_else(|e| panic!("the kv session broke: {e}"));
        let acked = self.acked.lock().unwrap().clone();
        (kv, acked)
    }
}

#[test]
fn every_checkpoints_disk_is_the_primarys_block_for_block_and_the_svms_own_writes_are_discarded() {
    let _g = serial();
    if !check("every_checkpoints_disk_is_the_primarys_block_for_block_and_the_svms_own_writes_are_discarded") {
        return;
    }
    let images = TempDir::new("colodisk");
    let (mut net, _) = pair(&images, "app=kv,counter,diskdirty disk_dirty=200");
    net.set_params(Side::Primary, &[("max-time", 500), ("ram-background-limit", 65536)]);
    net.start_colo_with(&["verify=true"]);
    let writer = Writer::start(KvClient::over(net.connect(9200)), 0);
    let colo = |net: &ColoNet| n(&net.status(Side::Primary)["checkpoints"]["colo"]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while colo(&net) < 6 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    let (mut kv, acked) = writer.finish();
    let p = net.status(Side::Primary);
    let s = net.status(Side::Secondary);
    let verified =
        net.log(Side::Secondary).matches("verified: the SVM's disk equals the PVM's block for block").count();
    eprintln!(
        "{} puts; {} checkpoints, {verified} disks verified; primary disk {}; secondary disk {}",
        acked.len(),
        p["checkpoints"]["total"],
        p["disk"],
        s["disk"]
    );
    assert_eq!(s["state"], "running", "no checkpoint failed verification: {s:#}\n{}", net.logs());
    assert!(n(&p["checkpoints"]["colo"]) >= 6, "{p:#}");
    assert!(verified as u64 + 1 >= n(&p["checkpoints"]["total"]), "every loaded checkpoint's disk verified");
    assert!(n(&p["disk"]["blocks-total"]) > 0, "checkpoints carried disk blocks: {p:#}");
    assert!(n(&p["disk"]["background-blocks"]) > 0, "blocks streamed between checkpoints: {p:#}");
    assert!(
        n(&s["disk"]["svm-blocks-discarded"]) > 0,
        "the SVM wrote blocks of its own (its records carry its own TSC) and checkpoints discarded them: {s:#}"
    );
    assert!(acked.len() > 20, "the writes went on");
    for k in &acked {
        assert_eq!(kv.get(k).unwrap(), Some(value_of(k)));
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Moment {
    Idle,
    Writes,
    MidCheckpoint,
}

/// Kills the primary at `moment`; the kv session goes on with the secondary, every
/// acknowledged put is there exactly once, in its memory and on its image.
fn failover_with_kv(moment: Moment) {
    let images = TempDir::new("colodisk");
    let (mut net, survivor_image) = pair(&images, "app=kv,counter");
    let hold: &[&str] = if moment == Moment::MidCheckpoint { &["test-checkpoint-delay=1500"] } else { &[] };
    net.set_params(Side::Primary, &[("max-time", 1000)]);
    net.start_colo_with(hold);
    let mut kv = KvClient::over(net.connect(9200));
    kv.set_timeout(Duration::from_secs(15));
    let mut acked: Vec<String> = vec![];
    for i in 0..20 {
        let k = format!("k{i}");
        kv.put(&k, &value_of(&k)).unwrap_or_else(|e| panic!("{e}\n{}", net.logs()));
        acked.push(k);
    }
    // Wait for a checkpoint that carried the puts, so the secondary's disk has them committed.
    net.wait_status(Side::Primary, "a checkpoint", Duration::from_secs(10), |s| n(&s["checkpoints"]["total"]) >= 1);
    let (writer, idle) = match moment {
        Moment::Idle => {
            std::thread::sleep(Duration::from_millis(500));
            (None, Some(kv))
        }
        Moment::Writes => {
            let w = Writer::start(kv, acked.len());
            std::thread::sleep(Duration::from_secs(1));
            (Some(w), None)
        }
        Moment::MidCheckpoint => {
            let w = Writer::start(kv, acked.len());
            let hooked = |net: &ColoNet| net.log(Side::Primary).matches("test hook").count();
            let seen = hooked(&net);
            net.ctl(Side::Primary, "colo-checkpoint", &[]).expect("colo-checkpoint");
            let t = Instant::now();
            while hooked(&net) == seen {
                assert!(t.elapsed() < Duration::from_secs(10), "no checkpoint began\n{}", net.logs());
                std::thread::sleep(Duration::from_millis(10));
            }
            std::thread::sleep(Duration::from_millis(200));
            (Some(w), None)
        }
    };
    let before = writer.as_ref().map(Writer::count).unwrap_or(0);
    net.kill(Side::Primary);
    let s = net.wait_status(Side::Secondary, "failed over", Duration::from_secs(5), |s| s["state"] == "failed-over");
    eprintln!("{moment:?}: {}", s["last-failover"]);
    if moment == Moment::MidCheckpoint {
        let from = s["last-failover"]["resumed-from"].as_str().unwrap_or("");
        assert!(from.contains("incomplete"), "the checkpoint in flight was dropped: {s:#}");
    }
    let mut kv = match writer {
        Some(w) => {
            std::thread::sleep(Duration::from_secs(2));
            let after = w.count();
            let (kv, more) = w.finish();
            assert!(after > before + 10, "puts went on after the failover: {before} -> {after}");
            acked.extend(more);
            kv
        }
        None => idle.expect("the idle session"),
    };
    for k in &acked {
        assert_eq!(kv.get(k).unwrap(), Some(value_of(k)), "an acknowledged put is readable on the survivor");
    }
    let scan = kv.scan().unwrap();
    eprintln!("{moment:?}: {} puts acknowledged; the survivor's log: {scan:?}", acked.len());
    assert_eq!(scan["repeated"], 0, "no put applied twice");
    assert_eq!(scan["mismatch"], 0, "the survivor's disk is the one its memory expects");
    let records = scan["records"] as usize;
    assert!(records == acked.len() || records == acked.len() + 1, "{records} records for {} puts", acked.len());
    // The survivor's image file itself holds that log.
    net.kill(Side::Secondary);
    let log = log_in_image(&survivor_image);
    assert_eq!(log.len(), records, "the image holds every record");
    let mut keys: Vec<&str> = log.iter().map(|(k, _)| k.as_str()).collect();
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), log.len(), "each key once in the image");
    for k in &acked {
        assert!(log.iter().any(|(key, v)| key == k && *v == value_of(k)), "{k} is in the survivor's image");
    }
}

#[test]
fn kv_failover_while_idle_keeps_every_acknowledged_put_once() {
    let _g = serial();
    if check("kv_failover_while_idle_keeps_every_acknowledged_put_once") {
        failover_with_kv(Moment::Idle);
    }
}

#[test]
fn kv_failover_during_writes_keeps_every_acknowledged_put_once() {
    let _g = serial();
    if check("kv_failover_during_writes_keeps_every_acknowledged_put_once") {
        failover_with_kv(Moment::Writes);
    }
}

#[test]
fn kv_failover_in_the_middle_of_a_checkpoint_keeps_every_acknowledged_put_once() {
    let _g = serial();
    if check("kv_failover_in_the_middle_of_a_checkpoint_keeps_every_acknowledged_put_once") {
        failover_with_kv(Moment::MidCheckpoint);
    }
}
