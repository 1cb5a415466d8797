//! The host-memory halves of the kernels, on plain `f32` slices in NCHW order: im2col and
//! col2im of one image for the convolution, the flipped kernel of its input gradient, the
//! epilogue applied as it writes its output; BatchNorm's one-pass statistics, affine pass and
//! two-pass backward with the activation ([`Clamp`]) and a residual fused (`[N, C, L]`, `L` the
//! positions per channel, parallel with rayon). No unsafe code; the matrix products and the
//! direct convolution kernels are in the flex-only modules.

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

/// `$body` compiled for the widest vector instructions this CPU has (AVX-512 or AVX2, chosen at
/// run time; plain Rust code is otherwise built for the x86-64 baseline, SSE2), so that the
/// loops in it vectorize. The body sits in a closure that pulp's target-feature function
/// inlines; closures it calls must be `#[inline(always)]` too, or they stay baseline code.
macro_rules! widest_simd {
    ($body:expr) => {
        pulp::Arch::new().dispatch(
            #[inline(always)]
            || $body,
        )
    };
}
pub(crate) use widest_simd;

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

/// An activation that clamps to `[lo, hi]` (ReLU: `[0, inf]`, ReLU6: `[0, 6]`), applied with
/// BatchNorm so that it costs no pass of its own. NaN passes through unchanged.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Clamp {
    /// Lower bound.
    pub lo: f32,
    /// Upper bound.
    pub hi: f32,
}

impl Clamp {
    /// No clamp (the identity).
    pub const NONE: Clamp = Clamp {
        lo: f32::NEG_INFINITY,
        hi: f32::INFINITY,
    };

    /// Whether this is the identity.
    pub fn is_none(self) -> bool {
        self == Self::NONE
    }

    /// `v` clamped to `[lo, hi]`.
    #[inline]
    pub fn apply(self, v: f32) -> f32 {
        if v < self.lo {
            self.lo
        } else if v > self.hi {
            self.hi
        } else {
            v
        }
    }

    /// Whether the gradient flows through an output `y` (strictly inside the bounds, as
    /// burn's ReLU backward has it).
    #[inline]
    pub fn passes(self, y: f32) -> bool {
        y > self.lo && y < self.hi
    }
}

/// The clamp a BatchNorm applied to its affine output `x * scale + shift` (per channel, as
/// [`normalize`] computes it without a residual): its backward passes recompute the clamp's
/// gradient mask from `x` with the same arithmetic, bit for bit, instead of reading the output.
#[derive(Debug, Clone, Copy)]
pub struct ClampOf<'a> {
    /// Per-channel factor.
    pub scale: &'a [f32],
    /// Per-channel offset.
    pub shift: &'a [f32],
    /// The activation.
    pub clamp: Clamp,
}

/// The clamp whose gradient BatchNorm's backward applies to its output gradient first, or
/// `None` when nothing was clamped.
pub type ClampGrad<'a> = Option<ClampOf<'a>>;

/// Lanes summed side by side, so that the sums vectorize (a single running sum is one long
/// chain of dependent additions); always in the same order.
const SUM_LANES: usize = 16;

/// `(sum f(x, g, y).0, sum f(x, g, y).1)` over the elements of three equal-length slices, in
/// [`SUM_LANES`] partial sums (pass a slice twice where fewer are needed).
#[inline]
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
        None => super::planes::par_planes(x.len(), l, |plane| {
            let (at, m, b) = plane_of(plane);
            x[at].iter().map(move |&s| clamp.apply(s * m + b))
        }),
        Some(r) => super::planes::par_planes(x.len(), l, |plane| {
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
    let (g, planes) = super::planes::par_planes_fold(
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
        None => super::planes::par_planes(x.len(), l, |plane| {
            let (at, m, r, k, md, mdx) = plane_values(plane);
            let (xs, gs) = (&x[at.clone()], &dy[at]);
            xs.iter()
                .zip(gs)
                .map(move |(&xv, &g)| k * (g - md - (xv - m) * r * mdx))
        }),
        Some(cl) => super::planes::par_planes(x.len(), l, |plane| {
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

/// Per-output-channel `clamp(v * scale + shift + residual)` (BatchNorm, a residual block's
/// shortcut and an activation folded into the convolution for inference), applied as the
/// convolution writes its output.
#[derive(Debug, Clone, Copy)]
pub struct Epilogue<'a> {
    /// Per-channel factor.
    pub scale: &'a [f32],
    /// Per-channel offset.
    pub shift: &'a [f32],
    /// Values added before the clamp, laid out like the whole output (`None`: nothing).
    pub residual: Option<&'a [f32]>,
    /// The activation.
    pub clamp: Clamp,
}

impl Epilogue<'_> {
    /// Applies channel `ch`'s transform to `values`, which sit at offset `at` of the output.
    pub fn apply(&self, ch: usize, values: &mut [f32], at: usize) {
        widest_simd!(self.apply_here(ch, values, at));
    }

    #[inline(always)]
    fn apply_here(&self, ch: usize, values: &mut [f32], at: usize) {
        let (m, b) = (self.scale[ch], self.shift[ch]);
        match self.residual {
            None => {
                for v in values.iter_mut() {
                    *v = self.clamp.apply(*v * m + b);
                }
            }
            Some(r) => {
                let n = values.len();
                for (v, &r) in values.iter_mut().zip(&r[at..at + n]) {
                    *v = self.clamp.apply(*v * m + b + r);
                }
            }
        }
    }
}

/// The shape of one 2-D convolution: square kernel, equal stride and padding on both axes,
/// no dilation, one group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvGeometry {
    /// Input channels.
    pub in_channels: usize,
    /// Output channels.
    pub out_channels: usize,
    /// Input height and width.
    pub in_hw: [usize; 2],
    /// Kernel size.
    pub kernel: usize,
    /// Stride.
    pub stride: usize,
    /// Zero padding on every side.
    pub padding: usize,
}

impl ConvGeometry {
    /// Output height and width.
    pub fn out_hw(&self) -> [usize; 2] {
        let out = |i: usize| (i + 2 * self.padding - self.kernel) / self.stride + 1;
        [out(self.in_hw[0]), out(self.in_hw[1])]
    }

    /// Rows of the column matrix: `in_channels * kernel^2`.
    pub fn patch(&self) -> usize {
        self.in_channels * self.kernel * self.kernel
    }

    /// Output positions per image.
    pub fn positions(&self) -> usize {
        let [h, w] = self.out_hw();
        h * w
    }

    /// Values in one input image.
    pub fn image(&self) -> usize {
        self.in_channels * self.in_hw[0] * self.in_hw[1]
    }

    /// Output positions `[lo, hi)` along an axis of `out` positions whose input index
    /// `o * stride + k - padding` falls inside `0..size`.
    pub(crate) fn valid(&self, k: usize, size: usize, out: usize) -> (usize, usize) {
        let (s, p) = (self.stride, self.padding);
        let lo = if k >= p { 0 } else { (p - k).div_ceil(s) };
        // o * s + k - p <= size - 1  <=>  o <= (size - 1 + p - k) / s
        let hi = if size + p > k {
            ((size - 1 + p - k) / s + 1).min(out)
        } else {
            0
        };
        (lo.min(hi), hi)
    }
}

/// The kernel of the input gradient of a stride-1 convolution: `w` (`[Co, Ci, k, k]`) with its
/// two channel axes swapped and both spatial axes reversed, `[Ci, Co, k, k]`.
pub fn flip_transpose(w: &[f32], g: &ConvGeometry) -> Vec<f32> {
    let (co, ci, kk) = (g.out_channels, g.in_channels, g.kernel * g.kernel);
    assert_eq!(w.len(), co * ci * kk, "weights of the wrong size");
    // One input channel (a row of `Co * k * k` values) per parallel plane.
    super::planes::par_planes(w.len(), co * kk, |i| {
        (0..co).flat_map(move |o| w[(o * ci + i) * kk..][..kk].iter().rev().copied())
    })
}

/// Appends the column matrix of `images` (each `[C, H, W]`, side by side) to `cols`:
/// `[C * k * k, images * OH * OW]`, row `(c, kh, kw)`, column `(image, oh, ow)`. Every value is
/// written once (no zero fill first).
pub fn im2col(images: &[&[f32]], g: &ConvGeometry, cols: &mut Vec<f32>) {
    im2col_with(images, g, GatherTable::new(g).as_ref(), cols);
}

/// [`im2col`] with the geometry's [`GatherTable`] built beforehand (once per convolution, not
/// once per group of images).
pub fn im2col_with(
    images: &[&[f32]],
    g: &ConvGeometry,
    table: Option<&GatherTable>,
    cols: &mut Vec<f32>,
) {
    let [oh, ow] = g.out_hw();
    cols.reserve(g.patch() * images.len() * oh * ow);
    if let Some(table) = table {
        return table.gather(images, g, cols);
    }
    for row in 0..g.patch() {
        for x in images {
            debug_assert_eq!(x.len(), g.image());
            if [oh, ow] == g.in_hw {
                append_row_same(x, g, row, cols);
            } else {
                append_row(x, g, row, cols);
            }
        }
    }
}

/// Output maps of at most this many positions take a [`GatherTable`].
const SMALL_MAP: usize = 16;

/// For small output maps, whose column rows are too short for copies of runs, and for strided
/// convolutions: the input position each output position reads through each tap
/// (`[tap][output position]`, the plane size for padding), so that a row is one gather.
#[derive(Debug, Clone)]
pub struct GatherTable(Vec<usize>);

impl GatherTable {
    /// The table of `g`, or `None` when its rows are better copied in runs (stride 1, maps of
    /// more than 16 positions: copying runs of rows wins from 8x8 maps up).
    pub fn new(g: &ConvGeometry) -> Option<Self> {
        let [h, w] = g.in_hw;
        let [oh, ow] = g.out_hw();
        if oh * ow > SMALL_MAP && g.stride == 1 {
            return None;
        }
        let k = g.kernel;
        let table = (0..k * k)
            .flat_map(|t| {
                let (kh, kw) = (t / k, t % k);
                (0..oh).flat_map(move |oy| {
                    (0..ow).map(move |ox| {
                        let iy = (oy * g.stride + kh).checked_sub(g.padding);
                        let ix = (ox * g.stride + kw).checked_sub(g.padding);
                        match (iy, ix) {
                            (Some(iy), Some(ix)) if iy < h && ix < w => iy * w + ix,
                            _ => h * w,
                        }
                    })
                })
            })
            .collect();
        Some(Self(table))
    }

    fn gather(&self, images: &[&[f32]], g: &ConvGeometry, cols: &mut Vec<f32>) {
        let [h, w] = g.in_hw;
        let (taps, n, l) = (
            g.kernel * g.kernel,
            h * w,
            self.0.len() / (g.kernel * g.kernel),
        );
        for row in 0..g.patch() {
            let (c, t) = (row / taps, row % taps);
            let reads = &self.0[t * l..][..l];
            for x in images {
                let plane = &x[c * n..][..n];
                cols.extend(reads.iter().map(|&i| plane.get(i).copied().unwrap_or(0.0)));
            }
        }
    }
}

/// Appends row `(c, kh, kw)` of one image's column matrix (`OH * OW` values) of a stride-1
/// convolution: runs of input rows copied between zeros.
fn append_row(x: &[f32], g: &ConvGeometry, row: usize, cols: &mut Vec<f32>) {
    let [h, w] = g.in_hw;
    let [oh, ow] = g.out_hw();
    let k = g.kernel;
    let c = row / (k * k);
    let (kh, kw) = ((row / k) % k, row % k);
    let (ylo, yhi) = g.valid(kh, h, oh);
    let (xlo, xhi) = g.valid(kw, w, ow);
    if xlo >= xhi {
        cols.resize(cols.len() + oh * ow, 0.0);
        return;
    }
    let plane = &x[c * h * w..(c + 1) * h * w];
    cols.resize(cols.len() + ylo * ow, 0.0);
    debug_assert_eq!(g.stride, 1, "strided convolutions take im2col_gather");
    let ix0 = xlo + kw - g.padding;
    for y in ylo..yhi {
        let iy = y + kh - g.padding;
        let irow = &plane[iy * w + ix0..(iy + 1) * w];
        cols.resize(cols.len() + xlo, 0.0);
        cols.extend_from_slice(&irow[..xhi - xlo]);
        cols.resize(cols.len() + (ow - xhi), 0.0);
    }
    cols.resize(cols.len() + (oh - yhi) * ow, 0.0);
}

/// [`append_row`] for a stride-1 convolution whose output is as large as its input ("same"
/// padding): the row is the input plane shifted by `(kh - p) * W + (kw - p)` in flattened
/// order, so it is one copy, after which the few values that wrapped around a row edge are
/// zeroed.
fn append_row_same(x: &[f32], g: &ConvGeometry, row: usize, cols: &mut Vec<f32>) {
    let [h, w] = g.in_hw;
    let (k, n) = (g.kernel, h * w);
    let c = row / (k * k);
    let (kh, kw) = ((row / k) % k, row % k);
    let plane = &x[c * n..(c + 1) * n];
    let start = cols.len();
    // Output position o reads input o + shift.
    let shift = (kh * w + kw) as isize - (g.padding * w + g.padding) as isize;
    let lo = (-shift).clamp(0, n as isize) as usize;
    let hi = (n as isize - shift).clamp(0, n as isize) as usize;
    cols.resize(start + lo, 0.0);
    if lo < hi {
        let from = (lo as isize + shift) as usize;
        cols.extend_from_slice(&plane[from..from + (hi - lo)]);
    }
    cols.resize(start + n, 0.0);
    let (xlo, xhi) = g.valid(kw, w, w);
    if xlo > 0 || xhi < w {
        for out_row in cols[start..start + n].chunks_mut(w) {
            out_row[..xlo].fill(0.0);
            out_row[xhi..].fill(0.0);
        }
    }
}

/// The adjoint of [`im2col`]: sums image `image`'s part of the column matrix `cols`
/// (`[C * k * k, images * OH * OW]`, images side by side) into `dx` (`[C, H, W]`, overwritten).
pub fn col2im(cols: &[f32], g: &ConvGeometry, images: usize, image: usize, dx: &mut [f32]) {
    let [h, w] = g.in_hw;
    let [oh, ow] = g.out_hw();
    let (k, l) = (g.kernel, oh * ow);
    debug_assert_eq!(dx.len(), g.image());
    for (c, dst) in dx.chunks_mut(h * w).enumerate() {
        dst.fill(0.0);
        for kh in 0..k {
            let (ylo, yhi) = g.valid(kh, h, oh);
            for kw in 0..k {
                let (xlo, xhi) = g.valid(kw, w, ow);
                if xlo >= xhi {
                    continue;
                }
                let src = &cols[(((c * k + kh) * k + kw) * images + image) * l..][..l];
                let ix0 = xlo * g.stride + kw - g.padding;
                for y in ylo..yhi {
                    let iy = y * g.stride + kh - g.padding;
                    let drow = &mut dst[iy * w..(iy + 1) * w];
                    let srow = &src[y * ow + xlo..y * ow + xhi];
                    for (d, s) in drow[ix0..].iter_mut().step_by(g.stride).zip(srow) {
                        *d += s;
                    }
                }
            }
        }
    }
}

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
    super::planes::par_planes(planes * h * w, h * w, move |p| {
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
