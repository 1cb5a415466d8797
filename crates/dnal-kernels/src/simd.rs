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

/// The instruction sets dnal's hand-written x86-64 kernels (the direct convolution, depthwise
/// convolution and max-pool) come in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// AVX2 with FMA: 8-lane vectors in 16 registers, lane masks as vectors.
    Avx2,
    /// AVX-512F: 16-lane vectors in 32 registers, lane masks in mask registers.
    Avx512,
}

static AVX512_ALLOWED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Lets the hand-written kernels use AVX-512 where the CPU has it (the default), or keeps them
/// to AVX2 (the benchmarks compare both on an AVX-512 machine).
pub fn set_avx512(on: bool) {
    AVX512_ALLOWED.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// The environment variable that caps the hand-written kernels' instruction set for the
/// whole process: `avx512` (the default: the widest the CPU has), `avx2`, or `none` (plain
/// code everywhere, as on a CPU without AVX2). The tests run the kernels under each.
pub const ISA_VAR: &str = "DNAL_ISA";

/// The widest instruction set of the hand-written kernels that this CPU runs, [`ISA_VAR`] and
/// [`set_avx512`] allow; `None` on CPUs without AVX2 and FMA (and off x86-64), where plain
/// code runs instead.
pub fn isa() -> Option<Isa> {
    static CAP: std::sync::OnceLock<Option<Isa>> = std::sync::OnceLock::new();
    let cap = *CAP.get_or_init(|| match std::env::var(ISA_VAR).as_deref() {
        Err(_) | Ok("avx512") => Some(Isa::Avx512),
        Ok("avx2") => Some(Isa::Avx2),
        Ok("none") => None,
        Ok(other) => {
            eprintln!(
                "dnal: {ISA_VAR}={other:?} is not an instruction set; \
                 set avx512, avx2 or none (using the widest this CPU has)"
            );
            Some(Isa::Avx512)
        }
    });
    let allowed = |isa: Isa| {
        runs(isa)
            && cap.is_some_and(|cap| isa == Isa::Avx2 || cap == Isa::Avx512)
            && (isa == Isa::Avx2 || AVX512_ALLOWED.load(std::sync::atomic::Ordering::Relaxed))
    };
    [Isa::Avx512, Isa::Avx2]
        .into_iter()
        .find(|&isa| allowed(isa))
}

/// Whether this CPU runs `isa`'s kernels, whatever [`ISA_VAR`] and [`set_avx512`] say.
pub(crate) fn runs(isa: Isa) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static DETECTED: std::sync::OnceLock<(bool, bool)> = std::sync::OnceLock::new();
        let (avx2, avx512) = *DETECTED.get_or_init(|| {
            let avx2 = std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma");
            (avx2, avx2 && std::arch::is_x86_feature_detected!("avx512f"))
        });
        match isa {
            Isa::Avx2 => avx2,
            Isa::Avx512 => avx512,
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = isa;
        false
    }
}
