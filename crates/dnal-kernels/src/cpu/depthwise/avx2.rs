//! The depthwise forward over phase planes in AVX2 (with FMA), for CPUs without AVX-512: the
//! flat outputs in 8-lane vectors.
use crate::cpu::Clamp;
use std::arch::x86_64::*;

/// Lanes per AVX2 vector.
const LANES: usize = 8;

/// [`super::forward_flat`]: the flat outputs (whole runs of [`super::RUN`]) eight vectors at a
/// time (eight independent sums of the taps), then one run (two vectors) at a time.
#[target_feature(enable = "avx2,fma")]
pub(super) fn forward_flat(
    planes: &[f32],
    w: &[f32],
    (scale, shift): (f32, f32),
    clamp: Clamp,
    taps: &[usize],
    flat: &mut [f32],
) {
    super::check_flat(planes, w, taps, flat);
    let (src, dst) = (planes.as_ptr(), flat.as_mut_ptr());
    let (scale, shift) = (_mm256_set1_ps(scale), _mm256_set1_ps(shift));
    let (lo, hi) = (_mm256_set1_ps(clamp.lo), _mm256_set1_ps(clamp.hi));
    // max(lo, v) then min(hi, .) return v's NaN (the second operand), as Clamp::apply does.
    let finish =
        |acc: __m256| _mm256_min_ps(hi, _mm256_max_ps(lo, _mm256_fmadd_ps(acc, scale, shift)));
    let mut o = 0;
    macro_rules! step {
        ($n:literal) => {
            while o + $n * LANES <= flat.len() {
                let mut acc = [_mm256_setzero_ps(); $n];
                for (&t, &wv) in taps.iter().zip(w) {
                    let wv = _mm256_set1_ps(wv);
                    for (r, a) in acc.iter_mut().enumerate() {
                        // SAFETY: t + o + (r + 1) * LANES <= max(taps) + flat.len() <=
                        // planes.len() (checked above).
                        let x = unsafe { _mm256_loadu_ps(src.add(t + o + r * LANES)) };
                        *a = _mm256_fmadd_ps(wv, x, *a);
                    }
                }
                for (r, a) in acc.into_iter().enumerate() {
                    // SAFETY: o + (r + 1) * LANES <= flat.len().
                    unsafe { _mm256_storeu_ps(dst.add(o + r * LANES), finish(a)) };
                }
                o += $n * LANES;
            }
        };
    }
    step!(8);
    // What is left is a whole number of runs, each two vectors.
    step!(2);
}
