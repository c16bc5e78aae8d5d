//! The chaos soak for a minute (CI's smoke of `colo-soak`): a COLO pair across two hosts under
//! counter, echo and `top` traffic, a random fault every few seconds, every fault followed by
//! re-protection where one host was lost; no invariant may break.

use std::time::Duration;

use colo_tests::soak::{run, Options};

fn prerequisites() -> Result<(), String> {
    colo_tests::colo_hosts::prerequisites()?;
    for tool in ["nft", "tc"] {
        if !colo_tests::have(tool) {
            return Err(format!("needs {tool} (scripts/setup.sh installs nftables and iproute2)"));
        }
    }
    Ok(())
}

#[test]
fn a_minute_of_random_faults_breaks_no_invariant() {
    if !colo_tests::can_run("a_minute_of_random_faults_breaks_no_invariant", prerequisites()) {
        return;
    }
    // A fixed seed: CI runs the same faults every time; colo-soak draws new ones.
    let opts = Options { duration: Duration::from_secs(60), seed: 12, ..Options::default() };
    let report = run(&opts, |line| eprintln!("{line}"));
    eprintln!("{}", report.markdown());
    assert!(report.rounds >= 5, "only {} faults in a minute", report.rounds);
    assert!(report.traffic.0 > 500, "the counter session ran: {:?}", report.traffic);
    assert!(report.violations.is_empty(), "{}", report.markdown());
}
