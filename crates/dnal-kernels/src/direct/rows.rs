//! The forward and weight gradient of a stride-1 "same" convolution on zero-padded copies of
//! its input, row by row, in AVX2: the form of the direct kernels for CPUs that run AVX2 in
//! 128-bit halves.
//!
//! Each image is first copied into planes with a zero border of `p` values (and a few zeros
//! after the last plane), so that every tap of every output vector is a plain unaligned load:
//! no lane masks, no edge cases. An output vector is 8 consecutive positions of one output
//! row (the last of a row may be partial; its lanes past the row read the border or the next
//! row and are not stored). A step computes up to 6 output channels x 2 vectors in 12
//! accumulators, walking the input channels and, within each, the taps, so that the weights
//! (`[Ci][taps][MAX_CHANNELS]` per channel block) stream in order. The weight gradient needs
//! whole vectors (`W` a multiple of 8): it holds 3 output channels x 4 patch rows of 8-lane
//! partial sums, which the caller reduces.
#![allow(unsafe_code)]

use super::MAX_CHANNELS;
use crate::cpu::{ConvGeometry, GeometryKey};
use crate::memo::Memo;
#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;
use std::mem::MaybeUninit;
use std::sync::Arc;

/// Positions per vector (one AVX2 register).
pub(super) const WIDTH: usize = 8;
/// Most output channels per step.
pub(super) const BLOCK: usize = 6;
/// Zeros after the last padded plane: a partial vector of the last row reads up to
/// `WIDTH - 1` values past its row.
const SLACK: usize = WIDTH;

/// A convolution's padded layout and its vectors of output positions.
pub(super) struct RowPlan {
    /// Width of a padded row.
    pub(super) padded_w: usize,
    /// Values of a padded plane.
    pub(super) plane: usize,
    /// Offset of each tap in a padded plane.
    pub(super) taps: Vec<usize>,
    /// Each output vector: its first input in a padded plane (the top-left tap), its first
    /// output position, and how many of its lanes are positions.
    pub(super) vectors: Vec<(usize, usize, usize)>,
}

impl RowPlan {
    /// The plan of `g`'s map size, kernel and padding, built once per process (the training
    /// step asks for it in every forward and weight gradient).
    pub(super) fn shared(g: &ConvGeometry) -> Arc<Self> {
        static PLANS: Memo<GeometryKey, RowPlan> = Memo::new();
        PLANS.get(g.key(), || Self::new(g))
    }

    fn new(g: &ConvGeometry) -> Self {
        let [h, w] = g.in_hw;
        let (k, p) = (g.kernel, g.padding);
        let padded_w = w + 2 * p;
        let plane = (h + 2 * p) * padded_w;
        let taps = (0..k * k).map(|t| t / k * padded_w + t % k).collect();
        let vectors = (0..h)
            .flat_map(|y| {
                (0..w)
                    .step_by(WIDTH)
                    .map(move |x| (y * padded_w + x, y * w + x, WIDTH.min(w - x)))
            })
            .collect();
        Self {
            padded_w,
            plane,
            taps,
            vectors,
        }
    }

    /// Values of an image's padded copy.
    pub(super) fn padded_len(&self, channels: usize) -> usize {
        channels * self.plane + SLACK
    }

    /// Copies image `x` (`[C, H, W]`) into `dst` (`padded_len(C)` values) with a zero border
    /// of `p`.
    pub(super) fn pad(&self, x: &[f32], g: &ConvGeometry, dst: &mut [f32]) {
        let [h, w] = g.in_hw;
        let p = g.padding;
        assert_eq!(dst.len(), self.padded_len(g.in_channels));
        dst.fill(0.0);
        for (plane, src) in dst.chunks_exact_mut(self.plane).zip(x.chunks_exact(h * w)) {
            for (row, line) in plane[p * self.padded_w..]
                .chunks_exact_mut(self.padded_w)
                .zip(src.chunks_exact(w))
            {
                row[p..p + w].copy_from_slice(line);
            }
        }
    }
}

/// What one kernel call computes: output channels `first..first + R` of one image, from its
/// padded copy `x`, into the image's output (`co` channels of `l` positions), with the block's
/// epilogue (`scale`, `shift`, a `residual` laid out like the image's output, clamp
/// `bounds`).
pub(super) struct RowBlock<'a> {
    pub x: &'a [f32],
    pub plan: &'a RowPlan,
    pub channels: usize,
    pub l: usize,
    pub co: usize,
    pub first: usize,
    pub scale: &'a [f32],
    pub shift: &'a [f32],
    pub residual: Option<&'a [f32]>,
    pub bounds: (f32, f32),
}

/// Output channels `first + r`, `r < R`, of every vector of one image, two vectors per step.
///
/// # Safety
/// AVX2 and FMA must be available. (Everything read and written is checked to lie inside its
/// slice first.)
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn forward<const R: usize>(
    w: &[f32],
    block: RowBlock,
    out: &mut [MaybeUninit<f32>],
) {
    let RowBlock {
        x,
        plan,
        channels,
        l,
        co,
        first,
        scale,
        shift,
        residual,
        bounds,
    } = block;
    let ntaps = plan.taps.len();
    assert!((1..=BLOCK).contains(&R) && first + R <= co);
    assert!(scale.len() == R && shift.len() == R && out.len() == co * l);
    assert!(residual.is_none_or(|r| r.len() == out.len()));
    assert!(w.len() >= channels * ntaps * MAX_CHANNELS && x.len() >= plan.padded_len(channels));
    // Every load lies inside `x`: the farthest starts at the last vector's input, plus the
    // last tap, in the last channel, and reads `WIDTH` values; every store inside the image.
    let last_tap = plan.taps.iter().copied().max().unwrap_or(0);
    assert!(plan.vectors.iter().all(|&(at, to, width)| {
        (channels.max(1) - 1) * plan.plane + at + last_tap + WIDTH <= x.len()
            && to + width <= l
            && width <= WIDTH
    }));
    let (lo, hi) = (_mm256_set1_ps(bounds.0), _mm256_set1_ps(bounds.1));
    let dst = out.as_mut_ptr().cast::<f32>();
    let (xp, wp) = (x.as_ptr(), w.as_ptr());
    for pair in plan.vectors.chunks(2) {
        // A lone last vector is computed twice and stored once.
        let at = [pair[0].0, pair[pair.len() - 1].0];
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        for c in 0..channels {
            // SAFETY: checked above: `c * plane + at + tap + WIDTH <= x.len()`.
            let base = unsafe { xp.add(c * plan.plane) };
            // SAFETY: `w` holds `channels * ntaps * MAX_CHANNELS` values.
            let wc = unsafe { wp.add(c * ntaps * MAX_CHANNELS) };
            for (t, &tap) in plan.taps.iter().enumerate() {
                // SAFETY: as above.
                let xs = [0, 1].map(|h| unsafe { _mm256_loadu_ps(base.add(at[h] + tap)) });
                for (r, a) in acc.iter_mut().enumerate() {
                    // SAFETY: `t * MAX_CHANNELS + r` < `ntaps * MAX_CHANNELS` (`R <= 8`).
                    let s = _mm256_set1_ps(unsafe { *wc.add(t * MAX_CHANNELS + r) });
                    a[0] = _mm256_fmadd_ps(s, xs[0], a[0]);
                    a[1] = _mm256_fmadd_ps(s, xs[1], a[1]);
                }
            }
        }
        for (r, a) in acc.iter().enumerate() {
            let (m, b) = (_mm256_set1_ps(scale[r]), _mm256_set1_ps(shift[r]));
            for (h, &(_, to, width)) in pair.iter().enumerate() {
                let start = (first + r) * l + to;
                let mut y = _mm256_fmadd_ps(a[h], m, b);
                let mut values = [0.0f32; WIDTH];
                if let Some(res) = residual {
                    let r = if width == WIDTH {
                        // SAFETY: `res` is as long as the output (checked).
                        unsafe { _mm256_loadu_ps(res.as_ptr().add(start)) }
                    } else {
                        values[..width].copy_from_slice(&res[start..start + width]);
                        // SAFETY: `values` holds `WIDTH` values.
                        unsafe { _mm256_loadu_ps(values.as_ptr()) }
                    };
                    y = _mm256_add_ps(y, r);
                }
                // max/min return their second operand when it is NaN, so NaN passes through.
                let y = _mm256_min_ps(hi, _mm256_max_ps(lo, y));
                if width == WIDTH {
                    // SAFETY: `start + WIDTH <= co * l` (checked).
                    unsafe { _mm256_storeu_ps(dst.add(start), y) };
                } else {
                    // SAFETY: `values` holds `WIDTH` values; the first `width` from `start`
                    // are inside the output (checked).
                    unsafe {
                        _mm256_storeu_ps(values.as_mut_ptr(), y);
                        std::ptr::copy_nonoverlapping(values.as_ptr(), dst.add(start), width);
                    }
                }
            }
        }
    }
}

/// Patch rows per weight-gradient tile.
pub(super) const DW_ROWS: usize = 4;
/// Most output channels per weight-gradient block (with [`DW_ROWS`]: 12 accumulators).
pub(super) const DW_BLOCK: usize = 3;

/// What one weight-gradient kernel call reads: a chunk of images' padded copies (`x`, each
/// `padded` values), their output gradients (`dy`, `[n, co, l]`), the block's first output
/// channel `c0`, and the patch rows (each `c * plane + tap offset`, in whole tiles of
/// [`DW_ROWS`]).
pub(super) struct RowGradBlock<'a> {
    pub x: &'a [f32],
    pub padded: usize,
    pub dy: &'a [f32],
    pub plan: &'a RowPlan,
    pub l: usize,
    pub co: usize,
    pub c0: usize,
    pub rows: &'a [usize],
}

/// Adds to `sums` (`[tile][R][DW_ROWS][WIDTH]`, 8-lane partial sums) the products of output
/// channels `c0 + r`, `r < R`, with every tile of patch rows, over every vector of every image
/// of the chunk. Needs every vector whole (`W` a multiple of [`WIDTH`]).
///
/// # Safety
/// AVX2 and FMA must be available. (Everything read and written is checked to lie inside its
/// slice first.)
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn weight_grad<const R: usize>(block: RowGradBlock, sums: &mut [f32]) {
    let RowGradBlock {
        x,
        padded,
        dy,
        plan,
        l,
        co,
        c0,
        rows,
    } = block;
    let images = x.len() / padded.max(1);
    assert!((1..=DW_BLOCK).contains(&R) && c0 + R <= co);
    assert!(x.len() == images * padded && dy.len() == images * co * l);
    assert!(rows.len().is_multiple_of(DW_ROWS));
    assert_eq!(sums.len(), rows.len() / DW_ROWS * R * DW_ROWS * WIDTH);
    let last_row = rows.iter().copied().max().unwrap_or(0);
    assert!(plan.vectors.iter().all(|&(at, to, width)| {
        width == WIDTH && at + last_row + WIDTH <= padded && to + WIDTH <= l
    }));
    let tile_sums = R * DW_ROWS * WIDTH;
    for (tile, sums) in rows
        .chunks_exact(DW_ROWS)
        .zip(sums.chunks_exact_mut(tile_sums))
    {
        let mut acc: [[__m256; DW_ROWS]; R] = std::array::from_fn(|r| {
            std::array::from_fn(|j| {
                // SAFETY: `sums` holds `R * DW_ROWS * WIDTH` values.
                unsafe { _mm256_loadu_ps(sums.as_ptr().add((r * DW_ROWS + j) * WIDTH)) }
            })
        });
        for i in 0..images {
            // SAFETY: image `i` of the chunk and its gradient's channels `c0..c0 + R`.
            let (image, grad) = unsafe {
                (
                    x.as_ptr().add(i * padded),
                    dy.as_ptr().add((i * co + c0) * l),
                )
            };
            for &(at, to, _) in &plan.vectors {
                // SAFETY: `to + WIDTH <= l` in each of the `R` channels (checked).
                let d: [__m256; R] =
                    std::array::from_fn(|r| unsafe { _mm256_loadu_ps(grad.add(r * l + to)) });
                for (j, &row) in tile.iter().enumerate() {
                    // SAFETY: `at + row + WIDTH <= padded` (checked).
                    let xs = unsafe { _mm256_loadu_ps(image.add(at + row)) };
                    for (a, dr) in acc.iter_mut().zip(&d) {
                        a[j] = _mm256_fmadd_ps(*dr, xs, a[j]);
                    }
                }
            }
        }
        for (r, a) in acc.iter().enumerate() {
            for (j, v) in a.iter().enumerate() {
                // SAFETY: as for the loads.
                unsafe { _mm256_storeu_ps(sums.as_mut_ptr().add((r * DW_ROWS + j) * WIDTH), *v) };
            }
        }
    }
}
