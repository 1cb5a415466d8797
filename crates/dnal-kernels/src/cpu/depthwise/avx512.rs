//! The depthwise forward in AVX-512: 16-lane vectors, lane masks in mask registers.
use super::RUN;
use crate::cpu::Clamp;
use crate::direct::Taps;
use std::arch::x86_64::*;

/// One plane of a stride-1 convolution whose output is as large as its input, read
/// straight from the plane `x`: each vector of 16 output positions sums its taps' shifted
/// inputs in tap order (lanes outside the plane masked off, reading zero), then the affine
/// transform and the clamp, stored on the plane's lanes. Four vectors at a time, then one.
///
/// # Safety
/// AVX-512F must be available and `taps` must be those of `x`'s map (`Taps::new`: every
/// lane on in a tap's mask reads inside the plane, and the lanes on in a vector's store
/// mask are positions of the plane); the sizes are checked.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn forward_same(
    x: &[f32],
    w: &[f32],
    affine: (f32, f32),
    clamp: Clamp,
    taps: &Taps,
    out: &mut [f32],
) {
    let (whole, vectors) = (super::check_same(x, w, taps, out), taps.lanes.len());
    // SAFETY: as checked, for the vectors `0..whole` and `whole..vectors`.
    unsafe {
        same_vectors::<4>(x, w, affine, clamp, taps, out, 0..whole);
        same_vectors::<1>(x, w, affine, clamp, taps, out, whole..vectors);
    }
}

/// [`forward_same`] of the vectors `range`, `N` at a time (`range` holds a multiple of
/// `N`), the `N` sums in registers.
///
/// # Safety
/// As [`forward_same`], whose checks it relies on.
#[target_feature(enable = "avx512f")]
unsafe fn same_vectors<const N: usize>(
    x: &[f32],
    w: &[f32],
    (scale, shift): (f32, f32),
    clamp: Clamp,
    taps: &Taps,
    out: &mut [f32],
    range: std::ops::Range<usize>,
) {
    let k = taps.taps;
    let (src, dst, masks) = (x.as_ptr(), out.as_mut_ptr(), taps.masks.as_ptr());
    let (scale, shift) = (_mm512_set1_ps(scale), _mm512_set1_ps(shift));
    let (lo, hi) = (_mm512_set1_ps(clamp.lo), _mm512_set1_ps(clamp.hi));
    // max(lo, v) then min(hi, .) return v's NaN (the second operand), as Clamp::apply does.
    let finish =
        |acc: __m512| _mm512_min_ps(hi, _mm512_max_ps(lo, _mm512_fmadd_ps(acc, scale, shift)));
    for v in range.step_by(N) {
        let mut acc = [_mm512_setzero_ps(); N];
        for (t, (&offset, &wv)) in taps.offsets.iter().zip(w).enumerate() {
            let wv = _mm512_set1_ps(wv);
            for (r, a) in acc.iter_mut().enumerate() {
                // SAFETY: vector v + r < vectors, so its mask of tap t < k is inside
                // `taps.masks`, and the lanes on in it read inside the plane.
                let x = unsafe {
                    let mask = *masks.add((v + r) * k + t);
                    let at = src.wrapping_add((v + r) * RUN).wrapping_offset(offset);
                    _mm512_maskz_loadu_ps(mask, at)
                };
                *a = _mm512_fmadd_ps(wv, x, *a);
            }
        }
        for (r, a) in acc.into_iter().enumerate() {
            // SAFETY: the lanes on are the plane's positions from (v + r) * RUN (contract),
            // inside `out`, which is as long as the plane.
            unsafe { _mm512_mask_storeu_ps(dst.add((v + r) * RUN), taps.lanes[v + r], finish(a)) };
        }
    }
}

/// Adds to `dw` (`K` values) the weight gradient of one channel of a stride-1 convolution whose
/// output is as large as its input, over `n` images: plane `i` of the input and of the output
/// gradient starts at `i * stride` in `x` and `dy`. Read straight from the planes as
/// [`forward_same`] reads them: each vector of 16 output-gradient values, times each tap's
/// shifted input (lanes outside the plane masked off, reading zero), summed per tap in a
/// register across the planes in order, then across the lanes.
///
/// # Safety
/// AVX-512F must be available and `taps` must be those of the planes' map (`Taps::new`: every
/// lane on in a tap's mask reads inside the plane, and the lanes on in a vector's lane mask
/// are positions of the plane); the sizes are checked.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn weight_grad_same<const K: usize>(
    x: &[f32],
    dy: &[f32],
    (n, stride): (usize, usize),
    taps: &Taps,
    dw: &mut [f32],
) {
    let vectors = taps.lanes.len();
    let plane: usize = taps.lanes.iter().map(|m| m.count_ones() as usize).sum();
    assert!(taps.taps == K && taps.offsets.len() == K && taps.masks.len() == vectors * K);
    assert!(dw.len() == K && (n == 0 || (n - 1) * stride + plane <= x.len().min(dy.len())));
    let mut acc = [_mm512_setzero_ps(); K];
    let masks = taps.masks.as_ptr();
    for i in 0..n {
        let (src, grad) = (
            x.as_ptr().wrapping_add(i * stride),
            dy.as_ptr().wrapping_add(i * stride),
        );
        for v in 0..vectors {
            // SAFETY: the lanes on in vector v's lane mask are positions of plane i, inside
            // `dy` (checked above).
            let d = unsafe { _mm512_maskz_loadu_ps(taps.lanes[v], grad.wrapping_add(v * RUN)) };
            for (t, a) in acc.iter_mut().enumerate() {
                // SAFETY: the mask of vector v < vectors and tap t < K is inside `taps.masks`,
                // and the lanes on in it read inside plane i (contract), inside `x`.
                let xv = unsafe {
                    let mask = *masks.add(v * K + t);
                    let at = src.wrapping_add(v * RUN).wrapping_offset(taps.offsets[t]);
                    _mm512_maskz_loadu_ps(mask, at)
                };
                *a = _mm512_fmadd_ps(d, xv, *a);
            }
        }
    }
    for (o, a) in dw.iter_mut().zip(acc) {
        *o += _mm512_reduce_add_ps(a);
    }
}

/// Runs of the flat outputs four at a time (four independent sums of the taps), then one
/// at a time.
#[target_feature(enable = "avx512f")]
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
    let (scale, shift) = (_mm512_set1_ps(scale), _mm512_set1_ps(shift));
    let (lo, hi) = (_mm512_set1_ps(clamp.lo), _mm512_set1_ps(clamp.hi));
    // max(lo, v) then min(hi, .) return v's NaN (the second operand), as Clamp::apply does.
    let finish =
        |acc: __m512| _mm512_min_ps(hi, _mm512_max_ps(lo, _mm512_fmadd_ps(acc, scale, shift)));
    let mut o = 0;
    while o + 4 * RUN <= flat.len() {
        let mut acc = [_mm512_setzero_ps(); 4];
        for (&t, &wv) in taps.iter().zip(w) {
            let wv = _mm512_set1_ps(wv);
            for (r, a) in acc.iter_mut().enumerate() {
                // SAFETY: t + o + (r + 1) * RUN <= max(taps) + flat.len() <= planes.len().
                let x = unsafe { _mm512_loadu_ps(src.add(t + o + r * RUN)) };
                *a = _mm512_fmadd_ps(wv, x, *a);
            }
        }
        for (r, a) in acc.into_iter().enumerate() {
            // SAFETY: o + (r + 1) * RUN <= flat.len().
            unsafe { _mm512_storeu_ps(dst.add(o + r * RUN), finish(a)) };
        }
        o += 4 * RUN;
    }
    while o < flat.len() {
        let mut acc = _mm512_setzero_ps();
        for (&t, &wv) in taps.iter().zip(w) {
            // SAFETY: t + o + RUN <= max(taps) + flat.len() <= planes.len().
            let x = unsafe { _mm512_loadu_ps(src.add(t + o)) };
            acc = _mm512_fmadd_ps(_mm512_set1_ps(wv), x, acc);
        }
        // SAFETY: o + RUN <= flat.len() (a whole number of runs).
        unsafe { _mm512_storeu_ps(dst.add(o), finish(acc)) };
        o += RUN;
    }
}
