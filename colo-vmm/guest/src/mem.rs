//! `memcpy`, `memmove`, `memset`, `memcmp` and `bcmp`: the compiler emits calls to them, and
//! without libc nobody else provides them.
//!
//! Each is a string instruction in inline assembly, so the optimiser cannot recognise a copy
//! loop and turn it back into a call to the function itself. `rep movsb`/`rep stosb` are fast
//! on CPUs with ERMSB; `repe cmpsb` is slow per byte, but comparisons here are short (addresses,
//! headers). The direction flag is clear at every call (System V ABI); `memmove` sets it only
//! around its backward copy.

use core::arch::asm;

/// Copies `n` bytes from `src` to `dst`; the areas must not overlap.
///
/// # Safety
/// The usual `memcpy` contract: both areas valid for `n` bytes, not overlapping.
#[no_mangle]
pub unsafe extern "C" fn memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller's contract; `rep movsb` copies exactly `n` bytes forward.
    unsafe {
        asm!(
            "rep movsb",
            inout("rcx") n => _,
            inout("rdi") dst => _,
            inout("rsi") src => _,
            options(nostack, preserves_flags)
        );
    }
    dst
}

/// Copies `n` bytes from `src` to `dst`; the areas may overlap.
///
/// # Safety
/// The usual `memmove` contract: both areas valid for `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn memmove(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dst as usize).wrapping_sub(src as usize) >= n {
        // `dst` is below `src` or past the end of the source: a forward copy never reads a
        // byte it has already overwritten.
        // SAFETY: the caller's contract.
        unsafe { memcpy(dst, src, n) };
    } else if n > 0 {
        // `dst` is inside the source, above `src`: copy from the end down.
        // SAFETY: the caller's contract; the last byte of each area is at offset `n - 1`.
        unsafe {
            asm!(
                "std",
                "rep movsb",
                "cld",
                inout("rcx") n => _,
                inout("rdi") dst.add(n - 1) => _,
                inout("rsi") src.add(n - 1) => _,
                options(nostack)
            );
        }
    }
    dst
}

/// Fills `n` bytes at `dst` with the low byte of `c`.
///
/// # Safety
/// The usual `memset` contract: the area valid for `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn memset(dst: *mut u8, c: i32, n: usize) -> *mut u8 {
    // SAFETY: the caller's contract; `rep stosb` stores exactly `n` bytes forward.
    unsafe {
        asm!(
            "rep stosb",
            inout("rcx") n => _,
            inout("rdi") dst => _,
            in("al") c as u8,
            options(nostack, preserves_flags)
        );
    }
    dst
}

/// Compares `n` bytes: negative, zero or positive as the first differing byte of `a` is
/// smaller, absent or larger than `b`'s.
///
/// # Safety
/// The usual `memcmp` contract: both areas valid for `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    if n == 0 {
        return 0;
    }
    let (end_a, end_b): (*const u8, *const u8);
    // SAFETY: the caller's contract; `repe cmpsb` reads at most `n` bytes of each and stops
    // one past the first difference (or the end).
    unsafe {
        asm!(
            "repe cmpsb",
            inout("rcx") n => _,
            inout("rsi") a => end_a,
            inout("rdi") b => end_b,
            options(nostack, readonly)
        );
        // The last pair compared is the first that differs, or the last pair if none does.
        i32::from(*end_a.sub(1)) - i32::from(*end_b.sub(1))
    }
}

/// Compares `n` bytes for equality only (zero if equal).
///
/// # Safety
/// As [`memcmp`].
#[no_mangle]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: the caller's contract.
    unsafe { memcmp(a, b, n) }
}
