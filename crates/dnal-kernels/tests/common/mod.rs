//! Deterministic inputs for the kernels' tests.

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
