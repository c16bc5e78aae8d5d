//! A real etcd member for the arbiter's tests, on loopback with a temporary data directory,
//! killed and removed on drop. Tests skip (with a visible reason, or fail under
//! `COLO_REQUIRE_ALL=1`) where etcd is not installed.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::etcd::Etcd;

/// A running etcd.
pub struct EtcdServer {
    child: Child,
    dir: PathBuf,
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
            let why = "needs etcd (apt-get install etcd-server)";
            if std::env::var("COLO_REQUIRE_ALL").is_ok_and(|v| v == "1") {
                panic!("{test}: {why} (COLO_REQUIRE_ALL=1)");
            }
            eprintln!("SKIPPED {test}: {why}");
            return None;
        }
        let dir = std::env::temp_dir().join(format!("colo-etcd-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (client, peer) = (free_port(), free_port());
        let url = format!("http://127.0.0.1:{client}");
        let child = Command::new("etcd")
            .args(["--name", test, "--data-dir"])
            .arg(dir.join("data"))
            .args(["--listen-client-urls", &url, "--advertise-client-urls", &url])
            .args(["--listen-peer-urls", &format!("http://127.0.0.1:{peer}")])
            .args(["--initial-advertise-peer-urls", &format!("http://127.0.0.1:{peer}")])
            .args(["--initial-cluster", &format!("{test}=http://127.0.0.1:{peer}")])
            .args(["--heartbeat-interval", "50", "--election-timeout", "250"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start etcd");
        let server = EtcdServer { child, dir, url };
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
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
