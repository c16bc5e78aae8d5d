//! The OCF resource agent (scripts/ocf/colo) for Pacemaker: Debian's `ocf-tester` passes on
//! it, and its actions do what they say with a real colo-vmm — start waits for COLO, promote
//! boots the VM (monitor: promoted), demote stops serving and waits again, stop stops.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use colo_tests::{bin, TempDir};

fn agent() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/ocf/colo")
}

fn check(test: &str) -> bool {
    let pre = (|| {
        if !colo_tests::is_root() {
            return Err("needs root (ocf-tester runs the agent as root and as nobody)".to_string());
        }
        if !Path::new("/dev/kvm").exists() {
            return Err("needs /dev/kvm (promote boots the VM)".into());
        }
        for tool in ["ocf-tester", "xmllint"] {
            if !colo_tests::have(tool) {
                return Err(format!("needs {tool} (apt-get install resource-agents libxml2-utils)"));
            }
        }
        Ok(())
    })();
    colo_tests::can_run(test, pre)
}

/// A free TCP port on loopback for the replica's --incoming.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The agent's parameters for a replica in `dir`.
struct Replica {
    params: Vec<(String, String)>,
    api: PathBuf,
}

impl Replica {
    fn new(dir: &TempDir) -> Replica {
        let api = dir.path("api.sock");
        let params = vec![
            ("binary".to_string(), bin("colo-vmm").display().to_string()),
            ("api".into(), api.display().to_string()),
            ("incoming".into(), format!("tcp:127.0.0.1:{}", free_port())),
            ("state_dir".into(), dir.path("state").display().to_string()),
            ("run_args".into(), format!("--serial file:{}", dir.path("serial.log").display())),
        ];
        Replica { params, api }
    }

    /// Runs `action`; its exit status and output.
    fn run(&self, action: &str) -> (i32, String) {
        let mut cmd = Command::new(agent());
        cmd.arg(action).env("OCF_ROOT", "/usr/lib/ocf").env("OCF_RESOURCE_INSTANCE", "colo_test");
        for (k, v) in &self.params {
            cmd.env(format!("OCF_RESKEY_{k}"), v);
        }
        let out = cmd.output().expect("run the agent");
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        (out.status.code().unwrap_or(-1), text)
    }

    fn expect(&self, action: &str, rc: i32) {
        let (got, out) = self.run(action);
        assert_eq!(got, rc, "{action}: {out}\n{}", self.log());
    }

    fn log(&self) -> String {
        let state = self.params.iter().find(|(k, _)| k == "state_dir").map(|(_, v)| v.clone()).unwrap();
        std::fs::read_to_string(Path::new(&state).join("colo-vmm.log")).unwrap_or_default()
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.run("stop");
    }
}

const OCF_SUCCESS: i32 = 0;
const OCF_NOT_RUNNING: i32 = 7;
const OCF_RUNNING_PROMOTED: i32 = 8;

#[test]
fn ocf_tester_passes_on_the_resource_agent() {
    if !check("ocf_tester_passes_on_the_resource_agent") {
        return;
    }
    let dir = TempDir::new("ocf");
    let replica = Replica::new(&dir);
    let mut cmd = Command::new("ocf-tester");
    cmd.args(["-n", "colo_test"]);
    for (k, v) in &replica.params {
        cmd.args(["-o", &format!("{k}={v}")]);
    }
    // ocf-tester also runs the agent as nobody: from a copy in a world-readable directory
    // (the checkout may be in a private one).
    let copy = dir.path("colo");
    std::fs::copy(agent(), &copy).expect("copy the agent");
    std::fs::set_permissions(&copy, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    std::fs::set_permissions(dir.path(""), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let out = cmd.arg(&copy).output().expect("ocf-tester");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && text.contains("passed all tests"), "ocf-tester:\n{text}\n{}", replica.log());
}

#[test]
fn the_agent_starts_a_waiting_replica_promotes_it_to_serve_and_demotes_it_again() {
    if !check("the_agent_starts_a_waiting_replica_promotes_it_to_serve_and_demotes_it_again") {
        return;
    }
    let dir = TempDir::new("ocf");
    let replica = Replica::new(&dir);
    replica.expect("monitor", OCF_NOT_RUNNING);
    replica.expect("start", OCF_SUCCESS);
    replica.expect("monitor", OCF_SUCCESS);
    assert!(!replica.api.exists(), "waiting for COLO: no VM, no API yet");
    // Nobody serves: promote boots the VM here.
    replica.expect("promote", OCF_SUCCESS);
    replica.expect("monitor", OCF_RUNNING_PROMOTED);
    let status = colo_tests::colo_topology::ctl(&replica.api, "query-status", &[]).expect("the VM answers");
    assert_eq!(status["running"], true, "{status}");
    assert!(
        colo_tests::wait_for_path(&dir.path("serial.log"), Duration::from_secs(5)),
        "the guest's console is where run_args said"
    );
    replica.expect("promote", OCF_SUCCESS);
    replica.expect("monitor", OCF_RUNNING_PROMOTED);
    // Demote: it stops serving and waits for COLO again.
    replica.expect("demote", OCF_SUCCESS);
    replica.expect("monitor", OCF_SUCCESS);
    replica.expect("stop", OCF_SUCCESS);
    replica.expect("monitor", OCF_NOT_RUNNING);
    // Bad parameters: a configuration error, said why.
    let mut bad = Replica::new(&dir);
    bad.params.retain(|(k, _)| k != "incoming");
    bad.params.push(("incoming".into(), "ftp://nowhere".into()));
    let (rc, out) = bad.run("validate-all");
    assert_eq!(rc, 6, "OCF_ERR_CONFIGURED: {out}");
    assert!(out.contains("expected tcp:HOST:PORT"), "{out}");
}
