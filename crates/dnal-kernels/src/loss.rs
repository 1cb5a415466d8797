//! The training loss: a batch's mean cross-entropy and its correct predictions, in one
//! operation on the CubeCL backends.

use burn::nn::loss::CrossEntropyLossConfig;
use burn::prelude::*;

/// The mean cross-entropy of `logits` (`[N, C]`) against `labels` (`[N]`, class indices), as
/// burn's `CrossEntropyLoss` computes it, and how many rows' largest logit is their label's
/// (`[1]`, as f32: exact up to 2^24). On cuda and wgpu one CubeCL launch computes both and one
/// more the logits' gradient, where burn's operations took about twenty; elsewhere burn's
/// loss and an argmax.
pub fn cross_entropy(logits: Tensor<2>, labels: Tensor<1, Int>) -> (Tensor<1>, Tensor<1>) {
    #[cfg(feature = "cube")]
    if crate::takes_cube_path(&logits) {
        use crate::cube::CubeLoss;
        use burn::backend::Dispatch;
        let out = <Dispatch as CubeLoss>::dnal_cube_cross_entropy(
            logits.into_dispatch(),
            labels.float().into_dispatch(),
        );
        return (
            Tensor::from_dispatch(out.loss),
            Tensor::from_dispatch(out.hits),
        );
    }
    let n = logits.dims()[0];
    let hits = logits
        .clone()
        .argmax(1)
        .reshape([n])
        .equal(labels.clone())
        .float()
        .sum();
    let loss = CrossEntropyLossConfig::new()
        .init(&logits.device())
        .forward(logits, labels);
    (loss, hits)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_loss_is_the_mean_cross_entropy_and_hits_count_the_top_logits() {
        let device = Device::default();
        let logits = Tensor::<2>::from_floats([[2.0, 1.0, 0.0], [0.0, 0.0, 5.0]], &device);
        let labels = Tensor::<1, Int>::from_ints([0, 1], &device);
        let (loss, hits) = cross_entropy(logits, labels);
        let lse = |row: [f32; 3]| row.iter().map(|v| v.exp()).sum::<f32>().ln();
        let want = ((lse([2.0, 1.0, 0.0]) - 2.0) + (lse([0.0, 0.0, 5.0]) - 0.0)) / 2.0;
        let loss: f32 = loss.into_scalar();
        assert!((loss - want).abs() < 1e-5, "{loss} against {want}");
        assert_eq!(hits.into_scalar::<f32>(), 1.0);
    }
}
