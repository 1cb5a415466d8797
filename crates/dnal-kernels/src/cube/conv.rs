//! The one-group convolution in training on the CubeCL backends (cuda, wgpu), as a burn
//! backend extension ([`CubeConv`]) whose only new part is its backward: the forward is burn's
//! conv2d, the weight gradient burn's, and the input gradient of a stride-1 convolution is
//! burn's *forward* convolution of the output gradient with the flipped, transposed kernel
//! (padding `k - 1 - p`).
//!
//! burn computes that input gradient with its own autotuned kernels; on cuda the one it picks
//! for 3x3 kernels is a matrix product into a `[N * H * W, k * k * C_in]` column matrix and a
//! tap-by-tap scatter of the columns back into the image, about fifteen launches per
//! convolution (on an H200, 60 % of a ResNet-56 step's launches). As a forward convolution it
//! is one implicit-GEMM launch plus the kernel's relayout. Strided convolutions keep burn's
//! input gradient.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::ops::{FloatTensorOps, ModuleOps};
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Cube, TensorMetadata, backend_extension};
use burn::tensor::ops::ConvOptions;
use burn_cubecl::CubeBackend;

fn options(stride: usize, padding: usize) -> ConvOptions<2> {
    ConvOptions::new([stride; 2], [padding; 2], [1; 2], 1)
}

/// The convolution without bias: `x` `[N, C_in, H, W]` (f32), `weight` `[C_out, C_in, k, k]`,
/// `stride` and `padding` on both axes (`padding < k`), one group.
#[backend_extension(Cube, Fusion, Autodiff)]
pub trait CubeConv: burn::backend::Backend {
    /// The convolution's output, `[N, C_out, OH, OW]`: burn's conv2d (on fusion, burn's lazy
    /// operation, not an opaque one).
    #[fusion(default)]
    fn dnal_cube_conv2d(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        stride: usize,
        padding: usize,
    ) -> FloatTensor<Self> {
        Self::conv2d(x, weight, None, options(stride, padding))
    }
}

impl CubeConv for CubeBackend {}

/// The gradient of the input `x` from the output's gradient `dy`.
fn grad_input(
    x: FloatTensor<Cube>,
    weight: FloatTensor<Cube>,
    dy: FloatTensor<Cube>,
    stride: usize,
    padding: usize,
) -> FloatTensor<Cube> {
    if stride != 1 {
        return Cube::conv2d_x_backward(x, weight, dy, options(stride, padding));
    }
    let kernel = weight.shape()[2];
    // dx[c_in] = sum over c_out of dy[c_out] correlated with the kernel rotated by 180 degrees:
    // a convolution whose weight is [C_in, C_out, k, k], flipped in both spatial axes. The
    // flip writes it as [C_in, k, k, C_out], the channel-last memory burn's cubecl convolution
    // works in, so that the convolution does not copy it once more.
    let flipped = Cube::float_flip(Cube::float_permute(weight, &[1, 2, 3, 0]), &[1, 2]);
    let flipped = Cube::float_permute(flipped, &[0, 3, 1, 2]);
    Cube::conv2d(dy, flipped, None, options(1, kernel - 1 - padding))
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
        if let Some(node) = node_w {
            let dw = Cube::conv2d_weight_backward(
                x.clone(),
                weight.clone(),
                dy.clone(),
                options(stride, padding),
            );
            grads.register::<Cube>(node.id, dw);
        }
        if let Some(node) = node_x {
            grads.register::<Cube>(node.id, grad_input(x, weight, dy, stride, padding));
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
        let out = Cube::conv2d(x.clone(), weight.clone(), None, options(stride, padding));
        match prep {
            OpsKind::Tracked(prep) => prep.finish((x, weight, stride, padding), out),
            OpsKind::UnTracked(prep) => prep.finish(out),
        }
    }
}
