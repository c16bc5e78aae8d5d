//! `_start`: where the VMM jumps, at CPL3 with RSP = `STACK_TOP` and RDI = `&BootInfo`.
//!
//! It clears `.bss` (the VMM loads only the file-backed part of the data segment, and memory
//! restored from elsewhere need not be zero), aligns the stack as the System V ABI expects at
//! a call, and calls [`crate::guest_main`] with the boot-info pointer still in RDI.

core::arch::global_asm!(
    ".section .text._start, \"ax\", @progbits",
    ".global _start",
    ".type _start, @function",
    "_start:",
    "    mov r12, rdi",                  // keep &BootInfo across the clearing
    "    lea rdi, [rip + __bss_start]",
    "    lea rcx, [rip + __bss_end]",
    "    sub rcx, rdi",
    "    xor eax, eax",
    "    cld",
    "    rep stosb",
    "    mov rdi, r12",
    "    and rsp, -16",
    "    xor ebp, ebp",                  // end of the frame-pointer chain
    "    call {main}",
    "    ud2",                           // guest_main never returns
    main = sym crate::guest_main,
);
