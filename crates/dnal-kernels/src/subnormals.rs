//! Subnormal floats flushed to zero on the CPU (x86-64's FTZ and DAZ flags).
//!
//! In the architecture stage a gate `sigmoid(beta * alpha)` passes through values between
//! 1e-45 and 1e-38 as `beta` rises (`beta * alpha` between -103 and -87), and every value of
//! its channel downstream becomes subnormal; x86 CPUs then take a microcode assist on each
//! operation that reads or writes one, tens to hundreds of cycles instead of one. A value
//! that small contributes nothing that f32 sums of the network's sizes can keep, so the
//! trainer flushes them: results change only where a subnormal would have been (on the
//! MNIST demo, none of its figures or saved weights changed, and its architecture stage took
//! 24 s instead of 38).
#![allow(unsafe_code)]

/// MXCSR's flush-to-zero (results) and denormals-are-zero (operands) bits.
#[cfg(target_arch = "x86_64")]
const FTZ_DAZ: u32 = 0x8040;

/// Flushes subnormal results and operands to zero on the calling thread only (a thread a
/// program starts itself; [`flush_subnormals`] covers rayon's). No effect off x86-64.
pub fn flush_this_thread() {
    #[cfg(target_arch = "x86_64")]
    {
        let csr = mxcsr() | FTZ_DAZ;
        // SAFETY: `ldmxcsr` loads MXCSR from `csr`, the register as it was with the two flag
        // bits set (both defined on every x86-64 CPU); it reads nothing else.
        unsafe { std::arch::asm!("ldmxcsr [{}]", in(reg) &csr, options(nostack, readonly)) };
    }
}

/// Whether the calling thread flushes subnormals (always false off x86-64).
pub fn flushed_here() -> bool {
    #[cfg(target_arch = "x86_64")]
    return mxcsr() & FTZ_DAZ == FTZ_DAZ;
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// The calling thread's MXCSR register.
#[cfg(target_arch = "x86_64")]
fn mxcsr() -> u32 {
    let mut csr: u32 = 0;
    // SAFETY: `stmxcsr` stores the 32-bit MXCSR register into `csr` and touches nothing else.
    unsafe { std::arch::asm!("stmxcsr [{}]", in(reg) &mut csr, options(nostack)) };
    csr
}

/// Flushes subnormal results and operands to zero on the calling thread and on every thread
/// of the current rayon pool (the global one outside a pool), where the CPU kernels and flex
/// run. A binary's choice, like the allocator: the trainer and the benchmarks call it first
/// thing in `main`; a program embedding dnal decides for itself. No effect off x86-64.
pub fn flush_subnormals() {
    flush_this_thread();
    rayon::broadcast(|_| flush_this_thread());
}
