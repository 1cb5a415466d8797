//! SGD's momentum step: for all of a network's parameters at once on cuda and wgpu (f32),
//! dnal's CubeCL kernel (one operation in fusion's stream and one launch per group of
//! parameters, `cube/sgd.rs`); elsewhere burn's tensor operations in burn's order, parameter by
//! parameter.

use burn::backend::ops::FloatTensorOps;
use burn::backend::{Dispatch, DispatchTensor, Scalar, TensorMetadata};
use burn::prelude::*;

/// SGD's learning rate: a number, or a one-element f32 tensor on the parameters' device that
/// holds it. A step recorded as a graph of launches takes the latter, so that every replay reads
/// the rate written into that tensor since (the number would be baked into the recording).
#[derive(Clone, Debug)]
#[allow(clippy::large_enum_variant)] // one per step, moved, never stored in bulk
pub enum Rate {
    /// The rate itself.
    Value(f64),
    /// A `[1]` tensor holding the rate.
    Held(Tensor<1>),
}

impl From<f64> for Rate {
    fn from(lr: f64) -> Self {
        Self::Value(lr)
    }
}

impl Rate {
    /// `t` times the rate.
    pub fn times<const D: usize>(&self, t: Tensor<D>) -> Tensor<D> {
        match self {
            Self::Value(lr) => t.mul_scalar(*lr),
            Self::Held(lr) => t.mul(lr.clone().reshape([1; D])),
        }
    }
}

/// `velocity = grad + weight_decay * param + momentum * velocity`, then
/// `param - lr * velocity`: one step of SGD with momentum (dampening 0, no Nesterov) and L2
/// weight decay, computed as burn's `Sgd` computes it. Returns the parameter and the velocity.
pub fn sgd_momentum_step<const D: usize>(
    param: Tensor<D>,
    grad: Tensor<D>,
    velocity: Tensor<D>,
    lr: impl Into<Rate>,
    momentum: f64,
    weight_decay: f64,
) -> (Tensor<D>, Tensor<D>) {
    let slot = [param, grad, velocity].map(Tensor::into_dispatch);
    let [[param, velocity]] = sgd_momentum_steps(vec![slot], lr, momentum, weight_decay)
        .try_into()
        .unwrap_or_else(|_| unreachable!("one result per slot"));
    (
        Tensor::from_dispatch(param),
        Tensor::from_dispatch(velocity),
    )
}

/// [`sgd_momentum_step`] for many parameters: each slot is a parameter's `[param, grad,
/// velocity]` (one shape, any rank), each result its `[param, velocity]`, in the slots' order.
/// On cuda and wgpu the f32 slots step together, as one operation; any other slot steps on its
/// own, with burn's operations.
pub fn sgd_momentum_steps(
    slots: Vec<[DispatchTensor; 3]>,
    lr: impl Into<Rate>,
    momentum: f64,
    weight_decay: f64,
) -> Vec<[DispatchTensor; 2]> {
    let lr = lr.into();
    let mut out: Vec<Option<[DispatchTensor; 2]>> = (0..slots.len()).map(|_| None).collect();
    #[cfg(feature = "cube")]
    let slots = {
        let (fused, at, rest) = cube_slots(slots);
        if !fused.is_empty() {
            let rate = match &lr {
                Rate::Value(lr) => crate::cube::StepRate::Value(*lr as f32),
                Rate::Held(t) => match cube_float(t.clone().inner().into_dispatch()) {
                    Some(t) => crate::cube::StepRate::Held(t),
                    None => panic!("a held SGD rate must be on the parameters' device"),
                },
            };
            let stepped = crate::cube::sgd_steps(fused, rate, momentum, weight_decay);
            for (i, [param, velocity]) in at.into_iter().zip(stepped) {
                out[i] = Some([param, velocity].map(cube_dispatch));
            }
        }
        rest
    };
    #[cfg(not(feature = "cube"))]
    let slots = slots.into_iter().enumerate();
    for (i, [param, grad, velocity]) in slots {
        out[i] = Some(burn_step(
            param,
            grad,
            velocity,
            &lr,
            momentum,
            weight_decay,
        ));
    }
    out.into_iter()
        .map(|slot| slot.expect("every slot stepped"))
        .collect()
}

/// Whether [`sgd_momentum_steps`] steps `param` together with others (f32 on cuda or wgpu,
/// with a gradient and velocity like it) rather than with burn's operations on its own.
pub fn steps_together<const D: usize>(param: &Tensor<D>) -> bool {
    #[cfg(feature = "cube")]
    return crate::takes_cube_path(param);
    #[cfg(not(feature = "cube"))]
    {
        let _ = param;
        false
    }
}

/// `param` in the memory layout in which [`sgd_momentum_steps`] steps it without copies on
/// cuda and wgpu: a rank-4 f32 tensor (a convolution's weight) channel-last, `[C_out, k, k,
/// C_in]` in memory viewed as `[C_out, C_in, k, k]`, the layout the convolutions' weight
/// gradients arrive in. Any other tensor, and every tensor elsewhere, is returned as it is.
/// The step keeps each parameter's layout (a gradient laid out otherwise is copied into it at
/// every step), so a network passed through this before training meets one weight layout
/// throughout, and its convolutions are stepped without copies. Reads the tensor back to the
/// host once.
pub fn step_layout<const D: usize>(param: Tensor<D>) -> Tensor<D> {
    let dims = param.dims();
    // With one input channel or a 1x1 kernel, channel-last is the memory it already has.
    if D != 4 || dims[1] == 1 || dims[2] * dims[3] == 1 || !steps_together(&param) {
        return param;
    }
    let param = channel_last(Tensor::<4>::from_dispatch(param.into_dispatch()));
    Tensor::from_dispatch(param.into_dispatch())
}

/// A copy of `x` (`[N, C, H, W]`) held channel-last in memory, made through the host: its
/// values in `[N, H, W, C]` order written to a new tensor, viewed back.
pub(crate) fn channel_last(x: Tensor<4>) -> Tensor<4> {
    let device = x.device();
    let data = x.permute([0, 2, 3, 1]).into_data();
    Tensor::<4>::from_data(data, &device).permute([0, 3, 1, 2])
}

/// The strides of `t`'s memory where `t` is on cuda or wgpu, `None` elsewhere; it runs what
/// is pending on `t`. For tests and diagnostics of [`step_layout`].
pub fn memory_strides<const D: usize>(t: &Tensor<D>) -> Option<Vec<usize>> {
    #[cfg(feature = "cube")]
    {
        use burn::backend::{BackendTensor, DispatchTensorKind};
        match t.clone().inner().into_dispatch().kind {
            DispatchTensorKind::Cube(BackendTensor::Float(t)) => Some(crate::cube::strides(t)),
            _ => None,
        }
    }
    #[cfg(not(feature = "cube"))]
    {
        let _ = t;
        None
    }
}

/// One slot's step with burn's operations, in the order burn's `Sgd` applies them.
fn burn_step(
    param: DispatchTensor,
    grad: DispatchTensor,
    velocity: DispatchTensor,
    lr: &Rate,
    momentum: f64,
    weight_decay: f64,
) -> [DispatchTensor; 2] {
    let scalar = |v: f64, like: &DispatchTensor| Scalar::new(v, &like.dtype());
    let grad = if weight_decay == 0.0 {
        grad
    } else {
        let decay = Dispatch::float_mul_scalar(param.clone(), scalar(weight_decay, &param));
        Dispatch::float_add(decay, grad)
    };
    let kept = Dispatch::float_mul_scalar(velocity, scalar(momentum, &grad));
    let velocity = Dispatch::float_add(grad, kept);
    let delta = match lr {
        Rate::Value(lr) => Dispatch::float_mul_scalar(velocity.clone(), scalar(*lr, &param)),
        Rate::Held(lr) => {
            let rank = velocity.shape().num_dims();
            let lr = lr.clone().inner().into_dispatch();
            let lr = Dispatch::float_reshape(lr, vec![1; rank].into());
            Dispatch::float_mul(velocity.clone(), lr)
        }
    };
    [Dispatch::float_sub(param, delta), velocity]
}

/// The slots dnal's CubeCL step takes (f32 on a fused CubeCL device, one shape, dnal's kernels
/// on), with their positions, and the others with theirs.
#[cfg(feature = "cube")]
#[allow(clippy::type_complexity)]
fn cube_slots(
    slots: Vec<[DispatchTensor; 3]>,
) -> (
    Vec<[burn::backend::fusion::FusionTensor<crate::cube::Runtime>; 3]>,
    Vec<usize>,
    Vec<(usize, [DispatchTensor; 3])>,
) {
    use burn::backend::{BackendTensor, DispatchTensorKind};
    let (mut fused, mut at, mut rest) = (Vec::new(), Vec::new(), Vec::new());
    for (i, slot) in slots.into_iter().enumerate() {
        let shape = slot[0].shape();
        let takes = crate::enabled()
            && shape.num_elements() > 0
            && slot.iter().all(|t| {
                t.dtype() == burn::tensor::DType::F32
                    && t.shape() == shape
                    && matches!(t.kind, DispatchTensorKind::Cube(BackendTensor::Float(_)))
            });
        if !takes {
            rest.push((i, slot));
            continue;
        }
        fused.push(slot.map(|t| match t.kind {
            DispatchTensorKind::Cube(BackendTensor::Float(t)) => t,
            _ => unreachable!("checked above"),
        }));
        at.push(i);
    }
    (fused, at, rest)
}

/// A fused CubeCL float tensor as a dispatch tensor outside autodiff.
#[cfg(feature = "cube")]
pub(crate) fn cube_dispatch(
    t: burn::backend::fusion::FusionTensor<crate::cube::Runtime>,
) -> DispatchTensor {
    use burn::backend::{BackendTensor, DispatchAutodiffContext, DispatchTensorKind};
    DispatchTensor {
        kind: DispatchTensorKind::Cube(BackendTensor::Float(t)),
        autodiff: DispatchAutodiffContext::Disabled,
    }
}

/// A float tensor's fused CubeCL tensor, where it is one.
#[cfg(feature = "cube")]
pub(crate) fn cube_float(
    t: DispatchTensor,
) -> Option<burn::backend::fusion::FusionTensor<crate::cube::Runtime>> {
    use burn::backend::{BackendTensor, DispatchTensorKind};
    match t.kind {
        DispatchTensorKind::Cube(BackendTensor::Float(t)) => Some(t),
        _ => None,
    }
}

/// `grad + weight_decay * param` (burn's `WeightDecay`), or `grad` without decay.
pub fn decayed<const D: usize>(grad: Tensor<D>, param: &Tensor<D>, weight_decay: f64) -> Tensor<D> {
    if weight_decay == 0.0 {
        grad
    } else {
        param.clone().mul_scalar(weight_decay).add(grad)
    }
}
