//! One step of SGD with momentum (dampening 0) and L2 weight decay on the CubeCL backends, for
//! one parameter tensor, as a burn backend extension ([`CubeSgd`]): one operation in fusion's
//! stream and one launch, where burn's optimiser issues seven tensor operations per parameter
//! that fusion handles one by one before merging them into fewer, larger launches. Written in
//! place over the parameter and its velocity, which fusion hands over as their only handles in
//! training, so the step reserves no memory; the gradient is read through its strides, since the convolutions'
//! weight gradients come back as permuted views (copying them first was a launch and a
//! reservation more per parameter, and cost more than the operations saved).
//!
//! `velocity = grad + weight_decay * param + momentum * velocity`, `param -= lr * velocity`, in
//! the order burn's `Sgd` computes it.

use burn::backend::fusion::custom::TensorSpec;
use burn::backend::tensor::FloatTensor;
use burn::backend::{ExtensionType, backend_extension};
use burn_cubecl::CubeBackend;
use burn_cubecl::cubecl::prelude::*;
use burn_cubecl::cubecl::{self, calculate_cube_count_elemwise};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;

/// A parameter and its velocity after one step.
#[derive(ExtensionType)]
#[extension_type(fusion)]
pub struct SgdOutput<B: burn::backend::Backend> {
    /// The updated parameter.
    pub param: FloatTensor<B>,
    /// The updated velocity.
    pub velocity: FloatTensor<B>,
}

fn sgd_meta(param: &TensorSpec) -> SgdOutputMetadata {
    SgdOutputMetadata {
        param: param.clone(),
        velocity: param.clone(),
    }
}

/// SGD's momentum step on the cubecl backends: `param`, `grad` and `velocity` f32 of one
/// shape.
#[backend_extension(Cube, Fusion)]
pub trait CubeSgd: burn::backend::Backend {
    /// The parameter and velocity after one step with learning rate `lr`.
    #[fusion(meta = |param, _grad, _velocity, _lr, _momentum, _weight_decay| sgd_meta(param))]
    fn dnal_cube_sgd(
        param: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        velocity: FloatTensor<Self>,
        lr: f64,
        momentum: f64,
        weight_decay: f64,
    ) -> SgdOutput<Self>;
}

impl CubeSgd for CubeBackend {
    fn dnal_cube_sgd(
        param: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        velocity: FloatTensor<Self>,
        lr: f64,
        momentum: f64,
        weight_decay: f64,
    ) -> SgdOutput<Self> {
        step(
            param,
            grad,
            velocity,
            [lr, momentum, weight_decay].map(|v| v as f32),
        )
    }
}

/// The shape and strides of `t` padded to four dimensions with leading ones, for the kernels
/// to read a strided gradient in place; none above rank 4.
fn padded(t: &CubeTensor) -> Option<([usize; 4], [usize; 4])> {
    let (shape, strides) = (t.meta.shape(), t.meta.strides());
    let rank = shape.num_dims();
    if rank > 4 {
        return None;
    }
    let (mut dims, mut steps) = ([1; 4], [0; 4]);
    for d in 0..rank {
        dims[4 - rank + d] = shape[d];
        steps[4 - rank + d] = strides[d];
    }
    Some((dims, steps))
}

/// The offset of row-major element `i` in a four-dimensional view of `shape` and `strides`.
#[cube]
fn offset(i: usize, shape: &Sequence<usize>, strides: &Sequence<usize>) -> usize {
    let (i3, rest) = (i % shape[3], i / shape[3]);
    let (i2, rest) = (rest % shape[2], rest / shape[2]);
    let (i1, i0) = (rest % shape[1], rest / shape[1]);
    i0 * strides[0] + i1 * strides[1] + i2 * strides[2] + i3 * strides[3]
}

fn step(
    param: CubeTensor,
    grad: CubeTensor,
    velocity: CubeTensor,
    [lr, momentum, decay]: [f32; 3],
) -> SgdOutput<CubeBackend> {
    // Fusion hands an operation the only handle of an input nothing reads after it; a
    // parameter or velocity that something else still holds is copied first.
    let [param, velocity] = [param, velocity].map(|t| {
        let t = into_contiguous(t);
        if t.can_mut() { t } else { t.copy() }
    });
    let view = padded(&grad).filter(|_| !grad.is_contiguous());
    let grad = if view.is_none() {
        into_contiguous(grad)
    } else {
        grad
    };
    let strided = view.is_some();
    let (dims, steps) = view.unwrap_or(([1; 4], [0; 4]));
    let sequence = |values: [usize; 4]| {
        let mut arg = SequenceArg::new();
        values.into_iter().for_each(|v| arg.push(v));
        arg
    };
    let client = param.client.clone();
    let elements = param.meta.num_elements();
    let dim = CubeDim::new(&client, elements);
    sgd_in_place::launch(
        &client,
        calculate_cube_count_elemwise(&client, elements, dim),
        dim,
        param.clone().into_buffer_arg(),
        velocity.clone().into_buffer_arg(),
        grad.into_buffer_arg(),
        sequence(dims),
        sequence(steps),
        lr,
        momentum,
        decay,
        strided,
    );
    SgdOutput { param, velocity }
}

/// The step written over `param` and `velocity`; `grad` read through `shape` and `strides`
/// where `strided`.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn sgd_in_place(
    param: &mut [f32],
    velocity: &mut [f32],
    grad: &[f32],
    shape: Sequence<usize>,
    strides: Sequence<usize>,
    lr: f32,
    momentum: f32,
    decay: f32,
    #[comptime] strided: bool,
) {
    let i = ABSOLUTE_POS;
    if i >= param.len() {
        terminate!();
    }
    let g = if strided {
        grad[offset(i, &shape, &strides)]
    } else {
        grad[i]
    };
    let p = param[i];
    let v = (p * decay + g) + velocity[i] * momentum;
    velocity[i] = v;
    param[i] = p - v * lr;
}
