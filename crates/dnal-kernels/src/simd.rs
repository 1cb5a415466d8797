//! Run-time dispatch to the widest vector instructions this CPU has.

/// `$body` compiled for the widest vector instructions this CPU has (AVX-512 or AVX2, chosen at
/// run time; plain Rust code is otherwise built for the x86-64 baseline, SSE2), so that the
/// loops in it vectorize. The body sits in a closure that pulp's target-feature function
/// inlines; closures it calls must be `#[inline(always)]` too, or they stay baseline code.
///
/// The closure takes a [`Once`] by value, so that it implements `FnOnce` only: a closure that
/// also implements `Fn` is called through a `call_once` shim that is not `#[inline(always)]`,
/// which LLVM leaves out of line when the body is large, and the body then runs as baseline
/// code (the conv epilogue and the max-pool did, until this).
macro_rules! widest_simd {
    ($body:expr) => {{
        let once = $crate::simd::Once;
        pulp::Arch::new().dispatch(
            #[inline(always)]
            || {
                let _once = once;
                $body
            },
        )
    }};
}
pub(crate) use widest_simd;

/// A value that is not `Copy`, moved into `widest_simd!`'s closure.
pub(crate) struct Once;
