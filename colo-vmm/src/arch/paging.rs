//! Identity page tables for the first 4 GiB with 2 MiB pages, all user-accessible (the guest
//! runs at CPL3); the MMIO window is mapped uncached.

use colo_vmm_abi::{MMIO_BASE, PAGE_TABLES};

const PRESENT: u64 = 1 << 0;
const WRITABLE: u64 = 1 << 1;
const USER: u64 = 1 << 2;
const WRITE_THROUGH: u64 = 1 << 3;
const CACHE_DISABLE: u64 = 1 << 4;
const HUGE: u64 = 1 << 7;

/// Number of 4 KiB pages the tables take: PML4, PDPT, four page directories.
pub const TABLE_PAGES: u64 = 6;

/// The page tables as (guest-physical address, page contents) pairs, to be written into guest
/// memory before the vCPU starts. CR3 = [`PAGE_TABLES`].
pub fn tables() -> Vec<(u64, Vec<u8>)> {
    let pml4_at = PAGE_TABLES;
    let pdpt_at = PAGE_TABLES + 0x1000;
    let pd_at = |i: u64| PAGE_TABLES + 0x2000 + i * 0x1000;
    let flags = PRESENT | WRITABLE | USER;
    let page = |entries: &[u64]| -> Vec<u8> {
        let mut p = vec![0u8; 4096];
        for (i, e) in entries.iter().enumerate() {
            p[i * 8..i * 8 + 8].copy_from_slice(&e.to_le_bytes());
        }
        p
    };
    let mut out = vec![
        (pml4_at, page(&[pdpt_at | flags])),
        (pdpt_at, page(&(0..4).map(|i| pd_at(i) | flags).collect::<Vec<_>>())),
    ];
    for i in 0..4u64 {
        let entries: Vec<u64> = (0..512u64)
            .map(|j| {
                let addr = (i << 30) | (j << 21);
                let cache = if addr >= MMIO_BASE { WRITE_THROUGH | CACHE_DISABLE } else { 0 };
                addr | flags | HUGE | cache
            })
            .collect();
        out.push((pd_at(i), page(&entries)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(tables: &[(u64, Vec<u8>)], at: u64, index: usize) -> u64 {
        let (_, p) = tables.iter().find(|(a, _)| *a == at).expect("table present");
        u64::from_le_bytes(p[index * 8..index * 8 + 8].try_into().unwrap())
    }

    /// Walks the tables like the MMU for a virtual address.
    fn translate(tables: &[(u64, Vec<u8>)], va: u64) -> (u64, u64) {
        let pml4e = entry(tables, PAGE_TABLES, ((va >> 39) & 0x1ff) as usize);
        let pdpte = entry(tables, pml4e & !0xfff, ((va >> 30) & 0x1ff) as usize);
        let pde = entry(tables, pdpte & !0xfff, ((va >> 21) & 0x1ff) as usize);
        assert!(pde & HUGE != 0 && pde & USER != 0 && pde & PRESENT != 0);
        ((pde & !0x1f_ffff & 0x000f_ffff_ffff_f000) | (va & 0x1f_ffff), pde)
    }

    #[test]
    fn identity_maps_ram_and_mmio() {
        let t = tables();
        assert_eq!(t.len() as u64, TABLE_PAGES);
        for va in [0x20_0000u64, 0x1234_5678, 0xbfff_ffff, MMIO_BASE + 0x50] {
            assert_eq!(translate(&t, va).0, va);
        }
        assert_eq!(translate(&t, 0x20_0000).1 & CACHE_DISABLE, 0);
        assert_ne!(translate(&t, MMIO_BASE).1 & CACHE_DISABLE, 0);
    }
}
