//! A recorded graph's inputs refreshed in place: a tensor's values written over the memory of
//! another, whatever else holds that memory. A graph of launches ([`burn::tensor::capture`])
//! reads the buffers it was recorded with, so each step's batch and learning rate must arrive
//! in those very buffers; burn's own operations write a new buffer wherever the old one is
//! shared, and a recorded graph always shares it.

use burn::backend::fusion::FusionTensor;
use burn::backend::fusion::custom::{
    CustomOpIr, HandleContainer, OperationFn, OperationIr, StreamId, TensorIr,
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
    let client = dst.client.clone();
    let out = TensorIr::uninit(client.create_empty_handle(), dst.shape.clone(), dst.dtype);
    let inputs = [dst.into_ir(), src.into_ir()];
    let desc = CustomOpIr {
        id: "dnal_overwrite".into(),
        inputs: inputs.to_vec(),
        outputs: vec![out.clone()],
        scalars: Vec::new(),
    };
    let id = out.id;
    let op = OperationFn(move |handles: &mut HandleContainer<_>| {
        let [dst, src] =
            [&inputs[0], &inputs[1]].map(|ir| handles.get_float_tensor::<CubeBackend>(ir));
        handles.register_float_tensor::<CubeBackend>(&id, copied_into(dst, src));
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
