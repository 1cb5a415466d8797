//! The 2x2, stride-2 max-pool of a VGG, forward and backward.

use crate::planes::{SERIAL_BELOW, par_planes};
use crate::simd::widest_simd;
use rayon::prelude::*;

/// Planes of a 2x2, stride-2 max-pool processed per parallel task.
const POOL_PLANES: usize = 16;

/// 2x2 max-pool with stride 2 of `planes` maps of `h x w` (an odd last row or column is
/// dropped, as burn's floor mode does): the output `[planes, h / 2, w / 2]` and, for each
/// output, which of its window's four inputs won (`2 * dy + dx`). The first maximum in row
/// order wins, and a NaN wins over any number (the last NaN), as in burn and PyTorch.
pub fn max_pool2x2(x: &[f32], planes: usize, [h, w]: [usize; 2]) -> (Vec<f32>, Vec<u8>) {
    let (oh, ow) = (h / 2, w / 2);
    let (out_plane, in_plane) = (oh * ow, h * w);
    let mut y = vec![0.0f32; planes * out_plane];
    let mut at = vec![0u8; planes * out_plane];
    if out_plane == 0 {
        return (y, at);
    }
    if y.len() < SERIAL_BELOW {
        widest_simd!(max_pool2x2_planes(x, &mut y, &mut at, [h, w]));
        return (y, at);
    }
    y.par_chunks_mut(POOL_PLANES * out_plane)
        .zip(at.par_chunks_mut(POOL_PLANES * out_plane))
        .zip(x.par_chunks(POOL_PLANES * in_plane))
        .for_each(|((y, at), x)| {
            widest_simd!(max_pool2x2_planes(x, y, at, [h, w]));
        });
    (y, at)
}

/// [`max_pool2x2`] of consecutive planes.
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

/// The input gradient of [`max_pool2x2`]: each output's gradient `dy` goes to the input that
/// won its window (`at`), zero elsewhere.
pub fn max_pool2x2_backward(dy: &[f32], at: &[u8], planes: usize, [h, w]: [usize; 2]) -> Vec<f32> {
    let (oh, ow) = (h / 2, w / 2);
    let out_plane = oh * ow;
    // One pass over the input gradient, row by row (an odd last row or column gets zeros).
    par_planes(planes * h * w, h * w, move |p| {
        let (dy, at) = (
            &dy[p * out_plane..][..out_plane],
            &at[p * out_plane..][..out_plane],
        );
        (0..h).flat_map(move |iy| {
            let (oy, ky) = (iy / 2, 2 * (iy % 2) as u8);
            let (g, k) = if oy < oh {
                (&dy[oy * ow..][..ow], &at[oy * ow..][..ow])
            } else {
                (&[][..], &[][..])
            };
            g.iter()
                .zip(k)
                .flat_map(move |(&g, &k)| {
                    [
                        if k == ky { g } else { 0.0 },
                        if k == ky + 1 { g } else { 0.0 },
                    ]
                })
                .chain(std::iter::repeat_n(0.0, w - 2 * g.len()))
        })
    })
}
