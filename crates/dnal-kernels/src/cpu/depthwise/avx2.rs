//! The depthwise convolution in AVX2 (with FMA). The forward, for CPUs without AVX-512: read
//! straight from the plane with each 16-position vector as two 8-lane halves, or over phase
//! planes as flat outputs in 8-lane vectors. The weight gradient's kernels and the stride-2
//! column split and merge, which AVX-512 CPUs run as well.
use super::RUN;
use crate::cpu::Clamp;
use crate::direct::Taps;
use crate::lane_masks::{HALF as LANES, half_mask};
use std::arch::x86_64::*;

/// [`super::avx512::forward_same`] in half vectors: a half whose lanes a tap leaves wholly
/// outside the plane is skipped, one wholly inside takes a plain load, and the others a
/// masked load. Four vectors (eight sums) at a time, then one.
///
/// # Safety
/// AVX2 and FMA must be available and `taps` must be those of `x`'s map (`Taps::new`: every
/// lane on in a tap's mask reads inside the plane, and the lanes on in a vector's lane mask
/// are the plane's positions, the first ones of the vector); the sizes are checked.
#[target_feature(enable = "avx2,fma")]
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
/// `N`), the `2N` half sums in registers.
///
/// # Safety
/// As [`forward_same`], whose checks it relies on.
#[target_feature(enable = "avx2,fma")]
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
    let (src, dst) = (x.as_ptr(), out.as_mut_ptr());
    let (scale, shift) = (_mm256_set1_ps(scale), _mm256_set1_ps(shift));
    let (lo, hi) = (_mm256_set1_ps(clamp.lo), _mm256_set1_ps(clamp.hi));
    // max(lo, v) then min(hi, .) return v's NaN (the second operand), as Clamp::apply does.
    let finish =
        |acc: __m256| _mm256_min_ps(hi, _mm256_max_ps(lo, _mm256_fmadd_ps(acc, scale, shift)));
    for v in range.step_by(N) {
        let mut acc = [[_mm256_setzero_ps(); 2]; N];
        for (t, (&offset, &wv)) in taps.offsets.iter().zip(w).enumerate() {
            let wv = _mm256_set1_ps(wv);
            for (r, a) in acc.iter_mut().enumerate() {
                let bits = taps.masks[(v + r) * k + t];
                let at = src.wrapping_add((v + r) * RUN).wrapping_offset(offset);
                for (h, a) in a.iter_mut().enumerate() {
                    let (byte, at) = ((bits >> (8 * h)) as u8, at.wrapping_add(h * LANES));
                    let x = match byte {
                        0 => continue,
                        // SAFETY: every lane of the half reads inside the plane (contract).
                        u8::MAX => unsafe { _mm256_loadu_ps(at) },
                        // SAFETY: the lanes on in the tap's mask read inside the plane.
                        _ => unsafe { _mm256_maskload_ps(at, half_mask(bits, h)) },
                    };
                    *a = _mm256_fmadd_ps(wv, x, *a);
                }
            }
        }
        for (r, a) in acc.into_iter().enumerate() {
            let (start, lanes) = ((v + r) * RUN, taps.lanes[v + r]);
            let y = a.map(finish);
            if lanes == u16::MAX {
                for (h, y) in y.into_iter().enumerate() {
                    // SAFETY: a whole vector of the plane's positions, inside `out` (as long
                    // as the plane).
                    unsafe { _mm256_storeu_ps(dst.add(start + h * LANES), y) };
                }
            } else {
                // A partial last vector: its first lanes, without a masked store.
                let mut values = [0.0f32; RUN];
                for (h, y) in y.into_iter().enumerate() {
                    // SAFETY: `values` holds two halves.
                    unsafe { _mm256_storeu_ps(values.as_mut_ptr().add(h * LANES), y) };
                }
                let width = lanes.trailing_ones() as usize;
                // SAFETY: the first `width` lanes are positions of the plane (contract).
                unsafe { std::ptr::copy_nonoverlapping(values.as_ptr(), dst.add(start), width) };
            }
        }
    }
}

/// Whether [`forward_rows`] computes a stride-1 "same" convolution of a `[h, w]` plane with a
/// `kernel x kernel` filter: rows of whole half vectors, taps reaching less than a half vector
/// sideways.
pub(super) fn takes_rows([h, w]: [usize; 2], kernel: usize) -> bool {
    h > 0 && w > 0 && w.is_multiple_of(LANES) && kernel % 2 == 1 && kernel < 2 * LANES
}

/// One plane of a stride-1 convolution whose output is as large as its input, with what
/// [`forward_rows`] applies after the sums.
pub(super) struct RowPlane<'a> {
    /// The input plane, `hw[0] x hw[1]` values.
    pub x: &'a [f32],
    /// The filter, `kernel x kernel` values.
    pub w: &'a [f32],
    /// The affine transform's scale and shift.
    pub affine: (f32, f32),
    pub clamp: Clamp,
    /// `[h, w]`, each row a whole number of half vectors ([`takes_rows`]).
    pub hw: [usize; 2],
    /// Odd; the padding is `(kernel - 1) / 2`.
    pub kernel: usize,
}

/// One plane of a stride-1 convolution whose output is as large as its input, row by row,
/// for planes whose rows are whole half vectors ([`takes_rows`]): a half vector reads a tap's
/// input row shifted by the tap's column offset, plainly unless it is a row's first (left
/// taps) or last (right taps) half, whose lanes past the row's end are masked off; taps whose
/// input row is outside the plane are skipped. So the only choices are per tap and row, not
/// per lane group as in [`forward_same`]. Each step sums 8 half vectors: `8 / J` rows of `J`
/// halves.
#[target_feature(enable = "avx2,fma")]
pub(super) fn forward_rows(plane: &RowPlane, out: &mut [f32]) {
    let ([h, wd], kernel) = (plane.hw, plane.kernel);
    assert!(takes_rows([h, wd], kernel), "rows of whole half vectors");
    assert!(plane.x.len() == h * wd && out.len() == h * wd && plane.w.len() == kernel * kernel);
    let halves = wd / LANES;
    // The widest step of 8 half vectors whose rows' halves divide the row evenly.
    match [8, 4, 2, 1].into_iter().find(|j| halves.is_multiple_of(*j)) {
        Some(8) => row_steps::<1, 8>(plane, out),
        Some(4) => row_steps::<2, 4>(plane, out),
        Some(2) => row_steps::<4, 2>(plane, out),
        _ => row_steps::<8, 1>(plane, out),
    }
}

/// [`forward_rows`] in steps of `R` rows (then single rows) by `J` halves.
#[target_feature(enable = "avx2,fma")]
fn row_steps<const R: usize, const J: usize>(plane: &RowPlane, out: &mut [f32]) {
    let [h, wd] = plane.hw;
    let whole = h / R * R;
    for j0 in (0..wd / LANES).step_by(J) {
        for y0 in (0..whole).step_by(R) {
            row_step::<R, J>(plane, out, [y0, j0]);
        }
        for y0 in whole..h {
            row_step::<1, J>(plane, out, [y0, j0]);
        }
    }
}

/// Output rows `y0..y0 + R`, halves `j0..j0 + J` of each: every tap's contribution in tap
/// order, then the affine transform and the clamp.
#[target_feature(enable = "avx2,fma")]
#[inline]
fn row_step<const R: usize, const J: usize>(
    plane: &RowPlane,
    out: &mut [f32],
    [y0, j0]: [usize; 2],
) {
    let &RowPlane {
        x,
        w,
        affine: (scale, shift),
        clamp,
        hw: [h, wd],
        kernel,
    } = plane;
    let (p, halves) = (kernel / 2, wd / LANES);
    assert!(y0 + R <= h && j0 + J <= halves);
    let (first, last) = (j0 == 0, j0 + J == halves);
    let src = x.as_ptr();
    let mut acc = [[_mm256_setzero_ps(); J]; R];
    for ky in 0..kernel {
        for kx in 0..kernel {
            let wv = _mm256_set1_ps(w[ky * kernel + kx]);
            let d = kx as isize - p as isize;
            // The half whose lanes reach past the row's end, and the mask of its lanes that
            // do not (d < LANES: `takes_rows`).
            let edge = if d < 0 && first {
                Some((0, half_mask(0xff << -d, 0)))
            } else if d > 0 && last {
                Some((J - 1, half_mask(0xff >> d, 0)))
            } else {
                None
            };
            for (r, acc) in acc.iter_mut().enumerate() {
                let Some(iy) = (y0 + r + ky).checked_sub(p).filter(|&iy| iy < h) else {
                    continue;
                };
                let row = src.wrapping_add(iy * wd + j0 * LANES).wrapping_offset(d);
                for (j, a) in acc.iter_mut().enumerate() {
                    let at = row.wrapping_add(j * LANES);
                    // SAFETY: row `iy` is inside the plane; the lanes of half `j0 + j`
                    // shifted by `d` are inside the row, but for the first half's first
                    // `-d` lanes and the last half's last `d`, which the edge mask leaves off.
                    let v = unsafe {
                        match edge {
                            Some((e, mask)) if e == j => _mm256_maskload_ps(at, mask),
                            _ => _mm256_loadu_ps(at),
                        }
                    };
                    *a = _mm256_fmadd_ps(wv, v, *a);
                }
            }
        }
    }
    let (scale, shift) = (_mm256_set1_ps(scale), _mm256_set1_ps(shift));
    let (lo, hi) = (_mm256_set1_ps(clamp.lo), _mm256_set1_ps(clamp.hi));
    for (r, acc) in acc.iter().enumerate() {
        let start = (y0 + r) * wd + j0 * LANES;
        let dst = &mut out[start..start + J * LANES];
        for (j, a) in acc.iter().enumerate() {
            // max(lo, v) then min(hi, .) return v's NaN (the second operand), as
            // Clamp::apply does.
            let y = _mm256_min_ps(hi, _mm256_max_ps(lo, _mm256_fmadd_ps(*a, scale, shift)));
            // SAFETY: `dst` holds J halves.
            unsafe { _mm256_storeu_ps(dst.as_mut_ptr().add(j * LANES), y) };
        }
    }
}

/// Adds one plane's weight gradient to `dw` (`kernel x kernel` values) for a stride-1
/// convolution whose output `dy` is as large as its `[h, w]` input `x` ([`takes_rows`], a
/// kernel of 3, 5 or 7): for each filter row, a pass over the output rows sums, per tap of
/// the row, the products of each 8-lane half of an output-gradient row with the input row's
/// half shifted by the tap, masked at the row's ends as in [`forward_rows`] (one load of the
/// output gradient serves the row's `kernel` taps). Each tap's 8 partial sums are added up
/// in lane order at the end.
#[target_feature(enable = "avx2,fma")]
pub(super) fn weight_grad_rows(
    x: &[f32],
    dy: &[f32],
    hw: [usize; 2],
    kernel: usize,
    dw: &mut [f32],
) {
    match kernel {
        3 => weight_grad_rows_k::<3>(x, dy, hw, dw),
        5 => weight_grad_rows_k::<5>(x, dy, hw, dw),
        7 => weight_grad_rows_k::<7>(x, dy, hw, dw),
        _ => panic!("weight_grad_rows takes kernels of 3, 5 and 7, not {kernel}"),
    }
}

/// [`weight_grad_rows`] for a `K x K` kernel, `K` sums in registers.
#[target_feature(enable = "avx2,fma")]
fn weight_grad_rows_k<const K: usize>(x: &[f32], dy: &[f32], [h, wd]: [usize; 2], dw: &mut [f32]) {
    assert!(takes_rows([h, wd], K), "rows of whole half vectors");
    assert!(x.len() == h * wd && dy.len() == x.len() && dw.len() == K * K);
    let (p, halves) = (K / 2, wd / LANES);
    let (src, grad) = (x.as_ptr(), dy.as_ptr());
    for ky in 0..K {
        let mut acc = [_mm256_setzero_ps(); K];
        for oy in 0..h {
            let Some(iy) = (oy + ky).checked_sub(p).filter(|&iy| iy < h) else {
                continue;
            };
            for j in 0..halves {
                // SAFETY: half `j` of row `oy` is inside `dy`.
                let d = unsafe { _mm256_loadu_ps(grad.add(oy * wd + j * LANES)) };
                let at = src.wrapping_add(iy * wd + j * LANES);
                for (kx, a) in acc.iter_mut().enumerate() {
                    let shift = kx as isize - p as isize;
                    let at = at.wrapping_offset(shift);
                    // SAFETY: row `iy` is inside the plane, and so are the lanes of half `j`
                    // shifted by `shift`, but for the first half's first `-shift` lanes and
                    // the last half's last `shift`, which the masks leave off (reading zero).
                    let v = unsafe {
                        if shift < 0 && j == 0 {
                            _mm256_maskload_ps(at, half_mask(0xff << -shift, 0))
                        } else if shift > 0 && j == halves - 1 {
                            _mm256_maskload_ps(at, half_mask(0xff >> shift, 0))
                        } else {
                            _mm256_loadu_ps(at)
                        }
                    };
                    *a = _mm256_fmadd_ps(d, v, *a);
                }
            }
        }
        for (kx, a) in acc.iter().enumerate() {
            let mut lanes = [0.0f32; LANES];
            // SAFETY: `lanes` holds one vector.
            unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), *a) };
            dw[ky * K + kx] += lanes.iter().sum::<f32>();
        }
    }
}

/// Partial sums kept per tap by [`tap_dots`]: four 8-lane vectors.
pub(super) const TAP_SUMS: usize = 4 * LANES;

/// Adds to each tap's partial sums (`sums[t]`, lane by lane) the products of `grad`'s values
/// with the run of `planes` from tap `taps[t]`: four vectors at a time (four independent sums),
/// then one. `grad` holds whole runs of [`RUN`] values.
#[target_feature(enable = "avx2,fma")]
pub(super) fn tap_dots(planes: &[f32], grad: &[f32], taps: &[usize], sums: &mut [[f32; TAP_SUMS]]) {
    let flat = grad.len();
    let last_tap = taps.iter().copied().max().unwrap_or(0);
    assert!(
        flat.is_multiple_of(RUN) && last_tap + flat <= planes.len() && sums.len() == taps.len()
    );
    let (src, g) = (planes.as_ptr(), grad.as_ptr());
    for (&t, sum) in taps.iter().zip(sums.iter_mut()) {
        // SAFETY: `sum` holds four vectors.
        let mut acc: [__m256; 4] =
            std::array::from_fn(|r| unsafe { _mm256_loadu_ps(sum.as_ptr().add(r * LANES)) });
        let mut o = 0;
        while o + 4 * LANES <= flat {
            for (r, a) in acc.iter_mut().enumerate() {
                // SAFETY: o + (r + 1) * LANES <= flat, and t + flat <= planes.len().
                let (d, x) = unsafe {
                    (
                        _mm256_loadu_ps(g.add(o + r * LANES)),
                        _mm256_loadu_ps(src.add(t + o + r * LANES)),
                    )
                };
                *a = _mm256_fmadd_ps(d, x, *a);
            }
            o += 4 * LANES;
        }
        while o < flat {
            // SAFETY: as above, for one vector (`flat` is a whole number of vectors).
            let (d, x) = unsafe { (_mm256_loadu_ps(g.add(o)), _mm256_loadu_ps(src.add(t + o))) };
            acc[0] = _mm256_fmadd_ps(d, x, acc[0]);
            o += LANES;
        }
        for (r, a) in acc.iter().enumerate() {
            // SAFETY: `sum` holds four vectors.
            unsafe { _mm256_storeu_ps(sum.as_mut_ptr().add(r * LANES), *a) };
        }
    }
}

/// [`super::fill_phases`] at stride 2 for a whole plane `x`: each row's even and odd columns
/// (16 inputs at a time: two shuffles and two cross-lane permutes, the last few one by one)
/// go where `rows` says, in one call.
///
/// # Safety
/// AVX2 must be available and `rows` must have been made for `planes`
/// ([`super::Stride2Rows::new`] checks the runs against its length); `x` is checked.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn fill_stride2(x: &[f32], rows: &super::Stride2Rows, planes: &mut [f32]) {
    let [h, w] = rows.hw;
    assert!(x.len() == h * w);
    // Within each 128-bit lane the shuffles leave pairs in the order 0 2 1 3 (of 64 bits).
    let order =
        |v: __m256| _mm256_castpd_ps(_mm256_permute4x64_pd::<0b11_01_10_00>(_mm256_castps_pd(v)));
    let whole = w / (2 * LANES);
    let (src, dst) = (x.as_ptr(), planes.as_mut_ptr());
    for iy in 0..h {
        let [even, odd] = rows.starts(iy);
        let row = src.wrapping_add(iy * w);
        for j in 0..whole {
            // SAFETY: 16 values from 16j are inside row `iy`; 8 from 8j inside its even and
            // odd runs, inside `planes` (contract).
            unsafe {
                let at = row.add(2 * LANES * j);
                let (lo, hi) = (_mm256_loadu_ps(at), _mm256_loadu_ps(at.add(LANES)));
                let e = order(_mm256_shuffle_ps::<0b10_00_10_00>(lo, hi));
                let o = order(_mm256_shuffle_ps::<0b11_01_11_01>(lo, hi));
                _mm256_storeu_ps(dst.add(even + LANES * j), e);
                _mm256_storeu_ps(dst.add(odd + LANES * j), o);
            }
        }
        for i in 2 * LANES * whole..w {
            let to = if i % 2 == 0 { even } else { odd } + i / 2;
            // SAFETY: input `i` is inside row `iy`, and `i / 2` inside its run (contract).
            unsafe { *dst.add(to) = *row.add(i) };
        }
    }
}

/// The inverse of [`fill_stride2`]: each row of the plane `x` interleaved from its even and
/// odd runs in the phase planes where `rows` says (`x[2j] = even[j]`, `x[2j + 1] = odd[j]`),
/// 16 values at a time (two unpacks and two cross-lane permutes), the last few one by one.
///
/// # Safety
/// AVX2 must be available and `rows` must have been made for `planes`
/// ([`super::Stride2Rows::new`] checks the runs against its length); `x` is checked.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn merge_stride2(planes: &[f32], rows: &super::Stride2Rows, x: &mut [f32]) {
    let [h, w] = rows.hw;
    assert!(x.len() == h * w);
    let whole = w / (2 * LANES);
    let (src, dst) = (planes.as_ptr(), x.as_mut_ptr());
    for iy in 0..h {
        let [even, odd] = rows.starts(iy);
        let row = dst.wrapping_add(iy * w);
        for j in 0..whole {
            // SAFETY: 8 values from 8j are inside row `iy`'s even and odd runs, inside
            // `planes` (contract); 16 from 16j inside row `iy` of `x`.
            unsafe {
                let e = _mm256_loadu_ps(src.add(even + LANES * j));
                let o = _mm256_loadu_ps(src.add(odd + LANES * j));
                // Pairs 0-1 and 4-5, then 2-3 and 6-7, of each 128-bit lane.
                let (lo, hi) = (_mm256_unpacklo_ps(e, o), _mm256_unpackhi_ps(e, o));
                let at = row.add(2 * LANES * j);
                _mm256_storeu_ps(at, _mm256_permute2f128_ps::<0x20>(lo, hi));
                _mm256_storeu_ps(at.add(LANES), _mm256_permute2f128_ps::<0x31>(lo, hi));
            }
        }
        for i in 2 * LANES * whole..w {
            let from = if i % 2 == 0 { even } else { odd } + i / 2;
            // SAFETY: `i / 2` is inside the row's run (contract), `i` inside row `iy`.
            unsafe { *row.add(i) = *src.add(from) };
        }
    }
}

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
