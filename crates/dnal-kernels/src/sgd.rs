//! SGD's momentum step for one parameter tensor: on cuda and wgpu (f32) dnal's CubeCL kernel,
//! one operation and one launch (`cube/sgd.rs`); elsewhere burn's tensor operations in the same
//! order.

use burn::prelude::*;

/// `velocity = grad + weight_decay * param + momentum * velocity`, then
/// `param - lr * velocity`: one step of SGD with momentum (dampening 0, no Nesterov) and L2
/// weight decay, computed as burn's `Sgd` computes it. Returns the parameter and the velocity.
pub fn sgd_momentum_step<const D: usize>(
    param: Tensor<D>,
    grad: Tensor<D>,
    velocity: Tensor<D>,
    lr: f64,
    momentum: f64,
    weight_decay: f64,
) -> (Tensor<D>, Tensor<D>) {
    #[cfg(feature = "cube")]
    if crate::takes_cube_path(&param)
        && grad.dtype() == burn::tensor::DType::F32
        && velocity.dtype() == burn::tensor::DType::F32
        && grad.shape() == param.shape()
        && velocity.shape() == param.shape()
    {
        use crate::cube::CubeSgd;
        use burn::backend::Dispatch;
        let out = <Dispatch as CubeSgd>::dnal_cube_sgd(
            param.into_dispatch(),
            grad.into_dispatch(),
            velocity.into_dispatch(),
            lr,
            momentum,
            weight_decay,
        );
        return (
            Tensor::from_dispatch(out.param),
            Tensor::from_dispatch(out.velocity),
        );
    }
    let grad = decayed(grad, &param, weight_decay);
    let velocity = grad.add(velocity.mul_scalar(momentum));
    (param - velocity.clone().mul_scalar(lr), velocity)
}

/// `grad + weight_decay * param` (burn's `WeightDecay`), or `grad` without decay.
pub fn decayed<const D: usize>(grad: Tensor<D>, param: &Tensor<D>, weight_decay: f64) -> Tensor<D> {
    if weight_decay == 0.0 {
        grad
    } else {
        param.clone().mul_scalar(weight_decay).add(grad)
    }
}
