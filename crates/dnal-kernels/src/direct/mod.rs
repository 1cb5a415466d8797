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
/// threads by channels ([`SPLIT_IMAGE_MACS`]), which `gemm` would run on one thread.
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

/// A convolution's weights and taps prepared for the forward kernel: per channel block,
/// `[tap][Ci][MAX_CHANNELS]` (zero past the block's channels), in the order the kernel reads
/// them.
pub struct PackedWeights {
    /// The instruction set whose kernel the blocks are sized for.
    isa: Isa,
    /// The padded-rows kernel's plan, where it runs the convolution (its blocks' weights are
    /// `[Ci][tap][MAX_CHANNELS]`).
    rows: Option<Arc<rows::RowPlan>>,
    values: Vec<f32>,
    blocks: Vec<(usize, usize)>,
    patch: usize,
    taps: Arc<Taps>,
    geometry: ConvGeometry,
}

impl PackedWeights {
    /// Packs `w` (`[Co, P]`, row-major) for geometry `g` (which [`supports_forward`] accepts),
    /// for the kernel of [`isa`].
    pub fn new(w: &[f32], g: &ConvGeometry) -> Self {
        let isa = isa().expect("a CPU with AVX2 or AVX-512 (`available()`)");
        Self::packed(w, g, isa, isa == Isa::Avx2 && takes_rows(g, units()))
    }

    /// `w` packed for the kernel of `isa`, or for the padded-rows kernel if `rows`.
    fn packed(w: &[f32], g: &ConvGeometry, isa: Isa, rows: bool) -> Self {
        assert!(
            supports_forward(g),
            "not a convolution the direct kernels compute"
        );
        let p = g.patch();
        assert_eq!(w.len(), g.out_channels * p, "weights of the wrong size");
        let rows = rows.then(|| rows::RowPlan::shared(g));
        let max = if rows.is_some() {
            rows::BLOCK
        } else {
            block_channels(isa)
        };
        let blocks = channel_blocks(g.out_channels, max);
        let (taps, channels) = (g.kernel * g.kernel, g.in_channels);
        let mut values = vec![0.0; blocks.len() * p * MAX_CHANNELS];
        for (b, &(first, count)) in blocks.iter().enumerate() {
            let dst = &mut values[b * p * MAX_CHANNELS..][..p * MAX_CHANNELS];
            for r in 0..count {
                let filter = &w[(first + r) * p..][..p];
                for (c, tap_weights) in filter.chunks_exact(taps).enumerate() {
                    for (t, &v) in tap_weights.iter().enumerate() {
                        let at = if rows.is_some() {
                            c * taps + t
                        } else {
                            t * channels + c
                        };
                        dst[at * MAX_CHANNELS + r] = v;
                    }
                }
            }
        }
        Self {
            isa,
            rows,
            values,
            blocks,
            patch: p,
            taps: Taps::shared(g),
            geometry: *g,
        }
    }

    /// The packing of `w` for `g`, kept from an earlier call on the same weights: at batch 1
    /// the packing (a scatter over every weight) took a tenth of a thin pruned ResNet-56's
    /// forward.
    ///
    /// `owner` is the shared storage `w` lies in, which nobody writes while another reference
    /// to it exists (copy-on-write: flex's tensor storage, whose writers copy it unless they
    /// hold the only reference). An entry holds a reference to its owner, so while it is
    /// cached the storage can neither be freed (its address reused) nor written in place: the
    /// same address, length, geometry and owner mean the same values, found without comparing
    /// them (the comparison had been a fifth of the lookup's cost at batch 1). Storage written
    /// through another handle than a copy-on-write one must not be passed.
    pub(crate) fn shared<T: Send + Sync + 'static>(
        owner: &Arc<T>,
        w: &[f32],
        g: &ConvGeometry,
    ) -> Arc<Self> {
        type Key = (usize, usize, ConvGeometry);
        /// Values (weights held and their packing) the cache holds at most before it starts
        /// over.
        const CAPACITY: usize = 16 << 20;
        struct Entry {
            owner: Arc<dyn std::any::Any + Send + Sync>,
            held: usize,
            packed: Arc<PackedWeights>,
        }
        #[derive(Default)]
        struct Cache {
            entries: FxHashMap<Key, Entry>,
            values: usize,
        }
        static CACHE: OnceLock<Mutex<Cache>> = OnceLock::new();
        let same_owner = |held: &Arc<dyn std::any::Any + Send + Sync>| {
            Arc::as_ptr(held).cast::<u8>() == Arc::as_ptr(owner).cast::<u8>()
        };
        let key = (w.as_ptr() as usize, w.len(), *g);
        let mut cache = CACHE
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(entry) = cache.entries.get(&key)
            && same_owner(&entry.owner)
        {
            return entry.packed.clone();
        }
        let packed = Arc::new(Self::new(w, g));
        let size = w.len() + packed.values.len();
        if cache.values + size > CAPACITY {
            *cache = Cache::default();
        }
        let entry = Entry {
            owner: owner.clone(),
            held: w.len(),
            packed: packed.clone(),
        };
        if let Some(old) = cache.entries.insert(key, entry) {
            cache.values -= old.held + old.packed.values.len();
        }
        cache.values += size;
        packed
    }

    fn block(&self, b: usize) -> &[f32] {
        &self.values[b * self.patch * MAX_CHANNELS..][..self.patch * MAX_CHANNELS]
    }
}

/// What one forward kernel call computes: channels `first..first + R` of the output of the
/// whole images `x` (`[n, Ci, H, W]`, `channels` input channels of `l` positions), with the
/// taps of their geometry, the block's epilogue (`scale`, `shift` of its channels, `residual`
/// laid out like the whole output, clamp `bounds`), into an output of `co` channels.
#[derive(Clone, Copy)]
struct ForwardBlock<'a> {
    x: &'a [f32],
    taps: &'a Taps,
    channels: usize,
    l: usize,
    co: usize,
    first: usize,
    scale: &'a [f32],
    shift: &'a [f32],
    residual: Option<&'a [f32]>,
    bounds: (f32, f32),
}

impl ForwardBlock<'_> {
    /// Checks what the forward kernels read and write for a block of `R` channels: the weights
    /// `w` (a packed block) and an output of `out` values.
    fn check<const R: usize>(&self, w: &[f32], out: usize) {
        let Self { x, taps, .. } = *self;
        let (ntaps, per_image, image_len) = (taps.taps, taps.lanes.len(), self.channels * self.l);
        let images = x.len() / image_len;
        assert!(R <= MAX_CHANNELS);
        assert!(per_image == self.l.div_ceil(LANES) && taps.offsets.len() == ntaps);
        assert!(taps.masks.len() == per_image * ntaps);
        assert!(x.len() == images * image_len && out == images * self.co * self.l);
        assert!(self.first + R <= self.co && self.scale.len() == R && self.shift.len() == R);
        assert!(self.residual.is_none_or(|r| r.len() == out));
        assert!(w.len() >= self.channels * ntaps * MAX_CHANNELS);
        assert!(taps.lanes.iter().enumerate().all(|(v, &lanes)| {
            // The lanes on are the first ones and end inside the image.
            let width = lanes.trailing_ones() as usize;
            lanes.trailing_ones() + lanes.leading_zeros() == 16 && v * LANES + width <= self.l
        }));
    }

    /// The block's vectors of positions, `V` at a time: each step's `(image, vector)` pairs
    /// and how many of them are new (a last step with fewer left repeats its last one).
    fn steps<const V: usize>(&self) -> impl Iterator<Item = ([(usize, usize); V], usize)> {
        let per_image = self.taps.lanes.len();
        let total = self.x.len() / (self.channels * self.l) * per_image;
        // The next vector: its image and its index in the image.
        let (mut image, mut vector) = (0usize, 0usize);
        (0..total).step_by(V).map(move |v0| {
            let valid = V.min(total - v0);
            let mut at = [(0usize, 0usize); V];
            for (h, slot) in at.iter_mut().enumerate() {
                *slot = (image, vector);
                if h + 1 < valid {
                    vector += 1;
                    if vector == per_image {
                        (image, vector) = (image + 1, 0);
                    }
                }
            }
            vector += 1;
            if vector == per_image {
                (image, vector) = (image + 1, 0);
            }
            (at, valid)
        })
    }
}

/// The forward convolution of a batch (`x`, `[N, Ci, H, W]`, `g` accepted by
/// [`supports_forward`]),
/// `per` images per parallel task, with the epilogue applied in the micro-kernel. The output
/// (`[N, Co, H, W]`) is written once, without being zeroed first.
pub fn conv_forward(
    x: &[f32],
    w: &PackedWeights,
    g: &ConvGeometry,
    per: usize,
    epilogue: Option<Epilogue>,
) -> Vec<f32> {
    use rayon::prelude::*;
    let (co, l, image_len) = (g.out_channels, g.positions(), g.image());
    let batch = x.len() / image_len;
    let n = batch * co * l;
    let mut out = Vec::with_capacity(n);
    let chunk = per.max(1) * co * l;
    // No epilogue is the identity one.
    let (ones, zeros) = (vec![1.0f32; co], vec![0.0f32; co]);
    let epilogue = epilogue.unwrap_or(Epilogue {
        scale: &ones,
        shift: &zeros,
        residual: None,
        clamp: crate::cpu::Clamp::NONE,
    });
    if let Some(r) = epilogue.residual {
        assert_eq!(r.len(), n, "residual of the wrong size");
    }
    let each = |(i, (dst, images)): (usize, (&mut [std::mem::MaybeUninit<f32>], &[f32]))| {
        // The group's part of the residual, laid out like `dst`.
        let epilogue = Epilogue {
            residual: epilogue
                .residual
                .map(|r| &r[i * chunk..i * chunk + dst.len()]),
            ..epilogue
        };
        conv_forward_images(images, w, g, epilogue, dst)
    };
    let dst = &mut out.spare_capacity_mut()[..n];
    // A thread outside rayon's pool would only wait while the pool's threads wake and work
    // (burn's forward at batch 1: VGG-16 5-8 % slower).
    let in_pool = rayon::current_thread_index().is_some();
    if batch == 1 && in_pool && w.rows.is_none() && splits_image(w, g) {
        // One image, a layer large enough to share: its channel blocks over the threads.
        forward_image_split(x, w, g, epilogue, dst);
    } else if n <= chunk {
        // One group (batch 1): on this thread, without a hand-off to rayon's pool.
        each((0, (dst, x)));
    } else {
        dst.par_chunks_mut(chunk)
            .zip(x.par_chunks(per.max(1) * image_len))
            .enumerate()
            .for_each(each);
    }
    // SAFETY: `conv_forward_images` wrote every element of every chunk: each image's every
    // vector of positions, for every channel block, and the blocks cover all channels.
    unsafe { out.set_len(n) };
    out
}

/// Fewest multiply-adds of a one-image forward whose channel blocks are spread over the
/// threads ([`forward_image_split`]); below it a hand-off to rayon's pool costs about as much
/// as it saves. On a 2-core AVX-512 machine (Intel, two threads): 64 x 64 x 32x32 0.48-0.51
/// -> 0.27 ms, 128 x 128 x 16x16 0.47 -> 0.23-0.25 ms; with the wide layers taken from
/// `gemm` ([`takes_forward_image`]) 256 x 256 x 8x8 0.43 -> 0.24, 512 x 512 x 2x2 0.70 ->
/// 0.47, 256 x 256 x 14x14 1.44-1.54 -> 0.85-0.90, 1x1 64 -> 256 on 56x56 0.70 -> 0.36.
const SPLIT_IMAGE_MACS: usize = 1 << 23;

/// Whether [`conv_forward`] spreads one image's channel blocks over the threads: a layer of at
/// least [`SPLIT_IMAGE_MACS`], with a block for each thread.
pub(crate) fn splits_image(w: &PackedWeights, g: &ConvGeometry) -> bool {
    worth_splitting(g) && w.blocks.len() >= rayon::current_num_threads()
}

/// Whether one image of `g` is worth spreading over the threads: there are several, and the
/// layer has at least [`SPLIT_IMAGE_MACS`].
fn worth_splitting(g: &ConvGeometry) -> bool {
    rayon::current_num_threads() > 1
        && g.out_channels * g.patch() * g.positions() >= SPLIT_IMAGE_MACS
}

/// [`conv_forward_images`] of one image with its channel blocks in one contiguous run per
/// thread, each writing its own channels' planes. Every output value is computed as on one
/// thread, so the result does not depend on the number of threads.
fn forward_image_split(
    x: &[f32],
    w: &PackedWeights,
    g: &ConvGeometry,
    epilogue: Epilogue,
    out: &mut [std::mem::MaybeUninit<f32>],
) {
    use rayon::prelude::*;
    assert_eq!(&w.geometry, g, "weights packed for another convolution");
    let l = g.positions();
    let parts = rayon::current_num_threads().min(w.blocks.len());
    // Contiguous runs of blocks with near-equal channel counts.
    let mut runs: Vec<Run> = Vec::with_capacity(parts);
    let (mut next, mut channel) = (0, 0);
    for part in 0..parts {
        let target = g.out_channels * (part + 1) / parts;
        let start = next;
        // Leave a block for each part after this one.
        let end = w.blocks.len() - (parts - part - 1);
        while next < end && (next == start || channel < target) {
            channel += w.blocks[next].1;
            next += 1;
        }
        if part + 1 == parts {
            next = w.blocks.len();
        }
        let first = w.blocks[start].0;
        let last = w.blocks[next - 1];
        runs.push(Run {
            blocks: start..next,
            first,
            channels: last.0 + last.1 - first,
        });
    }
    let mut slices = Vec::with_capacity(parts);
    let mut rest = out;
    for run in &runs {
        let (head, tail) = rest.split_at_mut(run.channels * l);
        slices.push(head);
        rest = tail;
    }
    runs.into_par_iter().zip(slices).for_each(|(run, dst)| {
        let (first, channels) = (run.first, run.channels);
        let epilogue = Epilogue {
            scale: &epilogue.scale[first..first + channels],
            shift: &epilogue.shift[first..first + channels],
            residual: epilogue.residual.map(|r| &r[first * l..][..channels * l]),
            ..epilogue
        };
        forward_blocks(x, w, run, g, epilogue, dst);
    });
}

/// [`conv_forward_images`] of consecutive images into `out` (`[n, Co, H, W]`), every element written.
///
/// Channel blocks outside, so that a block's weights stay in cache while the images' vectors
/// stream past them (wide layers have megabytes of weights); one kernel call per block walks
/// every vector of every image, so a call's fixed cost is paid once per block, not once per
/// tile (on a 1-channel input a tile is only 9 steps of arithmetic).
fn conv_forward_images(
    x: &[f32],
    w: &PackedWeights,
    g: &ConvGeometry,
    epilogue: Epilogue,
    out: &mut [std::mem::MaybeUninit<f32>],
) {
    assert_eq!(&w.geometry, g, "weights packed for another convolution");
    let (l, co) = (g.positions(), g.out_channels);
    assert!(x.len().is_multiple_of(g.image()), "input of whole images");
    assert_eq!(
        out.len(),
        x.len() / g.image() * co * l,
        "output of the wrong size"
    );
    if let Some(plan) = &w.rows {
        return forward_rows(x, w, plan, g, epilogue, out);
    }
    let all = Run {
        blocks: 0..w.blocks.len(),
        first: 0,
        channels: co,
    };
    forward_blocks(x, w, all, g, epilogue, out);
}

/// A contiguous run of a layer's channel blocks: `blocks`, whose channels are `first ..
/// first + channels`.
struct Run {
    blocks: std::ops::Range<usize>,
    first: usize,
    channels: usize,
}

/// The masked kernels' forward of `run`'s channels of consecutive images into `out` (`[n,
/// run.channels, H, W]`); `epilogue` holds those channels' values only.
fn forward_blocks(
    x: &[f32],
    w: &PackedWeights,
    run: Run,
    g: &ConvGeometry,
    epilogue: Epilogue,
    out: &mut [std::mem::MaybeUninit<f32>],
) {
    let Epilogue {
        scale,
        shift,
        residual,
        clamp,
    } = epilogue;
    for b in run.blocks {
        let (first, count) = w.blocks[b];
        let first = first - run.first;
        let block = ForwardBlock {
            x,
            taps: &w.taps,
            channels: g.in_channels,
            l: g.positions(),
            co: run.channels,
            first,
            scale: &scale[first..first + count],
            shift: &shift[first..first + count],
            residual,
            bounds: (clamp.lo, clamp.hi),
        };
        macro_rules! dispatch {
            ($isa:ident, $(($r:literal, $v:literal))*) => {
                match count {
                    $($r => {
                        #[cfg(target_arch = "x86_64")]
                        // SAFETY: `w.isa` is an instruction set this CPU has (`isa()` chose it
                        // when packing); `block` is as `forward` requires (it checks the
                        // sizes), with the taps of `g` (the weights were packed for `g`).
                        unsafe { $isa::forward::<$r, $v>(w.block(b), block, &mut *out) }
                    })*
                    _ => unreachable!("blocks of 1 to {} channels", block_channels(w.isa)),
                }
            };
        }
        match w.isa {
            // Narrow blocks take four vectors per step, so that each broadcast weight feeds
            // four FMAs (the accumulators still fit the 32 vector registers).
            Isa::Avx512 => {
                dispatch!(avx512, (1, 4)(2, 4)(3, 4)(4, 4)(5, 4)(6, 4)(7, 2)(8, 2))
            }
            // One or two vectors of two halves: at most 12 accumulators.
            Isa::Avx2 => dispatch!(avx2, (1, 2)(2, 2)(3, 1)(4, 1)),
        }
    }
}

/// [`conv_forward_images`] by the padded-rows kernel: image by image, each copied with its
/// zero border once and then read by every channel block.
fn forward_rows(
    x: &[f32],
    w: &PackedWeights,
    plan: &rows::RowPlan,
    g: &ConvGeometry,
    epilogue: Epilogue,
    out: &mut [std::mem::MaybeUninit<f32>],
) {
    let (l, co, image_len) = (g.positions(), g.out_channels, g.image());
    let mut padded = vec![0.0f32; plan.padded_len(g.in_channels)];
    for (i, (image, dst)) in x
        .chunks_exact(image_len)
        .zip(out.chunks_exact_mut(co * l))
        .enumerate()
    {
        plan.pad(image, g, &mut padded);
        for (b, &(first, count)) in w.blocks.iter().enumerate() {
            let block = rows::RowBlock {
                x: &padded,
                plan,
                channels: g.in_channels,
                l,
                co,
                first,
                scale: &epilogue.scale[first..first + count],
                shift: &epilogue.shift[first..first + count],
                residual: epilogue.residual.map(|r| &r[i * co * l..][..co * l]),
                bounds: (epilogue.clamp.lo, epilogue.clamp.hi),
            };
            macro_rules! dispatch {
                ($($r:literal)*) => {
                    match count {
                        $($r => {
                            #[cfg(target_arch = "x86_64")]
                            // SAFETY: the weights were packed for the padded-rows kernel,
                            // which `isa()` (AVX2) allowed; it checks the sizes.
                            unsafe { rows::forward::<$r>(w.block(b), block, &mut *dst) }
                        })*
                        _ => unreachable!("blocks of 1 to {} channels", rows::BLOCK),
                    }
                };
            }
            dispatch!(1 2 3 4 5 6);
        }
    }
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

/// Whether the padded-rows weight gradient computes `g` (which [`supports`] accepts): where
/// the padded-rows forward does, on maps whose rows are whole vectors; where AVX2 runs whole,
/// only on maps of at least 16x16, in place of the masked kernel (8x8 maps stay with `gemm`,
/// not compared there: `gemm` runs AVX-512 on the CPU measured).
fn takes_rows_weight_grad(g: &ConvGeometry, units: Units) -> bool {
    takes_rows(g, units)
        && g.in_hw[1].is_multiple_of(rows::WIDTH)
        && (units == Units::Avx2Halved || g.positions() >= 256)
}

/// [`conv_weight_grad_images`] by the padded-rows kernel: the images go in chunks of about
/// [`CHUNK_POSITIONS`] positions, each chunk copied with its zero borders once; per chunk
/// and block of output channels, one kernel call passes every tile of patch rows over the
/// chunk, each tile's 8-lane partial sums waiting in memory between chunks. The result does
/// not depend on the number of threads.
fn weight_grad_rows(
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
const TILE_SUMS: usize = DW_CHANNELS * DW_ROWS * LANES;

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
struct DwBlock<'a> {
    x: &'a [f32],
    dy: &'a [f32],
    g: &'a ConvGeometry,
    rows: &'a [(isize, usize)],
    masks: &'a [u16],
    tap_stride: usize,
}

impl DwBlock<'_> {
    /// Checks what the weight-gradient kernels read and write for a block of `RC` channels
    /// and `partial` partial sums.
    fn check<const RC: usize>(&self, partial: usize) {
        let (l, image_len) = (self.g.positions(), self.g.image());
        let (images, vectors) = (self.x.len() / image_len, l / LANES);
        assert!(self.dy.len() == images * RC * l && RC <= DW_CHANNELS);
        assert!(self.masks.len() == vectors * self.tap_stride);
        assert!(self.rows.iter().all(|r| r.1 < self.tap_stride));
        assert!(partial == self.rows.len() / DW_ROWS * TILE_SUMS);
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
// The plans and constants on every target (the routing reads them); the kernels on x86-64.
mod rows;

#[cfg(test)]
mod tests {
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
