//! The stage processes' allocator settings (the binaries install mimalloc as the global allocator).
//!
//! A training step frees and reallocates the same large activations (logits, attention inputs,
//! gradients: hundreds of MB) every step. mimalloc by default returns freed memory to the kernel
//! a second after it is freed, so every step faulted it back in and the kernel zeroed it again:
//! 11-19% of a CPU training step of the tiny model in `perf`. [`keep_freed_memory`] turns that purging off, so the process keeps its
//! peak and reuses it.
#![allow(unsafe_code)]

/// `mi_option_purge_delay`: entry 15 of `mi_option_e` in the mimalloc (v3) that libmimalloc-sys
/// bundles, which names no Rust constant for it.
const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
/// Its default in that mimalloc's `options.c`, in milliseconds: how the option is recognised before
/// it is changed (the header's comment still says 10).
const PURGE_DELAY_DEFAULT: std::ffi::c_long = 1000;

/// Stops mimalloc returning freed memory to the kernel. Returns whether it did: not when the
/// option does not read as its default, because `MIMALLOC_PURGE_DELAY` set it (the user's choice
/// stands) or because another mimalloc numbers its options differently.
pub fn keep_freed_memory() -> bool {
    if purge_delay() != PURGE_DELAY_DEFAULT {
        return false;
    }
    // SAFETY: setting an option is a plain call into mimalloc, with no pointers, valid at any time
    // from any thread.
    unsafe {
        libmimalloc_sys::mi_option_set(PURGE_DELAY, -1);
    }
    purge_delay() == -1
}

fn purge_delay() -> std::ffi::c_long {
    // SAFETY: reading an option is a plain call into mimalloc, with no pointers.
    unsafe { libmimalloc_sys::mi_option_get(PURGE_DELAY) }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Option 15 follows `MIMALLOC_PURGE_DELAY` (checked in a child process, since mimalloc reads
    /// its environment once), and `keep_freed_memory` sets it only from its default.
    #[test]
    fn option_15_is_the_purge_delay() {
        if std::env::var_os("PRETRAIN_ALLOCATOR_CHILD").is_some() {
            assert_eq!(purge_delay(), 123);
            assert!(!keep_freed_memory(), "a delay the environment set is left alone");
            assert_eq!(purge_delay(), 123);
            return;
        }
        let status = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "allocator::tests::option_15_is_the_purge_delay", "--test-threads", "1"])
            .env("PRETRAIN_ALLOCATOR_CHILD", "1")
            .env("MIMALLOC_PURGE_DELAY", "123")
            .status()
            .unwrap();
        assert!(status.success(), "the child saw another value for option 15");
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
            assert_eq!(purge_delay(), PURGE_DELAY_DEFAULT);
            assert!(keep_freed_memory());
            assert_eq!(purge_delay(), -1);
        }
    }
}
