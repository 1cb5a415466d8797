//! The depthwise convolution on the CubeCL backends as a burn backend extension: the trait
//! ([`CubeDepthwise`]), its implementation on burn's cubecl backend with dnal's kernels
//! ([`depthwise_kernels`]), lazy under fusion, and its autodiff implementation with the input
//! and weight gradients registered on burn's graph (each computed only where its parent is
//! tracked).

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, AutodiffBackend, Cube, TensorMetadata, backend_extension};
use burn::tensor::Shape;
use burn_cubecl::CubeBackend;

use super::depthwise_kernels::{self, output_shape};

/// The depthwise convolution without bias: `x` `[N, C, H, W]` (f32), `weight` `[C, 1, k, k]`,
/// `stride` and `padding` on both axes (`padding < k`).
#[backend_extension(Cube, Fusion, Autodiff)]
pub trait CubeDepthwise: burn::backend::Backend {
    /// The convolution's output, `[N, C, OH, OW]`.
    #[fusion(dtype = x, shape = output_shape(x, weight, *stride, *padding))]
    fn dnal_cube_depthwise(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        stride: usize,
        padding: usize,
    ) -> FloatTensor<Self>;

    /// The gradient of the input (`[N, C, height, width]`) from the output's gradient `dy`.
    #[fusion(dtype = dy, shape = Shape::new([dy[0], dy[1], *height, *width]))]
    fn dnal_cube_depthwise_grad_input(
        dy: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        height: usize,
        width: usize,
        stride: usize,
        padding: usize,
    ) -> FloatTensor<Self>;

    /// The gradient of the `[C, 1, kernel, kernel]` weight from the input `x` and the output's
    /// gradient `dy`.
    #[fusion(dtype = x, shape = Shape::new([x[1], 1, *kernel, *kernel]))]
    fn dnal_cube_depthwise_grad_weight(
        x: FloatTensor<Self>,
        dy: FloatTensor<Self>,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> FloatTensor<Self>;
}

impl CubeDepthwise for CubeBackend {
    fn dnal_cube_depthwise(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        stride: usize,
        padding: usize,
    ) -> FloatTensor<Self> {
        depthwise_kernels::forward(x, weight, stride, padding)
    }

    fn dnal_cube_depthwise_grad_input(
        dy: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        height: usize,
        width: usize,
        stride: usize,
        padding: usize,
    ) -> FloatTensor<Self> {
        depthwise_kernels::grad_input(dy, weight, height, width, stride, padding)
    }

    fn dnal_cube_depthwise_grad_weight(
        x: FloatTensor<Self>,
        dy: FloatTensor<Self>,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> FloatTensor<Self> {
        depthwise_kernels::grad_weight(x, dy, kernel, stride, padding)
    }
}

/// What the backward keeps: the input, the weight, the stride and the padding.
type DepthwiseState = (FloatTensor<Cube>, FloatTensor<Cube>, usize, usize);

#[derive(Debug)]
struct DepthwiseBackward;

impl Backward<Cube, 2> for DepthwiseBackward {
    type State = DepthwiseState;

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x, node_w] = ops.parents;
        let dy = grads.consume::<Cube>(&ops.node);
        let (x, weight, stride, padding) = ops.state;
        if let Some(node) = node_w {
            let kernel = weight.shape()[2];
            let dw = Cube::dnal_cube_depthwise_grad_weight(
                x.clone(),
                dy.clone(),
                kernel,
                stride,
                padding,
            );
            grads.register::<Cube>(node.id, dw);
        }
        if let Some(node) = node_x {
            let [_, _, height, width] = x.shape().dims();
            let dx =
                Cube::dnal_cube_depthwise_grad_input(dy, weight, height, width, stride, padding);
            grads.register::<Cube>(node.id, dx);
        }
    }
}

impl<C: CheckpointStrategy> CubeDepthwise for Autodiff<Cube, C> {
    fn dnal_cube_depthwise(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        stride: usize,
        padding: usize,
    ) -> FloatTensor<Self> {
        let prep = DepthwiseBackward
            .prepare::<C>([x.node(), weight.node()])
            .compute_bound()
            .stateful();
        let (x, weight) = (x.into_primitive(), weight.into_primitive());
        let out = Cube::dnal_cube_depthwise(x.clone(), weight.clone(), stride, padding);
        match prep {
            OpsKind::Tracked(prep) => prep.finish((x, weight, stride, padding), out),
            OpsKind::UnTracked(prep) => prep.finish(out),
        }
    }

    fn dnal_cube_depthwise_grad_input(
        dy: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        height: usize,
        width: usize,
        stride: usize,
        padding: usize,
    ) -> FloatTensor<Self> {
        // Not differentiated itself.
        Autodiff::<Cube, C>::from_inner(Cube::dnal_cube_depthwise_grad_input(
            dy.into_primitive(),
            weight.into_primitive(),
            height,
            width,
            stride,
            padding,
        ))
    }

    fn dnal_cube_depthwise_grad_weight(
        x: FloatTensor<Self>,
        dy: FloatTensor<Self>,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> FloatTensor<Self> {
        // Not differentiated itself.
        Autodiff::<Cube, C>::from_inner(Cube::dnal_cube_depthwise_grad_weight(
            x.into_primitive(),
            dy.into_primitive(),
            kernel,
            stride,
            padding,
        ))
    }
}
