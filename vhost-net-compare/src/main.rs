//! vhost-net-compare: the vhost-user net backend that mirrors and compares (see the library
//! documentation). Parses the command line, starts the service, waits for SIGINT or SIGTERM.

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use vhost_net_compare::cli::Options;
use vhost_net_compare::service::Service;

fn main() -> ExitCode {
    let opts = Options::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        // A log that cannot be written (a full disk under it) costs the log, not the thread
        // that logged: by default tracing reports the failure with eprintln!, whose own failure
        // panics (in colo-vmm that ended COLO mid-checkpoint).
        .log_internal_errors(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(&opts) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vhost-net-compare: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(opts: &Options) -> anyhow::Result<()> {
    // Installed before anything listens, so a signal during start-up is not lost.
    let mut signals = Signals::new([SIGINT, SIGTERM]).context("installing signal handlers")?;
    let service = Service::start(opts).context("starting")?;
    if let Some(sig) = signals.forever().next() {
        tracing::info!(signal = sig, "stopping");
    }
    service.shutdown();
    Ok(())
}
