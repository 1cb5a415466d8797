//! Writes into a tensor's own memory, whatever else holds it: a recorded graph's inputs
//! refreshed (a tensor's values written over another's), and single values written into
//! chosen places of a held buffer (a training step's loss and hits into the tally's). A graph
//! of launches ([`burn::tensor::capture`]) reads the buffers it was recorded with, so each
//! step's batch and learning rate must arrive in those very buffers; burn's own operations
//! write a new buffer wherever the old one is shared, and a recorded graph always shares it.

use burn::backend::fusion::FusionTensor;
use burn::backend::fusion::custom::{
    CustomOpIr, HandleContainer, OperationFn, OperationIr, ScalarIr, StreamId, TensorIr,
};
use burn_cubecl::CubeBackend;
use burn_cubecl::cubecl::prelude::*;
use burn_cubecl::cubecl::{self, calculate_cube_count_elemwise};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;

use super::sgd::Runtime;

/// `src`'s values (f32, `dst`'s shape) written over `dst`'s memory, which must be contiguous;
/// the result is `dst`'s memory under a new handle. One operation in fusion's stream, ordered
/// before whatever is issued after it on the device (a graph's replay included).
pub fn overwrite(dst: FusionTensor<Runtime>, src: FusionTensor<Runtime>) -> FusionTensor<Runtime> {
    assert_eq!(dst.shape, src.shape, "overwrite: the shapes differ");
    written_in_place(
        "dnal_overwrite",
        dst,
        vec![src],
        Vec::new(),
        |dst, mut sources| copied_into(dst, sources.remove(0)),
    )
}

/// One operation in fusion's stream that writes into `dst`'s memory with `write(dst,
/// sources)` (which returns `dst`): the result is that memory under a new handle, ordered
/// after whatever made the sources and before whatever is issued after it on the device.
fn written_in_place(
    name: &str,
    dst: FusionTensor<Runtime>,
    sources: Vec<FusionTensor<Runtime>>,
    scalars: Vec<ScalarIr>,
    write: impl Fn(CubeTensor, Vec<CubeTensor>) -> CubeTensor + Send + Sync + 'static,
) -> FusionTensor<Runtime> {
    let client = dst.client.clone();
    let out = TensorIr::uninit(client.create_empty_handle(), dst.shape.clone(), dst.dtype);
    let mut inputs = vec![dst.into_ir()];
    inputs.extend(sources.into_iter().map(FusionTensor::into_ir));
    let desc = CustomOpIr {
        id: name.into(),
        inputs: inputs.clone(),
        outputs: vec![out.clone()],
        scalars,
    };
    let id = out.id;
    let op = OperationFn(move |handles: &mut HandleContainer<_>| {
        let mut sources: Vec<CubeTensor> = inputs
            .iter()
            .map(|ir| handles.get_float_tensor::<CubeBackend>(ir))
            .collect();
        let dst = sources.remove(0);
        handles.register_float_tensor::<CubeBackend>(&id, write(dst, sources));
        Ok(())
    });
    client
        .register(StreamId::current(), OperationIr::Custom(desc), op)
        .into_iter()
        .next()
        .expect("one output")
}

/// `src` copied into `dst`'s memory; `dst`.
fn copied_into(dst: CubeTensor, src: CubeTensor) -> CubeTensor {
    assert!(
        dst.is_contiguous(),
        "overwrite: the tensor written over must be contiguous"
    );
    let src = into_contiguous(src);
    let client = dst.client.clone();
    let total = dst.meta.num_elements();
    let dim = CubeDim::new(&client, total);
    copy_kernel::launch(
        &client,
        calculate_cube_count_elemwise(&client, total, dim),
        dim,
        src.clone().into_tensor_arg(),
        dst.clone().into_tensor_arg(),
    );
    dst
}

#[cube(launch)]
fn copy_kernel(src: &Tensor<f32>, dst: &mut Tensor<f32>) {
    let pos = ABSOLUTE_POS;
    if pos < dst.len() {
        dst[pos] = src[pos];
    }
}

/// Each of `values` (`[1]`, f32) written over `dst[at[k]]` (`dst` contiguous, f32), in one
/// launch; the result is `dst`'s memory under a new handle. One operation in fusion's stream,
/// ordered after whatever made the values.
pub fn write_values(
    dst: FusionTensor<Runtime>,
    at: Vec<usize>,
    values: Vec<FusionTensor<Runtime>>,
) -> FusionTensor<Runtime> {
    assert_eq!(at.len(), values.len(), "write_values: one place per value");
    let scalars = at
        .iter()
        .map(|&i| ScalarIr::from(burn::backend::Scalar::from(i as f64)))
        .collect();
    written_in_place(
        "dnal_write_values",
        dst,
        values,
        scalars,
        move |dst, values| written_at(dst, &at, values),
    )
}

/// `values` written into `dst` at `at`; `dst`.
fn written_at(dst: CubeTensor, at: &[usize], values: Vec<CubeTensor>) -> CubeTensor {
    assert!(
        dst.is_contiguous(),
        "write_values: the buffer written into must be contiguous"
    );
    let client = dst.client.clone();
    let mut sources = SequenceArg::<OwnedTensor<f32>>::new();
    let mut places = SequenceArg::new();
    for (v, &i) in values.into_iter().zip(at) {
        sources.push(into_contiguous(v).into_tensor_arg());
        places.push(i);
    }
    write_values_kernel::launch(
        &client,
        CubeCount::Static(1, 1, 1),
        CubeDim::new_1d(1),
        sources,
        places,
        dst.clone().into_tensor_arg(),
        at.len(),
    );
    dst
}

#[cube(launch)]
fn write_values_kernel(
    values: &Sequence<OwnedTensor<f32>>,
    at: Sequence<usize>,
    dst: &mut Tensor<f32>,
    #[comptime] count: usize,
) {
    if ABSOLUTE_POS == 0 {
        #[unroll]
        for k in 0..count {
            dst[at[k]] = values.index(k).as_slice()[0];
        }
    }
}
