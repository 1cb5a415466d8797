//! The convolution on flex tensors: im2col and one matrix product per image or group of small
//! images, or the direct kernels (AVX-512 or AVX2); its weight and input gradients.

use super::{f32s, tensor, vec_of};
use crate::cpu::{self, Clamp, ConvGeometry, Epilogue};
use crate::direct;
use crate::gemm::{MatMut, MatRef, matmul, matmul_uninit};
use burn::backend::flex::FlexTensor;
use rayon::prelude::*;
use std::mem::MaybeUninit;
use std::sync::Arc;

/// Groups of images whose weight-gradient contributions are summed in sequence.
pub(super) const WEIGHT_GRAD_RUN: usize = 8;

pub(super) fn geometry(
    x: &FlexTensor,
    weight: &FlexTensor,
    stride: usize,
    padding: usize,
) -> ConvGeometry {
    let xs = x.layout().shape();
    let ws = weight.layout().shape();
    ConvGeometry {
        in_channels: xs[1],
        out_channels: ws[0],
        in_hw: [xs[2], xs[3]],
        kernel: ws[2],
        stride,
        padding,
    }
}

/// Output positions a matrix product should see at least: images whose maps are smaller are
/// processed in groups, side by side, so that the product stays efficient (a 4x4 map alone
/// would give `gemm` 16 columns).
pub(super) const GROUP_POSITIONS: usize = 256;

/// Images per group for `g` (1 when a map alone has enough positions).
pub(super) fn group_size(g: &ConvGeometry, batch: usize) -> usize {
    GROUP_POSITIONS
        .div_ceil(g.positions())
        .clamp(1, batch.max(1))
}

/// Whether `gemm` itself should run its `m x k x n` products in parallel: when there are
/// fewer groups of images than threads (batch 1 in inference), the groups alone would leave
/// threads idle, and the products are large enough to share (flex's own threshold).
pub(super) fn parallel_products(groups: usize, [m, k, n]: [usize; 3]) -> bool {
    groups < rayon::current_num_threads() && m * k * n >= 192 * 192 * 192
}

/// Fewest multiply-adds of a forward product that `gemm` splits over the threads (one group
/// of images, batch 1). Below it the split costs more than it saves: in the VGG-16 for CIFAR
/// at batch 1 (products of 9-38M multiply-adds on 2x2 to 32x32 maps, weights streamed from
/// memory), splitting them slowed the forward, dense 11.4 -> 12.8 ms and pruned (1.90x fewer
/// MACs) 5.6 -> 7.7 ms (medians of eight alternating rounds, 2-core AVX-512 machine), and on
/// another (Intel, two cores) with the threshold at 2^23 the frozen pruned VGG-16 took 4.7-5.3
/// against 3.8-4.2 ms. Products of ImageNet networks at batch 1 reach 10^8 to 10^9 and are
/// split. (The direct kernels split one image's layer by channels instead, where the weights
/// are packed once: `direct::takes_forward_image`.)
pub(super) const FORWARD_SPLIT_MACS: usize = 1 << 27;

/// [`FORWARD_SPLIT_MACS`] for the convolutions that stay with `gemm` at any size, and so are
/// not split by the direct kernels at batch 1: those the direct kernels cannot compute
/// (strided, or shrinking the map) and 1x1 ones on large inputs ([`direct::streams_input`]).
/// ResNet-50's strided ones (the 7x7 stem, the 3x3 and 1x1 stride-2 layers: 102-118M
/// multiply-adds at batch 1) ran on one thread under 2^27; split from 2^25, its frozen
/// batch-1 forward took 46.8-49.2 against 51.7-53.7 ms (three alternating rounds, 2-core Intel
/// AVX-512 machine). The CIFAR networks' layers of these kinds stay far below it.
pub(super) const GEMM_ONLY_SPLIT_MACS: usize = 1 << 25;

/// Fewest groups of images (forward) or runs of groups (weight gradient) the direct kernels
/// take: they spread whole groups over the threads, so fewer (small batches) are left to
/// `gemm`, which splits a product itself (except a forward product too small to be worth
/// splitting, which the kernels take on one thread; `conv_forward_slices`). A constant, not
/// the number of threads, so that the result does not depend on the number of threads.
pub(super) const DIRECT_MIN_GROUPS: usize = 2;

/// Whether the direct kernels may run: turned on, and the CPU has AVX2 or AVX-512.
pub(super) fn direct_usable() -> bool {
    crate::direct_enabled() && direct::available()
}

impl Scratch {
    /// Buffers larger than this many values are not kept between calls.
    const KEPT: usize = 1 << 21;

    /// `f` with this thread's kept buffers: at batch 1 a fresh column matrix for each strided
    /// layer (a new allocation, often fresh pages) cost about as much as its product.
    fn with_kept<R>(f: impl FnOnce(&mut Scratch) -> R) -> R {
        thread_local! {
            static KEPT: std::cell::RefCell<Scratch> = std::cell::RefCell::default();
        }
        KEPT.with(|kept| {
            // A call nested in another's `f` (none today) gets buffers of its own.
            let Ok(mut s) = kept.try_borrow_mut() else {
                return f(&mut Scratch::default());
            };
            let out = f(&mut s);
            let s = &mut *s;
            for buffer in [&mut s.cols, &mut s.wide] {
                if buffer.capacity() > Self::KEPT {
                    *buffer = Vec::new();
                }
            }
            out
        })
    }
}

/// Whether the direct kernels take `groups` groups of images (or runs of groups).
pub(super) fn direct_path(groups: usize) -> bool {
    direct_usable() && groups >= DIRECT_MIN_GROUPS
}

/// Per-thread buffers of the convolution, reused across the images a thread processes.
#[derive(Default)]
pub(super) struct Scratch {
    /// Column matrix of a group of images.
    cols: Vec<f32>,
    /// A group's `[Co, n * L]` matrix (product or gathered output gradient).
    wide: Vec<f32>,
}

/// Fills `cols` with the column matrix `[P, count * L]` of `images` (`table`: the geometry's
/// gather table, built once per convolution).
pub(super) fn columns_into(
    images: &[f32],
    g: &ConvGeometry,
    table: Option<&cpu::GatherTable>,
    cols: &mut Vec<f32>,
) {
    let images: Vec<&[f32]> = images.chunks(g.image()).collect();
    cols.clear();
    cpu::im2col_with(&images, g, table, cols);
}

/// Images `[count, C, L]` side by side as the matrix `[C, count * L]`, into `out`.
pub(super) fn gather_group(images: &[f32], c: usize, l: usize, out: &mut Vec<f32>) {
    let count = images.len() / (c * l);
    out.clear();
    out.reserve(c * count * l);
    for ch in 0..c {
        for i in 0..count {
            out.extend_from_slice(&images[(i * c + ch) * l..][..l]);
        }
    }
}

/// Where the direct kernels' packing of a convolution's weights comes from.
pub(crate) enum Packing<'a, T> {
    /// Packed for this call, except at batch 1, where the packing is kept between calls on the
    /// same copy-on-write storage (the weights' `owner`; see
    /// [`direct::PackedWeights::shared`]).
    Owner(&'a Arc<T>),
    /// Packed once by the caller, for weights that never change (`None` where the direct
    /// kernels do not take the geometry).
    Ready(Option<&'a direct::PackedWeights>),
}

/// The forward pass on slices: `x` `[N, Ci, H, W]`, `w` `[Co, P]`, result `[N, Co, OH, OW]`.
/// Groups of images in parallel: im2col into a per-thread buffer, then `W x cols`, written
/// straight into the image's output (one image per group) or through the group's product.
pub(crate) fn conv_forward_slices<T: Send + Sync + 'static>(
    x: &[f32],
    (w, packing): (&[f32], Packing<T>),
    g: &ConvGeometry,
    epilogue: Option<Epilogue>,
) -> Vec<f32> {
    let (co, p, l) = (g.out_channels, g.patch(), g.positions());
    let batch = x.len() / g.image().max(1);
    let per = group_size(g, batch);
    let groups = batch.div_ceil(per);
    // `gemm` splits a forward product only from [`FORWARD_SPLIT_MACS`] on.
    let split_at = if direct::supports_forward(g) && !direct::streams_input(g) {
        FORWARD_SPLIT_MACS
    } else {
        GEMM_ONLY_SPLIT_MACS
    };
    let parallel = parallel_products(groups, [co, p, per * l]) && co * p * per * l >= split_at;
    // One group (batch 1) whose product `gemm` does not split: the direct kernels on one
    // thread beat im2col + `gemm` on one thread (no column matrix to build).
    let direct = direct_path(groups) || (groups == 1 && !parallel && direct_usable());
    // Weights packed once (frozen for inference) also take wide layers at batch 1, spread over
    // the threads; the batch-1 cache of `Packing::Owner` would not hold VGG-16's wide layers
    // (it started over at every forward, which then took 5x as long).
    let takes = (direct::takes_forward(g) && !(groups > 1 && direct::streams_batch_input(g)))
        || (batch == 1
            && matches!(packing, Packing::Ready(Some(_)))
            && direct::takes_forward_image(g));
    if batch * co * l > 0 && direct && takes {
        match packing {
            Packing::Ready(Some(w)) => return direct::conv_forward(x, w, g, per, epilogue),
            Packing::Ready(None) => {}
            // One group (batch 1, inference): the packing would cost as much as a thin layer's
            // convolution, so it is kept between calls. Larger batches amortise it, and
            // training changes the weights every step.
            Packing::Owner(owner) if groups == 1 => {
                let w = direct::PackedWeights::shared(owner, w, g);
                return direct::conv_forward(x, &w, g, per, epilogue);
            }
            Packing::Owner(_) => {
                let w = direct::PackedWeights::new(w, g);
                return direct::conv_forward(x, &w, g, per, epilogue);
            }
        }
    }
    let len = batch * co * l;
    if len == 0 {
        return Vec::new();
    }
    // Not zeroed first: every value is written below.
    let mut out = Vec::with_capacity(len);
    let table = cpu::GatherTable::shared(g);
    let lhs = MatRef::row_major(w, co, p);
    let each = |s: &mut Scratch, (n, (dst, images)): (usize, (&mut [MaybeUninit<f32>], &[f32]))| {
        // Offset of this group in the output (where a residual's values are).
        let first = n * per * co * l;
        let count = dst.len() / (co * l);
        // One image whose product `gemm` splits: its gather is split too.
        let gathered;
        let cols = match table.as_deref() {
            // One image of a 1x1 convolution: its columns are the image.
            _ if count == 1 && g.columns_are_input() => images,
            Some(table) if parallel && count == 1 => {
                gathered = table.gather_image(images, g);
                &gathered
            }
            _ => {
                columns_into(images, g, table.as_deref(), &mut s.cols);
                &s.cols
            }
        };
        let cols = MatRef::row_major(cols, p, count * l);
        if count == 1 {
            let dst = matmul_uninit(dst, lhs, cols, parallel);
            if let Some(e) = epilogue {
                for (ch, plane) in dst.chunks_mut(l).enumerate() {
                    e.apply(ch, plane, first + ch * l);
                }
            }
            return;
        }
        s.wide.resize(co * count * l, 0.0);
        let wide = MatMut::row_major(&mut s.wide, co, count * l);
        matmul(wide, lhs, cols, false, parallel);
        for (at, plane) in dst.chunks_mut(l).enumerate() {
            let (i, ch) = (at / co, at % co);
            let plane = plane.write_copy_of_slice(&s.wide[(ch * count + i) * l..][..l]);
            if let Some(e) = epilogue {
                e.apply(ch, plane, first + at * l);
            }
        }
    };
    let dst = &mut out.spare_capacity_mut()[..len];
    if groups == 1 {
        // One group: on this thread (`gemm` splits a large product itself), without a
        // hand-off to rayon's pool.
        Scratch::with_kept(|s| each(s, (0, (dst, x))));
    } else {
        dst.par_chunks_mut(per * co * l)
            .zip(x.par_chunks(per * g.image()))
            .enumerate()
            .for_each_init(Scratch::default, each);
    }
    // SAFETY: every group wrote all of its chunk: its product (one image) or each of its
    // `count * co` planes.
    #[allow(unsafe_code)]
    unsafe {
        out.set_len(len)
    };
    out
}

/// The forward pass on flex tensors.
pub(super) fn conv_forward(
    x: FlexTensor,
    weight: FlexTensor,
    stride: usize,
    padding: usize,
    epilogue: Option<Epilogue>,
) -> FlexTensor {
    let x = f32s(&x);
    let weight = f32s(&weight);
    let g = geometry(&x, &weight, stride, padding);
    let batch = x.layout().shape()[0];
    // The weights' storage, copy-on-write, for the packed-weights cache.
    let owner = weight.data_arc();
    let w = (weight.storage::<f32>(), Packing::Owner(&owner));
    let out = conv_forward_slices(x.storage::<f32>(), w, &g, epilogue);
    let [oh, ow] = g.out_hw();
    tensor(out, &[batch, g.out_channels, oh, ow])
}

/// The weight gradient `sum_i dy_i [Co, L] x cols_i^T [L, P]`, as `[Co * P]`. Runs of
/// [`WEIGHT_GRAD_RUN`] groups are summed in parallel, each in sequence into its own buffer,
/// and the runs then in sequence, so the result does not depend on the number of threads.
pub(super) fn conv_weight_grad(x: &[f32], dy: &[f32], g: &ConvGeometry) -> Vec<f32> {
    let (co, p, l) = (g.out_channels, g.patch(), g.positions());
    let batch = x.len() / g.image().max(1);
    let per = group_size(g, batch);
    let groups: Vec<(usize, usize)> = (0..batch)
        .step_by(per)
        .map(|first| (first, per.min(batch - first)))
        .collect();
    let runs = groups.len().div_ceil(WEIGHT_GRAD_RUN);
    if direct_path(runs) && direct::takes_weight_grad(g) {
        return direct_weight_grad(x, dy, g, &groups);
    }
    let parallel = parallel_products(runs, [co, per * l, p]);
    let table = cpu::GatherTable::shared(g);
    let partial = |run: &[(usize, usize)]| {
        let mut s = Scratch::default();
        let mut dw = vec![0.0f32; co * p];
        for (n, &(first, count)) in run.iter().enumerate() {
            let images = &x[first * g.image()..][..count * g.image()];
            let cols = if count == 1 && g.columns_are_input() {
                images
            } else {
                columns_into(images, g, table.as_deref(), &mut s.cols);
                &s.cols
            };
            let cols_t = MatRef::row_major(cols, p, count * l).t();
            let dy_group = &dy[first * co * l..][..count * co * l];
            let dy_group = if count == 1 {
                MatRef::row_major(dy_group, co, l)
            } else {
                gather_group(dy_group, co, l, &mut s.wide);
                MatRef::row_major(&s.wide, co, count * l)
            };
            let dst = MatMut::row_major(&mut dw, co, p);
            matmul(dst, dy_group, cols_t, n > 0, parallel);
        }
        dw
    };
    let sums: Vec<Vec<f32>> = groups.par_chunks(WEIGHT_GRAD_RUN).map(partial).collect();
    let mut sums = sums.into_iter();
    let mut dw = sums.next().unwrap_or_else(|| vec![0.0; co * p]);
    for run in sums {
        for (d, v) in dw.iter_mut().zip(&run) {
            *d += v;
        }
    }
    dw
}

/// [`conv_weight_grad`] by the direct kernels. With fewer runs of groups than threads (8x8
/// maps give 4 runs at batch 128, 16x16 and 32x32 maps 16), each run's filters are split too,
/// into whole channel blocks ([`direct::weight_grad_splits`]), whose sums do not change with
/// the split: every weight's value is the same on any number of threads.
fn direct_weight_grad(
    x: &[f32],
    dy: &[f32],
    g: &ConvGeometry,
    groups: &[(usize, usize)],
) -> Vec<f32> {
    let (co, p, l) = (g.out_channels, g.patch(), g.positions());
    let runs: Vec<(usize, usize)> = groups
        .chunks(WEIGHT_GRAD_RUN)
        .map(|run| (run[0].0, run.iter().map(|&(_, count)| count).sum()))
        .collect();
    let splits = direct::weight_grad_splits(g, rayon::current_num_threads().div_ceil(runs.len()));
    let tasks: Vec<(usize, usize)> = (0..runs.len())
        .flat_map(|r| (0..splits.len()).map(move |s| (r, s)))
        .collect();
    let parts: Vec<Vec<f32>> = tasks
        .par_iter()
        .map(|&(r, s)| {
            // The run's groups are consecutive images.
            let (first, images) = runs[r];
            direct::conv_weight_grad_images(
                &x[first * g.image()..][..images * g.image()],
                &dy[first * co * l..][..images * co * l],
                g,
                splits[s].clone(),
            )
        })
        .collect();
    // The runs summed in sequence, as in `conv_weight_grad`: the first one copied.
    let mut dw = vec![0.0f32; co * p];
    for (&(r, s), part) in tasks.iter().zip(&parts) {
        let rows = &mut dw[splits[s].start * p..splits[s].end * p];
        if r == 0 {
            rows.copy_from_slice(part);
        } else {
            for (d, v) in rows.iter_mut().zip(part) {
                *d += v;
            }
        }
    }
    dw
}

/// The input gradient of a strided convolution: per group, `W^T [P, Co] x dy [Co, n * L]`,
/// then col2im of each image's columns.
pub(super) fn conv_input_grad_strided(
    dy: &[f32],
    w: &[f32],
    g: &ConvGeometry,
    batch: usize,
) -> Vec<f32> {
    let (co, p, l) = (g.out_channels, g.patch(), g.positions());
    let per = group_size(g, batch);
    let parallel = parallel_products(batch.div_ceil(per), [p, co, per * l]);
    let w_t = MatRef::row_major(w, co, p).t();
    let mut dx = vec![0.0f32; batch * g.image()];
    if dx.is_empty() {
        return dx;
    }
    dx.par_chunks_mut(per * g.image())
        .zip(dy.par_chunks(per * co * l))
        .for_each_init(Scratch::default, |s, (dst, dy)| {
            let count = dst.len() / g.image();
            let dy = if count == 1 {
                MatRef::row_major(dy, co, l)
            } else {
                gather_group(dy, co, l, &mut s.wide);
                MatRef::row_major(&s.wide, co, count * l)
            };
            s.cols.resize(p * count * l, 0.0);
            matmul(
                MatMut::row_major(&mut s.cols, p, count * l),
                w_t,
                dy,
                false,
                parallel,
            );
            for (i, image) in dst.chunks_mut(g.image()).enumerate() {
                cpu::col2im(&s.cols, g, count, i, image);
            }
        });
    dx
}

/// `(dx, dweight)`, each only when asked for.
pub(super) fn conv_backward(
    x: &FlexTensor,
    weight: &FlexTensor,
    grad: &FlexTensor,
    g: ConvGeometry,
    want_x: bool,
    want_w: bool,
) -> (Option<FlexTensor>, Option<FlexTensor>) {
    let x = f32s(x);
    let grad = f32s(grad);
    let (xv, dy) = (x.storage::<f32>(), grad.storage::<f32>());
    let batch = x.layout().shape()[0];
    let dw = want_w.then(|| {
        let dw = conv_weight_grad(xv, dy, &g);
        tensor(dw, &[g.out_channels, g.in_channels, g.kernel, g.kernel])
    });
    let dx = want_x.then(|| {
        if g.stride == 1 {
            // The input gradient of a stride-1 convolution is the convolution of the output
            // gradient with the transposed, flipped kernel and padding k - 1 - p.
            let flipped = cpu::flip_transpose(f32s(weight).storage::<f32>(), &g);
            let k = g.kernel;
            let flipped = tensor(flipped, &[g.in_channels, g.out_channels, k, k]);
            return conv_forward(grad.clone(), flipped, 1, k - 1 - g.padding, None);
        }
        let dx = conv_input_grad_strided(dy, f32s(weight).storage::<f32>(), &g, batch);
        tensor(dx, &[batch, g.in_channels, g.in_hw[0], g.in_hw[1]])
    });
    (dx, dw)
}

/// `clamp(stream + y)` with `y` (`[N, k, H, W]`) added into the channels `channels` of `stream`
/// (`[N, C, H, W]`), plane by plane, in the stream's own storage when nothing else holds it (a
/// residual network's stream, passed on from block to block), else in a copy.
pub(super) fn conv_affine_add_into(
    y: &FlexTensor,
    stream: FlexTensor,
    channels: &[usize],
    clamp: Clamp,
) -> FlexTensor {
    let y = f32s(y);
    let shape = stream.layout().shape().to_vec();
    let [n, c, h, w]: [usize; 4] = shape[..].try_into().expect("a stream [N, C, H, W]");
    let k = channels.len();
    assert_eq!(
        y.layout().shape()[..],
        [n, k, h, w],
        "one output channel per stream channel it is added into"
    );
    let source = cpu::StreamSources::new(channels, c);
    let mut stream = owned_f32s(stream);
    let values = stream
        .try_storage_mut::<f32>()
        .expect("a tensor nothing else holds");
    cpu::add_into_channels(
        &mut values[..n * c * h * w],
        [c, h * w],
        y.storage::<f32>(),
        &source,
        clamp,
    );
    stream
}

/// `t` as a contiguous f32 tensor whose storage, starting at its first value, nothing else
/// holds: `t` itself when it is one, otherwise a copy of its values.
fn owned_f32s(t: FlexTensor) -> FlexTensor {
    let own = t.is_unique() && t.layout().contiguous_offsets().is_some_and(|(s, _)| s == 0);
    if own && t.dtype() == burn::tensor::DType::F32 {
        return t;
    }
    let t = f32s(&t);
    tensor(vec_of(&t).into_owned(), t.layout().shape())
}

/// The inference convolution with BatchNorm, an optional residual and the clamp applied as
/// its output is written.
pub(super) fn conv_affine(
    x: FlexTensor,
    weight: FlexTensor,
    (scale, shift): (FlexTensor, FlexTensor),
    residual: Option<FlexTensor>,
    stride: usize,
    padding: usize,
    clamp: Clamp,
) -> FlexTensor {
    let (scale, shift) = (vec_of(&scale), vec_of(&shift));
    let residual = residual.map(|r| f32s(&r));
    let epilogue = Epilogue {
        scale: &scale,
        shift: &shift,
        residual: residual.as_ref().map(|r| r.storage::<f32>()),
        clamp,
    };
    conv_forward(x, weight, stride, padding, Some(epilogue))
}
