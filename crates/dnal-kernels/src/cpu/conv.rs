//! The host-memory halves of the convolution, on one image's `f32` slices in NCHW order:
//! its geometry, im2col and col2im, the flipped kernel of its input gradient, and the
//! epilogue applied as it writes its output.

use super::clamp::Clamp;
use crate::memo::Memo;
use crate::planes::par_planes;
use crate::simd::widest_simd;
use std::sync::Arc;

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
        // Everything the loops read besides the values, as values: read through `self` in the
        // loop (the stores could alias it), the clamp compiled to a gather of its bounds.
        let (m, b, clamp) = (self.scale[ch], self.shift[ch], self.clamp);
        match self.residual {
            None => {
                for v in values.iter_mut() {
                    *v = clamp.apply(*v * m + b);
                }
            }
            Some(r) => {
                let n = values.len();
                for (v, &r) in values.iter_mut().zip(&r[at..at + n]) {
                    *v = clamp.apply(*v * m + b + r);
                }
            }
        }
    }
}

/// The shape of one 2-D convolution: square kernel, equal stride and padding on both axes,
/// no dilation, one group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
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

/// What a convolution's spatial layout depends on: input map, kernel, padding, stride (not
/// the channels).
pub type GeometryKey = ([usize; 2], usize, usize, usize);

impl ConvGeometry {
    /// The spatial part of this geometry, which its taps and gather table depend on.
    pub fn key(&self) -> GeometryKey {
        (self.in_hw, self.kernel, self.padding, self.stride)
    }

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

    /// Whether the column matrix of one image is the image itself (`[in_channels, positions]`
    /// row-major): a 1x1 convolution with stride 1 and no padding, which needs no im2col.
    pub fn columns_are_input(&self) -> bool {
        self.kernel == 1 && self.stride == 1 && self.padding == 0
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
    par_planes(w.len(), co * kk, |i| {
        (0..co).flat_map(move |o| w[(o * ci + i) * kk..][..kk].iter().rev().copied())
    })
}

/// Appends the column matrix of `images` (each `[C, H, W]`, side by side) to `cols`:
/// `[C * k * k, images * OH * OW]`, row `(c, kh, kw)`, column `(image, oh, ow)`. Every value is
/// written once (no zero fill first).
pub fn im2col(images: &[&[f32]], g: &ConvGeometry, cols: &mut Vec<f32>) {
    im2col_with(images, g, GatherTable::shared(g).as_deref(), cols);
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
    /// more than 16 positions: copying runs of rows wins from 8x8 maps up). Built once per
    /// process and geometry: at batch 1 building it took as long as the gather.
    pub fn shared(g: &ConvGeometry) -> Option<Arc<Self>> {
        static TABLES: Memo<GeometryKey, GatherTable> = Memo::new();
        let [oh, ow] = g.out_hw();
        if oh * ow > SMALL_MAP && g.stride == 1 {
            return None;
        }
        Some(TABLES.get(g.key(), || Self::new(g)))
    }

    fn new(g: &ConvGeometry) -> Self {
        let [h, w] = g.in_hw;
        let [oh, ow] = g.out_hw();
        let k = g.kernel;
        let mut table = Vec::with_capacity(k * k * oh * ow);
        for (kh, kw) in (0..k).flat_map(|kh| (0..k).map(move |kw| (kh, kw))) {
            for oy in 0..oh {
                let iy = (oy * g.stride + kh)
                    .checked_sub(g.padding)
                    .filter(|&iy| iy < h);
                table.extend((0..ow).map(|ox| {
                    let ix = (ox * g.stride + kw)
                        .checked_sub(g.padding)
                        .filter(|&ix| ix < w);
                    match (iy, ix) {
                        (Some(iy), Some(ix)) => iy * w + ix,
                        _ => h * w,
                    }
                }));
            }
        }
        Self(table)
    }

    /// The column matrix of one image (`[patch, OH * OW]`), its rows gathered in parallel
    /// (on this thread below `planes::SERIAL_BELOW` values): at batch 1 a large
    /// strided convolution's product is split over the threads, and a gather on one thread
    /// would leave the others waiting.
    pub fn gather_image(&self, image: &[f32], g: &ConvGeometry) -> Vec<f32> {
        debug_assert_eq!(image.len(), g.image());
        let l = self.positions(g);
        par_planes(g.patch() * l, l, |row| self.row(image, g, row))
    }

    fn gather(&self, images: &[&[f32]], g: &ConvGeometry, cols: &mut Vec<f32>) {
        for row in 0..g.patch() {
            for x in images {
                cols.extend(self.row(x, g, row));
            }
        }
    }

    /// Output positions per image: the table holds one read per tap and position.
    fn positions(&self, g: &ConvGeometry) -> usize {
        self.0.len() / (g.kernel * g.kernel)
    }

    /// Row `row` (channel and tap) of `image`'s column matrix: the input each output position
    /// reads through the row's tap, zero where that is padding.
    fn row<'a>(
        &'a self,
        image: &'a [f32],
        g: &ConvGeometry,
        row: usize,
    ) -> impl Iterator<Item = f32> + 'a {
        let (taps, n, l) = (
            g.kernel * g.kernel,
            g.in_hw[0] * g.in_hw[1],
            self.positions(g),
        );
        let (c, t) = (row / taps, row % taps);
        let plane = &image[c * n..][..n];
        self.0[t * l..][..l]
            .iter()
            .map(move |&i| plane.get(i).copied().unwrap_or(0.0))
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
