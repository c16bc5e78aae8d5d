//! Unix sockets that only this user can reach from the moment they exist. A socket file takes
//! its mode from the umask at bind (0755, or 0777 under umask 000), and a chmod after bind
//! leaves a window in which anyone may connect; so the socket is bound inside a fresh 0700
//! directory beside its path, made 0600 there, and only then renamed into place.

use std::fs::DirBuilder;
use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The mode of every socket colo-vmm creates.
pub const MODE: u32 = 0o600;

/// Binds a listener at `path` (replacing a stale socket there, refusing a live one or any
/// other file), mode 0600 before anyone can reach it.
pub fn bind_private(path: &Path) -> io::Result<UnixListener> {
    colo_proxy::endpoint::remove_stale_socket(path)?;
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no file name"))?;
    let dir = parent.join(format!(
        ".{}.{}.{}",
        name.to_string_lossy(),
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    DirBuilder::new().mode(0o700).create(&dir)?;
    let inside = dir.join("socket");
    let bound = UnixListener::bind(&inside).and_then(|l| {
        std::fs::set_permissions(&inside, std::fs::Permissions::from_mode(MODE))?;
        std::fs::rename(&inside, path)?;
        Ok(l)
    });
    let _ = std::fs::remove_file(&inside);
    let _ = std::fs::remove_dir(&dir);
    bound
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::os::unix::fs::FileTypeExt;
    use std::sync::Mutex;

    /// Serializes the tests that change the process's umask.
    pub(crate) static UMASK: Mutex<()> = Mutex::new(());

    /// Runs `f` with umask 000 (the worst case for sockets bound the plain way).
    pub(crate) fn with_open_umask<T>(f: impl FnOnce() -> T) -> T {
        let _g = UMASK.lock().unwrap_or_else(|p| p.into_inner());
        // SAFETY: umask only swaps the process's file creation mask.
        let old = unsafe { libc::umask(0) };
        let r = f();
        // SAFETY: as above.
        unsafe { libc::umask(old) };
        r
    }

    /// A fresh directory for one test.
    pub(crate) fn scratch(tag: &str) -> std::path::PathBuf {
        static N: AtomicUsize = AtomicUsize::new(0);
        let d = std::env::temp_dir().join(format!(
            "colo-vmm-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn sockets_are_0600_under_any_umask_and_leave_nothing_behind() {
        let dir = scratch("sock");
        let path = dir.join("api.sock");
        let l = with_open_umask(|| bind_private(&path)).unwrap();
        let meta = std::fs::symlink_metadata(&path).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o777, MODE);
        let _client = std::os::unix::net::UnixStream::connect(&path).unwrap();
        assert!(l.accept().is_ok(), "the renamed socket is the listener's");
        let left: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(left, vec![std::ffi::OsString::from("api.sock")], "no private directory left");
        // A live socket is not taken over; another kind of file is not replaced.
        assert!(bind_private(&path).is_err());
        drop(l);
        let plain = dir.join("plain");
        std::fs::write(&plain, b"x").unwrap();
        assert!(bind_private(&plain).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
