//! The 2x2, stride-2 max-pool of a VGG, forward and backward; other max-pool windows and
//! global average pooling for inference.
#![allow(unsafe_code)]

use crate::planes::{SERIAL_BELOW, par_planes_zeroed};
use crate::simd::widest_simd;
use rayon::prelude::*;

/// Planes of a 2x2, stride-2 max-pool processed per parallel task.
const POOL_PLANES: usize = 16;

/// 2x2 max-pool with stride 2 of `planes` maps of `h x w` (an odd last row or column is
/// dropped, as burn's floor mode does): the output `[planes, h / 2, w / 2]` and, for each
/// output, which of its window's four inputs won (`2 * dy + dx`). The first maximum in row
/// order wins, and a NaN wins over any number (the last NaN), as in burn and PyTorch.
pub fn max_pool2x2(x: &[f32], planes: usize, hw: [usize; 2]) -> (Vec<f32>, Vec<u8>) {
    pool(x, planes, hw, true)
}

/// The values of [`max_pool2x2`] alone, for inference.
pub fn max_pool2x2_values(x: &[f32], planes: usize, hw: [usize; 2]) -> Vec<f32> {
    pool(x, planes, hw, false).0
}

/// [`max_pool2x2`], with the winners only if `winners` (else an empty vector).
fn pool(x: &[f32], planes: usize, [h, w]: [usize; 2], winners: bool) -> (Vec<f32>, Vec<u8>) {
    let (oh, ow) = (h / 2, w / 2);
    let (out_plane, in_plane) = (oh * ow, h * w);
    assert_eq!(
        x.len(),
        planes * in_plane,
        "max-pool input of the wrong size"
    );
    let mut y = vec![0.0f32; planes * out_plane];
    let mut at = vec![0u8; if winners { planes * out_plane } else { 0 }];
    if out_plane == 0 {
        return (y, at);
    }
    if y.len() < SERIAL_BELOW {
        pool_planes(x, &mut y, &mut at, [h, w]);
        return (y, at);
    }
    let (ys, xs) = (
        y.par_chunks_mut(POOL_PLANES * out_plane),
        x.par_chunks(POOL_PLANES * in_plane),
    );
    if winners {
        ys.zip(xs)
            .zip(at.par_chunks_mut(POOL_PLANES * out_plane))
            .for_each(|((y, x), at)| pool_planes(x, y, at, [h, w]));
    } else {
        ys.zip(xs)
            .for_each(|(y, x)| pool_planes(x, y, &mut [], [h, w]));
    }
    (y, at)
}

/// [`max_pool2x2`] of consecutive planes, on AVX-512 where the CPU has it; `at` empty: the
/// values alone.
fn pool_planes(x: &[f32], y: &mut [f32], at: &mut [u8], hw: [usize; 2]) {
    #[cfg(target_arch = "x86_64")]
    if crate::simd::isa() == Some(crate::simd::Isa::Avx512) {
        // SAFETY: AVX-512F is available; the function checks the sizes.
        unsafe {
            if at.is_empty() {
                avx512::max_pool2x2_planes::<false>(x, y, at, hw)
            } else {
                avx512::max_pool2x2_planes::<true>(x, y, at, hw)
            }
        };
        return;
    }
    if at.is_empty() {
        let mut winners = vec![0u8; y.len()];
        widest_simd!(max_pool2x2_planes(x, y, &mut winners, hw));
    } else {
        widest_simd!(max_pool2x2_planes(x, y, at, hw));
    }
}

/// [`max_pool2x2`] of consecutive planes, in scalar code the compiler may vectorize.
#[inline(always)]
fn max_pool2x2_planes(x: &[f32], y: &mut [f32], at: &mut [u8], [h, w]: [usize; 2]) {
    let (oh, ow) = (h / 2, w / 2);
    let (out_plane, in_plane) = (oh * ow, h * w);
    for ((y, at), x) in y
        .chunks_exact_mut(out_plane)
        .zip(at.chunks_exact_mut(out_plane))
        .zip(x.chunks_exact(in_plane))
    {
        for oy in 0..oh {
            let (top, bottom) = (&x[2 * oy * w..][..2 * ow], &x[(2 * oy + 1) * w..][..2 * ow]);
            let (y, at) = (&mut y[oy * ow..][..ow], &mut at[oy * ow..][..ow]);
            for (((y, at), t), b) in y
                .iter_mut()
                .zip(at.iter_mut())
                .zip(top.chunks_exact(2))
                .zip(bottom.chunks_exact(2))
            {
                // Selects, not branches, so that the loop vectorizes.
                let wins = |v: f32, m: f32| v > m || v.is_nan();
                let (m, k) = (t[0], 0u8);
                let (m, k) = if wins(t[1], m) { (t[1], 1) } else { (m, k) };
                let (m, k) = if wins(b[0], m) { (b[0], 2) } else { (m, k) };
                let (m, k) = if wins(b[1], m) { (b[1], 3) } else { (m, k) };
                *y = m;
                *at = k;
            }
        }
    }
}

/// Max pooling of `planes` maps of `h x w` with a `kernel x kernel` window, `stride` and
/// zero-free `padding` (padded positions never win), floor mode: `[planes, OH, OW]`. The
/// 2x2, stride-2, unpadded pool goes to [`max_pool2x2_values`]; other windows (a ResNet-50's
/// 3x3 stem pool) are computed here in two passes per output row: the maximum of the
/// window's input rows, along the whole row (one vectorised pass per input row), then of
/// each window's columns in it. A NaN wins, as in burn and PyTorch.
pub fn max_pool_values(
    x: &[f32],
    planes: usize,
    [h, w]: [usize; 2],
    [kernel, stride, padding]: [usize; 3],
) -> Vec<f32> {
    if [kernel, stride, padding] == [2, 2, 0] {
        return max_pool2x2_values(x, planes, [h, w]);
    }
    assert!(
        kernel > 0 && stride > 0,
        "a window and a stride of at least 1"
    );
    let out = |n: usize| (n + 2 * padding).saturating_sub(kernel) / stride + 1;
    let (oh, ow) = (out(h), out(w));
    assert_eq!(x.len(), planes * h * w, "max-pool input of the wrong size");
    if oh * ow == 0 {
        return Vec::new();
    }
    // The input rows or columns `lo..hi` of output `o`'s window.
    let span = |o: usize, n: usize| {
        let first = (o * stride) as isize - padding as isize;
        let lo = first.max(0) as usize;
        let hi = ((first + kernel as isize).max(0) as usize).min(n);
        (lo, hi)
    };
    par_planes_zeroed(planes * oh * ow, oh * ow, move |p, out| {
        let plane = &x[p * h * w..][..h * w];
        let mut rows = vec![f32::NEG_INFINITY; w];
        for (oy, out_row) in out.chunks_exact_mut(ow).enumerate() {
            let (y0, y1) = span(oy, h);
            rows.fill(f32::NEG_INFINITY);
            for row in plane[y0 * w..y1 * w].chunks_exact(w) {
                for (m, &v) in rows.iter_mut().zip(row) {
                    *m = nan_max(*m, v);
                }
            }
            for (ox, o) in out_row.iter_mut().enumerate() {
                let (x0, x1) = span(ox, w);
                *o = rows[x0..x1]
                    .iter()
                    .fold(f32::NEG_INFINITY, |m, &v| nan_max(m, v));
            }
        }
    })
}

/// The larger of `m` and `v`, or whichever is NaN (`m` first).
#[inline(always)]
fn nan_max(m: f32, v: f32) -> f32 {
    if v > m || v.is_nan() { v } else { m }
}

/// The mean of each of `planes` maps of `l` values (global average pooling): `[planes]`,
/// each summed in order.
pub fn global_avg_pool_values(x: &[f32], planes: usize, l: usize) -> Vec<f32> {
    assert_eq!(x.len(), planes * l, "pool input of the wrong size");
    x.chunks(l.max(1))
        .take(planes)
        .map(|plane| plane.iter().sum::<f32>() / l as f32)
        .collect()
}

/// The input gradient of [`max_pool2x2`]: each output's gradient `dy` goes to the input that
/// won its window (`at`), zero elsewhere.
pub fn max_pool2x2_backward(dy: &[f32], at: &[u8], planes: usize, [h, w]: [usize; 2]) -> Vec<f32> {
    let (oh, ow) = (h / 2, w / 2);
    let out_plane = oh * ow;
    // Each plane zeroed while in cache, then every window's gradient sent to its winner (an
    // odd last row or column keeps its zeros).
    par_planes_zeroed(planes * h * w, h * w, move |p, dx| {
        let (dy, at) = (
            &dy[p * out_plane..][..out_plane],
            &at[p * out_plane..][..out_plane],
        );
        for oy in 0..oh {
            let (g, k) = (&dy[oy * ow..][..ow], &at[oy * ow..][..ow]);
            let rows = &mut dx[2 * oy * w..][..2 * w];
            for (ox, (&g, &k)) in g.iter().zip(k).enumerate() {
                rows[usize::from(k >> 1) * w + 2 * ox + usize::from(k & 1)] = g;
            }
        }
    })
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    /// [`super::max_pool2x2`] of consecutive planes, 16 outputs of a row at a time (the
    /// window's four inputs split into even and odd columns by a permute), with the same
    /// rule (the first maximum in row order wins, a NaN wins over any number) as the scalar
    /// code; the winners go to `at` only if `WINNERS`.
    ///
    /// # Safety
    /// AVX-512F must be available (the sizes are checked).
    #[target_feature(enable = "avx512f")]
    pub unsafe fn max_pool2x2_planes<const WINNERS: bool>(
        x: &[f32],
        y: &mut [f32],
        at: &mut [u8],
        [h, w]: [usize; 2],
    ) {
        let (oh, ow) = (h / 2, w / 2);
        let (out_plane, in_plane) = (oh * ow, h * w);
        let planes = y.len() / out_plane;
        assert!(y.len() == planes * out_plane && x.len() == planes * in_plane);
        assert!(!WINNERS || at.len() == y.len());
        let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
        let odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
        // `v` wins over `m`: larger, or NaN.
        let wins = |v: __m512, m: __m512| {
            _mm512_cmp_ps_mask::<_CMP_GT_OQ>(v, m) | _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v)
        };
        let first_lanes = |n: usize| ((1u32 << n.min(16)) - 1) as u16;
        for p in 0..planes {
            for oy in 0..oh {
                let top = x[p * in_plane + 2 * oy * w..][..2 * ow].as_ptr();
                let bottom = x[p * in_plane + (2 * oy + 1) * w..][..2 * ow].as_ptr();
                let out = p * out_plane + oy * ow;
                for ox in (0..ow).step_by(16) {
                    let n = (ow - ox).min(16);
                    // The 2n inputs of a row: the first 16 and the rest.
                    let (lo, hi) = (first_lanes(2 * n), first_lanes((2 * n).saturating_sub(16)));
                    // SAFETY: the lanes on are among the 2 * ow inputs of the rows.
                    let [t, b] = [top, bottom].map(|row| unsafe {
                        let row = row.add(2 * ox);
                        let (a, z) = (
                            _mm512_maskz_loadu_ps(lo, row),
                            _mm512_maskz_loadu_ps(hi, row.add(16)),
                        );
                        (
                            _mm512_permutex2var_ps(a, even, z),
                            _mm512_permutex2var_ps(a, odd, z),
                        )
                    });
                    let (mut m, mut k) = (t.0, _mm512_setzero_si512());
                    for (i, v) in [t.1, b.0, b.1].into_iter().enumerate() {
                        let on = wins(v, m);
                        m = _mm512_mask_mov_ps(m, on, v);
                        if WINNERS {
                            k = _mm512_mask_mov_epi32(k, on, _mm512_set1_epi32(i as i32 + 1));
                        }
                    }
                    let store = first_lanes(n);
                    assert!(out + ox + n <= y.len());
                    // SAFETY: the lanes on are the n outputs from `out + ox`, inside `y`.
                    unsafe { _mm512_mask_storeu_ps(y.as_mut_ptr().add(out + ox), store, m) };
                    if WINNERS {
                        // SAFETY: `at` is as long as `y`.
                        unsafe {
                            _mm512_mask_cvtepi32_storeu_epi8(
                                at.as_mut_ptr().add(out + ox).cast(),
                                store,
                                k,
                            )
                        };
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Window by window, as the definition reads.
    fn naive(x: &[f32], planes: usize, [h, w]: [usize; 2], [k, s, p]: [usize; 3]) -> Vec<f32> {
        let out = |n: usize| (n + 2 * p).saturating_sub(k) / s + 1;
        let (oh, ow) = (out(h), out(w));
        let mut y = Vec::new();
        for plane in x.chunks(h * w).take(planes) {
            for oy in 0..oh {
                for ox in 0..ow {
                    let mut m = f32::NEG_INFINITY;
                    for r in 0..k {
                        for c in 0..k {
                            let (iy, ix) = (
                                (oy * s + r) as isize - p as isize,
                                (ox * s + c) as isize - p as isize,
                            );
                            if (0..h as isize).contains(&iy) && (0..w as isize).contains(&ix) {
                                let v = plane[iy as usize * w + ix as usize];
                                if v > m || v.is_nan() {
                                    m = v;
                                }
                            }
                        }
                    }
                    y.push(m);
                }
            }
        }
        y
    }

    #[test]
    fn every_window_matches_the_definition_nans_included() {
        for (hw, window) in [
            ([112, 112], [3, 2, 1]),
            ([7, 9], [3, 2, 1]),
            ([8, 8], [3, 1, 1]),
            ([5, 6], [2, 1, 0]),
            ([9, 9], [3, 3, 0]),
            ([4, 4], [5, 1, 2]),
            ([1, 3], [3, 2, 1]),
        ] {
            let planes = 3;
            let n = planes * hw[0] * hw[1];
            let mut x: Vec<f32> = (0..n).map(|i| ((i * 7919) % 1009) as f32 - 500.0).collect();
            x[n / 2] = f32::NAN;
            let (got, want) = (
                max_pool_values(&x, planes, hw, window),
                naive(&x, planes, hw, window),
            );
            assert_eq!(got.len(), want.len(), "{hw:?} {window:?}");
            for (i, (g, e)) in got.iter().zip(&want).enumerate() {
                assert!(
                    g == e || (g.is_nan() && e.is_nan()),
                    "{hw:?} {window:?} at {i}: {g} against {e}"
                );
            }
            assert!(got.iter().any(|v| v.is_nan()), "the NaN reaches an output");
        }
    }
}
