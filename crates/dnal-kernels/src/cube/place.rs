//! A tensor's channels placed into a wider stream of zeros, optionally subsampled on the way:
//! how a residual stream widens (a pruned network's stem into its first stage's stream, a
//! CIFAR ResNet's parameter-free shortcut into the next stage's). One launch forward and one
//! backward, where burn's operations took a strided slice, zero fills and a concatenation
//! forward, and slices, a zero fill and a strided assignment backward.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, AutodiffBackend, Cube, TensorMetadata, backend_extension};
use burn::tensor::Shape;
use burn_cubecl::CubeBackend;
use burn_cubecl::cubecl;
use burn_cubecl::cubecl::calculate_cube_count_elemwise;
use burn_cubecl::cubecl::prelude::*;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;

use super::layout::{empty_shaped, laid_out, offset, position};

/// The placed tensor's shape: `x`'s batch, `width` channels, `x`'s plane subsampled by `stride`.
fn placed_shape(x: &Shape, width: usize, stride: usize) -> Shape {
    Shape::new([x[0], width, x[2].div_ceil(stride), x[3].div_ceil(stride)])
}

/// `x` (`[N, k, H, W]`, f32) subsampled by `stride` (rows and columns `0, stride, ...`) and
/// placed in the channels of a zero tensor `[N, S, ceil(H / stride), ceil(W / stride)]`:
/// `map` (`[S]`) holds, per output channel, the channel of `x` placed there, or -1; `pos`
/// (`[k]`) the other way round, per channel of `x` its output channel (each channel of `x` is
/// placed once).
#[backend_extension(Cube, Fusion, Autodiff)]
pub trait CubePlace: burn::backend::Backend {
    /// The placed tensor, laid out in memory as `x` is.
    #[fusion(dtype = x, shape = placed_shape(x, map[0], *stride))]
    fn dnal_cube_place(
        x: FloatTensor<Self>,
        map: FloatTensor<Self>,
        pos: FloatTensor<Self>,
        stride: usize,
    ) -> FloatTensor<Self>;

    /// The gradient of `x` (`[N, k, height, width]`) from the placed tensor's gradient `dy`:
    /// `dy` at `x`'s channels' places and the subsampled positions, zero elsewhere.
    #[fusion(dtype = dy, shape = Shape::new([dy[0], pos[0], *height, *width]))]
    fn dnal_cube_place_backward(
        dy: FloatTensor<Self>,
        pos: FloatTensor<Self>,
        height: usize,
        width: usize,
        stride: usize,
    ) -> FloatTensor<Self>;
}

/// One element of `to` per unit, in either direction (`to` laid out as `from`, `cl`):
/// forward, `out[n, c, i, j] = x[n, map[c], i * stride, j * stride]`, zero where `map[c]` is
/// negative (`from` is `x`, `channels` is `map`); backward, `dx[n, k, y, x] = dy[n, pos[k],
/// y / stride, x / stride]` where `y` and `x` are multiples of `stride`, zero elsewhere (`from`
/// is `dy`, `channels` is `pos`). `plane`, `row` and `wide` are the unsubsampled tensor's
/// plane, row and channels, `sub_plane`, `sub_row` and `placed` the placed tensor's.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn place_kernel(
    from: &[f32],
    channels: &[f32],
    to: &mut [f32],
    plane: usize,
    row: usize,
    wide: usize,
    sub_plane: usize,
    sub_row: usize,
    placed: usize,
    stride: usize,
    #[comptime] forward: bool,
    #[comptime] cl: bool,
) {
    let i = ABSOLUTE_POS;
    if i >= to.len() {
        terminate!();
    }
    let mut v = 0.0f32;
    if forward {
        let (m, c) = position(i, sub_plane, placed, cl);
        let k = channels[c];
        if k >= 0.0 {
            let k = u32::cast_from(k) as usize;
            let n = m / sub_plane;
            let p = m - n * sub_plane;
            let r = p / sub_row;
            let source = n * plane + r * stride * row + (p - r * sub_row) * stride;
            v = from[offset(source, k, plane, wide, cl)];
        }
    } else {
        let (m, k) = position(i, plane, wide, cl);
        let n = m / plane;
        let p = m - n * plane;
        let r = p / row;
        let col = p - r * row;
        let (sr, sc) = (r / stride, col / stride);
        if sr * stride == r && sc * stride == col {
            let c = u32::cast_from(channels[k]) as usize;
            let target = n * sub_plane + sr * sub_row + sc;
            v = from[offset(target, c, sub_plane, placed, cl)];
        }
    }
    to[i] = v;
}

/// Launches [`place_kernel`] over every element of `to`; `full` is the unsubsampled tensor's
/// shape, `sub` the placed one.
fn launch(
    forward: bool,
    [from, channels, to]: [CubeTensor; 3],
    (full, sub): (&Shape, &Shape),
    stride: usize,
    cl: bool,
) {
    let client = from.client.clone();
    let elements = to.meta.num_elements();
    let dim = CubeDim::new(&client, elements);
    place_kernel::launch(
        &client,
        calculate_cube_count_elemwise(&client, elements, dim),
        dim,
        from.into_buffer_arg(),
        channels.into_buffer_arg(),
        to.into_buffer_arg(),
        full[2] * full[3],
        full[3],
        full[1],
        sub[2] * sub[3],
        sub[3],
        sub[1],
        stride,
        forward,
        cl,
    );
}

impl CubePlace for CubeBackend {
    fn dnal_cube_place(
        x: FloatTensor<Self>,
        map: FloatTensor<Self>,
        _pos: FloatTensor<Self>,
        stride: usize,
    ) -> FloatTensor<Self> {
        let (x, cl) = laid_out(x);
        let full = x.meta.shape().clone();
        let sub = placed_shape(&full, map.meta.shape()[0], stride);
        let out = empty_shaped(&x, sub.clone(), cl);
        let tensors = [x, into_contiguous(map), out.clone()];
        launch(true, tensors, (&full, &sub), stride, cl);
        out
    }

    fn dnal_cube_place_backward(
        dy: FloatTensor<Self>,
        pos: FloatTensor<Self>,
        height: usize,
        width: usize,
        stride: usize,
    ) -> FloatTensor<Self> {
        let (dy, cl) = laid_out(dy);
        let sub = dy.meta.shape().clone();
        let full = Shape::new([sub[0], pos.meta.shape()[0], height, width]);
        let dx = empty_shaped(&dy, full.clone(), cl);
        let tensors = [dy, into_contiguous(pos), dx.clone()];
        launch(false, tensors, (&full, &sub), stride, cl);
        dx
    }
}

/// What the backward keeps: `pos`, `x`'s height and width, and the stride.
type PlaceState = (FloatTensor<Cube>, usize, usize, usize);

#[derive(Debug)]
struct PlaceBackward;

impl Backward<Cube, 1> for PlaceBackward {
    type State = PlaceState;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node] = ops.parents;
        let dy = grads.consume::<Cube>(&ops.node);
        if let Some(node) = node {
            let (pos, height, width, stride) = ops.state;
            let dx = Cube::dnal_cube_place_backward(dy, pos, height, width, stride);
            grads.register::<Cube>(node.id, dx);
        }
    }
}

impl<C: CheckpointStrategy> CubePlace for Autodiff<Cube, C> {
    fn dnal_cube_place(
        x: FloatTensor<Self>,
        map: FloatTensor<Self>,
        pos: FloatTensor<Self>,
        stride: usize,
    ) -> FloatTensor<Self> {
        let prep = PlaceBackward
            .prepare::<C>([x.node()])
            .compute_bound()
            .stateful();
        let x = x.into_primitive();
        let [_, _, height, width] = x.shape().dims();
        let (map, pos) = (map.into_primitive(), pos.into_primitive());
        let out = Cube::dnal_cube_place(x, map, pos.clone(), stride);
        match prep {
            OpsKind::Tracked(prep) => prep.finish((pos, height, width, stride), out),
            OpsKind::UnTracked(prep) => prep.finish(out),
        }
    }

    fn dnal_cube_place_backward(
        dy: FloatTensor<Self>,
        pos: FloatTensor<Self>,
        height: usize,
        width: usize,
        stride: usize,
    ) -> FloatTensor<Self> {
        // Not differentiated itself.
        Autodiff::<Cube, C>::from_inner(Cube::dnal_cube_place_backward(
            dy.into_primitive(),
            pos.into_primitive(),
            height,
            width,
            stride,
        ))
    }
}
