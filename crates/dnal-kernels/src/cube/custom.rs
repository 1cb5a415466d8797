//! Operations over a run-time number of tensors (every gate's, every parameter's), registered
//! by hand as one custom operation of fusion's stream each (`#[backend_extension]` declares a
//! fixed list of arguments), and launched over groups of them: a kernel over sequences of
//! tensors, one unrolled branch per member of its group.

use burn::backend::fusion::FusionTensor;
use burn::backend::fusion::custom::{
    CustomOpIr, HandleContainer, OperationFn, OperationIr, StreamId, TensorId, TensorIr,
};
use burn::tensor::{DType, Shape};
use burn_cubecl::CubeBackend;
use burn_cubecl::cubecl::{self, prelude::*};
use burn_cubecl::tensor::CubeTensor;

use super::sgd::Runtime;

/// Registers `run` as the operation `name` of fusion's stream: it reads `inputs` (f32) and
/// writes new f32 tensors of `shapes`, which it returns. `run` gets the inputs on the device,
/// in order, and returns the outputs in the order of `shapes`.
pub(super) fn custom_op<F>(
    name: &str,
    inputs: Vec<FusionTensor<Runtime>>,
    shapes: Vec<Shape>,
    run: F,
) -> Vec<FusionTensor<Runtime>>
where
    F: Fn(Vec<CubeTensor>) -> Vec<CubeTensor> + Send + Sync + 'static,
{
    let client = inputs
        .first()
        .map(|t| t.client.clone())
        .expect("an operation reads at least one tensor");
    let inputs: Vec<TensorIr> = inputs.into_iter().map(FusionTensor::into_ir).collect();
    let outputs: Vec<TensorIr> = shapes
        .into_iter()
        .map(|shape| TensorIr::uninit(client.create_empty_handle(), shape, DType::F32))
        .collect();
    let desc = CustomOpIr {
        id: name.into(),
        inputs: inputs.clone(),
        outputs: outputs.clone(),
        scalars: Vec::new(),
    };
    let ids: Vec<TensorId> = outputs.iter().map(|t| t.id).collect();
    let op = OperationFn(move |handles: &mut HandleContainer<_>| {
        let tensors = inputs
            .iter()
            .map(|ir| handles.get_float_tensor::<CubeBackend>(ir))
            .collect();
        let written = run(tensors);
        assert_eq!(written.len(), ids.len(), "one tensor per output");
        for (id, tensor) in ids.iter().zip(written) {
            handles.register_float_tensor::<CubeBackend>(id, tensor);
        }
        Ok(())
    });
    client.register(StreamId::current(), OperationIr::Custom(desc), op)
}

/// The most members (gates, parameters) one launch over sequences of tensors takes.
pub(super) const MAX_GROUP: usize = 32;

/// How many members of `per_member` bindings each one launch on `like`'s device takes beside
/// `fixed` other bindings (the launch's metadata and scalars among them): as many as the device
/// binds, at least one, at most [`MAX_GROUP`].
pub(super) fn per_launch(like: &CubeTensor, per_member: usize, fixed: usize) -> usize {
    let max_bindings = like.client.properties().hardware.max_bindings as usize;
    (max_bindings.saturating_sub(fixed) / per_member).clamp(1, MAX_GROUP)
}

/// `sigmoid(t * alpha)` in f32: 0 or 1 where `|t * alpha|` is large, never NaN (a gate's
/// relaxation at temperature `t`).
#[cube]
pub(super) fn gate_sigmoid(t: f32, alpha: f32) -> f32 {
    1.0 / (1.0 + f32::exp(-(t * alpha)))
}
