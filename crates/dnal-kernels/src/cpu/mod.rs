//! The host-memory halves of the kernels, on plain `f32` slices in NCHW order: the
//! convolution's im2col, col2im and epilogue ([`conv`]), the depthwise convolution's
//! inference forward and backward passes ([`depthwise`]), BatchNorm's passes with the activation
//! and a residual fused ([`norm`]), the pools ([`pool`]), a residual stream's channel passes ([`stream`]). No unsafe code; the matrix
//! products and the direct convolution kernels are in the flex-only modules.

pub mod clamp;
pub mod conv;
pub mod depthwise;
pub mod norm;
pub mod pool;
pub mod stream;

pub use clamp::{Clamp, ClampGrad, ClampOf};
pub use conv::{
    ConvGeometry, Epilogue, GatherTable, GeometryKey, col2im, flip_transpose, im2col, im2col_with,
};
pub use depthwise::{
    DepthwiseGeometry, depthwise_forward_affine, depthwise_input_grad, depthwise_weight_grad,
};
pub use norm::{
    batch_norm_grad_sums, batch_norm_input_grad, channel_stats, normalize, through_clamp,
    through_clamp_grad_sums,
};
pub use pool::{
    global_avg_pool_values, max_pool_values, max_pool2x2, max_pool2x2_backward, max_pool2x2_values,
};
pub use stream::{StreamSources, add_into_channels, normalize_into_channels, select_channels};
