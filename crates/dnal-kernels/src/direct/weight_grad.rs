//! The weight gradient's side: runs of images in chunks that keep a block of output-gradient
//! rows in L1, tiles of patch rows, and partial sums reduced in a fixed order.

use super::*;

/// The weight gradient of consecutive images, `[Co, P]`: `x` their input (`[n, Ci, H, W]`),
/// `dy` their output gradient (`[n, Co, H, W]`).
///
/// The images go in chunks of about [`CHUNK_POSITIONS`] positions (at most [`CHUNK_IMAGES`]
/// images); for each chunk and block of [`DW_CHANNELS`] output channels, the block's
/// output-gradient rows are copied into one buffer ([`pack_gradient`]), where they stay in L1
/// while one kernel call passes every tile of [`DW_ROWS`] patch rows over them; each tile's
/// 16-lane partial sums wait in memory between chunks. The result does not depend on the
/// number of threads (nothing here is parallel).
///
/// Only the filters `filters` are computed (`[filters.len(), P]`): a range of whole channel
/// blocks from [`weight_grad_splits`], whose sums are those of a call for every filter.
pub fn conv_weight_grad_images(
    x: &[f32],
    dy: &[f32],
    g: &ConvGeometry,
    filters: Range<usize>,
) -> Vec<f32> {
    assert!(supports(g), "not a convolution the direct kernels compute");
    let isa = isa().expect("a CPU with AVX2 or AVX-512 (`available()`)");
    let blocks = blocks_in(weight_grad_blocks(g), &filters);
    if isa == Isa::Avx2 && takes_rows_weight_grad(g, units()) {
        return weight_grad_rows(x, dy, g, &blocks, filters);
    }
    let (co, p, l) = (g.out_channels, g.patch(), g.positions());
    let image_len = g.image();
    let images = x.len() / image_len;
    assert_eq!(
        dy.len(),
        images * co * l,
        "output gradient of the wrong size"
    );
    let taps = Taps::shared(g);
    let tap_count = taps.taps;
    let (rows, ks) = patch_rows(g, isa, &taps);
    let tiles = rows.len() / DW_ROWS;
    // Lane masks `[vector][tap]`, with the null tap last.
    let masks: Vec<u16> = (0..l / LANES)
        .flat_map(|v| taps.masks(v).iter().copied().chain([0]))
        .collect();
    let mut partial = vec![0.0f32; blocks.len() * tiles * TILE_SUMS];
    let per = CHUNK_POSITIONS
        .div_ceil(l)
        .clamp(1, CHUNK_IMAGES.min(images.max(1)));
    // The block's output gradient, packed, from a 64-byte boundary, so that its loads never
    // cross a cache line (kernel alone, batch 128, one thread: 8x8 and 32x32 maps 5-14 %
    // faster than from a buffer 16 bytes off a boundary).
    let mut buffer = vec![0.0f32; per.min(images) * l * DW_CHANNELS + LANES];
    let skew = buffer.as_ptr().align_offset(64).min(LANES);
    let packed = &mut buffer[skew..];
    for first in (0..images).step_by(per) {
        let count = per.min(images - first);
        let chunk = &x[first * image_len..][..count * image_len];
        let grad = &dy[first * co * l..][..count * co * l];
        for (&(c0, rc), sums) in blocks
            .iter()
            .zip(partial.chunks_exact_mut(tiles * TILE_SUMS))
        {
            let dy = &mut packed[..count * l * rc];
            pack_gradient(grad, l, co, c0, dy);
            let block = DwBlock {
                x: chunk,
                dy,
                g,
                rows: &rows,
                masks: &masks,
                tap_stride: tap_count + 1,
            };
            macro_rules! dispatch {
                ($isa:ident, $($r:literal)*) => {
                    match rc {
                        $($r => {
                            #[cfg(target_arch = "x86_64")]
                            // SAFETY: the CPU has `isa` (`isa()` chose it); `block` holds
                            // whole images, `rows` only offsets and taps of `g` (and the null
                            // tap), and `masks` the lanes inside the image for each.
                            unsafe { $isa::weight_grad::<$r>(block, sums) }
                        })*
                        _ => unreachable!("blocks of 1 to {} channels", dw_block_channels(isa)),
                    }
                };
            }
            match isa {
                Isa::Avx512 => dispatch!(avx512, 1 2 3 4 5 6),
                Isa::Avx2 => dispatch!(avx2, 1 2),
            }
        }
    }
    let mut dw = vec![0.0f32; filters.len() * p];
    for (&(c0, rc), block) in blocks.iter().zip(partial.chunks_exact(tiles * TILE_SUMS)) {
        for (sums, ks) in block.chunks_exact(TILE_SUMS).zip(ks.chunks_exact(DW_ROWS)) {
            for r in 0..rc {
                for (j, k) in ks.iter().enumerate() {
                    if let Some(k) = *k {
                        dw[(c0 - filters.start + r) * p + k] =
                            lane_sum(&sums[(r * DW_ROWS + j) * LANES..][..LANES]);
                    }
                }
            }
        }
    }
    dw
}

/// The filters of `g`'s weight gradient in at most `parts` ranges of whole channel blocks of
/// the kernel that computes it ([`conv_weight_grad_images`]), as even as the blocks allow.
/// The blocks' sums do not depend on one another, so the ranges' results are those of one
/// call for all filters, bit for bit: the caller can spread a few runs of images over more
/// threads.
pub fn weight_grad_splits(g: &ConvGeometry, parts: usize) -> Vec<Range<usize>> {
    let blocks = weight_grad_blocks(g);
    let per = blocks.len().div_ceil(parts.clamp(1, blocks.len().max(1)));
    channel_blocks(blocks.len(), per.max(1))
        .into_iter()
        .map(|(first, count)| {
            let (start, _) = blocks[first];
            let (last, width) = blocks[first + count - 1];
            start..last + width
        })
        .collect()
}

/// The channel blocks of the kernel that computes `g`'s weight gradient: one kernel call each
/// per chunk of images.
fn weight_grad_blocks(g: &ConvGeometry) -> Vec<(usize, usize)> {
    let isa = isa().expect("a CPU with AVX2 or AVX-512 (`available()`)");
    let most = if isa == Isa::Avx2 && takes_rows_weight_grad(g, units()) {
        rows::DW_BLOCK
    } else {
        dw_block_channels(isa)
    };
    channel_blocks(g.out_channels, most)
}

/// The blocks of `blocks` inside `filters`, which must be whole blocks.
fn blocks_in(blocks: Vec<(usize, usize)>, filters: &Range<usize>) -> Vec<(usize, usize)> {
    let inside: Vec<_> = blocks
        .into_iter()
        .filter(|(c0, _)| filters.contains(c0))
        .collect();
    assert!(
        inside.first().map(|b| b.0) == Some(filters.start)
            && inside.last().map(|&(c0, rc)| c0 + rc) == Some(filters.end),
        "filters {filters:?} are not whole channel blocks (`weight_grad_splits`)"
    );
    inside
}

/// Copies output channels `c0..c0 + rc` of `grad` (`[n, co, l]`) into `out` as
/// `[n][l / LANES][rc][LANES]` (`rc = out.len() / (n * l)`), the order in which the
/// weight-gradient kernels read them. With one pointer for the block's rows instead of one
/// per row, the AVX-512 kernel's loop keeps its pointers in registers (it had spilled them
/// with 5 and 6 rows): 8x8 maps at batch 128, one thread, 10-14 % faster, 16x16 and 32x32
/// maps 0-5 %.
fn pack_gradient(grad: &[f32], l: usize, co: usize, c0: usize, out: &mut [f32]) {
    let images = grad.len() / (co * l);
    let rc = out.len() / (images * l);
    for (i, image) in out.chunks_exact_mut(rc * l).enumerate() {
        for (v, vector) in image.chunks_exact_mut(rc * LANES).enumerate() {
            for (r, lanes) in vector.chunks_exact_mut(LANES).enumerate() {
                lanes.copy_from_slice(&grad[(i * co + c0 + r) * l + v * LANES..][..LANES]);
            }
        }
    }
}

/// [`conv_weight_grad_images`] by the padded-rows kernel: the images go in chunks of about
/// [`CHUNK_POSITIONS`] positions, each chunk copied with its zero borders once; per chunk
/// and block of output channels, one kernel call passes every tile of patch rows over the
/// chunk, each tile's 8-lane partial sums waiting in memory between chunks. The result does
/// not depend on the number of threads.
pub(super) fn weight_grad_rows(
    x: &[f32],
    dy: &[f32],
    g: &ConvGeometry,
    blocks: &[(usize, usize)],
    filters: Range<usize>,
) -> Vec<f32> {
    let plan = rows::RowPlan::shared(g);
    let (ci, co, p, l, image_len) = (
        g.in_channels,
        g.out_channels,
        g.patch(),
        g.positions(),
        g.image(),
    );
    let images = x.len() / image_len;
    assert_eq!(
        dy.len(),
        images * co * l,
        "output gradient of the wrong size"
    );
    let ntaps = plan.taps.len();
    let padded = plan.padded_len(ci);
    // Weight `k = c * taps + t` reads plane `c` at tap `t`; the last tile is filled up with
    // repeats of row 0, whose sums are dropped.
    let mut rows: Vec<usize> = (0..p)
        .map(|k| k / ntaps * plan.plane + plan.taps[k % ntaps])
        .collect();
    rows.resize(p.div_ceil(rows::DW_ROWS) * rows::DW_ROWS, 0);
    let per_channel = rows.len() * rows::WIDTH;
    let mut partial = vec![0.0f32; filters.len() * per_channel];
    let per = CHUNK_POSITIONS.div_ceil(l).clamp(1, images.max(1));
    let mut buffer = vec![0.0f32; per.min(images) * padded];
    for first in (0..images).step_by(per) {
        let count = per.min(images - first);
        let chunk = &mut buffer[..count * padded];
        for (i, dst) in chunk.chunks_exact_mut(padded).enumerate() {
            plan.pad(&x[(first + i) * image_len..][..image_len], g, dst);
        }
        let block = |c0| rows::RowGradBlock {
            x: chunk,
            padded,
            dy: &dy[first * co * l..][..count * co * l],
            plan: &plan,
            l,
            co,
            c0,
            rows: &rows,
        };
        for &(c0, rc) in blocks {
            let sums = &mut partial[(c0 - filters.start) * per_channel..][..rc * per_channel];
            macro_rules! dispatch {
                ($($r:literal)*) => {
                    match rc {
                        $($r => {
                            #[cfg(target_arch = "x86_64")]
                            // SAFETY: the caller's `isa()` is AVX2 or wider, so the CPU has
                            // AVX2 and FMA; the kernel checks the sizes.
                            unsafe { rows::weight_grad::<$r>(block(c0), sums) }
                        })*
                        _ => unreachable!("blocks of 1 to {} channels", rows::DW_BLOCK),
                    }
                };
            }
            dispatch!(1 2 3);
        }
    }
    let mut dw = vec![0.0f32; filters.len() * p];
    for &(c0, rc) in blocks {
        let sums = &partial[(c0 - filters.start) * per_channel..][..rc * per_channel];
        let tile_sums = rc * rows::DW_ROWS * rows::WIDTH;
        for (tile, sums) in sums.chunks_exact(tile_sums).enumerate() {
            for r in 0..rc {
                for j in 0..rows::DW_ROWS {
                    let k = tile * rows::DW_ROWS + j;
                    if k < p {
                        let lanes = &sums[(r * rows::DW_ROWS + j) * rows::WIDTH..][..rows::WIDTH];
                        dw[(c0 - filters.start + r) * p + k] = lane_sum(lanes);
                    }
                }
            }
        }
    }
    dw
}

/// The weight-gradient kernels' patch rows, in whole tiles of [`DW_ROWS`]: each as (offset of
/// its first input in an image, tap), and the index `k = c * taps + t` of the weight it is
/// the gradient of (`None` for the padding).
///
/// On AVX-512 in the weights' order, padded at the end with rows of the null tap (whose masks
/// read nothing). On AVX2 tap by tap, each tap's channels padded to whole tiles with repeats of
/// channel 0, so that a tile's rows share one tap and the kernel one mask.
fn patch_rows(
    g: &ConvGeometry,
    isa: Isa,
    taps: &Taps,
) -> (Vec<(isize, usize)>, Vec<Option<usize>>) {
    let (channels, l, ntaps) = (g.in_channels, g.positions(), taps.taps);
    let row = |c: usize, t: usize| ((c * l) as isize + taps.offsets[t], t);
    let (mut rows, mut ks) = (Vec::new(), Vec::new());
    match isa {
        Isa::Avx512 => {
            for k in 0..channels * ntaps {
                rows.push(row(k / ntaps, k % ntaps));
                ks.push(Some(k));
            }
            let whole = rows.len().div_ceil(DW_ROWS) * DW_ROWS;
            rows.resize(whole, (0, ntaps));
            ks.resize(whole, None);
        }
        Isa::Avx2 => {
            for t in 0..ntaps {
                for c in 0..channels.div_ceil(DW_ROWS) * DW_ROWS {
                    let real = c < channels;
                    rows.push(row(if real { c } else { 0 }, t));
                    ks.push(real.then_some(c * ntaps + t));
                }
            }
        }
    }
    (rows, ks)
}

/// Fewest positions a weight-gradient kernel call covers (whole images): fewer would load and
/// store the partial sums too often; more would let the output-gradient rows leave L1.
const CHUNK_POSITIONS: usize = 1024;

/// Most images in one chunk of the masked weight-gradient kernel. Images of `Ci * H * W` values
/// lie a multiple of 4 KiB apart whenever that is a multiple of 1,024 (16 channels of 8x8 and
/// up), so the rows a tile reads in each image of a chunk fall into the same sets of the L1
/// cache, and 16 images of 8x8 ([`CHUNK_POSITIONS`]) are more than its 12 ways hold. Measured
/// on a 2-core Intel AVX-512 machine (kernel alone, one thread, 64 Ki positions): 8x8 maps
/// with 16 and 64 channels at 72-77 GFLOP/s in chunks of 16 images against 91-95 with 17, 18
/// and 65 channels; in chunks of 8, 84-87 against 89-95 (64 x 64 x 8x8 forward + weight
/// gradient at batch 128 on two threads, `conv_parts`: 5.51-5.64 against 5.80-5.93 ms).
const CHUNK_IMAGES: usize = 8;

/// Partial sums of a weight-gradient tile: `[DW_CHANNELS][DW_ROWS][LANES]`.
pub(super) const TILE_SUMS: usize = DW_CHANNELS * DW_ROWS * LANES;

/// The sum of 16 (or 8) lanes, in a fixed (pairwise) order.
fn lane_sum(lanes: &[f32]) -> f32 {
    assert!(
        lanes.len() == LANES || lanes.len() == LANES / 2,
        "16 or 8 lanes"
    );
    let mut v = [0.0f32; LANES];
    v[..lanes.len()].copy_from_slice(lanes);
    let mut n = lanes.len();
    while n > 1 {
        n /= 2;
        for i in 0..n {
            v[i] += v[i + n];
        }
    }
    v[0]
}

/// What a weight-gradient kernel call reads: a chunk of images (`x`), the output gradient of
/// a block of channels in those images (`dy`, as [`pack_gradient`] lays it out), every patch
/// row (`rows`, padded to whole tiles) and the lane masks (`[vector][tap_stride]`).
#[derive(Clone, Copy)]
pub(super) struct DwBlock<'a> {
    pub(super) x: &'a [f32],
    pub(super) dy: &'a [f32],
    pub(super) g: &'a ConvGeometry,
    pub(super) rows: &'a [(isize, usize)],
    pub(super) masks: &'a [u16],
    pub(super) tap_stride: usize,
}

impl DwBlock<'_> {
    /// Checks what the weight-gradient kernels read and write for a block of `RC` channels
    /// and `partial` partial sums.
    pub(super) fn check<const RC: usize>(&self, partial: usize) {
        let (l, image_len) = (self.g.positions(), self.g.image());
        let (images, vectors) = (self.x.len() / image_len, l / LANES);
        assert!(self.dy.len() == images * RC * l && RC <= DW_CHANNELS);
        assert!(self.masks.len() == vectors * self.tap_stride);
        assert!(self.rows.iter().all(|r| r.1 < self.tap_stride));
        assert!(partial == self.rows.len() / DW_ROWS * TILE_SUMS);
    }
}
