//! The depthwise forward in AVX-512: 16-lane vectors, lane masks in mask registers, and a
//! permute that splits a row into its even and odd columns.
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

/// Splits `row` into its even-indexed values (`even`) and odd-indexed ones (`odd`), 32
/// inputs at a time.
///
/// # Safety
/// AVX-512F must be available; the sizes are checked.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn split_columns(row: &[f32], even: &mut [f32], odd: &mut [f32]) {
    let w = row.len();
    assert!(even.len() == w.div_ceil(2) && odd.len() == w / 2);
    let pick = |first: i32| {
        _mm512_setr_epi32(
            first,
            first + 2,
            first + 4,
            first + 6,
            first + 8,
            first + 10,
            first + 12,
            first + 14,
            first + 16,
            first + 18,
            first + 20,
            first + 22,
            first + 24,
            first + 26,
            first + 28,
            first + 30,
        )
    };
    let (evens, odds) = (pick(0), pick(1));
    let first_lanes = |n: usize| ((1u32 << n.min(16)) - 1) as u16;
    for j in (0..even.len()).step_by(16) {
        let left = w - 2 * j;
        // SAFETY: the lanes on are among the `left` values of `row` from 2j.
        let (lo, hi) = unsafe {
            let src = row.as_ptr().add(2 * j);
            (
                _mm512_maskz_loadu_ps(first_lanes(left), src),
                _mm512_maskz_loadu_ps(first_lanes(left.saturating_sub(16)), src.add(16)),
            )
        };
        let (ne, no) = (
            (even.len() - j).min(16),
            odd.len().saturating_sub(j).min(16),
        );
        // SAFETY: `ne` values from j are inside `even`, `no` inside `odd`.
        unsafe {
            let e = _mm512_permutex2var_ps(lo, evens, hi);
            _mm512_mask_storeu_ps(even.as_mut_ptr().add(j), first_lanes(ne), e);
            let o = _mm512_permutex2var_ps(lo, odds, hi);
            _mm512_mask_storeu_ps(odd.as_mut_ptr().add(j), first_lanes(no), o);
        }
    }
}

/// [`super::fill_phases`] at stride 2 for a whole `[h, w]` plane `x` with padding `p`: each
/// row's even and odd columns go to their phase planes (`len` values apart, rows `pitch`
/// apart) as [`split_columns`] splits them, in one call with the offsets computed per row
/// rather than through slices.
///
/// # Safety
/// AVX-512F must be available; the sizes are checked (every row's two runs inside `planes`).
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn fill_stride2(
    x: &[f32],
    [h, w]: [usize; 2],
    p: usize,
    [len, pitch]: [usize; 2],
    planes: &mut [f32],
) {
    assert!(x.len() == h * w && w >= 2);
    let (ne, no) = (w.div_ceil(2), w / 2);
    // Row `iy`'s even inputs go to phase column `p % 2` at column `p / 2`, its odd ones to
    // `(p + 1) % 2` at `(p + 1) / 2`, in phase row `(iy + p) % 2`, row `(iy + p) / 2`.
    let at = |iy: usize, b: usize, column: usize| {
        let py = iy + p;
        ((py % 2) * 2 + b) * len + (py / 2) * pitch + column
    };
    let runs = |iy: usize| {
        [
            (at(iy, p % 2, p / 2), ne),
            (at(iy, (p + 1) % 2, p.div_ceil(2)), no),
        ]
    };
    // Rows of one phase row lie further into their planes the later they come, so the last
    // row of each phase row (the plane's last two) reaches furthest.
    for iy in h.saturating_sub(2)..h {
        for (start, n) in runs(iy) {
            assert!(start + n <= planes.len(), "phase planes too short");
        }
    }
    let pick = |first: i32| {
        _mm512_setr_epi32(
            first,
            first + 2,
            first + 4,
            first + 6,
            first + 8,
            first + 10,
            first + 12,
            first + 14,
            first + 16,
            first + 18,
            first + 20,
            first + 22,
            first + 24,
            first + 26,
            first + 28,
            first + 30,
        )
    };
    let (evens, odds) = (pick(0), pick(1));
    let first_lanes = |n: usize| ((1u32 << n.min(16)) - 1) as u16;
    let (src, dst) = (x.as_ptr(), planes.as_mut_ptr());
    for iy in 0..h {
        let [(even, _), (odd, _)] = runs(iy);
        for j in (0..ne).step_by(16) {
            let left = w - 2 * j;
            let (le, lo) = (first_lanes(ne - j), first_lanes(no.saturating_sub(j)));
            // SAFETY: the lanes loaded are among the `left` values of row `iy` from 2j; the
            // lanes stored are among the row's `ne` (`no`) values of its even (odd) run, inside
            // `planes` as checked above.
            unsafe {
                let row = src.add(iy * w + 2 * j);
                let a = _mm512_maskz_loadu_ps(first_lanes(left), row);
                let b = _mm512_maskz_loadu_ps(first_lanes(left.saturating_sub(16)), row.add(16));
                _mm512_mask_storeu_ps(dst.add(even + j), le, _mm512_permutex2var_ps(a, evens, b));
                _mm512_mask_storeu_ps(dst.add(odd + j), lo, _mm512_permutex2var_ps(a, odds, b));
            }
        }
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
