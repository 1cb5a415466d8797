//! The backward passes of a depthwise convolution (one `k x k` filter per channel, no bias) on
//! `f32` slices in NCHW order: input gradient and weight gradient, plane by plane. (The forward
//! pass is flex's grouped convolution, which measured faster.)
//!
//! Both are written as row operations: an input-gradient row gains `w * (output-gradient row)`
//! for each filter tap, and a weight-gradient tap is a sum of row dot products, so the inner
//! loops run over contiguous slices (with stride 1) and vectorize. Each value is summed in one
//! fixed order (taps row by row; images in order for the weight gradient), whatever the number
//! of threads.

use rayon::prelude::*;

use crate::planes::par_planes_zeroed;
use crate::simd::widest_simd;

/// The shape of a depthwise convolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DepthwiseGeometry {
    /// Channels (filters).
    pub channels: usize,
    /// Input `[H, W]`.
    pub in_hw: [usize; 2],
    /// Filter side `k`.
    pub kernel: usize,
    /// Stride on both axes.
    pub stride: usize,
    /// Zero padding on every side.
    pub padding: usize,
}

impl DepthwiseGeometry {
    /// Output `[OH, OW]`.
    pub fn out_hw(&self) -> [usize; 2] {
        self.in_hw
            .map(|n| (n + 2 * self.padding).saturating_sub(self.kernel) / self.stride + 1)
    }

    fn in_plane(&self) -> usize {
        self.in_hw[0] * self.in_hw[1]
    }

    fn out_plane(&self) -> usize {
        let [oh, ow] = self.out_hw();
        oh * ow
    }

    /// The outputs `lo..hi` along an axis whose input index `o * stride + tap - padding` lies in
    /// `0..input`.
    fn valid(&self, tap: usize, input: usize, output: usize) -> (usize, usize) {
        let (s, p) = (self.stride, self.padding);
        let lo = p.saturating_sub(tap).div_ceil(s);
        let hi = (input + p).saturating_sub(tap).div_ceil(s).min(output);
        (lo, hi.max(lo))
    }

    /// For each column tap `kx`: the output columns `lo..hi` it reaches and the input column of
    /// output `lo` (computed once per convolution, not per row).
    fn column_taps(&self) -> Vec<Tap> {
        let [_, w] = self.in_hw;
        let [_, ow] = self.out_hw();
        (0..self.kernel)
            .map(|kx| {
                let (lo, hi) = self.valid(kx, w, ow);
                Tap {
                    lo,
                    hi,
                    first: (lo * self.stride + kx).saturating_sub(self.padding),
                }
            })
            .collect()
    }
}

/// Where one column tap of the filter applies along a row.
#[derive(Clone, Copy, Debug)]
struct Tap {
    /// First output column it reaches.
    lo: usize,
    /// One past the last.
    hi: usize,
    /// The input column read for output `lo`.
    first: usize,
}

/// The input gradient: `dy` `[N, C, OH, OW]`, `w` `[C, k, k]`, result `[N, C, H, W]`.
pub fn depthwise_input_grad(dy: &[f32], w: &[f32], g: &DepthwiseGeometry) -> Vec<f32> {
    let (ip, op, kk) = (g.in_plane(), g.out_plane(), g.kernel * g.kernel);
    let planes = dy.len() / op.max(1);
    let taps = g.column_taps();
    par_planes_zeroed(planes * ip, ip, |i, out| {
        let c = i % g.channels;
        let (dy, w) = (&dy[i * op..(i + 1) * op], &w[c * kk..(c + 1) * kk]);
        widest_simd!(input_grad_plane(dy, w, g, &taps, out));
    })
}

#[inline(always)]
fn input_grad_plane(dy: &[f32], w: &[f32], g: &DepthwiseGeometry, taps: &[Tap], dx: &mut [f32]) {
    let ([h, wd], [oh, ow], k, s, p) = (g.in_hw, g.out_hw(), g.kernel, g.stride, g.padding);
    for oy in 0..oh {
        let grow = &dy[oy * ow..(oy + 1) * ow];
        for ky in 0..k {
            let Some(iy) = (oy * s + ky).checked_sub(p).filter(|&iy| iy < h) else {
                continue;
            };
            let drow = &mut dx[iy * wd..(iy + 1) * wd];
            for (kx, &Tap { lo, hi, first }) in taps.iter().enumerate() {
                if lo == hi {
                    continue;
                }
                let wv = w[ky * k + kx];
                if s == 1 {
                    for (d, gv) in drow[first..].iter_mut().zip(&grow[lo..hi]) {
                        *d += wv * gv;
                    }
                } else {
                    for (d, gv) in drow[first..].iter_mut().step_by(s).zip(&grow[lo..hi]) {
                        *d += wv * gv;
                    }
                }
            }
        }
    }
}

/// Partial sums kept side by side in the weight gradient's dot products, so that they
/// vectorize; always added in the same order.
const LANES: usize = 16;

/// The weight gradient: `x` `[N, C, H, W]`, `dy` `[N, C, OH, OW]`, result `[C, k, k]`. Channels
/// in parallel; each sums its images in order.
pub fn depthwise_weight_grad(x: &[f32], dy: &[f32], g: &DepthwiseGeometry) -> Vec<f32> {
    let (ip, op, kk, c) = (g.in_plane(), g.out_plane(), g.kernel * g.kernel, g.channels);
    let n = x.len() / (ip * c).max(1);
    let mut dw = vec![0.0f32; c * kk];
    let taps = g.column_taps();
    dw.par_chunks_mut(kk).enumerate().for_each(|(ch, out)| {
        widest_simd!({
            for image in 0..n {
                let plane = image * c + ch;
                let x = &x[plane * ip..(plane + 1) * ip];
                let dy = &dy[plane * op..(plane + 1) * op];
                weight_grad_plane(x, dy, g, &taps, out);
            }
        })
    });
    dw
}

#[inline(always)]
fn weight_grad_plane(x: &[f32], dy: &[f32], g: &DepthwiseGeometry, taps: &[Tap], dw: &mut [f32]) {
    let ([h, wd], [oh, ow], k, s, p) = (g.in_hw, g.out_hw(), g.kernel, g.stride, g.padding);
    for ky in 0..k {
        for (kx, &Tap { lo, hi, first }) in taps.iter().enumerate() {
            if lo == hi {
                continue;
            }
            let mut lanes = [0.0f32; LANES];
            let mut tail = 0.0f32;
            for oy in 0..oh {
                let Some(iy) = (oy * s + ky).checked_sub(p).filter(|&iy| iy < h) else {
                    continue;
                };
                let grow = &dy[oy * ow + lo..oy * ow + hi];
                let irow = &x[iy * wd + first..];
                if s == 1 {
                    let mut gs = grow.chunks_exact(LANES);
                    let mut is = irow.chunks_exact(LANES);
                    for (gc, ic) in (&mut gs).zip(&mut is) {
                        for l in 0..LANES {
                            lanes[l] += gc[l] * ic[l];
                        }
                    }
                    for (gv, iv) in gs
                        .remainder()
                        .iter()
                        .zip(&irow[grow.len() / LANES * LANES..])
                    {
                        tail += gv * iv;
                    }
                } else {
                    for (gv, iv) in grow.iter().zip(irow.iter().step_by(s)) {
                        tail += gv * iv;
                    }
                }
            }
            dw[ky * k + kx] += lanes.iter().sum::<f32>() + tail;
        }
    }
}
