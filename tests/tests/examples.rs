//! The example configuration in `examples/`: the systemd unit templates pass
//! `systemd-analyze verify` with the binaries they name.

use std::path::Path;
use std::process::Command;

use colo_tests::{bin, TempDir};

#[test]
fn the_systemd_unit_templates_verify() {
    let pre = if colo_tests::have("systemd-analyze") { Ok(()) } else { Err("needs systemd-analyze".to_string()) };
    if !colo_tests::can_run("the_systemd_unit_templates_verify", pre) {
        return;
    }
    let dir = TempDir::new("units");
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/systemd");
    let bin_dir = bin("colo-vmm").parent().unwrap().display().to_string();
    let mut units = vec![];
    for entry in std::fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        // The built binaries stand in for /usr/local/bin.
        let text = std::fs::read_to_string(&path).unwrap().replace("/usr/local/bin", &bin_dir);
        std::fs::write(dir.path(&name), text).unwrap();
        let instance = name.replace("@.", "@web1.");
        std::os::unix::fs::symlink(dir.path(&name), dir.path(&instance)).unwrap();
        units.push(dir.path(&instance));
    }
    assert_eq!(units.len(), 3, "three templates");
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .args(&units)
        .env("SYSTEMD_LOG_LEVEL", "warning")
        .output()
        .expect("systemd-analyze");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && text.trim().is_empty(), "systemd-analyze verify:\n{text}");
}
