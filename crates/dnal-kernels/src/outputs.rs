//! What dnal's flex backend extension returns.

use burn::backend::ExtensionType;
use burn::backend::tensor::FloatTensor;

/// A training BatchNorm's output with the batch statistics it used.
#[derive(ExtensionType)]
pub struct NormOutput<B: burn::backend::Backend> {
    /// `clamp((x - mean) * inv_std * a + b (+ residual))`.
    pub output: FloatTensor<B>,
    /// Per-channel batch mean.
    pub mean: FloatTensor<B>,
    /// Per-channel biased batch variance.
    pub variance: FloatTensor<B>,
}
