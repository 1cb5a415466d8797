//! BatchNorm's passes on `[N, C, L]` slices (`L` the positions per channel), parallel with
//! rayon: the one-pass statistics, the affine pass with the activation and a residual fused,
//! and the two-pass backward.

use super::clamp::{Clamp, ClampGrad};
use crate::planes::{par_planes, par_planes_fold};
use crate::simd::widest_simd;
use rayon::prelude::*;

/// Per-channel mean and biased variance of `x` (`[N, C, L]`), accumulated in f64 in one pass
/// (sum and sum of squares per image plane, combined per channel).
pub fn channel_stats(x: &[f32], channels: usize, l: usize) -> (Vec<f32>, Vec<f32>) {
    let n = x.len() / (channels * l).max(1);
    let count = (n * l) as f64;
    // Shifted sums (by each channel's first value) keep the variance exact when |mean| >> std.
    let shifts: Vec<f32> = (0..channels)
        .map(|c| if n * l > 0 { x[c * l] } else { 0.0 })
        .collect();
    let planes = plane_sums(
        x,
        channels,
        l,
        #[inline(always)]
        |_, c, plane| {
            let shift = shifts[c];
            lane_sums(plane, plane, plane, |v, _, _| {
                let d = v - shift;
                (d, d * d)
            })
        },
    );
    (0..channels)
        .map(|c| {
            let (s, q) = channel_total(&planes, channels, c);
            let mean = s / count;
            let var = (q / count - mean * mean).max(0.0);
            ((mean + f64::from(shifts[c])) as f32, var as f32)
        })
        .unzip()
}

/// `f(index, channel, plane)` of every image plane of `x` (`[N, C, L]`), in parallel over the
/// planes in memory order (each task streams through contiguous memory), in plane order.
fn plane_sums<F>(x: &[f32], channels: usize, l: usize, f: F) -> Vec<(f32, f32)>
where
    F: Fn(usize, usize, &[f32]) -> (f32, f32) + Sync,
{
    x.par_chunks(l.max(1))
        .enumerate()
        .map(|(p, plane)| widest_simd!(f(p, p % channels.max(1), plane)))
        .collect()
}

/// Channel `c`'s plane sums added in f64, image by image (a fixed order).
fn channel_total(planes: &[(f32, f32)], channels: usize, c: usize) -> (f64, f64) {
    planes
        .iter()
        .skip(c)
        .step_by(channels.max(1))
        .fold((0.0, 0.0), |(s, q), &(a, b)| {
            (s + f64::from(a), q + f64::from(b))
        })
}

/// Lanes summed side by side, so that the sums vectorize (a single running sum is one long
/// chain of dependent additions); always in the same order.
const SUM_LANES: usize = 16;

/// `(sum f(x, g, y).0, sum f(x, g, y).1)` over the elements of three equal-length slices, in
/// [`SUM_LANES`] partial sums (pass a slice twice where fewer are needed). Always inlined, so
/// that it compiles for the instruction set of the `widest_simd!` context that calls it (left
/// to the compiler, it stayed a function of its own in baseline SSE2, four lanes at a time;
/// the passes are bound by memory, and the steps measured no faster with AVX-512 here).
#[inline(always)]
fn lane_sums(
    xs: &[f32],
    gs: &[f32],
    ys: &[f32],
    f: impl Fn(f32, f32, f32) -> (f32, f32),
) -> (f32, f32) {
    let (mut a, mut b) = ([0.0f32; SUM_LANES], [0.0f32; SUM_LANES]);
    fn chunks(v: &[f32]) -> std::slice::ChunksExact<'_, f32> {
        v.chunks_exact(SUM_LANES)
    }
    for ((x, g), y) in chunks(xs).zip(chunks(gs)).zip(chunks(ys)) {
        for j in 0..SUM_LANES {
            let (u, v) = f(x[j], g[j], y[j]);
            a[j] += u;
            b[j] += v;
        }
    }
    let (xr, gr, yr) = (
        chunks(xs).remainder(),
        chunks(gs).remainder(),
        chunks(ys).remainder(),
    );
    for (j, ((&x, &g), &y)) in xr.iter().zip(gr).zip(yr).enumerate() {
        let (u, v) = f(x, g, y);
        a[j] += u;
        b[j] += v;
    }
    (a.iter().sum(), b.iter().sum())
}

/// `g` where the clamp let output `y` through, else zero.
#[inline]
fn through(g: f32, y: f32, clamp: Clamp) -> f32 {
    if clamp.passes(y) { g } else { 0.0 }
}

/// `g` where the clamp let `x * m + b` through (the clamp's input, computed as [`normalize`]
/// computes it), else zero.
#[inline]
fn through_affine(g: f32, x: f32, m: f32, b: f32, clamp: Clamp) -> f32 {
    through(g, x * m + b, clamp)
}

/// `y = clamp((x - mean) * inv_std * a + b + residual)` per channel, in one pass (`residual`
/// shaped like `x`, or `None`).
pub fn normalize(
    x: &[f32],
    channels: usize,
    l: usize,
    (scale, shift): (&[f32], &[f32]),
    residual: Option<&[f32]>,
    clamp: Clamp,
) -> Vec<f32> {
    let l = l.max(1);
    let plane_of = move |plane: usize| {
        let c = plane % channels;
        (
            plane * l..((plane + 1) * l).min(x.len()),
            scale[c],
            shift[c],
        )
    };
    match residual {
        None => par_planes(x.len(), l, |plane| {
            let (at, m, b) = plane_of(plane);
            x[at].iter().map(move |&s| clamp.apply(s * m + b))
        }),
        Some(r) => par_planes(x.len(), l, |plane| {
            let (at, m, b) = plane_of(plane);
            x[at.clone()]
                .iter()
                .zip(&r[at])
                .map(move |(&s, &r)| clamp.apply(s * m + b + r))
        }),
    }
}

/// The output gradient `dy` passed back through `clamp` given the output `y` (zero where the
/// clamp cut: `g`, the gradient of the clamp's input, which a residual block's shortcut
/// receives), and [`batch_norm_grad_sums`] of `g`, in one pass: `(g, sum(g), sum(g * xhat))`
/// per channel, summed in the same order as [`batch_norm_grad_sums`].
pub fn through_clamp_grad_sums(
    dy: &[f32],
    y: &[f32],
    x: &[f32],
    channels: usize,
    l: usize,
    (mean, inv_std): (&[f32], &[f32]),
    clamp: Clamp,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let l = l.max(1);
    let (g, planes) = par_planes_fold(
        dy.len(),
        l,
        |plane| {
            let at = plane * l..((plane + 1) * l).min(dy.len());
            dy[at.clone()]
                .iter()
                .zip(&y[at])
                .map(move |(&g, &y)| through(g, y, clamp))
        },
        #[inline(always)]
        |plane, g| {
            let c = plane % channels;
            let (m, r) = (mean[c], inv_std[c]);
            let xs = &x[plane * l..][..g.len()];
            lane_sums(xs, g, g, |xv, g, _| (g, g * (xv - m) * r))
        },
    );
    let (sum_dy, sum_dy_xhat) = (0..channels)
        .map(|c| {
            let (sd, sdx) = channel_total(&planes, channels, c);
            (sd as f32, sdx as f32)
        })
        .unzip();
    (g, sum_dy, sum_dy_xhat)
}

/// `dy` passed back through `clamp` given its output `y` (zero where the clamp cut), as a new
/// vector.
pub fn through_clamp(dy: &[f32], y: &[f32], l: usize, clamp: Clamp) -> Vec<f32> {
    let l = l.max(1);
    par_planes(dy.len(), l, |plane| {
        let at = plane * l..((plane + 1) * l).min(dy.len());
        dy[at.clone()]
            .iter()
            .zip(&y[at])
            .map(move |(&g, &y)| through(g, y, clamp))
    })
}

/// Sums per channel of `dy` and of `dy * xhat` (`xhat = (x - mean) * inv_std`), in f64, with
/// `dy` first passed back through `clamp`.
pub fn batch_norm_grad_sums(
    x: &[f32],
    dy: &[f32],
    channels: usize,
    l: usize,
    (mean, inv_std): (&[f32], &[f32]),
    clamp: ClampGrad,
) -> (Vec<f32>, Vec<f32>) {
    let l = l.max(1);
    let planes = plane_sums(
        x,
        channels,
        l,
        #[inline(always)]
        |p, c, xs| {
            let gs = &dy[p * l..][..xs.len()];
            let (m, r) = (mean[c], inv_std[c]);
            match clamp {
                None => lane_sums(xs, gs, gs, |xv, g, _| (g, g * (xv - m) * r)),
                Some(k) => {
                    let (sm, sb) = (k.scale[c], k.shift[c]);
                    lane_sums(xs, gs, gs, |xv, g, _| {
                        let g = through_affine(g, xv, sm, sb, k.clamp);
                        (g, g * (xv - m) * r)
                    })
                }
            }
        },
    );
    (0..channels)
        .map(|c| {
            let (sd, sdx) = channel_total(&planes, channels, c);
            (sd as f32, sdx as f32)
        })
        .unzip()
}

/// The input gradient of batch-statistics BatchNorm with per-channel affine `a`:
/// `dx = a * inv_std * (dy - sum(dy) / M - xhat * sum(dy * xhat) / M)`, one pass, with `dy`
/// first passed back through `clamp`.
#[allow(clippy::too_many_arguments)]
pub fn batch_norm_input_grad(
    x: &[f32],
    dy: &[f32],
    channels: usize,
    l: usize,
    (mean, inv_std): (&[f32], &[f32]),
    a: &[f32],
    sums: (&[f32], &[f32]),
    clamp: ClampGrad,
) -> Vec<f32> {
    let count = (x.len() / channels.max(1)) as f32;
    let l = l.max(1);
    let plane_values = |plane: usize| {
        let c = plane % channels;
        let at = plane * l;
        let end = (at + l).min(x.len());
        let (m, r) = (mean[c], inv_std[c]);
        let k = a[c] * r;
        let (md, mdx) = (sums.0[c] / count, sums.1[c] / count);
        (at..end, m, r, k, md, mdx)
    };
    match clamp {
        None => par_planes(x.len(), l, |plane| {
            let (at, m, r, k, md, mdx) = plane_values(plane);
            let (xs, gs) = (&x[at.clone()], &dy[at]);
            xs.iter()
                .zip(gs)
                .map(move |(&xv, &g)| k * (g - md - (xv - m) * r * mdx))
        }),
        Some(cl) => par_planes(x.len(), l, |plane| {
            let (at, m, r, k, md, mdx) = plane_values(plane);
            let c = plane % channels;
            let (sm, sb) = (cl.scale[c], cl.shift[c]);
            let (xs, gs) = (&x[at.clone()], &dy[at]);
            xs.iter().zip(gs).map(move |(&xv, &g)| {
                k * (through_affine(g, xv, sm, sb, cl.clamp) - md - (xv - m) * r * mdx)
            })
        }),
    }
}
