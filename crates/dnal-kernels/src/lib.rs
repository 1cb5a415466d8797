//! # dnal-kernels
//!
//! The convolution and the BatchNorm (with a channel gate folded in, and the unit's
//! activation fused) that every conv -> BN (-> gate) (-> ReLU) unit of dnal's networks runs
//! through. Depends on burn only; knows nothing of gates or networks beyond a per-channel factor.
//!
//! **The gate folded into BatchNorm**, on every backend: [`batch_norm`] takes the gate's
//! per-channel factor `g` (dnal-core's `ChannelGate::factor`) and
//! uses the affine transform `a = gamma * g`, `b = beta * g`, so the gate costs two `[C]`-sized
//! multiplies instead of a pass over the activation forward and two backward; on the CubeCL
//! backends the BatchNorm kernels take `g` and make those products themselves (and the three
//! gradients where the backward's sums are finished), so the gate costs no launch. In
//! evaluation the running statistics are folded too: `x * scale + shift`.
//!
//! **dnal's own operations on flex** (f32), declared with burn's `#[backend_extension]` and
//! differentiated by hand-written `Backward` implementations on burn's autodiff graph:
//!
//! * BatchNorm in training: the batch statistics in one pass (shifted sum and sum of squares
//!   per channel, accumulated in f64), the output in a second, with the [`Activation`] (a
//!   clamp) applied in the same pass; the backward in two (the two per-channel sums, then the
//!   input gradient), the activation's gradient mask applied on the fly. burn's generic
//!   BatchNorm, which flex uses, makes about ten passes with copies for the channel-first
//!   reductions. On the CubeCL backends (cuda, wgpu; feature `cube`) the same fused unit is
//!   dnal's own CubeCL kernels (`cube/`): three launches forward (per-channel partial sums,
//!   per-channel coefficients and running statistics, the output with residual and clamp)
//!   and three backward, two and two on cuda where the partial sums' last cube finishes the
//!   reduction ([`Finish`]), read and written in the channel-last memory CubeCL's
//!   convolutions use; added into some channels of a wider residual stream, the output pass
//!   runs over the stream and the backward gathers BatchNorm's gradient in one launch more.
//!   ndarray uses burn's `batch_norm_train` with the folded `a`, `b`.
//! * [`depthwise_conv2d`]: on flex plane-by-plane kernels; on the CubeCL backends one launch
//!   forward, one for the input gradient and two for the weight gradient (one on cuda), in the memory
//!   layout the input comes in, where burn's grouped convolution autotunes among its general
//!   convolution kernels per shape and copies between layouts around them.
//! * [`conv2d`] (one group, square kernel, symmetric padding, no dilation, no bias), with two
//!   engines. Stride-1 "same" convolutions take direct AVX-512 or AVX2 micro-kernels where
//!   the CPU has them and they are faster (`direct/`: no column matrix; the input is read through
//!   shifted, masked vector loads). The rest is im2col into a buffer that stays in cache and
//!   one matrix product per image or group of small images (`gemm.rs`, the `gemm` crate flex
//!   itself uses), whose `[Co, OH * OW]` result is already the image's NCHW output. The weight
//!   gradient is summed in a fixed order so that it does not depend on the number of threads;
//!   the input gradient of a stride-1 convolution is the convolution of the output gradient
//!   with the flipped, transposed kernel, and of a strided one col2im of `W^T x grad_i`. On
//!   the CubeCL backends in training, burn's convolution and input gradient with dnal's weight
//!   gradient: one column-matrix launch and a depth-split matrix product (`cube/conv.rs`).
//!   Other backends, and other convolutions, use burn's.
//! * [`conv_bn`] in inference: BatchNorm, the gate and the activation applied as the
//!   convolution writes its output; [`conv_bn_add`] and [`conv_bn_add_into`] with a residual,
//!   the latter added into some channels of a wider residual stream in one pass.
//!
//! * [`cross_entropy`]: the training loss and the batch's correct predictions; on the CubeCL
//!   backends one launch, and one for the logits' gradient.
//! * [`sgd_momentum_steps`]: SGD's update of many parameters with momentum and weight decay;
//!   on the CubeCL backends one operation for all of them (one launch per group of up to 32),
//!   the velocities in place ([`sgd_momentum_step`] for one parameter).
//!
//! [`set_enabled`]`(false)` turns dnal's flex operations off process-wide, [`set_direct`]`(false)`
//! only the direct kernels (the benchmarks time all three).

#[cfg(feature = "mimalloc")]
pub mod allocator;
pub mod channels;
pub mod check;
mod conv;
pub mod cpu;
#[cfg(feature = "cube")]
mod cube;
// The depthwise kernels in `cpu` use its tap masks on every build; the rest serves flex. Off
// x86-64 the kernels are compiled out and only the routing (which never picks them) is left.
#[cfg_attr(not(feature = "flex"), allow(dead_code))]
#[cfg_attr(
    not(target_arch = "x86_64"),
    allow(dead_code, unused_imports, unused_variables)
)]
mod direct;
mod factors;
#[cfg(feature = "flex")]
mod flex;
pub mod frozen;
#[cfg(feature = "flex")]
pub mod gemm;
#[cfg(target_arch = "x86_64")]
#[cfg_attr(not(feature = "flex"), allow(dead_code))]
mod lane_masks;
mod loss;
mod memo;
mod norm;
#[cfg(feature = "flex")]
mod outputs;
mod penalty;
mod planes;
mod pool;
mod refresh;
mod routing;
mod sgd;
mod simd;
pub mod subnormals;
mod unit;

pub use conv::{conv_forward, conv2d, depthwise_conv2d};
pub use factors::{GateChain, factor_gradients, gate_factors};
pub use loss::cross_entropy;
pub use norm::{batch_norm, batch_norm_add_train, batch_norm_train};
pub use penalty::{PenaltyTerm, gate_operations_fold, penalty_gradients};
pub use pool::{global_avg_pool, max_pool2d};
pub use refresh::{overwrite, write_values};
#[cfg(feature = "cube")]
pub(crate) use routing::takes_cube_path;
pub use routing::{
    Finish, direct_enabled, enabled, is_flex, reduction_finish, set_direct, set_enabled,
    set_reduction_finish, takes_fast_path,
};
pub use sgd::{
    Rate, decayed, memory_strides, sgd_momentum_step, sgd_momentum_steps, step_layout,
    steps_together,
};
pub use simd::{AVX2_WIDTH_VAR, ISA_VAR, Isa, avx2_halved, isa, set_avx512};
pub use unit::{Activation, conv_bn, conv_bn_add, conv_bn_add_into};
