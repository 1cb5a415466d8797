//! The forward kernel's side: weights packed per channel block, and a convolution's output
//! computed image by image, block by block (or one large image split over the threads).

use super::*;

/// A convolution's weights and taps prepared for the forward kernel: per channel block,
/// `[tap][Ci][MAX_CHANNELS]` (zero past the block's channels), in the order the kernel reads
/// them.
pub struct PackedWeights {
    /// The instruction set whose kernel the blocks are sized for.
    isa: Isa,
    /// The padded-rows kernel's plan, where it runs the convolution (its blocks' weights are
    /// `[Ci][tap][MAX_CHANNELS]`).
    rows: Option<Arc<rows::RowPlan>>,
    pub(super) values: Vec<f32>,
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
    pub(super) fn packed(w: &[f32], g: &ConvGeometry, isa: Isa, rows: bool) -> Self {
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
pub(super) struct ForwardBlock<'a> {
    pub(super) x: &'a [f32],
    pub(super) taps: &'a Taps,
    pub(super) channels: usize,
    pub(super) l: usize,
    pub(super) co: usize,
    pub(super) first: usize,
    pub(super) scale: &'a [f32],
    pub(super) shift: &'a [f32],
    pub(super) residual: Option<&'a [f32]>,
    pub(super) bounds: (f32, f32),
}

impl ForwardBlock<'_> {
    /// Checks what the forward kernels read and write for a block of `R` channels: the weights
    /// `w` (a packed block) and an output of `out` values.
    pub(super) fn check<const R: usize>(&self, w: &[f32], out: usize) {
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
    pub(super) fn steps<const V: usize>(
        &self,
    ) -> impl Iterator<Item = ([(usize, usize); V], usize)> {
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
pub(super) const SPLIT_IMAGE_MACS: usize = 1 << 23;

/// Whether [`conv_forward`] spreads one image's channel blocks over the threads: a layer of at
/// least [`SPLIT_IMAGE_MACS`], with a block for each thread.
pub(crate) fn splits_image(w: &PackedWeights, g: &ConvGeometry) -> bool {
    worth_splitting(g) && w.blocks.len() >= rayon::current_num_threads()
}

/// Whether one image of `g` is worth spreading over the threads: there are several, and the
/// layer has at least [`SPLIT_IMAGE_MACS`].
pub(super) fn worth_splitting(g: &ConvGeometry) -> bool {
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
