//! dnal's operations on the CubeCL backends (cuda, wgpu), as burn backend extensions with
//! their own kernels: BatchNorm in training with its gate, residual add and activation
//! ([`norm`]), the depthwise convolution ([`depthwise`]), the one-group convolution's weight
//! gradient ([`conv`]), SGD's momentum step ([`sgd`]), the searching gates' factors and
//! their gradients ([`factors`]), the sparsity penalty's gradient ([`penalty`]), the training
//! loss ([`loss`]), channels placed into a wider stream ([`place`]) and a recorded graph's
//! inputs written in place ([`refresh`]). Each is lazy
//! under fusion (one opaque operation in fusion's stream, or burn's own operation where only
//! the backward is dnal's); the differentiable ones have their backward registered on burn's
//! autodiff graph.

mod conv;
mod custom;
mod depthwise;
mod depthwise_kernels;
mod factors;
mod im2col;
mod layout;
mod loss;
mod norm;
mod norm_kernels;
mod norm_launch;
mod penalty;
mod place;
mod reduction;
mod refresh;
mod sgd;

pub use conv::CubeConv;
pub(crate) use conv::pointwise;
pub use depthwise::CubeDepthwise;
pub use factors::factor_steps;
pub use loss::CubeLoss;
pub use norm::CubeNorm;
pub use penalty::penalty_steps;
pub use place::CubePlace;
pub use refresh::{overwrite, write_values};
pub use sgd::{Runtime, StepRate, sgd_steps, strides};
