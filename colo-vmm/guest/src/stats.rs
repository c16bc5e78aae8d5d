//! The guest's counters, as `/stats` shows them.

use core::fmt;

use colo_vmm_abi::MAX_CPUS;

/// Counters of the whole guest. The main loop refreshes the device and heap figures; each
/// service adds to its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Stats {
    /// Milliseconds since boot.
    pub uptime_ms: u64,
    /// Frames received from the network device.
    pub rx_frames: u64,
    /// Frames handed to the network device.
    pub tx_frames: u64,
    /// Frames the device returned that the guest could not use (bad length or descriptor).
    pub rx_errors: u64,
    /// TCP connections accepted (a listening socket got a SYN), all services.
    pub tcp_accepted: u64,
    /// Bytes echoed over TCP.
    pub echo_tcp_bytes: u64,
    /// Datagrams echoed over UDP.
    pub echo_udp_datagrams: u64,
    /// HTTP requests answered.
    pub http_requests: u64,
    /// The counter service's value.
    pub counter: u64,
    /// `top` lines made.
    pub top_lines: u64,
    /// Burn iterations since boot.
    pub burn_iterations: u64,
    /// Pages written by the dirtier since boot.
    pub dirty_pages: u64,
    /// Disk blocks written by the disk dirtier since boot.
    pub dirty_blocks: u64,
    /// Heap bytes in use.
    pub heap_used: u64,
    /// Heap bytes free.
    pub heap_free: u64,
    /// vCPUs.
    pub cpus: u64,
    /// Per vCPU (the first `cpus`): times it ran a shared task.
    pub cpu_runs: [u64; MAX_CPUS],
    /// Per vCPU: iterations of its burner.
    pub cpu_burn: [u64; MAX_CPUS],
}

impl fmt::Display for Stats {
    /// One `key=value` line per counter; `cpuN_runs` and `cpuN_burn` for each vCPU.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Stats {
            uptime_ms,
            rx_frames,
            tx_frames,
            rx_errors,
            tcp_accepted,
            echo_tcp_bytes,
            echo_udp_datagrams,
            http_requests,
            counter,
            top_lines,
            burn_iterations,
            dirty_pages,
            dirty_blocks,
            heap_used,
            heap_free,
            cpus,
            cpu_runs,
            cpu_burn,
        } = self;
        writeln!(f, "uptime_ms={uptime_ms}")?;
        writeln!(f, "rx_frames={rx_frames}")?;
        writeln!(f, "tx_frames={tx_frames}")?;
        writeln!(f, "rx_errors={rx_errors}")?;
        writeln!(f, "tcp_accepted={tcp_accepted}")?;
        writeln!(f, "echo_tcp_bytes={echo_tcp_bytes}")?;
        writeln!(f, "echo_udp_datagrams={echo_udp_datagrams}")?;
        writeln!(f, "http_requests={http_requests}")?;
        writeln!(f, "counter={counter}")?;
        writeln!(f, "top_lines={top_lines}")?;
        writeln!(f, "burn_iterations={burn_iterations}")?;
        writeln!(f, "dirty_pages={dirty_pages}")?;
        writeln!(f, "dirty_blocks={dirty_blocks}")?;
        writeln!(f, "heap_used={heap_used}")?;
        writeln!(f, "heap_free={heap_free}")?;
        writeln!(f, "cpus={cpus}")?;
        for (i, (runs, burn)) in cpu_runs.iter().zip(cpu_burn).enumerate().take(*cpus as usize) {
            writeln!(f, "cpu{i}_runs={runs}")?;
            writeln!(f, "cpu{i}_burn={burn}")?;
        }
        Ok(())
    }
}

/// Upper bound of the formatted size: 16 + 2 per vCPU lines of at most 19 + 1 + 20 + 1 bytes.
pub const MAX_FORMATTED: usize = (16 + 2 * MAX_CPUS) * 41;

#[cfg(test)]
impl Stats {
    /// Every counter at its largest: the longest text the page can be.
    pub(crate) fn worst_case() -> Stats {
        Stats {
            uptime_ms: u64::MAX,
            rx_frames: u64::MAX,
            tx_frames: u64::MAX,
            rx_errors: u64::MAX,
            tcp_accepted: u64::MAX,
            echo_tcp_bytes: u64::MAX,
            echo_udp_datagrams: u64::MAX,
            http_requests: u64::MAX,
            counter: u64::MAX,
            top_lines: u64::MAX,
            burn_iterations: u64::MAX,
            dirty_pages: u64::MAX,
            dirty_blocks: u64::MAX,
            heap_used: u64::MAX,
            heap_free: u64::MAX,
            cpus: MAX_CPUS as u64,
            cpu_runs: [u64::MAX; MAX_CPUS],
            cpu_burn: [u64::MAX; MAX_CPUS],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::string::ToString;

    #[test]
    fn every_line_is_key_value() {
        let s = Stats { uptime_ms: 12, counter: 3, ..Stats::default() }.to_string();
        assert!(s.starts_with("uptime_ms=12\n"));
        assert!(s.contains("\ncounter=3\n"));
        assert!(s.lines().all(|l| l.split_once('=').is_some_and(|(_, v)| v.parse::<u64>().is_ok())));
    }

    #[test]
    fn each_vcpu_has_its_lines() {
        let mut st = Stats { cpus: 2, ..Stats::default() };
        st.cpu_runs[1] = 5;
        st.cpu_burn[0] = 7;
        st.cpu_burn[2] = 9;
        let s = st.to_string();
        assert!(s.contains("\ncpus=2\ncpu0_runs=0\ncpu0_burn=7\ncpu1_runs=5\ncpu1_burn=0\n"), "{s}");
        assert!(!s.contains("cpu2_"), "only the vCPUs there are: {s}");
    }

    #[test]
    fn worst_case_fits_the_bound() {
        let s = Stats::worst_case().to_string();
        assert!(s.len() <= MAX_FORMATTED, "{}", s.len());
    }
}
