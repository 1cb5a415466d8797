//! dnal's operations on one device compared with a reference device: the training BatchNorm
//! (output, batch and running statistics, gradients), the depthwise convolution, the
//! one-group convolution with its gradients, SGD's momentum step, the sparsity penalty's
//! gradient, the training loss and the placement of channels into a wider stream, each over a set of shapes, layouts and activations
//! chosen to reach every branch of the kernels (several cubes per channel, more channels than
//! a cube's units, channel-last memory, odd planes, a large common offset).
//!
//! The CubeCL kernels are written once for every CubeCL runtime, but compiled by a different
//! compiler on each (SPIR-V for wgpu, PTX for cuda); `dnal-train check --backend cuda` runs
//! these comparisons against flex on the machine at hand, and the wgpu tests run them on
//! Mesa's software Vulkan. On the reference the BatchNorm runs through dnal's flex kernels and
//! the convolutions through burn's own convolution.

use std::fmt;

use burn::nn::BatchNormConfig;
use burn::prelude::*;
use burn::tensor::ops::ConvOptions;

use crate::Activation;

/// The largest difference allowed, relative to the largest magnitude of the reference's values
/// (at least 1), for dnal's own f32 kernels.
pub const TOLERANCE: f32 = 2e-4;

/// The same for the one-group convolutions, whose products are burn's on the CubeCL backends
/// (the weight gradient's too): on cuda burn's convolution and matrix-product kernels stage
/// f32 through TF32 tensor cores (10-bit mantissa), and on an H200 their outputs and gradients
/// differed from flex by up to 2.5e-3 of the largest value. A wrong tap, flip, stride or layout
/// differs by the order of the values themselves.
pub const CONVOLUTION_TOLERANCE: f32 = 1e-2;

/// One quantity of one case on the checked device against the reference.
#[derive(Debug, Clone)]
pub struct Comparison {
    /// The operation and its shapes.
    pub case: String,
    /// What was compared: `output`, `dx`, `running mean`, ...
    pub quantity: &'static str,
    /// The largest absolute difference.
    pub worst: f32,
    /// The reference's largest magnitude (at least 1): the difference's scale.
    pub scale: f32,
    /// Why there is no value to compare, where the operation failed on either device.
    pub error: Option<String>,
    /// The difference allowed, relative to `scale`.
    pub tolerance: f32,
}

impl Comparison {
    /// Whether the difference is within [`TOLERANCE`] of the scale (and finite).
    pub fn ok(&self) -> bool {
        self.error.is_none() && self.worst <= self.tolerance * self.scale
    }
}

impl fmt::Display for Comparison {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let status = if self.ok() { "ok  " } else { "FAIL" };
        let (quantity, case) = (self.quantity, &self.case);
        match &self.error {
            Some(e) => write!(f, "{status} {quantity} of {case}: {e}"),
            None => write!(
                f,
                "{status} {quantity} of {case}: differs by {:.3e} (largest value {:.3e}, \
                 allowed {:.0e} of it)",
                self.worst, self.scale, self.tolerance
            ),
        }
    }
}

fn compare(
    tolerance: f32,
    case: &str,
    names: &[&'static str],
    got: Result<Vec<Vec<f32>>, String>,
    want: Result<Vec<Vec<f32>>, String>,
) -> Vec<Comparison> {
    let empty = Vec::new();
    let error = match (&got, &want) {
        (Err(e), _) => Some(format!("failed on the checked device: {e}")),
        (_, Err(e)) => Some(format!("failed on the reference: {e}")),
        _ => None,
    };
    let (got, want) = (got.unwrap_or_default(), want.unwrap_or_default());
    names
        .iter()
        .enumerate()
        .map(|(i, quantity)| {
            let (g, w) = (got.get(i).unwrap_or(&empty), want.get(i).unwrap_or(&empty));
            let scale = w.iter().fold(1.0f32, |m, v| m.max(v.abs()));
            // A missing or misshapen result, or a non-finite value, is an infinite difference.
            let worst = if g.len() == w.len() && !w.is_empty() {
                g.iter()
                    .zip(w)
                    .map(|(g, w)| {
                        if g.is_finite() {
                            (g - w).abs()
                        } else {
                            f32::INFINITY
                        }
                    })
                    .fold(0.0f32, f32::max)
            } else {
                f32::INFINITY
            };
            Comparison {
                case: case.to_string(),
                quantity,
                worst,
                scale,
                error: error.clone(),
                tolerance,
            }
        })
        .collect()
}

/// Values `0.5 * sin(i * 0.37 + seed) + 0.3 * cos(i * 1.91 * seed)`: varied, deterministic.
fn wave(n: usize, seed: f32) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let i = i as f32;
            0.5 * (i * 0.37 + seed).sin() + 0.3 * (i * 1.91 * seed).cos()
        })
        .collect()
}

/// A tensor's values, or why they could not be read (a kernel failed to compile or run).
fn values<const D: usize>(t: Tensor<D>) -> Result<Vec<f32>, String> {
    let len = t.shape().num_elements();
    let data = t
        .reshape([len])
        .try_into_data()
        .map_err(|e| e.to_string())?;
    data.try_to_vec::<f32>().map_err(|e| format!("{e:?}"))
}

/// The gradient of `t`, or why there is none.
fn grad_of<const D: usize>(
    t: &Tensor<D>,
    grads: &burn::tensor::Gradients,
) -> Result<Vec<f32>, String> {
    values(t.grad(grads).ok_or("no gradient was computed")?)
}

mod channels;
mod conv;
mod gates;
mod loss;
mod norm;
mod sgd;

pub use channels::channels;
pub use conv::{ConvCase, convolution, depthwise};
pub use gates::{gates, penalty};
pub use loss::loss;
pub use norm::batch_norm;
pub use sgd::sgd;

/// `x`'s values held channel-last in memory (what a convolution hands on on the CubeCL
/// backends) where `channel_last`, as a fresh leaf tensor either way.
fn laid_out(x: Tensor<4>, channel_last: bool) -> Tensor<4> {
    let x = if channel_last {
        crate::sgd::channel_last(x)
    } else {
        x
    };
    x.detach()
}
