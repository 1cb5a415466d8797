//! SGD with momentum (dampening 0) and L2 weight decay on the CubeCL backends for all of a
//! network's parameters at once: one operation in fusion's stream, and one launch per group of
//! up to [`MAX_GROUP`](super::custom::MAX_GROUP) parameters. burn's optimiser issues seven tensor operations per parameter,
//! which fusion takes one by one before merging them into fewer launches; PyTorch's `foreach`
//! and fused optimisers likewise step many tensors per launch. Parameters and velocities are
//! written in place where the step holds their only handles (the optimiser takes each parameter
//! out of the network for the step), else into a copy. Each parameter keeps its memory layout,
//! and its gradient and velocity are brought to it; [`crate::step_layout`] gives the convolutions'
//! weights the layout their gradients arrive in (channel-last), so in training nothing is
//! copied.
//!
//! `velocity = grad + weight_decay * param + momentum * velocity`, `param -= lr * velocity`, in
//! the order burn's `Sgd` computes it.

use burn::backend::fusion::custom::{
    CustomOpIr, HandleContainer, OperationFn, OperationIr, ScalarIr, StreamId, TensorId, TensorIr,
};
use burn::backend::fusion::{FusionBackend, FusionTensor};
use burn_cubecl::CubeBackend;
use burn_cubecl::cubecl::prelude::*;
use burn_cubecl::cubecl::{self, calculate_cube_count_elemwise};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::permute;
use burn_cubecl::tensor::CubeTensor;

use super::custom::per_launch;
use super::layout::writable;

/// The fused runtime of the CubeCL backends, whose tensors [`sgd_steps`] takes.
pub type Runtime = <CubeBackend as FusionBackend>::FusionRuntime;

/// The learning rate of [`sgd_steps`]: a number, or a one-element tensor holding it (read by
/// the kernel, so that a recorded step reads the rate of each replay).
pub enum StepRate {
    /// The rate, passed to the launch.
    Value(f32),
    /// A `[1]` f32 tensor on the parameters' device.
    Held(FusionTensor<Runtime>),
}

/// SGD's momentum step for many parameters at once on a fused CubeCL backend: one operation in
/// fusion's stream for all of them and one launch per [`MAX_GROUP`](super::custom::MAX_GROUP) parameters (fewer where the
/// device allows fewer bindings). Each slot
/// is a `[param, grad, velocity]` of one shape (f32); the result is each slot's
/// `[param, velocity]`, written over the slot's own where it holds their only handles, so that a
/// step recorded as a graph ([`burn::tensor::capture`]) moves the same memory at every replay.
pub fn sgd_steps(
    slots: Vec<[FusionTensor<Runtime>; 3]>,
    lr: StepRate,
    momentum: f64,
    weight_decay: f64,
) -> Vec<[FusionTensor<Runtime>; 2]> {
    let Some(client) = slots.first().map(|[param, ..]| param.client.clone()) else {
        return Vec::new();
    };
    let mut inputs = Vec::with_capacity(slots.len() * 3 + 1);
    let mut outputs = Vec::with_capacity(slots.len() * 2);
    let value = match lr {
        StepRate::Value(lr) => Some(lr),
        StepRate::Held(lr) => {
            inputs.push(lr.into_ir());
            None
        }
    };
    for [param, grad, velocity] in slots {
        for (shape, dtype) in [
            (&param.shape, param.dtype),
            (&velocity.shape, velocity.dtype),
        ] {
            let id = client.create_empty_handle();
            outputs.push(TensorIr::uninit(id, shape.clone(), dtype));
        }
        inputs.extend([param.into_ir(), grad.into_ir(), velocity.into_ir()]);
    }
    let factors = [momentum as f32, weight_decay as f32];
    let desc = CustomOpIr {
        id: "dnal_sgd_steps".into(),
        inputs: inputs.clone(),
        outputs: outputs.clone(),
        scalars: [value.map_or(f64::NAN, f64::from), momentum, weight_decay]
            .iter()
            .map(|&v| ScalarIr::from(burn::backend::Scalar::from(v)))
            .collect(),
    };
    let ids: Vec<TensorId> = outputs.iter().map(|t| t.id).collect();
    let op = OperationFn(move |handles: &mut HandleContainer<_>| {
        let mut tensors = inputs
            .iter()
            .map(|ir| handles.get_float_tensor::<CubeBackend>(ir))
            .collect::<Vec<CubeTensor>>()
            .into_iter();
        let lr = match value {
            Some(lr) => Lr::Value(lr),
            None => Lr::Held(tensors.next().expect("the rate comes first")),
        };
        let slots: Vec<[CubeTensor; 3]> =
            std::iter::from_fn(|| Some([tensors.next()?, tensors.next()?, tensors.next()?]))
                .collect();
        let stepped = sgd_group(slots, &lr, factors);
        for (id, tensor) in ids.iter().zip(stepped.into_iter().flatten()) {
            handles.register_float_tensor::<CubeBackend>(id, tensor);
        }
        Ok(())
    });
    let mut tensors = client
        .register(StreamId::current(), OperationIr::Custom(desc), op)
        .into_iter();
    std::iter::from_fn(|| Some([tensors.next()?, tensors.next()?])).collect()
}

/// The rate of [`sgd_group`]: baked into the launch, or read from a `[1]` tensor.
#[allow(clippy::large_enum_variant)] // one per step, never stored
enum Lr {
    Value(f32),
    Held(CubeTensor),
}

/// The steps of [`sgd_steps`] on the device: `[param, grad, velocity]` slots in, `[param,
/// velocity]` out, each written in place (over a copy where another handle shares it). Each
/// slot's three tensors share its parameter's memory layout (a dense one; a parameter with gaps
/// is first copied contiguous), so that the kernel works in memory order without index
/// arithmetic: a gradient or velocity laid out otherwise is copied into it. A parameter's layout
/// thus never changes here; layers that read it meet the same layout at every step (burn's
/// autotune keys include it), whatever layout the kernels that computed its gradient chose.
fn sgd_group(
    slots: Vec<[CubeTensor; 3]>,
    lr: &Lr,
    [momentum, decay]: [f32; 2],
) -> Vec<[CubeTensor; 2]> {
    let Some(first) = slots.first() else {
        return Vec::new();
    };
    let client = first[0].client.clone();
    // Three bindings per parameter, one for a held rate and two for the launch's metadata and
    // scalars.
    let per_launch = per_launch(&first[0], 3, 3);
    let slots: Vec<[CubeTensor; 3]> = slots
        .into_iter()
        .map(|[param, grad, velocity]| {
            let (param, order) = match dense_order(&param) {
                Some(order) => (writable(param), order),
                None => {
                    let param = into_contiguous(param);
                    let order = (0..param.meta.num_dims()).collect();
                    (param, order)
                }
            };
            let grad = laid_out_as(grad, &param, &order);
            let velocity = writable(laid_out_as(velocity, &param, &order));
            [param, grad, velocity]
        })
        .collect();
    for chunk in slots.chunks(per_launch) {
        let mut starts = SequenceArg::new();
        let mut total = 0;
        starts.push(0);
        let [mut params, mut grads, mut velocities] =
            [(); 3].map(|_| SequenceArg::<OwnedTensor<f32>>::new());
        for [param, grad, velocity] in chunk {
            total += param.meta.num_elements();
            starts.push(total);
            params.push(param.clone().into_tensor_arg());
            grads.push(grad.clone().into_tensor_arg());
            velocities.push(velocity.clone().into_tensor_arg());
        }
        let dim = CubeDim::new(&client, total);
        let count = calculate_cube_count_elemwise(&client, total, dim);
        match lr {
            Lr::Value(lr) => sgd_group_kernel::launch(
                &client,
                count,
                dim,
                params,
                grads,
                velocities,
                starts,
                *lr,
                momentum,
                decay,
                chunk.len(),
            ),
            Lr::Held(rate) => sgd_group_held_kernel::launch(
                &client,
                count,
                dim,
                params,
                grads,
                velocities,
                starts,
                rate.clone().into_tensor_arg(),
                momentum,
                decay,
                chunk.len(),
            ),
        }
    }
    slots
        .into_iter()
        .map(|[param, _, velocity]| [param, velocity])
        .collect()
}

/// The strides of a fused CubeCL tensor's memory, once what is pending on it has run.
pub fn strides(t: FusionTensor<Runtime>) -> Vec<usize> {
    let client = t.client.clone();
    client
        .resolve_tensor_float::<CubeBackend>(t)
        .meta
        .strides()
        .to_vec()
}

/// `t`'s dimensions from the largest stride to the smallest, where its memory holds each of
/// its elements once with no gaps (contiguous in some dimension order); `None` where it does
/// not (a broadcast or a slice). A dimension of size 1 does not move in memory, whatever its
/// stride: it goes just before the first larger dimension that follows it in the order (at
/// the end if none does), so that a tensor contiguous but for such strides has the order
/// `0, 1, ...` and its copies are plainly contiguous.
fn dense_order(t: &CubeTensor) -> Option<Vec<usize>> {
    let (shape, strides) = (t.meta.shape(), t.meta.strides());
    let mut order: Vec<usize> = (0..shape.num_dims()).filter(|&d| shape[d] > 1).collect();
    order.sort_by_key(|&d| std::cmp::Reverse(strides[d]));
    let mut expected = 1;
    for &d in order.iter().rev() {
        if strides[d] != expected {
            return None;
        }
        expected *= shape[d];
    }
    for d in (0..shape.num_dims()).filter(|&d| shape[d] == 1) {
        let at = order.iter().position(|&o| o > d).unwrap_or(order.len());
        order.insert(at, d);
    }
    Some(order)
}

/// `t` with the memory layout of `like` (dense, in dimension order `order`): itself where
/// it has it, else a copy.
fn laid_out_as(t: CubeTensor, like: &CubeTensor, order: &[usize]) -> CubeTensor {
    let shape = t.meta.shape();
    let same = dense_order(&t).is_some()
        && (0..shape.num_dims())
            .filter(|&d| shape[d] > 1)
            .all(|d| t.meta.strides()[d] == like.meta.strides()[d]);
    if same {
        t
    } else {
        let ordered = into_contiguous(permute(t, order));
        permute(ordered, &inverse(order))
    }
}

/// The permutation that undoes `order`.
fn inverse(order: &[usize]) -> Vec<usize> {
    let mut inverse = vec![0; order.len()];
    for (i, &d) in order.iter().enumerate() {
        inverse[d] = i;
    }
    inverse
}

/// The step of up to [`MAX_GROUP`](super::custom::MAX_GROUP) parameters whose three tensors share one dense memory
/// layout: parameter `k` owns the positions `starts[k]..starts[k + 1]`, each its element at
/// that memory offset; the parameter and its velocity are written in place.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn sgd_group_kernel(
    params: &mut Sequence<OwnedTensor<f32>>,
    grads: &Sequence<OwnedTensor<f32>>,
    velocities: &mut Sequence<OwnedTensor<f32>>,
    starts: Sequence<usize>,
    lr: f32,
    momentum: f32,
    decay: f32,
    #[comptime] count: usize,
) {
    sgd_group_at(
        params, grads, velocities, starts, lr, momentum, decay, count,
    );
}

/// [`sgd_group_kernel`] at the rate `rate[0]`.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn sgd_group_held_kernel(
    params: &mut Sequence<OwnedTensor<f32>>,
    grads: &Sequence<OwnedTensor<f32>>,
    velocities: &mut Sequence<OwnedTensor<f32>>,
    starts: Sequence<usize>,
    rate: &Tensor<f32>,
    momentum: f32,
    decay: f32,
    #[comptime] count: usize,
) {
    sgd_group_at(
        params, grads, velocities, starts, rate[0], momentum, decay, count,
    );
}

#[cube]
#[allow(clippy::too_many_arguments)]
fn sgd_group_at(
    params: &mut Sequence<OwnedTensor<f32>>,
    grads: &Sequence<OwnedTensor<f32>>,
    velocities: &mut Sequence<OwnedTensor<f32>>,
    starts: Sequence<usize>,
    lr: f32,
    momentum: f32,
    decay: f32,
    #[comptime] count: usize,
) {
    let pos = ABSOLUTE_POS;
    if pos >= starts[count] {
        terminate!();
    }
    #[unroll]
    for k in 0..count {
        let start = starts[k];
        if pos >= start && pos < starts[comptime!(k + 1)] {
            let i = pos - start;
            let g = grads.index(k).as_slice()[i];
            let param = params.index_mut(k).as_mut_slice();
            let p = param[i];
            let velocity = velocities.index_mut(k).as_mut_slice();
            let v = (p * decay + g) + velocity[i] * momentum;
            velocity[i] = v;
            param[i] = p - v * lr;
        }
    }
}
