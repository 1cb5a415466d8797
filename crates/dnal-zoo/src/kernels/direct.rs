//! Direct convolution on AVX-512 for stride-1 "same" convolutions (the 3x3 convolutions of
//! ResNets and VGG), forward and weight gradient, without a column matrix.
//!
//! im2col writes every input value `k^2` times (9 for 3x3) before a matrix product reads them
//! again, and for the narrow layers of CIFAR networks (16-64 filters) that traffic costs about
//! as much as the arithmetic. Here the micro-kernels read the input image directly: for a
//! vector of 16 consecutive output positions (flattened `oy * W + ox`), patch row
//! `(c, kh, kw)` is the 16 consecutive input values at the same flattened position shifted by
//! `(kh - p) * W + (kw - p)`, with the lanes whose input falls outside the image masked off
//! (a masked load reads nothing there and yields zero). That needs `H * W` to be a multiple of
//! 16 (32x32 down to 4x4 maps).
//!
//! * Forward, `Y [Co, L] = W [Co, P] x X_shifted [P, L]`: up to 8 output channels x 2 vectors
//!   of positions in 16 accumulators, one broadcast weight per pair of FMAs. Output channels
//!   are split into near-equal blocks (17 filters: 6 + 6 + 5), so pruned layers with odd
//!   widths waste no lanes.
//! * Weight gradient, `dW [Co, P] = dY [Co, L] x X_shifted^T [L, P]` over a run of images: up
//!   to 4 output channels x 4 patch rows in 16 accumulators along the positions, each reduced
//!   once per run, in a fixed order (so the result does not depend on the number of threads).
//! * The input gradient of a stride-1 convolution is itself such a convolution (flipped,
//!   transposed kernel) and takes the forward path.
//!
//! Everything else (strided convolutions, other map sizes, batches too small to give every
//! thread whole images, CPUs without AVX-512) uses im2col and `gemm`.
//!
//! The only unsafe code is the vector loads and stores of the micro-kernels; each load reads
//! only lanes whose position is inside the image slice it is given.
#![allow(unsafe_code)]

use super::cpu::{ConvGeometry, Epilogue};

/// Positions per vector.
const LANES: usize = 16;
/// Most output channels per forward micro-kernel.
const MAX_CHANNELS: usize = 8;
/// Most output channels and patch rows per weight-gradient micro-kernel.
const DW_CHANNELS: usize = 4;
const DW_ROWS: usize = 4;

/// Whether this CPU runs the AVX-512 kernels.
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether the direct kernels compute convolution `g`: stride 1, output as large as the input,
/// and maps of a whole number of vectors.
pub fn supports(g: &ConvGeometry) -> bool {
    g.stride == 1
        && g.out_hw() == g.in_hw
        && g.positions().is_multiple_of(LANES)
        && g.positions() > 0
        && g.patch() > 0
}

/// The kernel taps of `g`: for tap `(kh, kw)`, the flattened input offset `(kh - p) * W +
/// (kw - p)` and, for each vector of an image, the mask of lanes whose input is inside it.
struct Taps {
    /// `k * k` offsets.
    offsets: Vec<isize>,
    /// `[vector][tap]` lane masks.
    masks: Vec<u16>,
    taps: usize,
}

impl Taps {
    fn new(g: &ConvGeometry) -> Self {
        let (k, p) = (g.kernel as isize, g.padding as isize);
        let [h, w] = [g.in_hw[0] as isize, g.in_hw[1] as isize];
        let taps = (k * k) as usize;
        let mut offsets = Vec::with_capacity(taps);
        for kh in 0..k {
            for kw in 0..k {
                offsets.push((kh - p) * w + (kw - p));
            }
        }
        let vectors = g.positions() / LANES;
        let mut masks = Vec::with_capacity(vectors * taps);
        for v in 0..vectors {
            for kh in 0..k {
                for kw in 0..k {
                    let mut mask = 0u16;
                    for lane in 0..LANES {
                        let at = (v * LANES + lane) as isize;
                        let (iy, ix) = (at / w + kh - p, at % w + kw - p);
                        if (0..h).contains(&iy) && (0..w).contains(&ix) {
                            mask |= 1 << lane;
                        }
                    }
                    masks.push(mask);
                }
            }
        }
        Self {
            offsets,
            masks,
            taps,
        }
    }

    fn masks(&self, vector: usize) -> &[u16] {
        &self.masks[vector * self.taps..][..self.taps]
    }
}

/// The output channels split into near-equal blocks of at most [`MAX_CHANNELS`]:
/// `(first, count)`.
fn channel_blocks(channels: usize) -> Vec<(usize, usize)> {
    let blocks = channels.div_ceil(MAX_CHANNELS);
    let mut out = Vec::with_capacity(blocks);
    let mut first = 0;
    for b in 0..blocks {
        let count = (channels - first) / (blocks - b);
        out.push((first, count));
        first += count;
    }
    out
}

/// A convolution's weights and taps prepared for the forward kernel: per channel block,
/// `[P][MAX_CHANNELS]` (zero past the block's channels).
pub struct PackedWeights {
    values: Vec<f32>,
    blocks: Vec<(usize, usize)>,
    patch: usize,
    taps: Taps,
}

impl PackedWeights {
    /// Packs `w` (`[Co, P]`, row-major) for geometry `g` (which [`supports`] accepts).
    pub fn new(w: &[f32], g: &ConvGeometry) -> Self {
        assert!(supports(g), "not a convolution the direct kernels compute");
        let p = g.patch();
        assert_eq!(w.len(), g.out_channels * p, "weights of the wrong size");
        let blocks = channel_blocks(g.out_channels);
        let mut values = vec![0.0; blocks.len() * p * MAX_CHANNELS];
        for (b, &(first, count)) in blocks.iter().enumerate() {
            let dst = &mut values[b * p * MAX_CHANNELS..][..p * MAX_CHANNELS];
            for r in 0..count {
                for (k, &v) in w[(first + r) * p..][..p].iter().enumerate() {
                    dst[k * MAX_CHANNELS + r] = v;
                }
            }
        }
        Self {
            values,
            blocks,
            patch: p,
            taps: Taps::new(g),
        }
    }

    fn block(&self, b: usize) -> &[f32] {
        &self.values[b * self.patch * MAX_CHANNELS..][..self.patch * MAX_CHANNELS]
    }
}

/// One vector of output positions: its image's input and where it starts in the image.
#[derive(Clone, Copy)]
struct Vector<'a> {
    image: &'a [f32],
    at: usize,
    masks: &'a [u16],
}

/// The forward convolution of consecutive images (`x`, `[n, Ci, H, W]`) into `out`
/// (`[n, Co, H, W]`), with the epilogue applied as each tile is written.
pub fn conv_forward_images(
    x: &[f32],
    w: &PackedWeights,
    g: &ConvGeometry,
    epilogue: Option<Epilogue>,
    out: &mut [f32],
) {
    let (l, co) = (g.positions(), g.out_channels);
    let image_len = g.image();
    let images = x.len() / image_len;
    assert_eq!(out.len(), images * co * l, "output of the wrong size");
    let per_image = l / LANES;
    let vector = |v: usize| Vector {
        image: &x[(v / per_image) * image_len..][..image_len],
        at: (v % per_image) * LANES,
        masks: w.taps.masks(v % per_image),
    };
    let total = images * per_image;
    let mut tile = [0.0f32; MAX_CHANNELS * 2 * LANES];
    for v in (0..total).step_by(2) {
        let pair = [Some(vector(v)), (v + 1 < total).then(|| vector(v + 1))];
        for (b, &(first, count)) in w.blocks.iter().enumerate() {
            forward_tile(w.block(b), &w.taps.offsets, l, pair, count, &mut tile);
            for (half, slot) in pair.iter().enumerate() {
                let Some(slot) = slot else { continue };
                let image = (v + half) / per_image;
                for r in 0..count {
                    let ch = first + r;
                    let dst = &mut out[(image * co + ch) * l + slot.at..][..LANES];
                    dst.copy_from_slice(&tile[(r * 2 + half) * LANES..][..LANES]);
                    if let Some(e) = epilogue {
                        e.apply(ch, dst);
                    }
                }
            }
        }
    }
}

/// The weight gradient of consecutive images, `[Co, P]`: `x` their input (`[n, Ci, H, W]`),
/// `dy` their output gradient (`[n, Co, H, W]`).
pub fn conv_weight_grad_images(x: &[f32], dy: &[f32], g: &ConvGeometry) -> Vec<f32> {
    assert!(supports(g), "not a convolution the direct kernels compute");
    let (co, p, l) = (g.out_channels, g.patch(), g.positions());
    let images = x.len() / g.image();
    assert_eq!(
        dy.len(),
        images * co * l,
        "output gradient of the wrong size"
    );
    let taps = Taps::new(g);
    let mut dw = vec![0.0f32; co * p];
    let mut sums = [0.0f32; DW_CHANNELS * DW_ROWS];
    for c0 in (0..co).step_by(DW_CHANNELS) {
        let rc = DW_CHANNELS.min(co - c0);
        for k0 in (0..p).step_by(DW_ROWS) {
            let rk = DW_ROWS.min(p - k0);
            weight_grad_tile(x, dy, g, &taps, (c0, rc), (k0, rk), &mut sums);
            for r in 0..rc {
                dw[(c0 + r) * p + k0..][..rk].copy_from_slice(&sums[r * DW_ROWS..][..rk]);
            }
        }
    }
    dw
}

/// `tile[r][half]` (two vectors per channel) = block weights x shifted input, for `r < count`.
fn forward_tile(
    w: &[f32],
    offsets: &[isize],
    l: usize,
    pair: [Option<Vector>; 2],
    count: usize,
    tile: &mut [f32; MAX_CHANNELS * 2 * LANES],
) {
    let first = pair[0].expect("a tile has a first vector");
    // A missing second vector reads nothing (all lanes masked off) from the first's image.
    let second = pair[1].unwrap_or(first);
    let none = [0u16; 0];
    let second_masks = if pair[1].is_some() {
        second.masks
    } else {
        &none[..]
    };
    let channels = first.image.len() / l;
    assert!(w.len() >= channels * offsets.len() * MAX_CHANNELS);
    assert!(first.masks.len() == offsets.len());
    macro_rules! dispatch {
        ($($r:literal)*) => {
            match count {
                $($r => {
                    // SAFETY: the callers use the direct kernels only when `available()`; every
                    // unmasked lane of tap t at position at + lane reads input position
                    // at + lane + offsets[t] of channel c, inside the image (`Taps::new`).
                    #[cfg(target_arch = "x86_64")]
                    unsafe {
                        avx512::forward::<$r>(
                            w, offsets, l, channels,
                            (first.image, first.at, first.masks),
                            (second.image, second.at, second_masks),
                            tile,
                        )
                    }
                })*
                _ => unreachable!("channel blocks hold 1 to {MAX_CHANNELS} channels"),
            }
        };
    }
    dispatch!(1 2 3 4 5 6 7 8);
}

/// `sums[r][j]` = sum over the images and positions of `dy[c0 + r] * x_shifted[k0 + j]`.
fn weight_grad_tile(
    x: &[f32],
    dy: &[f32],
    g: &ConvGeometry,
    taps: &Taps,
    (c0, rc): (usize, usize),
    (k0, rk): (usize, usize),
    sums: &mut [f32; DW_CHANNELS * DW_ROWS],
) {
    macro_rules! dispatch {
        ($(($a:literal, $b:literal))*) => {
            match (rc, rk) {
                $(($a, $b) => {
                    // SAFETY: as in `forward_tile`: unmasked lanes read inside each image.
                    #[cfg(target_arch = "x86_64")]
                    unsafe {
                        avx512::weight_grad::<$a, $b>(x, dy, g, taps, c0, k0, sums)
                    }
                })*
                _ => unreachable!("tiles hold 1 to 4 channels and rows"),
            }
        };
    }
    dispatch!(
        (1, 1)(1, 2)(1, 3)(1, 4)(2, 1)(2, 2)(2, 3)(2, 4)(3, 1)(3, 2)(3, 3)(3, 4)(4, 1)(4, 2)(4, 3)(
            4, 4
        )
    );
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{ConvGeometry, DW_CHANNELS, DW_ROWS, LANES, MAX_CHANNELS, Taps};
    use std::arch::x86_64::*;

    /// The masked load of 16 input values of channel `c` at flattened position
    /// `at + offset`: lanes off in `mask` are zero and not read.
    ///
    /// # Safety
    /// AVX-512F must be available and every lane on in `mask` must be inside `image`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load(image: &[f32], base: usize, offset: isize, mask: u16) -> __m512 {
        let ptr = image.as_ptr().wrapping_add(base).wrapping_offset(offset);
        // SAFETY: see the contract; masked-off lanes are not accessed.
        unsafe { _mm512_maskz_loadu_ps(mask, ptr) }
    }

    /// `tile[r][0]`, `tile[r][1]` = sum over patch rows `k = (c, t)` of `w[k][r]` times the
    /// two vectors' shifted input.
    ///
    /// # Safety
    /// AVX-512F must be available; `w` holds `channels * offsets.len() * MAX_CHANNELS`
    /// values; each vector's masks say which lanes of each tap are inside its image (an empty
    /// mask list: none).
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    pub unsafe fn forward<const R: usize>(
        w: &[f32],
        offsets: &[isize],
        l: usize,
        channels: usize,
        (x0, at0, m0): (&[f32], usize, &[u16]),
        (x1, at1, m1): (&[f32], usize, &[u16]),
        tile: &mut [f32; MAX_CHANNELS * 2 * LANES],
    ) {
        let taps = offsets.len();
        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        for c in 0..channels {
            for t in 0..taps {
                let off = offsets[t];
                let mask1 = m1.get(t).copied().unwrap_or(0);
                // SAFETY: contract (lanes on are inside the image).
                let (v0, v1) = unsafe {
                    (
                        load(x0, c * l + at0, off, m0[t]),
                        load(x1, c * l + at1, off, mask1),
                    )
                };
                let wk = &w[(c * taps + t) * MAX_CHANNELS..][..MAX_CHANNELS];
                for (a, &wr) in acc.iter_mut().zip(wk) {
                    let s = _mm512_set1_ps(wr);
                    a[0] = _mm512_fmadd_ps(s, v0, a[0]);
                    a[1] = _mm512_fmadd_ps(s, v1, a[1]);
                }
            }
        }
        for (r, a) in acc.iter().enumerate() {
            let dst = &mut tile[r * 2 * LANES..][..2 * LANES];
            // SAFETY: `dst` holds 32 values.
            unsafe {
                _mm512_storeu_ps(dst.as_mut_ptr(), a[0]);
                _mm512_storeu_ps(dst.as_mut_ptr().add(LANES), a[1]);
            }
        }
    }

    /// `sums[r][j]` = sum over images and positions of `dy[c0 + r] * x_shifted[k0 + j]`, for
    /// `r < RC`, `j < RK`.
    ///
    /// # Safety
    /// AVX-512F must be available; `x` and `dy` hold whole images of `g`, and the masks of
    /// `taps` are those of `g`.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn weight_grad<const RC: usize, const RK: usize>(
        x: &[f32],
        dy: &[f32],
        g: &ConvGeometry,
        taps: &Taps,
        c0: usize,
        k0: usize,
        sums: &mut [f32; DW_CHANNELS * DW_ROWS],
    ) {
        let (l, co) = (g.positions(), g.out_channels);
        let image_len = g.image();
        let images = x.len() / image_len;
        let tap_count = taps.offsets.len();
        let rows: [(usize, usize); RK] = std::array::from_fn(|j| {
            let k = k0 + j;
            (k / tap_count, k % tap_count)
        });
        let mut acc = [[_mm512_setzero_ps(); RK]; RC];
        for i in 0..images {
            let image = &x[i * image_len..][..image_len];
            let grad = &dy[i * co * l..][..co * l];
            for v in 0..l / LANES {
                let masks = taps.masks(v);
                let at = v * LANES;
                let d: [__m512; RC] = std::array::from_fn(|r| {
                    let row = &grad[(c0 + r) * l + at..][..LANES];
                    // SAFETY: `row` holds 16 values.
                    unsafe { _mm512_loadu_ps(row.as_ptr()) }
                });
                for (j, &(c, t)) in rows.iter().enumerate() {
                    // SAFETY: lanes on in the mask are inside the image (`Taps::new`).
                    let xs = unsafe { load(image, c * l + at, taps.offsets[t], masks[t]) };
                    for (a, dr) in acc.iter_mut().zip(&d) {
                        a[j] = _mm512_fmadd_ps(*dr, xs, a[j]);
                    }
                }
            }
        }
        for (r, a) in acc.iter().enumerate() {
            for (j, v) in a.iter().enumerate() {
                sums[r * DW_ROWS + j] = _mm512_reduce_add_ps(*v);
            }
        }
    }
}
