//! colo-guest: colo-vmm's reference guest, a `no_std` unikernel that runs entirely at CPL3.
//!
//! It reads the boot information the VMM left in memory, parses its command line, brings up
//! virtio-net over MMIO and smoltcp with a static address, starts the services asked for,
//! lets the other vCPUs go, and then every vCPU runs the scheduler (`sched.rs`): the shared
//! tasks (network, dirtier) one vCPU at a time, a burner each, and when nothing is due, the
//! paravirtual halt until a device signals or the next deadline.
//!
//! Console lines (tests read them):
//! - `colo-guest: boot mem=<MiB>MiB tsc_khz=<kHz> virtio=<devices> cpus=<vCPUs>`
//! - `colo-guest: cmdline <command line>`
//! - `colo-guest: warning: unknown option <token>`
//! - `colo-guest: exit <code>` (for `exit=` / `app=exit`, then the guest exits)
//! - `colo-guest: net up ip=<A.B.C.D/P> mac=<aa:bb:cc:dd:ee:ff>`, `colo-guest: route default via <A.B.C.D>`
//! - `colo-guest: no network device: network services off`
//! - `colo-guest: disk up sectors=<n> readonly=<0|1>`, `colo-guest: no disk: kv off`,
//!   `colo-guest: kv log records=<n> keys=<k> capacity=<sectors>`,
//!   `colo-guest: bad disk requests sent=<n>, each failed alone`
//! - `colo-guest: listening <service> <tcp|udp>/<port>`, `colo-guest: running burn`,
//!   `colo-guest: running dirty pages_per_sec=<n> region_mib=<m>`
//! - `colo-guest: ready` (every service started, every vCPU let go)
//! - `colo-guest: fatal: <why>` (then exit code 1)

#![no_std]
#![no_main]

extern crate alloc;

#[macro_use]
mod serial;
mod entry;
mod halt;
mod heap;
mod mem;
mod net;
mod panic;
mod port;
mod region;
mod sched;
mod services;
mod smp;
mod time;
mod virtio;

use alloc::boxed::Box;

use colo_vmm_abi::{BootInfo, CMDLINE_MAX, MAX_CPUS};

use colo_guest::cmdline::{self, Config, Ipv4};
use colo_guest::fmt::Mac;

use crate::halt::fatal;
use crate::net::Net;
use crate::region::{Region, PAGE};
use crate::sched::System;
use crate::services::dirty::Dirty;
use crate::services::diskdirty::DiskDirty;
use crate::services::kv::{Disk, Layout};
use crate::services::{NetCore, NetServices};
use crate::virtio::blk::{BlkMemory, VirtioBlk};
use crate::virtio::mmio::{Transport, DEVICE_BLK, DEVICE_NET};
use crate::virtio::net::{NetMemory, VirtioNet};

/// Least heap the services need (sockets, per-client state).
const MIN_HEAP: u64 = 4 << 20;

/// Called by `_start` with the boot-info address the VMM put in RDI.
///
/// # Safety
/// `boot` must point to the boot-info block (the VMM's entry contract); called once.
pub unsafe extern "C" fn guest_main(boot: *const BootInfo) -> ! {
    serial::init();
    // SAFETY: the VMM put the block at this (identity-mapped) address; we take a copy.
    let boot = unsafe { core::ptr::read_volatile(boot) };
    if !boot.is_valid() {
        fatal(format_args!("bad boot info (magic {:#x}, version {})", boot.magic, boot.version));
    }
    if boot.tsc_khz == 0 {
        fatal(format_args!("boot info has no TSC frequency"));
    }
    time::init(boot.tsc_khz);
    if !(1..=MAX_CPUS as u32).contains(&boot.cpus) {
        fatal(format_args!("boot info: {} vCPUs (1 to {MAX_CPUS})", boot.cpus));
    }
    status!(
        "boot mem={}MiB tsc_khz={} virtio={} cpus={}",
        boot.mem_size >> 20,
        boot.tsc_khz,
        boot.virtio_count,
        boot.cpus
    );
    let line = cmdline_of(&boot);
    if !line.is_empty() {
        status!("cmdline {line}");
    }
    let config = cmdline::parse(line, |token| status!("warning: unknown option {token}"))
        .unwrap_or_else(|error| fatal(format_args!("bad command line: {error}")));
    if let Some(code) = config.exit_now() {
        status!("exit {code}");
        halt::exit(code);
    }
    run(&boot, &config)
}

/// The command line, checked to lie in RAM and be UTF-8.
fn cmdline_of(boot: &BootInfo) -> &'static str {
    let (addr, len) = (boot.cmdline_addr, boot.cmdline_len);
    if len == 0 {
        return "";
    }
    if addr == 0 || len >= CMDLINE_MAX as u64 || addr.checked_add(len).is_none_or(|end| end > boot.mem_size) {
        fatal(format_args!("boot info: command line outside RAM ({addr:#x}, {len} bytes)"));
    }
    // SAFETY: the bytes are in RAM (checked), identity-mapped, and nothing writes them.
    let bytes = unsafe { core::slice::from_raw_parts(addr as *const u8, len as usize) };
    core::str::from_utf8(bytes).unwrap_or_else(|_| fatal(format_args!("command line is not UTF-8")))
}

/// The first virtio-mmio device of type `kind` in the boot info.
fn find_device(boot: &BootInfo, kind: u32) -> Option<Transport> {
    let count = (boot.virtio_count as usize).min(boot.virtio.len());
    boot.virtio[..count].iter().find_map(|device| {
        // SAFETY: the VMM describes a virtio-mmio register window at this address.
        let transport = unsafe { Transport::new(device.base) };
        match transport.probe() {
            Ok(k) if k == kind => Some(transport),
            Ok(_) => None,
            Err(why) => fatal(format_args!("virtio device at {:#x}: {why}", device.base)),
        }
    })
}

/// Sets up memory, the network and the services, lets the other vCPUs go, then runs the
/// scheduler.
fn run(boot: &BootInfo, config: &Config) -> ! {
    let cpus = boot.cpus as usize;
    // Carve fixed areas (queues, dirty region, AP stacks) first; the heap gets the rest.
    let mut region = Region::new(boot.free_start, boot.free_end);
    let stacks = smp::carve_stacks(&mut region, cpus)
        .unwrap_or_else(|| fatal(format_args!("not enough memory for {} vCPU stacks", cpus - 1)));
    let nic = find_device(boot, DEVICE_NET);
    let blk = find_device(boot, DEVICE_BLK).filter(|_| config.apps.needs_disk());
    let blk_memory = blk.map(|_| {
        BlkMemory::carve(&mut region).unwrap_or_else(|| {
            fatal(format_args!("not enough memory for the disk's queue ({} KiB)", BlkMemory::BYTES >> 10))
        })
    });
    let net_memory = nic.map(|_| {
        NetMemory::carve(&mut region).unwrap_or_else(|| {
            fatal(format_args!("not enough memory for the network queues ({} KiB)", NetMemory::BYTES >> 10))
        })
    });
    let dirty_pages = u64::from(config.dirty_mib) << 20 >> 12;
    let dirty_region = config.apps.dirty.then(|| {
        region.take(dirty_pages * PAGE).unwrap_or_else(|| {
            fatal(format_args!(
                "not enough memory for dirty_mib={} (free: {} MiB)",
                config.dirty_mib,
                region.rest().1 >> 20
            ))
        })
    });
    let (heap_start, heap_len) = region.rest();
    if heap_len < MIN_HEAP {
        fatal(format_args!("not enough memory: {} KiB left for the heap, need {} KiB", heap_len >> 10, MIN_HEAP >> 10));
    }
    // SAFETY: the rest of the free RAM, used by nothing else from now on.
    unsafe { heap::init(heap_start as *mut u8, heap_len as usize) };

    let disk = match (blk, blk_memory) {
        (Some(transport), Some(memory)) => Some(start_disk(transport, memory, config)),
        _ => None,
    };
    let net = match (nic, net_memory) {
        (Some(transport), Some(memory)) => {
            let mut net = start_network(transport, memory, config);
            let services = NetServices::start(config, &mut net.sockets, disk)
                .unwrap_or_else(|why| fatal(format_args!("cannot start the network services: {why}")));
            Some(NetCore::new(net, services))
        }
        _ => {
            if config.apps.needs_network() {
                status!("no network device: network services off");
            }
            None
        }
    };
    if config.apps.burn {
        status!("running burn");
    }
    let dirty = dirty_region.map(|area| {
        let rate = u64::from(config.dirty_pages_per_sec);
        if rate > dirty_pages {
            status!(
                "warning: dirty={rate} is more than the region's {dirty_pages} pages; writing {dirty_pages} per second"
            );
        }
        status!("running dirty pages_per_sec={} region_mib={}", rate.min(dirty_pages), config.dirty_mib);
        // SAFETY: the area was carved for the dirtier alone.
        unsafe { Dirty::new(area, dirty_pages, rate, time::now()) }
    });
    let disk_dirty = disk.filter(|_| config.apps.diskdirty).map(|disk| {
        let layout = Layout::of(disk.lock().sectors());
        let rate = u64::from(config.disk_dirty_blocks_per_sec);
        status!("running diskdirty blocks_per_sec={rate}");
        DiskDirty::new(disk, &layout, rate, time::now())
    });
    let system: &'static System = Box::leak(Box::new(System::new(cpus, net, dirty, disk_dirty, config.apps.burn)));
    smp::start_aps(system, &stacks);
    status!("ready");
    sched::cpu_loop(system, 0)
}

/// Brings up the disk, prints the `disk up` line and runs `badblk` if asked.
fn start_disk(transport: Transport, memory: BlkMemory, config: &Config) -> &'static Disk {
    let mut blk = VirtioBlk::init(transport, memory).unwrap_or_else(|why| fatal(format_args!("virtio-blk: {why}")));
    status!("disk up sectors={} readonly={}", blk.sectors(), u8::from(blk.readonly()));
    if blk.sectors() < 16 {
        fatal(format_args!("the disk has {} sectors; it needs at least 16", blk.sectors()));
    }
    if config.apps.badblk {
        match blk.send_bad_requests() {
            Ok(n) => status!("bad disk requests sent={n}, each failed alone"),
            Err(why) => fatal(format_args!("badblk: {why}")),
        }
    }
    Box::leak(Box::new(spinning_top::Spinlock::new(blk)))
}

/// Brings up the device and the interface and prints the `net up` line.
fn start_network(transport: Transport, memory: NetMemory, config: &Config) -> Net {
    let device = VirtioNet::init(transport, memory).unwrap_or_else(|why| fatal(format_args!("virtio-net: {why}")));
    let seed = config.seed.unwrap_or_else(time::rdtsc);
    let net = Net::new(device, config.ip, config.gateway, seed, time::now())
        .unwrap_or_else(|why| fatal(format_args!("network: {why}")));
    status!("net up ip={} mac={}", config.ip, Mac(net.mac()));
    if let Some(gateway) = config.gateway {
        status!("route default via {}", Ipv4(gateway));
    }
    net
}
