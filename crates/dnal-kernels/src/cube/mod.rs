//! dnal's operations on the CubeCL backends (cuda, wgpu), as burn backend extensions with
//! their own kernels: BatchNorm in training with its gate, residual add and activation
//! ([`norm`]) and the depthwise convolution ([`depthwise`]). Each is lazy under fusion (one
//! opaque operation in fusion's stream) and has its backward registered on burn's autodiff
//! graph.

mod depthwise;
mod depthwise_kernels;
mod layout;
mod norm;
mod norm_kernels;
mod reduction;

pub use depthwise::CubeDepthwise;
pub use norm::CubeNorm;
