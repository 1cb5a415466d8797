//! Deterministic inputs for the kernels' tests, and references built from burn's operations.

use burn::prelude::*;

/// Pseudo-random values in `[lo, hi)`, the same for the same `seed`.
pub fn noise(n: usize, seed: u64, lo: f32, hi: f32) -> Vec<f32> {
    let mut s = seed ^ 0x9e37_79b9_7f4a_7c15;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            lo + (hi - lo) * ((s >> 40) as f32 / (1u64 << 24) as f32)
        })
        .collect()
}

/// `v` as a tensor on `device`.
pub fn vec1(v: Vec<f32>, device: &Device) -> Tensor<1> {
    let n = v.len();
    Tensor::from_data(TensorData::new(v, [n]), device)
}

/// An input of `shape` with values in `[-1, 1)`.
pub fn input(shape: [usize; 4], seed: u64, device: &Device) -> Tensor<4> {
    Tensor::from_data(
        TensorData::new(noise(shape.iter().product(), seed, -1.0, 1.0), shape),
        device,
    )
}

/// `x`'s channels picked by `sources` (zeros where `None`), built from one-channel slices and a
/// concatenation: the reference for `dnal_kernels::channels::select`.
pub fn picked_by_slices(x: Tensor<4>, sources: &[Option<usize>]) -> Tensor<4> {
    let [n, _, h, w] = x.dims();
    let parts = sources
        .iter()
        .map(|s| match *s {
            Some(c) => x.clone().slice([0..n, c..c + 1, 0..h, 0..w]),
            None => Tensor::zeros([n, 1, h, w], &x.device()),
        })
        .collect();
    Tensor::cat(parts, 1)
}

/// `(output, input gradient)` of `f` on `x` (a fresh leaf), the gradient of `sum(f(x) * probe)`.
pub fn value_and_grad(
    x: &Tensor<4>,
    probe: &Tensor<4>,
    f: impl Fn(Tensor<4>) -> Tensor<4>,
) -> (Tensor<4>, Tensor<4>) {
    let x = x.clone().detach().require_grad();
    let y = f(x.clone());
    let grads = (y.clone() * probe.clone()).sum().backward();
    (y.inner(), x.grad(&grads).expect("input gradient"))
}

/// The cases the channel selections are tested on: channels picked out of order, a stream
/// widened with zeros between its channels, the channels reversed.
pub fn selections() -> [Vec<Option<usize>>; 3] {
    [
        vec![Some(4), Some(1), Some(2)],
        vec![None, Some(0), None, Some(5), Some(3), None, None],
        (0..6).rev().map(Some).collect(),
    ]
}
