//! colo-vmm: run a VM (`colo-vmm run`) or talk to a running one (`colo-vmm ctl`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::mpsc::{channel, Sender};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use colo_proxy::link::LinkKey;
use colo_vmm::arbiter::claim::Claim;
use colo_vmm::arbiter::etcd::Etcd;

use colo_vmm::api::client::{parse_arguments, ApiClient};
use colo_vmm::api::dispatch::{Lifecycle, VmmApi};
use colo_vmm::api::protocol::Reply;
use colo_vmm::api::server::ApiServer;
use colo_vmm::colo::shared::ColoShared;
use colo_vmm::devices::block::DiskConfig;
use colo_vmm::devices::serial::SerialOutput;
use colo_vmm::loader::Image;
use colo_vmm::migration::destination::incoming;
use colo_vmm::migration::status::{MigrationState, MigrationStatus};
use colo_vmm::migration::uri::MigrationUri;
use colo_vmm::vmm::{NetConfig, VmConfig, Vmm};
use colo_vmm::vstate::vcpu::VcpuEnd;

/// A minimal KVM VMM for COLO fault tolerance.
#[derive(Parser, Debug)]
#[command(name = "colo-vmm", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Boot a VM (the built-in reference guest unless --kernel is given).
    Run(Box<RunArgs>),
    /// Send one command to a running VMM's control API and print the reply.
    Ctl(CtlArgs),
}

#[derive(Args, Debug)]
#[command(after_help = "The process exits with the guest's exit code (exit port), 0 after `quit` or \
SIGTERM, and 1 on errors (no /dev/kvm, bad image, backend unreachable, guest crash).")]
struct RunArgs {
    /// A guest ELF image (CPL3 long-mode ABI of colo-vmm-abi); default: the reference guest.
    #[arg(long, value_name = "ELF", conflicts_with = "restore")]
    kernel: Option<PathBuf>,
    /// Resume a VM saved with `snapshot` (the devices given must match the saved ones).
    #[arg(long, value_name = "FILE", conflicts_with = "incoming")]
    restore: Option<PathBuf>,
    /// Wait for a live migration on tcp:HOST:PORT or unix:PATH and run the VM it brings.
    #[arg(long, value_name = "URI", conflicts_with = "kernel")]
    incoming: Option<MigrationUri>,
    /// The guest's command line (reference guest: e.g. "ip=10.0.0.2/24 gw=10.0.0.1 app=echo,http").
    #[arg(long, value_name = "STR", default_value = "", conflicts_with = "restore")]
    cmdline: String,
    /// Guest memory in MiB.
    #[arg(long, value_name = "MIB", default_value_t = 256)]
    mem: u64,
    /// vCPUs, 1 to 8 (a restored or migrated VM keeps its own count).
    #[arg(long, value_name = "N", default_value_t = 1, conflicts_with_all = ["restore", "incoming"])]
    cpus: u32,
    /// A virtio-net device backed by a vhost-user backend (repeat for more devices).
    #[arg(long, value_name = "vhost-user=PATH[,mac=MAC]")]
    net: Vec<NetConfig>,
    /// A virtio-blk disk on a raw image (at least 1 MiB, whole 4 KiB blocks; `readonly`: the
    /// guest may only read it). Each VM needs its own image: snapshot, migration and COLO carry
    /// the disk's contents.
    #[arg(long, value_name = "path=FILE[,readonly]")]
    disk: Option<DiskConfig>,
    /// Where the serial console goes: stdio, file:PATH or none.
    #[arg(long, value_name = "OUT", default_value = "stdio")]
    serial: SerialOutput,
    /// Serve the control API on this Unix socket (mode 0600).
    #[arg(long, value_name = "PATH")]
    api: Option<PathBuf>,
    /// COLO: the control socket of a compare process (vhost-net-compare or colo-proxy) this VM's
    /// traffic goes through; repeat for several NICs. A primary sets them to primary-only at
    /// once; a secondary sets them to secondary-only on failover.
    #[arg(long, value_name = "PATH")]
    compare_socket: Vec<PathBuf>,
    /// The key shared by the hosts of this VM (a file of at least 32 random bytes, mode 0600 or
    /// 0400, e.g. `head -c 32 /dev/urandom`). Every link this VMM makes or accepts (migration,
    /// COLO's checkpoint link) is then mutually authenticated and encrypted; a peer without
    /// the key is refused. Without it links are plain (a warning at start).
    #[arg(long, value_name = "FILE")]
    link_key: Option<PathBuf>,
    /// The arbiter that decides which replica of the VM may serve: etcd's client URLs
    /// (`etcd=http://HOST:2379[,http://HOST2:2379,...]`). The serving replica holds a
    /// lease-backed key for --vm-name; without it, it releases nothing. Without an arbiter a
    /// partition between the replicas can make both serve (a warning at start).
    #[arg(long, value_name = "etcd=URL[,URL...]")]
    arbiter: Option<ArbiterArg>,
    /// The protected VM's name: its key in the arbiter (`/colo/NAME/...`).
    #[arg(long, value_name = "NAME", value_parser = parse_vm_name)]
    vm_name: Option<String>,
    /// This replica's name in the arbiter, unique among the VM's replicas and the same across
    /// restarts (default: the host name).
    #[arg(long, value_name = "NAME", value_parser = parse_vm_name)]
    replica_name: Option<String>,
    /// With --incoming and --arbiter: register as a standby for the VM (reachable at the
    /// --incoming address), so a primary without a secondary starts COLO with it by itself.
    #[arg(long, requires_all = ["incoming", "arbiter"])]
    standby: bool,
    /// `--standby --vm-name NAME` in one: wait with --incoming as a registered standby for NAME.
    #[arg(long, value_name = "NAME", value_parser = parse_vm_name, requires_all = ["incoming", "arbiter"])]
    standby_for: Option<String>,
    #[arg(long, value_name = "HOST:PORT", help = colo_proxy::metrics::FLAG_HELP)]
    metrics: Option<std::net::SocketAddr>,
}

impl RunArgs {
    /// The protected VM's name (`--vm-name` or `--standby-for`), when an arbiter is given.
    fn arbiter_vm_name(&self) -> anyhow::Result<Option<String>> {
        if self.arbiter.is_none() {
            return Ok(None);
        }
        match (&self.vm_name, &self.standby_for) {
            (Some(a), Some(b)) if a != b => anyhow::bail!("--vm-name {a} and --standby-for {b} name different VMs"),
            (Some(n), _) | (None, Some(n)) => Ok(Some(n.clone())),
            (None, None) => {
                anyhow::bail!("--arbiter needs --vm-name NAME (or --standby-for NAME): the VM's key in etcd")
            }
        }
    }
}

/// `--arbiter etcd=URL[,URL...]`.
#[derive(Debug, Clone)]
struct ArbiterArg(Vec<String>);

impl std::str::FromStr for ArbiterArg {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let urls = s.strip_prefix("etcd=").ok_or_else(|| format!("'{s}': expected etcd=http://HOST:PORT[,...]"))?;
        let urls: Vec<String> = urls.split(',').map(str::trim).filter(|u| !u.is_empty()).map(String::from).collect();
        if urls.is_empty() {
            return Err(format!("'{s}': no etcd endpoint"));
        }
        for u in &urls {
            if !u.starts_with("http://") {
                return Err(format!("'{u}': etcd endpoints are http://HOST:PORT (the v3 JSON gateway)"));
            }
        }
        Ok(ArbiterArg(urls))
    }
}

/// Names in the arbiter's keys: letters, digits, `-`, `_`, `.`.
fn parse_vm_name(s: &str) -> Result<String, String> {
    let ok = !s.is_empty() && s.len() <= 64 && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if ok {
        Ok(s.to_string())
    } else {
        Err(format!("'{s}': a name is 1-64 letters, digits, '-', '_' or '.'"))
    }
}

/// This replica's default name: the host name (stable across restarts, which the pair record
/// in etcd relies on; give each replica on one host its own --replica-name).
fn default_replica_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let host: String = host.trim().chars().filter(|c| c.is_ascii_alphanumeric() || "-_.".contains(*c)).collect();
    if host.is_empty() {
        "replica".into()
    } else {
        host
    }
}

#[derive(Args, Debug)]
#[command(after_help = "Commands:
  query-status, stop, cont, quit
  snapshot path=FILE
  migrate uri=URI [downtime-limit=MS max-rounds=N verify=true], query-migrate,
  migrate-set-parameters ..., query-migrate-parameters
COLO (docs/colo.md; with an arbiter docs/arbiter.md):
  colo-start uri=URI        on the primary or a survivor: migrate to a secondary's --incoming URI, then COLO
             [verify=true test-checkpoint-delay=MS]   test only: verify every checkpoint page
                            for page; hold every checkpoint open MS ms after its pages
  query-colo-status         role, mode, hybrid state, checkpoint counters, pauses, last failover,
                            the arbiter (holder, pair, lease), waiting, fenced, re-protection
  set-parameters NAME=N...  max-time min-time relax-time passive-limit passive-time passive-count
                            ram-background-limit heartbeat-interval heartbeat-timeout arbiter-ttl
                            (ms, bytes) auto-reprotect=true|false resume-before-load=true|false
  query-parameters
  colo-checkpoint           on the primary: checkpoint now
  lost-heartbeat            on the survivor: fail over now (the peer is declared dead)
Arguments are key=value (numbers and true/false are typed). Prints the JSON reply; exits 1 if it is an \
error. A secondary serves its API once COLO has started.")]
struct CtlArgs {
    /// The VMM's control socket.
    #[arg(long, value_name = "PATH")]
    api: PathBuf,
    /// The command.
    command: String,
    /// Its arguments, key=value.
    args: Vec<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let result = match cli.command {
        Command::Run(args) => run(*args),
        Command::Ctl(args) => ctl(args),
    };
    result.unwrap_or_else(|e| {
        eprintln!("colo-vmm: error: {e:#}");
        ExitCode::FAILURE
    })
}

/// Why the main thread wakes up.
enum Event {
    Vcpu(VcpuEnd),
    Signal(i32),
    Quit,
    Migrated,
}

struct QuitByChannel(Sender<Event>);

impl Lifecycle for QuitByChannel {
    fn quit(&self) {
        let _ = self.0.send(Event::Quit);
    }
    fn migrated(&self) {
        let _ = self.0.send(Event::Migrated);
    }
}

fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let vm_name = args.arbiter_vm_name()?;
    match &args.link_key {
        Some(path) => colo_vmm::migration::uri::set_link_key(LinkKey::load(path)?),
        None => tracing::warn!(
            "no --link-key: migration and checkpoint links to other hosts are neither authenticated nor encrypted"
        ),
    }
    let config = VmConfig {
        image: args.kernel.map_or(Image::Reference, Image::File),
        cmdline: args.cmdline,
        mem_mib: args.mem,
        cpus: args.cpus,
        net: args.net,
        disk: args.disk,
        serial: args.serial,
    };
    let colo = Arc::new(ColoShared::new(args.compare_socket));
    let _metrics = args.metrics.map(|addr| colo_vmm::metrics::serve(addr, colo.clone())).transpose()?;
    // The arbiter's lease is renewed for the process's lifetime.
    let _keeper = match (&args.arbiter, &vm_name) {
        (Some(ArbiterArg(endpoints)), Some(vm)) => {
            let me = args.replica_name.clone().unwrap_or_else(default_replica_name);
            let etcd = Etcd::new(endpoints.clone(), Duration::from_millis(500));
            let claim = Arc::new(Claim::new(etcd, vm, &me, Duration::from_millis(colo.params().arbiter_ttl)));
            let keeper = claim.keep().context("starting the arbiter's lease thread")?;
            let _ = colo.arbiter.set(claim.clone());
            tracing::info!(target: "colo", vm = %vm, replica = %me, endpoints = ?endpoints, "arbiter: etcd");
            if args.standby || args.standby_for.is_some() {
                let uri = args.incoming.as_ref().expect("clap requires --incoming").to_string();
                if uri.contains("0.0.0.0") || uri.contains("[::]") {
                    tracing::warn!(target: "colo", %uri, "the standby registers its --incoming address: give one its peers can reach");
                }
                // Registered until COLO starts with it; etcd may come later.
                let registering = claim.clone();
                std::thread::Builder::new().name("standby-register".into()).spawn(move || {
                    while let Err(e) = registering.register_standby(&uri) {
                        tracing::warn!(target: "colo", error = %e, "cannot register as a standby yet");
                        std::thread::sleep(Duration::from_secs(1));
                    }
                    tracing::info!(target: "colo", %uri, "registered as a standby");
                })?;
            }
            Some(keeper)
        }
        _ => {
            tracing::warn!(
                "no --arbiter: if the link between the replicas is cut while both reach their clients, both will serve"
            );
            None
        }
    };
    let mut secondary = None;
    let vmm = Arc::new(match (&args.restore, &args.incoming) {
        (Some(path), _) => Vmm::restore(&config, path)?,
        (None, Some(uri)) => {
            let arrived = incoming(&config, uri, &colo)?;
            secondary = arrived.secondary;
            arrived.vmm
        }
        (None, None) => Vmm::boot(&config)?,
    });
    match secondary {
        Some(runner) => runner.spawn(vmm.clone()),
        // A primary-to-be keeps its compare processes passing its traffic until COLO starts.
        None if !colo.compare_sockets.is_empty() => {
            colo_vmm::colo::primary::prepare(&colo).context("compare processes")?
        }
        None => {}
    }
    if colo.arbiter().is_some() {
        colo_vmm::colo::serving::spawn(vmm.clone(), colo.clone()).context("starting the serving thread")?;
    }
    let (tx, rx) = channel();
    // The first vCPU thread to end ends the VM (a guest exit, a crash, or quit).
    for thread in vmm.take_threads() {
        let vcpu_tx = tx.clone();
        std::thread::spawn(move || {
            let end = thread.join().unwrap_or_else(|_| VcpuEnd::Crashed("a vCPU thread panicked".into()));
            let _ = vcpu_tx.send(Event::Vcpu(end));
        });
    }
    let mut signals = signal_hook::iterator::Signals::new([signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT])
        .context("installing signal handlers")?;
    let sig_tx = tx.clone();
    std::thread::spawn(move || {
        if let Some(sig) = signals.forever().next() {
            let _ = sig_tx.send(Event::Signal(sig));
        }
    });
    let api = match &args.api {
        Some(path) => {
            let handler = Arc::new(VmmApi::new(vmm.clone(), colo.clone(), Arc::new(QuitByChannel(tx.clone()))));
            Some(ApiServer::start(path, handler).with_context(|| format!("control API socket {}", path.display()))?)
        }
        None => None,
    };
    let code = loop {
        match rx.recv().context("event channel closed")? {
            Event::Vcpu(VcpuEnd::GuestExit(code)) => {
                tracing::info!(code, "guest exited");
                break ExitCode::from(code as u8);
            }
            Event::Vcpu(VcpuEnd::Quit) => break ExitCode::SUCCESS,
            Event::Vcpu(VcpuEnd::Crashed(why)) => {
                drop(api);
                anyhow::bail!("{why}");
            }
            Event::Signal(sig) => {
                tracing::info!(signal = sig, "shutting down");
                vmm.vcpus().quit();
            }
            Event::Quit => {
                tracing::info!("quit requested");
                vmm.vcpus().quit();
            }
            Event::Migrated => {
                // As QEMU: the source stays, paused ("postmigrate"), until told to quit.
                tracing::info!("the VM now runs at the migration destination; this VMM waits for quit");
            }
        }
    };
    // The vCPU thread has ended and dropped the devices: the backends saw an orderly close.
    drop(api);
    Ok(code)
}

fn ctl(args: CtlArgs) -> anyhow::Result<ExitCode> {
    let arguments = parse_arguments(&args.args)?;
    let mut client = ApiClient::connect(&args.api)?;
    let reply = client.execute(&args.command, arguments)?;
    let ok = matches!(reply, Reply::Return { .. });
    if args.command == "migrate" && ok {
        return follow_migration(&mut client);
    }
    if args.command == "colo-start" && ok {
        return follow_colo_start(&mut client);
    }
    println!("{}", serde_json::to_string_pretty(&reply)?);
    Ok(if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// Waits until COLO runs (or failed to start); prints the COLO status.
fn follow_colo_start(client: &mut ApiClient) -> anyhow::Result<ExitCode> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
    loop {
        let reply = client.execute("query-colo-status", Default::default())?;
        let Reply::Return { value, .. } = reply else {
            anyhow::bail!("query-colo-status failed: {}", serde_json::to_string(&reply)?);
        };
        match value["state"].as_str() {
            Some("starting") if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(100))
            }
            Some("running") => {
                println!("{}", serde_json::to_string_pretty(&serde_json::json!({ "return": value }))?);
                return Ok(ExitCode::SUCCESS);
            }
            _ => {
                eprintln!("colo-start failed: {}", value["error"].as_str().unwrap_or("see the VMM's log"));
                println!("{}", serde_json::to_string_pretty(&serde_json::json!({ "return": value }))?);
                return Ok(ExitCode::FAILURE);
            }
        }
    }
}

/// Shows a progress bar until the migration ends; prints the final status.
fn follow_migration(client: &mut ApiClient) -> anyhow::Result<ExitCode> {
    use std::io::Write;
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    loop {
        let reply = client.execute("query-migrate", Default::default())?;
        let Reply::Return { value, .. } = reply else {
            anyhow::bail!("query-migrate failed: {}", serde_json::to_string(&reply)?);
        };
        let st: MigrationStatus = serde_json::from_value(value.clone())?;
        let pct = (st.pages_sent.min(st.total_pages) * 100).checked_div(st.total_pages).unwrap_or(0) as usize;
        let bar = format!(
            "[{:<30}] {:>3}%  round {}  sent {} MiB  dirty {} pages/s  expected downtime {} ms",
            "#".repeat(pct * 30 / 100),
            pct,
            st.rounds,
            st.bytes_sent >> 20,
            st.dirty_rate,
            st.expected_downtime_ms
        );
        if tty {
            eprint!("\r{bar}");
            let _ = std::io::stderr().flush();
        }
        match st.status {
            MigrationState::Active | MigrationState::None => std::thread::sleep(std::time::Duration::from_millis(100)),
            MigrationState::Completed | MigrationState::Failed => {
                if tty {
                    eprintln!();
                }
                println!("{}", serde_json::to_string_pretty(&value)?);
                return Ok(if st.status == MigrationState::Completed { ExitCode::SUCCESS } else { ExitCode::FAILURE });
            }
        }
    }
}
