//! colo-proxy: the COLO compare proxy.
//!
//! - `colo-proxy compare`: a drop-in for QEMU's `colo-compare` object, on QEMU chardev-style
//!   sockets (frames from filter-mirror/redirector in, released frames out, `notify_dev`).
//! - `colo-proxy run`: the whole proxy on network interfaces: mirror the uplink's inbound
//!   frames to both VMs (the secondary's through the TCP rewriter), compare what they send,
//!   release the primary's output to the uplink.

mod compare_cmd;
mod metrics;
mod options;
mod output;
mod replica_cmd;
mod run_cmd;
mod signals;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use options::{CompareArgs, RunArgs};

/// COLO compare proxy: compares the network output of a primary and a secondary VM, releases
/// the primary's while they agree, and asks for a checkpoint when they do not.
#[derive(Parser, Debug)]
#[command(name = "colo-proxy", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Compare frames arriving on QEMU-style sockets (a drop-in for QEMU's colo-compare).
    Compare(CompareArgs),
    /// Run the whole proxy on network interfaces (AF_PACKET): uplink, primary and secondary;
    /// or, with --vm, one VM's side of a pair on two hosts.
    Run(RunArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Compare(args) => compare_cmd::run(args),
        Command::Run(args) => run_cmd::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("colo-proxy: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
