//! A real etcd member for the arbiter's tests, on loopback with a temporary data directory,
//! killed and removed on drop. Tests skip (with a visible reason, or fail under
//! `COLO_REQUIRE_ALL=1`) where etcd is not installed.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use colo_test_support::{skip, TempDir};

use super::etcd::Etcd;

/// A running etcd.
pub struct EtcdServer {
    child: Child,
    /// Its data directory, removed (after the kill) on drop.
    _dir: TempDir,
    /// Its client URL.
    pub url: String,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl EtcdServer {
    /// Starts one for `test`, or says why it cannot (`None`: skipped).
    pub fn start(test: &str) -> Option<EtcdServer> {
        if Command::new("etcd").arg("--version").stdout(Stdio::null()).status().is_err() {
            skip(test, "needs etcd (apt-get install etcd-server)");
            return None;
        }
        let dir = TempDir::new(&format!("etcd-{test}"));
        let (client, peer) = (free_port(), free_port());
        let url = format!("http://127.0.0.1:{client}");
        let child = Command::new("etcd")
            .args(["--name", test, "--data-dir"])
            .arg(dir.path("data"))
            .args(["--listen-client-urls", &url, "--advertise-client-urls", &url])
            .args(["--listen-peer-urls", &format!("http://127.0.0.1:{peer}")])
            .args(["--initial-advertise-peer-urls", &format!("http://127.0.0.1:{peer}")])
            .args(["--initial-cluster", &format!("{test}=http://127.0.0.1:{peer}")])
            .args(["--heartbeat-interval", "50", "--election-timeout", "250"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start etcd");
        let server = EtcdServer { child, _dir: dir, url };
        let probe = server.client();
        let deadline = Instant::now() + Duration::from_secs(10);
        while probe.get("/probe").is_err() {
            assert!(Instant::now() < deadline, "etcd did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        Some(server)
    }

    /// A client of it.
    pub fn client(&self) -> Etcd {
        Etcd::new(vec![self.url.clone()], Duration::from_millis(500))
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
