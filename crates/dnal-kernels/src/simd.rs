//! Run-time dispatch to the widest vector instructions this CPU has.

/// `$body` compiled for the widest vector instructions this CPU has (AVX-512 or AVX2, chosen at
/// run time; plain Rust code is otherwise built for the x86-64 baseline, SSE2), so that the
/// loops in it vectorize. The body sits in a closure that pulp's target-feature function
/// inlines; closures it calls must be `#[inline(always)]` too, or they stay baseline code.
macro_rules! widest_simd {
    ($body:expr) => {
        pulp::Arch::new().dispatch(
            #[inline(always)]
            || $body,
        )
    };
}
pub(crate) use widest_simd;
