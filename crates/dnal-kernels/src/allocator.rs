//! The memory allocator for dnal's binaries (feature `mimalloc`).
//!
//! A training step allocates and frees hundreds of megabytes of activations and gradients. An
//! allocator that hands freed memory back to the operating system makes every step fault it
//! in again, page by page, zeroed by the kernel: with glibc's malloc or mimalloc's defaults
//! that is 10-15 % of a ResNet-56 step on flex. A binary avoids it with
//!
//! ```ignore
//! dnal_kernels::global_allocator!();
//!
//! fn main() {
//!     dnal_kernels::allocator::keep_freed_memory();
//!     // ...
//! }
//! ```
//!
//! A library never picks the global allocator; that is the binary's choice, so the macro is
//! invoked only in binaries (the trainer, the benchmarks and their examples).
#![allow(unsafe_code)]

pub use mimalloc::MiMalloc;

/// mimalloc's `mi_option_purge_delay` (position 15 of `mi_option_e` in mimalloc 2 and 3).
const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Tells mimalloc never to return freed memory to the operating system, so that the next
/// step reuses it without page faults. Has an effect only where [`MiMalloc`] is the global
/// allocator; call it first thing in `main`.
pub fn keep_freed_memory() {
    // SAFETY: `mi_option_set` only stores an option value; -1 ("never purge") is a documented
    // value of `mi_option_purge_delay`.
    unsafe { libmimalloc_sys::mi_option_set(PURGE_DELAY, -1) }
}

/// Makes [`MiMalloc`] the global allocator of the binary that invokes it (at the crate's top
/// level; never in a library).
#[macro_export]
macro_rules! global_allocator {
    () => {
        #[global_allocator]
        static GLOBAL: $crate::allocator::MiMalloc = $crate::allocator::MiMalloc;
    };
}
