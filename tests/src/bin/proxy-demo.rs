//! The packet-capture demo of `colo-proxy run` (the README's main command until COLO runs end
//! to end): a client and two "VMs" with the same address in network namespaces, the proxy
//! between them, real traffic, a divergent service, and the captures left for inspection.
//!
//! Run as root: `cargo run --release -p colo-tests --bin proxy-demo -- --out demo-out`

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpStream, UdpSocket};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use colo_proxy::control::{ControlClient, Event};
use colo_tests::netns::prerequisites;
use colo_tests::topology::{ProxyTopology, DIVERGENT_PORT, VM_IP};

/// Demo of the COLO proxy on network namespaces.
#[derive(Parser, Debug)]
struct Args {
    /// Directory for the captures (uplink.pcap, miscompares.pcapng).
    #[arg(long, default_value = "demo-out")]
    out: PathBuf,
}

fn step(text: &str) {
    println!("\n== {text}");
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Err(why) = prerequisites(&["ip", "socat", "tcpdump", "ethtool", "ping"]) {
        bail!("the demo {why}");
    }
    std::fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    let out = std::fs::canonicalize(&args.out)?;
    step("Building: client ns — uplink [colo-proxy run] pri/sec — two VM namespaces, both 10.0.0.2");
    let mut topo = ProxyTopology::start(&out, &[]);
    let mut control = ControlClient::connect(&topo.control).context("connecting to the proxy")?;
    if let Event::Hello { component, version, nic, mode, .. } = control.hello() {
        println!("control socket: {component} {version}, nic {nic}, mode {}", mode.name());
    }

    step("ping 10.0.0.2 (both kernels answer; the proxy releases the primary's reply)");
    let (ok, text) = topo.client.try_exec(&["ping", "-c", "3", "-i", "0.2", VM_IP]);
    print!("{text}");
    if !ok {
        bail!("ping failed");
    }

    step("UDP echo on port 7");
    topo.client.enter(|| -> anyhow::Result<()> {
        let s = UdpSocket::bind("10.0.0.1:0")?;
        s.set_read_timeout(Some(Duration::from_secs(3)))?;
        for i in 0..3 {
            let t = Instant::now();
            s.send_to(format!("hello {i}").as_bytes(), "10.0.0.2:7")?;
            let mut buf = [0u8; 64];
            let (n, _) = s.recv_from(&mut buf)?;
            println!("reply {:?} in {:?}", String::from_utf8_lossy(&buf[..n]), t.elapsed());
        }
        Ok(())
    })?;

    step("TCP echo on port 7 (different initial sequence numbers, mapped by the rewriter)");
    topo.client.enter(|| -> anyhow::Result<()> {
        let s = TcpStream::connect_timeout(&"10.0.0.2:7".parse()?, Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut r = BufReader::new(s.try_clone()?);
        let mut w = s;
        for i in 0..3 {
            writeln!(w, "line {i}")?;
            let mut got = String::new();
            r.read_line(&mut got)?;
            println!("echo: {}", got.trim_end());
        }
        Ok(())
    })?;
    let stats = control.stats()?;
    println!(
        "proxy: {} primary / {} secondary frames, {} released, {} miscompares, hold p50 {} µs p99 {} µs",
        stats.frames_primary,
        stats.frames_secondary,
        stats.released,
        stats.miscompares.total(),
        stats.hold_p50_us,
        stats.hold_p99_us
    );

    step(&format!("A service on UDP {DIVERGENT_PORT} answers with the machine's name: the outputs differ"));
    let sock = topo.client.enter(|| UdpSocket::bind("10.0.0.1:0"))?;
    sock.set_read_timeout(Some(Duration::from_millis(500)))?;
    sock.send_to(b"who are you?", ("10.0.0.2", DIVERGENT_PORT))?;
    let mut buf = [0u8; 64];
    if sock.recv_from(&mut buf).is_ok() {
        bail!("the divergent reply was released without a checkpoint");
    }
    println!("no reply yet: the primary's answer is held");
    match control.next_event(Some(Duration::from_secs(5)))? {
        Some(ev @ Event::Miscompare { .. }) => println!("control socket: {}", ev.to_line().trim_end()),
        other => bail!("expected a miscompare event, got {other:?}"),
    }
    let s = control.checkpoint()?;
    println!("checkpoint: released {}, dropped {}", s.released, s.dropped);
    sock.set_read_timeout(Some(Duration::from_secs(3)))?;
    let (n, _) = sock.recv_from(&mut buf)?;
    println!("the client now gets the primary's answer: {:?}", String::from_utf8_lossy(&buf[..n]));

    step("Captures");
    std::thread::sleep(Duration::from_millis(300));
    topo.stop_tcpdump();
    drop(control);
    topo.stop_proxy();
    let show = |args: &[&str]| {
        if let Ok(o) = Command::new(args[0]).args(&args[1..]).output() {
            print!("{}", String::from_utf8_lossy(&o.stdout));
        }
    };
    println!("uplink ({}):", topo.uplink_pcap.display());
    show(&["tcpdump", "-n", "-r", topo.uplink_pcap.to_str().unwrap_or_default(), "ip"]);
    println!("miscompared frames with verdicts ({}):", topo.capture.display());
    show(&[
        "tshark",
        "-r",
        topo.capture.to_str().unwrap_or_default(),
        "-T",
        "fields",
        "-e",
        "frame.comment",
        "-e",
        "udp.payload",
    ]);
    println!("\ndone: every reply crossed the uplink once; the divergent one only after the checkpoint.");
    Ok(())
}
