//! The one-group convolution on the CubeCL backends (cuda, wgpu), as a burn backend extension
//! ([`CubeConv`]). A 1x1 stride-1 convolution is a matrix product, forward and backward
//! ([`pointwise`]). For a wider kernel (in training) the only new part is the weight
//! gradient: the forward and the input gradient are burn's.
//!
//! The weight gradient is a matrix product over every output position of the batch,
//! `dW[c_out, (tap, c_in)] = sum_m dy[m, c_out] * cols[m, (tap, c_in)]` with `m = (n, oy, ox)`:
//! dnal's column kernel writes `cols` in one launch ([`im2col`]), and the product's depth is
//! cut into equal pieces multiplied as one batched product and summed, so that a depth of
//! `N * OH * OW` (131,072 rows for a CIFAR batch of 128) against an output of a few thousand
//! elements still fills the device. Four launches per convolution where burn's autotuned
//! weight gradient took nineteen on an H200 (a zero fill, a slice and a slice-assign per
//! kernel tap, a copy, the product and the sum).

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::ops::{FloatTensorOps, ModuleOps};
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, AutodiffBackend, Backend, Cube, TensorMetadata, backend_extension};
use burn::tensor::Shape;
use burn::tensor::ops::ConvOptions;
use burn_cubecl::CubeBackend;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::{permute_nchw_to_nhwc, permute_nhwc_to_nchw};
use burn_cubecl::tensor::CubeTensor;

use super::im2col::im2col;

fn options(stride: usize, padding: usize) -> ConvOptions<2> {
    ConvOptions::new([stride; 2], [padding; 2], [1; 2], 1)
}

/// The convolution without bias: `x` `[N, C_in, H, W]` (f32), `weight` `[C_out, C_in, k, k]`,
/// `stride` and `padding` on both axes (`padding < k`), one group.
#[backend_extension(Cube, Fusion, Autodiff)]
pub trait CubeConv: burn::backend::Backend {
    /// The convolution's output, `[N, C_out, OH, OW]`: a matrix product for a 1x1 stride-1
    /// convolution ([`pointwise`]), else burn's conv2d (on fusion, burn's lazy operations,
    /// not an opaque one).
    #[fusion(default)]
    fn dnal_cube_conv2d(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        stride: usize,
        padding: usize,
    ) -> FloatTensor<Self> {
        if pointwise(weight.shape()[2], stride, padding) {
            pointwise_forward::<Self>(x, weight)
        } else {
            Self::conv2d(x, weight, None, options(stride, padding))
        }
    }

    /// The gradient of the `[C_out, C_in, kernel, kernel]` weight from the input `x` and the
    /// output's gradient `dy`.
    #[fusion(dtype = x, shape = Shape::new([dy[1], x[1], *kernel, *kernel]))]
    fn dnal_cube_conv2d_grad_weight(
        x: FloatTensor<Self>,
        dy: FloatTensor<Self>,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> FloatTensor<Self>;
}

impl CubeConv for CubeBackend {
    fn dnal_cube_conv2d_grad_weight(
        x: FloatTensor<Self>,
        dy: FloatTensor<Self>,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> FloatTensor<Self> {
        grad_weight(x, dy, kernel, stride, padding)
    }
}

/// The fewest rows of the product's depth one piece takes.
const MIN_PIECE_ROWS: usize = 2048;
/// The most pieces the depth is cut into.
const MAX_PIECES: usize = 64;

/// How many equal pieces to cut a depth of `rows` into: the largest power of two that
/// divides it, keeps every piece at least [`MIN_PIECE_ROWS`] deep and is at most
/// [`MAX_PIECES`]; 1 (no cut) where none does. A CIFAR batch of 128 cuts into 64 pieces at
/// 32x32, 16 at 16x16 and 4 at 8x8 (`check::convolution` runs two cut cases against flex).
fn pieces(rows: usize) -> usize {
    let mut pieces = 1;
    while pieces * 2 <= MAX_PIECES
        && rows.is_multiple_of(pieces * 2)
        && rows / (pieces * 2) >= MIN_PIECE_ROWS
    {
        pieces *= 2;
    }
    pieces
}

/// The gradient of the weight (`[C_out, C_in, k, k]`, channel-last in memory) from the input
/// `x` and the output's gradient `dy`.
fn grad_weight(
    x: CubeTensor,
    dy: CubeTensor,
    kernel: usize,
    stride: usize,
    padding: usize,
) -> CubeTensor {
    let in_channels = x.shape()[1];
    let out_channels = dy.shape()[1];
    let cols = im2col(x, kernel, stride, padding);
    let [rows, depth_cols] = [cols.shape()[0], cols.shape()[1]];
    // dy as the `[M, C_out]` matrix: a view where its memory is channel-last (as burn's
    // convolutions and dnal's BatchNorm kernels leave it), else one copy.
    let dy = permute_nchw_to_nhwc(dy);
    let dy = if dy.is_contiguous() {
        dy
    } else {
        into_contiguous(dy)
    };
    let n = pieces(rows);
    let per = rows / n;
    let dy = CubeBackend::float_reshape(dy, Shape::new([n, per, out_channels]));
    let dy = CubeBackend::float_swap_dims(dy, 1, 2);
    let cols = CubeBackend::float_reshape(cols, Shape::new([n, per, depth_cols]));
    let partial = CubeBackend::float_matmul(dy, cols);
    let grad = if n > 1 {
        CubeBackend::float_sum_dim(partial, 0)
    } else {
        partial
    };
    // `[C_out, (tap, C_in)]` is the channel-last `[C_out, k, k, C_in]`.
    let grad = CubeBackend::float_reshape(
        grad,
        Shape::new([out_channels, kernel, kernel, in_channels]),
    );
    permute_nhwc_to_nchw(grad)
}

/// Whether a convolution is 1x1 at stride 1 without padding: one matrix product over the
/// batch's positions, `[N * H * W, C_in] x [C_in, C_out]`, and so are its two gradients.
/// Each product is tuned by burn's matrix-product autotune alone; burn's convolution tuned its
/// own candidates (most of them running the same product inside) for the forward pass, the
/// input gradient and the weight gradient of every such layer, which made most of
/// MobileNetV2's warm-up.
pub(crate) fn pointwise(kernel: usize, stride: usize, padding: usize) -> bool {
    kernel == 1 && stride == 1 && padding == 0
}

fn dims<B: Backend>(x: &FloatTensor<B>) -> [usize; 4] {
    let shape = x.shape();
    [shape[0], shape[1], shape[2], shape[3]]
}

/// `[N, C, H, W]` as the `[N * H * W, C]` matrix of its positions: a view where the memory is
/// channel-last, as burn's convolutions and dnal's BatchNorm and depthwise kernels leave it.
fn positions<B: Backend>(x: FloatTensor<B>) -> FloatTensor<B> {
    let [n, c, h, w] = dims::<B>(&x);
    let x = B::float_permute(x, &[0, 2, 3, 1]);
    B::float_reshape(x, Shape::new([n * h * w, c]))
}

/// The `[N * H * W, C]` matrix as `[N, C, H, W]`, channel-last in memory.
fn from_positions<B: Backend>(rows: FloatTensor<B>, [n, h, w, c]: [usize; 4]) -> FloatTensor<B> {
    let y = B::float_reshape(rows, Shape::new([n, h, w, c]));
    B::float_permute(y, &[0, 3, 1, 2])
}

/// The 1x1 stride-1 convolution of `x` `[N, C_in, H, W]` by `weight` `[C_out, C_in, 1, 1]`.
fn pointwise_forward<B: Backend>(x: FloatTensor<B>, weight: FloatTensor<B>) -> FloatTensor<B> {
    let [n, c_in, h, w] = dims::<B>(&x);
    let c_out = weight.shape()[0];
    let weight = B::float_reshape(weight, Shape::new([c_out, c_in]));
    let y = B::float_matmul(positions::<B>(x), B::float_swap_dims(weight, 0, 1));
    from_positions::<B>(y, [n, h, w, c_out])
}

/// What the backward keeps: the input, the weight, the stride and the padding.
type ConvState = (FloatTensor<Cube>, FloatTensor<Cube>, usize, usize);

#[derive(Debug)]
struct ConvBackward;

impl Backward<Cube, 2> for ConvBackward {
    type State = ConvState;

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x, node_w] = ops.parents;
        let dy = grads.consume::<Cube>(&ops.node);
        let (x, weight, stride, padding) = ops.state;
        let kernel = weight.shape()[2];
        if pointwise(kernel, stride, padding) {
            let dy_rows = positions::<Cube>(dy);
            let [c_out, c_in] = [weight.shape()[0], weight.shape()[1]];
            if let Some(node) = node_x {
                let [n, _, h, w] = dims::<Cube>(&x);
                let weight = Cube::float_reshape(weight, Shape::new([c_out, c_in]));
                let dx = Cube::float_matmul(dy_rows.clone(), weight);
                grads.register::<Cube>(node.id, from_positions::<Cube>(dx, [n, h, w, c_in]));
            }
            if let Some(node) = node_w {
                // `dy^T x` as `[C_out, C_in]`: the weight's own row-major layout.
                let dy_t = Cube::float_swap_dims(dy_rows, 0, 1);
                let dw = Cube::float_matmul(dy_t, positions::<Cube>(x));
                let dw = Cube::float_reshape(dw, Shape::new([c_out, c_in, 1, 1]));
                grads.register::<Cube>(node.id, dw);
            }
            return;
        }
        if let Some(node) = node_x {
            let dx = Cube::conv2d_x_backward(
                x.clone(),
                weight.clone(),
                dy.clone(),
                options(stride, padding),
            );
            grads.register::<Cube>(node.id, dx);
        }
        if let Some(node) = node_w {
            let dw = Cube::dnal_cube_conv2d_grad_weight(x, dy, kernel, stride, padding);
            grads.register::<Cube>(node.id, dw);
        }
    }
}

impl<C: CheckpointStrategy> CubeConv for Autodiff<Cube, C> {
    fn dnal_cube_conv2d(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        stride: usize,
        padding: usize,
    ) -> FloatTensor<Self> {
        let prep = ConvBackward
            .prepare::<C>([x.node(), weight.node()])
            .compute_bound()
            .stateful();
        let (x, weight) = (x.into_primitive(), weight.into_primitive());
        let out = if pointwise(weight.shape()[2], stride, padding) {
            pointwise_forward::<Cube>(x.clone(), weight.clone())
        } else {
            Cube::conv2d(x.clone(), weight.clone(), None, options(stride, padding))
        };
        match prep {
            OpsKind::Tracked(prep) => prep.finish((x, weight, stride, padding), out),
            OpsKind::UnTracked(prep) => prep.finish(out),
        }
    }

    fn dnal_cube_conv2d_grad_weight(
        x: FloatTensor<Self>,
        dy: FloatTensor<Self>,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> FloatTensor<Self> {
        // Not differentiated itself.
        Autodiff::<Cube, C>::from_inner(Cube::dnal_cube_conv2d_grad_weight(
            x.into_primitive(),
            dy.into_primitive(),
            kernel,
            stride,
            padding,
        ))
    }
}
