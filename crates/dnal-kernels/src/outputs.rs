//! What dnal's backend extensions return, shared by the flex and the CubeCL ones.

use burn::backend::ExtensionType;
use burn::backend::tensor::FloatTensor;

/// A training BatchNorm's output with the batch statistics it used.
#[derive(ExtensionType)]
#[extension_type(fusion: cfg(feature = "cube"))]
pub struct NormOutput<B: burn::backend::Backend> {
    /// `clamp((x - mean) * inv_std * a + b (+ residual))`.
    pub output: FloatTensor<B>,
    /// Per-channel batch mean.
    pub mean: FloatTensor<B>,
    /// Per-channel biased batch variance.
    pub variance: FloatTensor<B>,
}
