//! Helpers shared by the tests of every crate (the end-to-end tests in `tests/`,
//! vhost-net-compare's process tests, colo-vmm's unit tests): a temporary directory, the rule for
//! skipping a test whose prerequisites are missing, and waiting for a control event.

#![warn(missing_docs)]

use std::fs::Permissions;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use colo_proxy::control::{ControlClient, Event};

/// A temporary directory (mode 0700, so sockets in it are private), removed on drop.
pub struct TempDir(tempfile::TempDir);

impl TempDir {
    /// Creates `$TMPDIR/colo-<tag>-<random>`, mode 0700 (tempfile makes directories with the
    /// default mode unless told).
    pub fn new(tag: &str) -> TempDir {
        let dir = tempfile::Builder::new()
            .prefix(&format!("colo-{tag}-"))
            .permissions(Permissions::from_mode(0o700))
            .tempdir()
            .expect("create a temp dir");
        TempDir(dir)
    }

    /// A path inside the directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.path().join(name)
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        self.0.path()
    }
}

/// Prints a visible skip notice (the test then returns). Set `COLO_REQUIRE_ALL=1` to turn
/// skips into failures (CI does, so a missing prerequisite cannot pass unnoticed).
pub fn skip(test: &str, why: &str) {
    if std::env::var_os("COLO_REQUIRE_ALL").is_some_and(|v| v == "1") {
        panic!("{test}: prerequisite missing and COLO_REQUIRE_ALL=1: {why}");
    }
    eprintln!("SKIPPED {test}: {why}");
}

/// Whether `test` can run here: its prerequisites are met, or it is skipped with the reason
/// (see [`skip`]).
pub fn can_run(test: &str, prerequisites: Result<(), String>) -> bool {
    match prerequisites {
        Ok(()) => true,
        Err(why) => {
            skip(test, &why);
            false
        }
    }
}

/// Waits for the first event `wanted` accepts (others are skipped, and listed if none comes).
pub fn expect_event(c: &mut ControlClient, timeout: Duration, what: &str, wanted: impl Fn(&Event) -> bool) -> Event {
    let deadline = Instant::now() + timeout;
    let mut skipped = vec![];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match c.next_event(Some(left)).expect("control socket") {
            Some(e) if wanted(&e) => return e,
            Some(e) => skipped.push(e),
            None => panic!("no {what} event within {timeout:?}; got {skipped:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_temp_dir_is_private_and_removed_on_drop() {
        let d = TempDir::new("support");
        assert!(d.dir().file_name().unwrap().to_str().unwrap().starts_with("colo-support-"));
        assert_eq!(std::fs::metadata(d.dir()).unwrap().permissions().mode() & 0o777, 0o700);
        std::fs::write(d.path("f"), b"x").unwrap();
        let kept = d.dir().to_path_buf();
        drop(d);
        assert!(!kept.exists());
    }

    #[test]
    fn prerequisites_met_run() {
        assert!(can_run("prerequisites_met_run", Ok(())));
    }
}
