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

/// The environment variable that says how this CPU executes AVX2's 256-bit instructions,
/// overriding what [`avx2_halved`] detects: `128` (as two 128-bit halves) or `256` (whole).
/// The tests set each in turn, so that every machine runs the direct convolution under both
/// routings.
pub const AVX2_WIDTH_VAR: &str = "DNAL_AVX2_WIDTH";

/// Whether this CPU executes each 256-bit AVX2 instruction as two 128-bit halves, at half the
/// multiply-add rate per instruction of CPUs with 256-bit units: AMD's Zen and Zen+ cores
/// (family 17h, models below 30h; Zen 2 has 256-bit units) and Hygon's Dhyana (family 18h),
/// built on Zen. [`AVX2_WIDTH_VAR`] overrides the detection. On such a CPU the direct
/// convolution's masked AVX2 kernel runs at about half the speed of `gemm`, so 3x3
/// convolutions take a padded-rows kernel instead, and the masked one only short 1x1
/// patches (`direct::takes_forward`).
pub fn avx2_halved() -> bool {
    static HALVED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HALVED.get_or_init(|| match std::env::var(AVX2_WIDTH_VAR).as_deref() {
        Ok("128") => true,
        Ok("256") => false,
        Err(_) => detect_avx2_halved(),
        Ok(other) => {
            eprintln!(
                "dnal: {AVX2_WIDTH_VAR}={other:?} is not a width; set 128 or 256 \
                 (using what this CPU reports)"
            );
            detect_avx2_halved()
        }
    })
}

#[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
fn detect_avx2_halved() -> bool {
    let cpuid = raw_cpuid::CpuId::new();
    let (Some(vendor), Some(features)) = (cpuid.get_vendor_info(), cpuid.get_feature_info()) else {
        return false;
    };
    halves_avx2(vendor.as_str(), features.family_id(), features.model_id())
}

#[cfg(not(any(target_arch = "x86", target_arch = "x86_64")))]
fn detect_avx2_halved() -> bool {
    false
}

/// Whether the CPU with this CPUID vendor string, family and model (extended ones included)
/// executes AVX2 in 128-bit halves ([`avx2_halved`]). Zen: models 01h, 11h, 20h; Zen+: 08h,
/// 18h; Zen 2 from 31h. AMD's Excavator (family 15h) also has 128-bit units but is left out:
/// the kernels were not measured on it.
#[cfg_attr(
    not(any(target_arch = "x86", target_arch = "x86_64")),
    allow(dead_code)
)]
fn halves_avx2(vendor: &str, family: u8, model: u8) -> bool {
    match (vendor, family) {
        ("AuthenticAMD", 0x17) => model < 0x30,
        ("HygonGenuine", 0x18) => true,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::halves_avx2;

    #[test]
    fn zen_and_zen_plus_halve_avx2_and_later_cores_do_not() {
        // EPYC 7601 (Zen), Ryzen 7 2700X (Zen+), Raven Ridge (Zen), Hygon C86 7185.
        for (vendor, family, model) in [
            ("AuthenticAMD", 0x17, 0x01),
            ("AuthenticAMD", 0x17, 0x08),
            ("AuthenticAMD", 0x17, 0x11),
            ("HygonGenuine", 0x18, 0x00),
        ] {
            assert!(
                halves_avx2(vendor, family, model),
                "{vendor} {family:x}h {model:x}h"
            );
        }
        // EPYC 7742 (Zen 2), Ryzen 4000 (Zen 2), EPYC 7763 (Zen 3), Zen 4, Skylake-SP,
        // Haswell, Excavator (not measured).
        for (vendor, family, model) in [
            ("AuthenticAMD", 0x17, 0x31),
            ("AuthenticAMD", 0x17, 0x60),
            ("AuthenticAMD", 0x19, 0x01),
            ("AuthenticAMD", 0x19, 0x11),
            ("GenuineIntel", 0x06, 0x55),
            ("GenuineIntel", 0x06, 0x3c),
            ("AuthenticAMD", 0x15, 0x60),
        ] {
            assert!(
                !halves_avx2(vendor, family, model),
                "{vendor} {family:x}h {model:x}h"
            );
        }
    }
}
