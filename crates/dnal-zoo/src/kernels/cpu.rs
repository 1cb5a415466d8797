//! BatchNorm on host memory: one-pass statistics, the affine pass, and the two-pass backward,
//! on plain `f32` slices in NCHW order (`[N, C, L]`, `L` the positions per channel). Parallel
//! with rayon; no unsafe code.

use rayon::prelude::*;

/// Per-channel mean and biased variance of `x` (`[N, C, L]`), accumulated in f64 in one pass
/// (sum and sum of squares per image plane, combined per channel).
pub fn channel_stats(x: &[f32], channels: usize, l: usize) -> (Vec<f32>, Vec<f32>) {
    let n = x.len() / (channels * l).max(1);
    let count = (n * l) as f64;
    (0..channels)
        .into_par_iter()
        .map(|c| {
            // Shifted sums (by the first value) keep the variance exact when |mean| >> std.
            let shift = if n * l > 0 { f64::from(x[c * l]) } else { 0.0 };
            let (mut s, mut q) = (0.0f64, 0.0f64);
            for i in 0..n {
                let plane = &x[(i * channels + c) * l..][..l];
                let (ps, pq) = plane.iter().fold((0.0f32, 0.0f32), |(s, q), &v| {
                    let d = v - shift as f32;
                    (s + d, q + d * d)
                });
                s += f64::from(ps);
                q += f64::from(pq);
            }
            let mean = s / count;
            let var = (q / count - mean * mean).max(0.0);
            ((mean + shift) as f32, var as f32)
        })
        .unzip()
}

/// `y = (x - mean) * inv_std * a + b` per channel, in one pass.
pub fn normalize(x: &[f32], channels: usize, l: usize, scale: &[f32], shift: &[f32]) -> Vec<f32> {
    let mut y = vec![0.0; x.len()];
    y.par_chunks_mut(l)
        .zip(x.par_chunks(l))
        .enumerate()
        .for_each(|(plane, (dst, src))| {
            let c = plane % channels;
            let (m, b) = (scale[c], shift[c]);
            for (d, s) in dst.iter_mut().zip(src) {
                *d = s * m + b;
            }
        });
    y
}

/// Sums per channel of `dy` and of `dy * xhat` (`xhat = (x - mean) * inv_std`), in f64.
pub fn batch_norm_grad_sums(
    x: &[f32],
    dy: &[f32],
    channels: usize,
    l: usize,
    mean: &[f32],
    inv_std: &[f32],
) -> (Vec<f32>, Vec<f32>) {
    let n = x.len() / (channels * l).max(1);
    (0..channels)
        .into_par_iter()
        .map(|c| {
            let (m, r) = (mean[c], inv_std[c]);
            let (mut sd, mut sdx) = (0.0f64, 0.0f64);
            for i in 0..n {
                let at = (i * channels + c) * l;
                let (a, b) = x[at..at + l]
                    .iter()
                    .zip(&dy[at..at + l])
                    .fold((0.0f32, 0.0f32), |(a, b), (&xv, &g)| {
                        (a + g, b + g * (xv - m) * r)
                    });
                sd += f64::from(a);
                sdx += f64::from(b);
            }
            (sd as f32, sdx as f32)
        })
        .unzip()
}

/// The input gradient of batch-statistics BatchNorm with per-channel affine `a`:
/// `dx = a * inv_std * (dy - sum(dy) / M - xhat * sum(dy * xhat) / M)`, one pass.
#[allow(clippy::too_many_arguments)]
pub fn batch_norm_input_grad(
    x: &[f32],
    dy: &[f32],
    channels: usize,
    l: usize,
    mean: &[f32],
    inv_std: &[f32],
    a: &[f32],
    sums: (&[f32], &[f32]),
) -> Vec<f32> {
    let count = (x.len() / channels.max(1)) as f32;
    let mut dx = vec![0.0; x.len()];
    dx.par_chunks_mut(l).enumerate().for_each(|(plane, dst)| {
        let c = plane % channels;
        let at = plane * l;
        let (m, r) = (mean[c], inv_std[c]);
        let k = a[c] * r;
        let (md, mdx) = (sums.0[c] / count, sums.1[c] / count);
        for ((d, &xv), &g) in dst.iter_mut().zip(&x[at..at + l]).zip(&dy[at..at + l]) {
            *d = k * (g - md - (xv - m) * r * mdx);
        }
    });
    dx
}
