//! Direct convolution for stride-1 "same" convolutions (the 3x3 convolutions of ResNets and
//! VGG), forward and weight gradient, in AVX-512 or AVX2, without a column matrix.
//!
//! im2col writes every input value `k^2` times (9 for 3x3) before a matrix product reads them
//! again, and for the narrow layers of CIFAR networks (16-64 filters) that traffic costs about
//! as much as the arithmetic. Here the micro-kernels read the input image directly: for a
//! vector of 16 consecutive output positions (flattened `oy * W + ox`), patch row
//! `(c, kh, kw)` is the 16 consecutive input values at the same flattened position shifted by
//! `(kh - p) * W + (kw - p)`, with the lanes whose input falls outside the image masked off
//! (a masked load reads nothing there and yields zero). The forward kernel takes any map: an
//! image's last vector may be partial (14x14 maps have 196 positions, 12 vectors and 4
//! lanes), and its lanes past the image are neither read nor stored. The weight-gradient
//! kernel needs `H * W` to be a multiple of 16 (32x32 down to 4x4 maps).
//!
//! * Forward, `Y [Co, L] = W [Co, P] x X_shifted [P, L]`: on AVX-512 (`avx512.rs`) up to 8
//!   output channels x 2 vectors of positions in 16 accumulators (up to 6 x 4 in 24 for narrow
//!   blocks), one broadcast weight per 2 or 4 FMAs; on AVX2 (`avx2.rs`) up to 4 channels x 2
//!   half vectors, or 2 x 4. Output channels are split into near-equal blocks (17 filters:
//!   6 + 6 + 5), so pruned layers with odd widths waste no lanes. BatchNorm, a residual and
//!   the activation are applied in registers, and the output is written once.
//! * Weight gradient, `dW [Co, P] = dY [Co, L] x X_shifted^T [L, P]` over a run of images: up
//!   to 6 output channels (near-equal blocks) x 4 patch rows in 24 accumulators (AVX2: 2 x 4
//!   half vectors, the rows of a tile sharing one tap) along the positions, each reduced once per run, in a fixed order (so the result does not depend on
//!   the number of threads). The images go in chunks of about 1024 positions, and a chunk's
//!   block of output-gradient rows stays in L1 while every tile of patch rows passes over it.
//! * The input gradient of a stride-1 convolution is itself such a convolution (flipped,
//!   transposed kernel) and takes the forward path.
//! * One image of a large layer (batch 1, called from inside rayon's pool: a frozen network's
//!   forward) has its channel blocks spread over the threads; with weights packed once, the
//!   AVX-512 kernel then also takes layers of more than 128 filters and maps down to 1x1,
//!   which `gemm` would run on one thread.
//! * In AVX2, 3x3 (and larger) convolutions take another form (`rows.rs`) on CPUs that run
//!   AVX2 in 128-bit halves, and the narrow ones of CIFAR networks on every AVX2 CPU: each
//!   image copied once with a zero border, output rows in 8-position vectors read with plain
//!   loads; the forward holds up to 6 channels x 2 vectors per step, the weight gradient 3
//!   channels x 4 patch rows of 8-lane partial sums.
//!
//! Everything else (strided convolutions, other map sizes, batches too small to give every
//! thread whole images, CPUs without AVX2, and on CPUs that run AVX2 in 128-bit halves 1x1
//! convolutions of many input channels and weight gradients on maps whose rows are not whole
//! 8-lane vectors) uses im2col and `gemm`. [`crate::isa`] says which instruction set runs.
//!
//! The only unsafe code is the vector loads and stores of the micro-kernels; each load reads
//! only lanes whose position is inside the image slice it is given.
#![allow(unsafe_code)]

use crate::cpu::{ConvGeometry, Epilogue, GeometryKey};
use crate::memo::Memo;
use crate::simd::{Isa, isa};
use rustc_hash::FxHashMap;
use std::ops::Range;
use std::sync::{Arc, Mutex, OnceLock};

/// Positions per vector.
const LANES: usize = 16;
/// Most output channels per forward micro-kernel.
const MAX_CHANNELS: usize = 8;
/// Most vectors of positions per forward micro-kernel step.
const TILE_VECTORS: usize = 4;
/// Most output channels and patch rows per weight-gradient micro-kernel (AVX-512: 24
/// accumulators).
const DW_CHANNELS: usize = 6;
const DW_ROWS: usize = 4;

/// Whether this CPU runs the direct kernels (in AVX-512 or AVX2).
pub fn available() -> bool {
    isa().is_some()
}

/// Most output channels per forward micro-kernel on `isa`: AVX2's 16 vector registers hold
/// the accumulators of 4 channels x 16 positions (two 8-lane halves each) with the inputs and
/// the broadcast weight; with 6 the loop spilled and ran at half the speed.
fn block_channels(isa: Isa) -> usize {
    match isa {
        Isa::Avx512 => MAX_CHANNELS,
        Isa::Avx2 => 4,
    }
}

/// Most output channels per weight-gradient micro-kernel on `isa` (AVX2: 2 x [`DW_ROWS`]
/// accumulators; with 3 its 16 registers did not hold the loop's values, and it ran slower).
fn dw_block_channels(isa: Isa) -> usize {
    match isa {
        Isa::Avx512 => DW_CHANNELS,
        Isa::Avx2 => 2,
    }
}

/// Whether the forward kernel computes convolution `g`: stride 1, output as large as the
/// input.
pub fn supports_forward(g: &ConvGeometry) -> bool {
    g.stride == 1 && g.out_hw() == g.in_hw && g.positions() > 0 && g.patch() > 0
}

/// Whether the weight-gradient kernel computes convolution `g`: as the forward, on maps of a
/// whole number of vectors.
pub fn supports(g: &ConvGeometry) -> bool {
    supports_forward(g) && g.positions().is_multiple_of(LANES)
}

/// Whether the forward kernel should compute `g`: it beats `gemm` up to 128 filters and
/// loses by 3-14 % at 256 and 512, where `gemm`'s larger tiles reuse more (measured with
/// batch 128, 3x3 convolutions, on a 2-core AVX-512 machine). With a partial last vector it
/// still beats im2col and `gemm` while at least half of an image's lanes are positions (3x3
/// maps: 9 of 16 lanes, 1.2-1.5x faster; 14x14 and 7x7 up to 64 filters: 1.3-2x; 128
/// filters on 7x7: 5-10 % slower), and loses by 2-4x on 2x2 and 1x1 maps.
///
/// Where AVX2 runs in 128-bit halves ([`crate::avx2_halved`]), the masked AVX2 kernel runs at
/// about half the speed of `gemm` and takes only patches of at most [`HALVED_FORWARD_PATCH`]
/// values (1x1 convolutions of few input channels, whose short products `gemm` runs less
/// well); 3x3 and larger kernels go to the padded-rows kernel, 1.2-1.7x faster than `gemm`
/// there on every CIFAR layer measured, at batch 1 and 128, and 1.1x at 256 filters on 8x8
/// maps, but 1.3-1.6x slower on 4x4 maps, whose rows fill half a vector (`takes_rows`).
/// Where AVX2 runs whole, the padded rows take over from the masked AVX2 kernel on narrow
/// layers only ([`takes_rows`]).
pub fn takes_forward(g: &ConvGeometry) -> bool {
    takes_forward_on(g, units())
}

/// Whether the forward kernel should compute `g` for one image: where [`takes_forward`] says
/// so, and on AVX-512 also layers of more than 128 filters large enough to be spread over the
/// threads by channels ([`forward::SPLIT_IMAGE_MACS`]), which `gemm` would run on one thread.
pub fn takes_forward_image(g: &ConvGeometry) -> bool {
    takes_forward(g)
        || (units() == Units::Avx512
            && supports_forward(g)
            && worth_splitting(g)
            && !streams_input(g))
}

/// Fewest values of one image's input that [`streams_input`] counts as read from beyond the
/// core's cache (1 MB).
const STREAMED_INPUT: usize = 1 << 18;

/// Fewest values [`streams_input`] counts as read in all (16 MB).
const STREAMED_READS: usize = 1 << 22;

/// Whether `g` is a 1x1 convolution whose input, per image, has [`STREAMED_INPUT`] values or
/// more and is read, once per block of [`MAX_CHANNELS`] filters, [`STREAMED_READS`] values or
/// more in all (ResNet-50's 256 channels on 56x56 into 64 or 128 filters, 512 on 28x28 into
/// 128 or 256). The forward kernel walks all of an image's positions and input channels
/// once per block of filters, so such an input comes from beyond the core's cache again and
/// again, while `gemm` blocks the inner dimension. Measured on a 2-core Intel AVX-512
/// machine, forward of 1x1 convolutions, direct against im2col + `gemm`, batch 1 on one
/// thread: 256 -> 64 on 56x56 1.25 against 0.89 ms, 256 -> 128 on 56x56 2.82 against 1.45,
/// 512 -> 128 on 28x28 0.89 against 0.76; below the line, 384 -> 64 on 28x28 0.24 against
/// 0.33, 144 -> 32 on 56x56 0.24 against 0.33, 1024 -> 256 on 14x14 (an input the cache
/// holds) 0.66 against 0.72. At batch 16 on two threads `gemm` led on all of these, by
/// 1.9-2.1x above the line and up to 1.2x below it. Split over two threads at batch 1, the
/// direct kernel ran the layers above the line no faster than on one.
pub fn streams_input(g: &ConvGeometry) -> bool {
    let image = g.image();
    g.kernel == 1
        && image >= STREAMED_INPUT
        && image * g.out_channels.div_ceil(MAX_CHANNELS) >= STREAMED_READS
}

/// Fewest values of one image's input from which [`streams_batch_input`] holds (256 KB).
const BATCH_STREAMED_INPUT: usize = 1 << 16;

/// Whether `g` is a 1x1 convolution whose input, per image, has [`BATCH_STREAMED_INPUT`]
/// values or more: over a batch (more than one group of images), `gemm` computes it faster
/// than the forward kernel. A batch's input does not stay in the cache, and the kernel reads
/// every input channel's row of a tile side by side (one stream per channel, more than the
/// hardware prefetchers follow), spending `co` multiply-adds on each value, while `gemm` packs
/// the input in sequence. (At batch 1, where one image's input stays in the cache, the kernel
/// leads below [`streams_input`]'s line.) Measured on a 2-core Intel AVX-512 machine, batch
/// 128, two threads, forward, direct against im2col + `gemm`, ms: 144 -> 24 on 32x32
/// 10.3-11.7 against 5.1-5.7, on 28x28 6.5-8.3 against 3.9-4.0, on 64x64 61-68 against 34-42;
/// 96 -> 24 on 32x32 4.5-5.8 against 3.0-3.2; 64 -> 64 on 56x56 24-25 against 17-18; 96 -> 16
/// on 32x32 3.5-5.0 against 4.0-5.3. Below the line: 192 -> 32 and 144 -> 32 on 16x16 even,
/// 576 -> 96 on 8x8 3.2-6.8 against 3.4-3.5, 384 -> 64 on 8x8 1.46-1.48 against 1.66-1.70.
/// Batch 64, ResNet-50's layers: 64 -> 64 on 56x56 12.0-12.1 against 8.2-8.3, 128 -> 128 on
/// 28x28 8.4-8.5 against 6.3-6.4. Small batches (fastest of 60): 144 -> 24 on 32x32 and 64 -> 64
/// on 56x56 even at batch 2, `gemm` 0-10 % ahead at 8 and 16; at batch 1 the kernel 10-20 %
/// ahead (0.05 against 0.06 ms, 0.18 against 0.20-0.21).
pub fn streams_batch_input(g: &ConvGeometry) -> bool {
    g.kernel == 1 && g.image() >= BATCH_STREAMED_INPUT
}

/// How this CPU runs the direct kernels, as far as the choice of kernel goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Units {
    /// AVX-512 (or no direct kernels at all: the callers ask [`available`] first).
    Avx512,
    /// AVX2 on 256-bit units.
    Avx2,
    /// AVX2 executed in 128-bit halves ([`crate::avx2_halved`]).
    Avx2Halved,
}

/// [`Units`] of this CPU, under [`crate::ISA_VAR`] and [`crate::set_avx512`].
fn units() -> Units {
    match isa() {
        Some(Isa::Avx2) if crate::avx2_halved() => Units::Avx2Halved,
        Some(Isa::Avx2) => Units::Avx2,
        _ => Units::Avx512,
    }
}

/// Largest patch the forward kernel takes where AVX2 runs in 128-bit halves. Measured on a Zen
/// CPU (family 17h, model 01h), one thread, batch 64, forward against im2col + `gemm`: 1x1
/// from 8, 16 and 24 input channels 1.35x, 1.05-1.3x and 1.05-1.2x faster, from 32 even, from
/// 48-144 1.3-1.45x slower; every 3x3 layer (batch 64 and 128) 1.25-2.4x slower, 3 input
/// channels included.
const HALVED_FORWARD_PATCH: usize = 24;

/// [`takes_forward`] on `units`.
fn takes_forward_on(g: &ConvGeometry, units: Units) -> bool {
    let lanes = g.positions().div_ceil(LANES) * LANES;
    let masked =
        g.out_channels <= 128 && (units != Units::Avx2Halved || g.patch() <= HALVED_FORWARD_PATCH);
    supports_forward(g)
        && 2 * g.positions() >= lanes
        && (takes_rows(g, units) || masked)
        && !streams_input(g)
}

/// Whether the weight-gradient kernel should compute `g`: on narrow layers (up to 64 input
/// and output channels), on maps of at least [`AVX512_WEIGHT_GRAD_POSITIONS`] positions in
/// AVX-512 and of at least 16x16 in AVX2.
///
/// In AVX-512 (Intel Xeon, family 6 model 167, batch 128, weight gradient alone against
/// im2col + `gemm`, one thread): 8x8 maps 1.0-4.3x faster (8 x 8 0.14 against 0.61 ms, 20 x
/// 20 0.64-0.70 against 1.63-1.65, 34 x 34 1.80-1.88 against 3.02-3.07, 48 x 48 3.9 against
/// 5.0, 64 x 32 3.7-3.8 against 5.3-5.5, 64 x 64 7.1-7.2 against 7.2-7.4; on two threads
/// 1.0-2.6x), 4x4 maps even (16 x 16, 32 x 32, 64 x 64), so those stay with `gemm`. In AVX2
/// on 256-bit units (batch 128, weight gradient alone: 9 x 9 x 32x32 2.2-2.5 against 7.7-7.9
/// ms for `gemm`, 17 x 17 x 16x16 2.1-2.2 against 2.7-3.0, 32 x 32 x 16x16 6.4-6.9 against
/// 6.2-6.5, 64 x 64 x 8x8 9.0-9.5 against 5.6-5.7) the 3x3 layers on 32x32 and 16x16 maps
/// take the padded rows instead ([`takes_rows_weight_grad`]). Where AVX2 runs in 128-bit
/// halves ([`crate::avx2_halved`]) the masked kernel lost to `gemm` below 32x32 maps, and the
/// padded-rows one takes every map of whole 8-lane rows instead (one thread, batch 128,
/// weight gradient alone against the masked kernel on 32x32 and `gemm` below: 16 x 16 x
/// 32x32 21 against 34 ms, 6 x 6 x 32x32 3.6-3.8 against 5.8-7.4, 32 x 32 x 16x16 20 against
/// 27-28, 11 x 11 x 16x16 2.6 against 5.6, 64 x 64 x 8x8 21-23 against 24-25, 22 x 22 x 8x8
/// 2.6-2.7 against 4.6-4.8).
pub fn takes_weight_grad(g: &ConvGeometry) -> bool {
    available() && takes_weight_grad_on(g, units())
}

/// Fewest positions per image of a map whose weight gradient the AVX-512 kernel takes (8x8).
const AVX512_WEIGHT_GRAD_POSITIONS: usize = 64;

/// [`takes_weight_grad`] on `units`.
fn takes_weight_grad_on(g: &ConvGeometry, units: Units) -> bool {
    supports(g)
        && g.out_channels <= 64
        && g.in_channels <= 64
        && match units {
            Units::Avx512 => g.positions() >= AVX512_WEIGHT_GRAD_POSITIONS,
            Units::Avx2 => takes_rows_weight_grad(g, units) || g.positions() >= 256,
            Units::Avx2Halved => takes_rows_weight_grad(g, units),
        }
}

/// The kernel taps of `g`: for tap `(kh, kw)`, the flattened input offset `(kh - p) * W +
/// (kw - p)` and, for each vector of an image, the mask of lanes whose input is inside it
/// (none past the image's last position).
pub(crate) struct Taps {
    /// `k * k` offsets.
    pub(crate) offsets: Vec<isize>,
    /// `[vector][tap]` lane masks.
    pub(crate) masks: Vec<u16>,
    pub(crate) taps: usize,
    /// The lanes of each vector that are positions of the image (all but in a partial last
    /// vector).
    pub(crate) lanes: Vec<u16>,
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
        let vectors = g.positions().div_ceil(LANES);
        let mut masks = vec![0u16; vectors * taps];
        let mut lanes = vec![0u16; vectors];
        // Position by position (row `y`, column `x`), no divisions.
        let (mut y, mut x) = (0isize, 0isize);
        for at in 0..g.positions() {
            let (v, lane) = (at / LANES, at % LANES);
            lanes[v] |= 1 << lane;
            for kh in 0..k {
                let iy = y + kh - p;
                for kw in 0..k {
                    let ix = x + kw - p;
                    if (0..h).contains(&iy) && (0..w).contains(&ix) {
                        masks[v * taps + (kh * k + kw) as usize] |= 1 << lane;
                    }
                }
            }
            x += 1;
            if x == w {
                (x, y) = (0, y + 1);
            }
        }
        Self {
            offsets,
            masks,
            taps,
            lanes,
        }
    }

    /// The taps of `g`'s map size, kernel and padding, built once per process: at batch 1 building
    /// them (a pass over every position and tap) took a quarter of a thin pruned ResNet-56's
    /// forward.
    pub(crate) fn shared(g: &ConvGeometry) -> Arc<Self> {
        static TAPS: Memo<GeometryKey, Taps> = Memo::new();
        TAPS.get(g.key(), || Self::new(g))
    }

    fn masks(&self, vector: usize) -> &[u16] {
        &self.masks[vector * self.taps..][..self.taps]
    }
}

/// `channels` split into near-equal blocks of at most `max`: `(first, count)`.
fn channel_blocks(channels: usize, max: usize) -> Vec<(usize, usize)> {
    let blocks = channels.div_ceil(max);
    let mut out = Vec::with_capacity(blocks);
    let mut first = 0;
    for b in 0..blocks {
        let count = (channels - first) / (blocks - b);
        out.push((first, count));
        first += count;
    }
    out
}

/// Whether the padded-rows kernel runs convolution `g` (which the forward kernel takes) in
/// AVX2, on kernels larger than 1x1:
/// * where AVX2 runs in 128-bit halves, on maps whose rows fill at least 5 of every 8 lanes
///   of their vectors;
/// * where it runs whole, on layers of at most [`WHOLE_ROWS_CHANNELS`] channels in and out on
///   maps whose rows are 1 to 4 whole vectors (the 3x3 layers of CIFAR ResNets and
///   MobileNetV2's stem). Measured on an AVX-512 CPU (Intel Xeon, family 6 model 167) with
///   the kernels kept to AVX2, one thread, against the masked AVX2 kernel: batch 128, forward
///   1.05-1.33x faster (16 x 16 x 32x32 1.11-1.26x, 9 x 9 x 32x32 1.22-1.33x, 64 x 64 x 8x8
///   1.06-1.14x, 3 x 32 x 32x32 1.28-1.39x at batch 64), weight gradient 1.25-1.7x (32x32 and
///   16x16 maps); but 4-22 % slower on wider layers and ImageNet's maps (64 x 64 on 56x56,
///   28x28 and 14x14, 128 x 128 on 16x16 and 28x28; batch 8 and 128), where the masked
///   kernel stays.
fn takes_rows(g: &ConvGeometry, units: Units) -> bool {
    let w = g.in_hw[1];
    let shape = g.kernel > 1 && supports_forward(g);
    match units {
        Units::Avx512 => false,
        Units::Avx2Halved => shape && 8 * w >= 5 * w.next_multiple_of(rows::WIDTH),
        Units::Avx2 => {
            shape
                && g.in_channels.max(g.out_channels) <= WHOLE_ROWS_CHANNELS
                && w.is_multiple_of(rows::WIDTH)
                && w <= 4 * rows::WIDTH
        }
    }
}

/// Most channels, in or out, of a layer the padded rows take where AVX2 runs whole.
const WHOLE_ROWS_CHANNELS: usize = 64;

/// Whether the padded-rows weight gradient computes `g` (which [`supports`] accepts): where
/// the padded-rows forward does, on maps whose rows are whole vectors; where AVX2 runs whole,
/// only on maps of at least 16x16, in place of the masked kernel (8x8 maps stay with `gemm`,
/// not compared there: `gemm` runs AVX-512 on the CPU measured).
fn takes_rows_weight_grad(g: &ConvGeometry, units: Units) -> bool {
    takes_rows(g, units)
        && g.in_hw[1].is_multiple_of(rows::WIDTH)
        && (units == Units::Avx2Halved || g.positions() >= 256)
}

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
// The plans and constants on every target (the routing reads them); the kernels on x86-64.
mod forward;
mod rows;
mod weight_grad;

pub(crate) use forward::splits_image;
pub use forward::{PackedWeights, conv_forward};
pub use weight_grad::{conv_weight_grad_images, weight_grad_splits};
// What the micro-kernels (`avx2.rs`, `avx512.rs`) read.
use forward::{ForwardBlock, worth_splitting};
use weight_grad::{DwBlock, TILE_SUMS};

#[cfg(test)]
mod tests {
    use super::forward::*;
    use super::weight_grad::*;
    use super::*;

    fn geometry(in_channels: usize, out_channels: usize) -> ConvGeometry {
        ConvGeometry {
            in_channels,
            out_channels,
            in_hw: [8, 8],
            kernel: 3,
            stride: 1,
            padding: 1,
        }
    }

    /// Where AVX2 runs in 128-bit halves the padded-rows kernel takes the 3x3 (and larger)
    /// convolutions and the forward kernel only 1x1 convolutions of few input channels;
    /// where AVX2 runs whole, the padded rows take the narrow 3x3 layers of CIFAR maps and
    /// the masked kernel the rest; on AVX-512 the forward kernel takes every shape it
    /// supports up to 128 filters.
    #[test]
    fn routing_follows_the_vector_units() {
        use Units::{Avx2, Avx2Halved, Avx512};
        let conv = |ci, co, kernel, side| same_conv(ci, co, side, kernel);
        for g in [conv(3, 16, 3, 32), conv(16, 16, 3, 32), conv(64, 64, 3, 8)] {
            for units in [Avx512, Avx2, Avx2Halved] {
                assert!(takes_forward_on(&g, units));
            }
            assert!(takes_rows(&g, Avx2Halved) && takes_rows(&g, Avx2));
            assert!(!takes_rows(&g, Avx512));
        }
        // Wider layers and ImageNet's maps: the masked kernel where AVX2 runs whole.
        for g in [
            conv(128, 128, 3, 16),
            conv(64, 65, 3, 16),
            conv(64, 64, 3, 56),
            conv(64, 64, 3, 28),
            conv(64, 64, 3, 14),
            conv(32, 32, 3, 7),
        ] {
            assert!(takes_forward_on(&g, Avx2) && !takes_rows(&g, Avx2), "{g:?}");
            assert!(takes_rows(&g, Avx2Halved) || g.in_hw[1] == 7 || g.in_hw[1] == 14);
        }
        for g in [conv(8, 48, 1, 32), conv(24, 96, 1, 32)] {
            for units in [Avx512, Avx2, Avx2Halved] {
                assert!(takes_forward_on(&g, units) && !takes_rows(&g, units));
            }
        }
        for g in [conv(32, 96, 1, 32), conv(96, 24, 1, 32)] {
            assert!(takes_forward_on(&g, Avx2) && !takes_forward_on(&g, Avx2Halved));
        }
        // The weight gradient: the padded rows on maps of whole 8-lane rows where AVX2 runs
        // in halves; where it runs whole, on 16x16 and larger maps (8x8 ones go to `gemm`);
        // the masked kernel from 8x8 maps on AVX-512.
        for g in [conv(16, 16, 3, 32), conv(32, 32, 3, 16), conv(64, 64, 3, 8)] {
            assert!(takes_weight_grad_on(&g, Avx2Halved) && takes_rows_weight_grad(&g, Avx2Halved));
            let large = g.positions() >= 256;
            assert!(takes_weight_grad_on(&g, Avx512));
            assert_eq!(takes_weight_grad_on(&g, Avx2), large);
            assert_eq!(takes_rows_weight_grad(&g, Avx2), large);
            assert!(!takes_rows_weight_grad(&g, Avx512));
        }
        // 64 x 64 on 56x56: the masked weight gradient where AVX2 runs whole.
        let g = conv(64, 64, 3, 56);
        assert!(takes_weight_grad_on(&g, Avx2) && !takes_rows_weight_grad(&g, Avx2));
        for g in [
            conv(16, 16, 3, 4),
            conv(128, 128, 3, 8),
            conv(16, 16, 1, 32),
        ] {
            assert!(!takes_weight_grad_on(&g, Avx2Halved));
        }
        // 4x4 maps and wide layers: `gemm` on AVX-512 too.
        for g in [
            conv(16, 16, 3, 4),
            conv(128, 128, 3, 8),
            conv(64, 65, 3, 16),
        ] {
            assert!(!takes_weight_grad_on(&g, Avx512), "{g:?}");
        }
        // Neither: too few positions for a vector; too many filters for the masked kernel
        // (the padded rows take them where AVX2 runs in halves), rows too short for the
        // padded rows.
        for units in [Avx512, Avx2, Avx2Halved] {
            assert!(!takes_forward_on(&conv(16, 16, 1, 2), units));
        }
        assert!(!takes_forward_on(&conv(16, 256, 3, 8), Avx512));
        assert!(!takes_forward_on(&conv(16, 256, 3, 8), Avx2));
        assert!(takes_forward_on(&conv(16, 256, 3, 8), Avx2Halved));
        for g in [conv(64, 64, 3, 4), conv(64, 64, 3, 9)] {
            assert!(takes_forward_on(&g, Avx2) && !takes_forward_on(&g, Avx2Halved));
            assert!(!takes_rows(&g, Avx2));
        }
        assert!(takes_rows(&conv(16, 16, 3, 5), Avx2Halved));
        assert!(takes_rows(&conv(16, 16, 3, 7), Avx2Halved));
        // 1x1 convolutions whose large input would be read once per block of filters
        // (ResNet-50's 256 channels on 56x56, 512 on 28x28) go to `gemm` on every CPU, at
        // batch 1 too; inputs the cache holds (1024 on 14x14), few filters on a large input
        // and 3x3 layers stay.
        for g in [
            conv(256, 64, 1, 56),
            conv(256, 128, 1, 56),
            conv(512, 128, 1, 28),
        ] {
            assert!(streams_input(&g), "{g:?}");
            for units in [Avx512, Avx2, Avx2Halved] {
                assert!(!takes_forward_on(&g, units), "{g:?}");
            }
        }
        for g in [
            conv(1024, 128, 1, 14),
            conv(384, 64, 1, 28),
            conv(144, 32, 1, 56),
            conv(256, 64, 3, 56),
            conv(64, 64, 1, 56),
        ] {
            assert!(!streams_input(&g) && takes_forward_on(&g, Avx512), "{g:?}");
        }
        // Over a batch, 1x1 convolutions on inputs of 256 KB or more per image go to `gemm`
        // as well (MobileNetV2-CIFAR's projections on 32x32 maps, ResNet-50's 64 -> 64 on
        // 56x56); its narrower 1x1 layers on smaller maps and 3x3 layers stay.
        for g in [
            conv(144, 24, 1, 32),
            conv(96, 24, 1, 32),
            conv(64, 64, 1, 56),
        ] {
            assert!(streams_batch_input(&g), "{g:?}");
        }
        for g in [
            conv(192, 32, 1, 16),
            conv(384, 64, 1, 8),
            conv(144, 24, 3, 32),
        ] {
            assert!(!streams_batch_input(&g), "{g:?}");
        }
    }

    /// A test value in [-1, 1] for index `i` of the array `salt` names.
    fn value(i: usize, salt: usize) -> f32 {
        ((i * 7919 + salt * 104_729) % 2001) as f32 / 1000.0 - 1.0
    }

    /// The weight gradient of a range of filters is those filters' rows of the whole one, bit
    /// for bit, however the filters are split (the masked kernel on AVX-512 and AVX2, the
    /// padded rows where AVX2 takes them: `xtask test` runs this under each `DNAL_ISA`).
    #[test]
    fn split_filters_give_the_same_weight_gradient() {
        if !available() {
            return;
        }
        // (in, out, side, images): blocks of 6 and 5 (AVX-512), 2 and 1 (AVX2), 3 and 2
        // (padded rows), and one filter.
        for (case, &(ci, co, side, images)) in
            [(5, 17, 8, 9), (3, 16, 32, 2), (7, 13, 16, 5), (4, 1, 8, 3)]
                .iter()
                .enumerate()
        {
            let g = same_conv(ci, co, side, 3);
            if !supports(&g) {
                continue;
            }
            let x: Vec<f32> = (0..images * g.image()).map(|i| value(i, case)).collect();
            let dy: Vec<f32> = (0..images * co * g.positions())
                .map(|i| value(i, case + 9))
                .collect();
            let whole = conv_weight_grad_images(&x, &dy, &g, 0..co);
            for parts in [1, 2, 3, 5, 64] {
                let splits = weight_grad_splits(&g, parts);
                assert!(
                    splits.len() <= parts.max(1),
                    "{co} filters in {parts} parts"
                );
                assert_eq!(splits.first().map(|r| r.start), Some(0));
                assert!(splits.windows(2).all(|w| w[0].end == w[1].start));
                assert_eq!(splits.last().map(|r| r.end), Some(co));
                let joined: Vec<f32> = splits
                    .iter()
                    .flat_map(|f| conv_weight_grad_images(&x, &dy, &g, f.clone()))
                    .collect();
                let same = joined
                    .iter()
                    .zip(&whole)
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "{ci} -> {co} on {side}x{side}, {parts} parts");
            }
        }
    }

    /// A stride-1 "same" convolution on square maps.
    fn same_conv(ci: usize, co: usize, side: usize, kernel: usize) -> ConvGeometry {
        ConvGeometry {
            in_channels: ci,
            out_channels: co,
            in_hw: [side, side],
            kernel,
            stride: 1,
            padding: kernel / 2,
        }
    }

    /// `clamp(conv(x) * scale + shift + residual)` of a batch, summed in `f64`.
    fn naive_forward(x: &[f32], w: &[f32], g: &ConvGeometry, epilogue: &Epilogue) -> Vec<f64> {
        let ([h, wd], k, p) = (g.in_hw, g.kernel, g.padding);
        let (ci, co, l) = (g.in_channels, g.out_channels, g.positions());
        let images = x.len() / g.image();
        let mut out = vec![0.0f64; images * co * l];
        for i in 0..images {
            for o in 0..co {
                for y in 0..h {
                    for xx in 0..wd {
                        let mut sum = 0.0f64;
                        for c in 0..ci {
                            for kh in 0..k {
                                for kw in 0..k {
                                    let (iy, ix) = (y + kh, xx + kw);
                                    if iy < p || ix < p || iy - p >= h || ix - p >= wd {
                                        continue;
                                    }
                                    let v = x[((i * ci + c) * h + iy - p) * wd + ix - p];
                                    let wv = w[((o * ci + c) * k + kh) * k + kw];
                                    sum += f64::from(v) * f64::from(wv);
                                }
                            }
                        }
                        let at = (i * co + o) * l + y * wd + xx;
                        let mut v =
                            sum * f64::from(epilogue.scale[o]) + f64::from(epilogue.shift[o]);
                        if let Some(r) = epilogue.residual {
                            v += f64::from(r[at]);
                        }
                        let clamp = epilogue.clamp;
                        out[at] = v.clamp(f64::from(clamp.lo), f64::from(clamp.hi));
                    }
                }
            }
        }
        out
    }

    /// The padded-rows kernel (run wherever the CPU has AVX2, whichever kernel it would
    /// choose) against a plain convolution: full and partial row vectors (32, 14, 9, 7 and 4
    /// wide), an odd number of vectors per image, every block width from 1 to 6, 3x3 and 5x5
    /// kernels, one and several images, with and without a residual and a clamp.
    #[test]
    fn padded_rows_forward_matches_a_plain_convolution() {
        if !crate::simd::runs(Isa::Avx2) {
            return;
        }
        let cases = [
            // (in, out, side, kernel, images)
            (1, 1, 4, 3, 1),
            (3, 16, 32, 3, 2),
            (6, 6, 32, 3, 1),
            (5, 13, 14, 3, 3),
            (7, 7, 9, 3, 1),
            (2, 9, 7, 3, 2),
            (4, 5, 8, 5, 1),
            (13, 18, 28, 3, 1),
            (11, 2, 16, 3, 1),
            (9, 3, 8, 3, 2),
            (8, 4, 5, 3, 1),
        ];
        for (case, &(ci, co, side, kernel, images)) in cases.iter().enumerate() {
            let g = same_conv(ci, co, side, kernel);
            let x: Vec<f32> = (0..images * g.image()).map(|i| value(i, case)).collect();
            let w: Vec<f32> = (0..co * g.patch()).map(|i| value(i, case + 50)).collect();
            let residual: Vec<f32> = (0..images * co * g.positions())
                .map(|i| value(i, case + 99))
                .collect();
            let scale: Vec<f32> = (0..co).map(|i| 0.5 + value(i, 7).abs()).collect();
            let shift: Vec<f32> = (0..co).map(|i| value(i, 11)).collect();
            let packed = PackedWeights::packed(&w, &g, Isa::Avx2, true);
            for (residual, clamp) in [
                (None, crate::cpu::Clamp::NONE),
                (Some(&residual[..]), crate::cpu::Clamp { lo: 0.0, hi: 6.0 }),
            ] {
                let epilogue = Epilogue {
                    scale: &scale,
                    shift: &shift,
                    residual,
                    clamp,
                };
                let want = naive_forward(&x, &w, &g, &epilogue);
                for per in [1, images] {
                    let got = conv_forward(&x, &packed, &g, per, Some(epilogue));
                    assert_eq!(got.len(), want.len());
                    for (j, (&a, &b)) in got.iter().zip(&want).enumerate() {
                        assert!(
                            (f64::from(a) - b).abs() <= 1e-4 * (1.0 + b.abs()),
                            "case {case} {g:?}, {per} per task, output {j}: {a} against {b}"
                        );
                    }
                }
            }
        }
    }

    /// One image of a large layer, its channel blocks spread over 2 and 3 threads (odd block
    /// counts, a residual and a clamp, 16x16 and 2x2 maps), gives exactly what one thread
    /// gives, and what a plain convolution gives.
    #[test]
    fn one_image_split_over_threads_matches_one_thread() {
        let Some(isa) = isa() else { return };
        // (in, out, side)
        for (case, &(ci, co, side)) in [(64, 150, 16), (512, 461, 2)].iter().enumerate() {
            let g = same_conv(ci, co, side, 3);
            let x: Vec<f32> = (0..g.image()).map(|i| value(i, case)).collect();
            let w: Vec<f32> = (0..co * g.patch())
                .map(|i| value(i, case + 50) / 30.0)
                .collect();
            let residual: Vec<f32> = (0..co * g.positions())
                .map(|i| value(i, case + 99))
                .collect();
            let scale: Vec<f32> = (0..co).map(|i| 0.5 + value(i, 7).abs()).collect();
            let shift: Vec<f32> = (0..co).map(|i| value(i, 11)).collect();
            let packed = PackedWeights::packed(&w, &g, isa, false);
            let epilogue = Epilogue {
                scale: &scale,
                shift: &shift,
                residual: Some(&residual),
                clamp: crate::cpu::Clamp { lo: -1.0, hi: 6.0 },
            };
            let on = |threads: usize| {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                pool.install(|| {
                    assert_eq!(splits_image(&packed, &g), threads > 1, "{g:?}");
                    conv_forward(&x, &packed, &g, 1, Some(epilogue))
                })
            };
            let one = on(1);
            for threads in [2, 3] {
                assert!(one == on(threads), "{g:?} on {threads} threads");
            }
            let want = naive_forward(&x, &w, &g, &epilogue);
            for (j, (&a, &b)) in one.iter().zip(&want).enumerate() {
                assert!(
                    (f64::from(a) - b).abs() <= 1e-4 * (1.0 + b.abs()),
                    "{g:?}, output {j}: {a} against {b}"
                );
            }
        }
    }

    /// The padded-rows weight gradient (run wherever the CPU has AVX2) against a plain sum:
    /// every block width from 1 to 3, a last tile filled up, 3x3 and 5x5 kernels, one chunk of
    /// images and several (16x16 maps: 4 images per chunk).
    #[test]
    fn padded_rows_weight_grad_matches_a_plain_sum() {
        if !crate::simd::runs(Isa::Avx2) {
            return;
        }
        let cases = [
            // (in, out, side, kernel, images)
            (1, 1, 8, 3, 1),
            (3, 16, 32, 3, 2),
            (5, 7, 16, 3, 9),
            (13, 2, 8, 3, 5),
            (6, 4, 8, 5, 2),
        ];
        for (case, &(ci, co, side, kernel, images)) in cases.iter().enumerate() {
            let g = same_conv(ci, co, side, kernel);
            let (l, p, pad) = (g.positions(), g.patch(), kernel / 2);
            let x: Vec<f32> = (0..images * g.image()).map(|i| value(i, case)).collect();
            let dy: Vec<f32> = (0..images * co * l).map(|i| value(i, case + 50)).collect();
            let blocks = channel_blocks(co, rows::DW_BLOCK);
            let got = weight_grad_rows(&x, &dy, &g, &blocks, 0..co);
            assert_eq!(got.len(), co * p);
            for o in 0..co {
                for k in 0..p {
                    let (c, kh, kw) = (k / (kernel * kernel), k / kernel % kernel, k % kernel);
                    let (mut sum, mut size) = (0.0f64, 0.0f64);
                    for i in 0..images {
                        for y in 0..side {
                            for xx in 0..side {
                                let (iy, ix) = (y + kh, xx + kw);
                                if iy < pad || ix < pad || iy - pad >= side || ix - pad >= side {
                                    continue;
                                }
                                let v = x[((i * ci + c) * side + iy - pad) * side + ix - pad];
                                let d = dy[(i * co + o) * l + y * side + xx];
                                sum += f64::from(v) * f64::from(d);
                                size += f64::from(v * d).abs();
                            }
                        }
                    }
                    let a = f64::from(got[o * p + k]);
                    assert!(
                        (a - sum).abs() <= 1e-5 * size + 1e-6,
                        "case {case} {g:?}, weight ({o}, {k}): {a} against {sum}"
                    );
                }
            }
        }
    }

    /// The cache returns the earlier packing for the same storage: while an entry holds it,
    /// copy-on-write storage cannot change in place (a writer gets a copy, at another address,
    /// which is packed again), nor be freed; equal values in other storage, or under another
    /// geometry, are packed again.
    #[test]
    fn shared_packing_follows_the_storage() {
        if !available() {
            return;
        }
        let g = geometry(3, 5);
        let mut w: Arc<Vec<f32>> =
            Arc::new((0..g.out_channels * g.patch()).map(|i| i as f32).collect());
        let first = PackedWeights::shared(&w, &w, &g);
        assert!(Arc::ptr_eq(&first, &PackedWeights::shared(&w, &w, &g)));
        assert_eq!(first.values, PackedWeights::new(&w, &g).values);
        // The cache's reference makes the storage shared: writing it copies it first.
        assert!(Arc::get_mut(&mut w).is_none());
        Arc::make_mut(&mut w)[7] = -1.0;
        let changed = PackedWeights::shared(&w, &w, &g);
        assert!(!Arc::ptr_eq(&first, &changed));
        assert_eq!(changed.values, PackedWeights::new(&w, &g).values);
        // Equal values in other storage.
        let copy = Arc::new(w.to_vec());
        let again = PackedWeights::shared(&copy, &copy, &g);
        assert!(!Arc::ptr_eq(&changed, &again));
        assert_eq!(again.values, changed.values);
        // The same values read as 15 filters of 1 channel.
        let other = geometry(1, 15);
        let repacked = PackedWeights::shared(&w, &w, &other);
        assert_eq!(repacked.values, PackedWeights::new(&w, &other).values);
    }
}
