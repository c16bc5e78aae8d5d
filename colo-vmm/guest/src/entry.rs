//! `_start`: where the VMM jumps, at CPL3 with RDI = `&BootInfo` and RSI = the vCPU's index.
//!
//! The boot vCPU (RSI = 0, RSP = `STACK_TOP`) clears `.bss` (the VMM loads only the file-backed
//! part of the data segment, and memory restored from elsewhere need not be zero), aligns the
//! stack as the System V ABI expects at a call, and calls [`crate::guest_main`] with the
//! boot-info pointer still in RDI.
//!
//! Every other vCPU starts here at the same moment without a stack (see `colo_vmm_abi`): it
//! touches no memory but its slot of [`crate::smp::AP_STACKS`], which it reads with a halt of
//! 1 ms between looks until the boot vCPU has put a stack there, then switches to it and calls
//! [`crate::smp::ap_main`] with its index. The table is in `.bss`: zero when the image is
//! loaded, zeroed again by the clearing, so an AP never sees a stale stack.

core::arch::global_asm!(
    ".section .text._start, \"ax\", @progbits",
    ".global _start",
    ".type _start, @function",
    "_start:",
    "    test rsi, rsi",
    "    jnz 2f",
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
    // An AP: wait for a stack in AP_STACKS[rsi], halting 1 ms between looks.
    "2:",
    "    lea rbx, [rip + {stacks}]",
    "3:",
    "    mov rax, [rbx + rsi * 8]",
    "    test rax, rax",
    "    jnz 4f",
    "    mov dx, {halt_port}",
    "    mov eax, 1000",
    "    out dx, eax",
    "    jmp 3b",
    "4:",
    "    mov rsp, rax",
    "    and rsp, -16",
    "    xor ebp, ebp",
    "    mov rdi, rsi",
    "    call {ap_main}",
    "    ud2",
    main = sym crate::guest_main,
    stacks = sym crate::smp::AP_STACKS,
    ap_main = sym crate::smp::ap_main,
    halt_port = const colo_vmm_abi::port::HALT,
);
