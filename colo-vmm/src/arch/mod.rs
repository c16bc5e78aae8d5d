//! x86-64 boot state for a guest that runs entirely at CPL3 (see `colo_vmm_abi`): the GDT and
//! TSS, identity page tables, and the initial registers.

pub mod cpuid;
pub mod gdt;
pub mod paging;
pub mod regs;
