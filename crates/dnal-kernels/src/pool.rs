//! Pooling: the global average pool and VGG's 2x2 max-pool.

#[cfg(feature = "flex")]
use burn::nn::PaddingConfig2d;
use burn::nn::pool::MaxPool2d;
use burn::prelude::*;

#[cfg(feature = "flex")]
use crate::{flex, takes_fast_path};

/// The global average pool of `x` (`[N, C, H, W]`), as `[N, C]`: the mean of each plane.
///
/// One reduction over the last axis of the `[N, C, H * W]` view. burn's adaptive average pool
/// to 1x1 computes the same, but on flex hands every call to rayon's pool, and at batch 1
/// waiting for a worker to wake took a fifth of a thin pruned ResNet-56's forward.
pub fn global_avg_pool(x: Tensor<4>) -> Tensor<2> {
    let [n, c, h, w] = x.dims();
    x.reshape([n, c, h * w]).mean_dim(2).reshape([n, c])
}

/// `pool.forward(x)`; on flex (f32) a 2x2, stride-2 max-pool without padding or dilation (a
/// VGG's) is dnal's own, forward and backward (one pass each; burn's generic pooling costs
/// several times as much).
pub fn max_pool2d(pool: &MaxPool2d, x: Tensor<4>) -> Tensor<4> {
    #[cfg(feature = "flex")]
    if takes_fast_path(&x)
        && pool.kernel_size == [2, 2]
        && pool.stride == [2, 2]
        && pool.dilation == [1, 1]
        && !pool.ceil_mode
        && matches!(
            pool.padding,
            PaddingConfig2d::Valid | PaddingConfig2d::Explicit(0, 0, 0, 0)
        )
    {
        use burn::backend::Dispatch;
        use flex::DnalKernels;
        return Tensor::from_dispatch(<Dispatch as DnalKernels>::dnal_max_pool2x2(
            x.into_dispatch(),
        ));
    }
    pool.forward(x)
}
