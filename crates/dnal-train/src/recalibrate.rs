//! BatchNorm running statistics estimated again for a network whose channels changed.
//!
//! In the architecture stage the gates open and close while BatchNorm's running statistics
//! keep averaging over the stage's last steps, so at its end they describe a mixture of the
//! networks the gates passed through, not the one derivation keeps. Evaluated with those
//! statistics, a derived network looks worse than it is. Forward passes in train mode over
//! training batches replace them with the derived network's own; nothing else changes.

use burn::prelude::*;
use dnal_data::HostBatch;
use dnal_zoo::Network;

use crate::error::Result;

/// Runs `net` forward in train mode (on `device`, an autodiff device; no gradients, no
/// parameter changes) over `batches`, so that every BatchNorm's running statistics move to
/// those batches' statistics. Each batch moves them by BatchNorm's momentum `m`: after `n`
/// batches the previous statistics keep a weight of `(1 - m)^n` (with burn's `m = 0.1`,
/// 2.7e-5 after 100 batches). The network comes back with gradients off everywhere; give it the
/// next phase's settings.
pub fn recalibrate_batch_norm<N: Network>(
    net: N,
    batches: impl IntoIterator<Item = Result<HostBatch>>,
    device: &Device,
) -> Result<N> {
    debug_assert!(
        device.is_autodiff(),
        "BatchNorm updates its statistics in training"
    );
    // Without gradients BatchNorm still trains: it normalises with the batch's statistics and
    // updates its running ones.
    let net = net.no_grad();
    for batch in batches {
        let images = batch?.into_device(device).images;
        let _ = net.forward(images);
    }
    Ok(net)
}

#[cfg(test)]
mod tests {
    use super::*;
    use dnal_zoo::{PlainCnn, PlainCnnConfig};

    /// Sixteen MNIST-sized images of a fixed pseudo-random pattern, with a mean and a spread
    /// far from the running statistics' initial 0 and 1.
    fn batch() -> HostBatch {
        let mut state = 2024u32;
        let images = (0..16 * 28 * 28)
            .map(|_| {
                state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                3.0 * ((state >> 8) as f32 / (1u32 << 24) as f32) + 1.0
            })
            .collect();
        HostBatch {
            images,
            shape: [16, 1, 28, 28],
            labels: (0..16).map(|i| i % 10).collect(),
        }
    }

    fn logits(net: &PlainCnn, batch: &HostBatch, device: &Device) -> Vec<f32> {
        net.forward(batch.to_device(device).images)
            .into_data()
            .convert::<f32>()
            .try_to_vec::<f32>()
            .unwrap()
    }

    fn max_rel_diff(a: &[f32], b: &[f32]) -> f32 {
        let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
        a.iter()
            .zip(b)
            .fold(0f32, |m, (x, y)| m.max((x - y).abs() / scale))
    }

    /// After recalibrating on one batch, evaluation (running statistics) computes on that batch
    /// what training (the batch's own statistics) does; before, it does not. The weights do
    /// not move.
    #[test]
    fn evaluation_matches_training_on_the_batch_recalibrated_on() {
        let device = Device::flex().autodiff();
        let config = PlainCnnConfig::mnist_cnn().with_num_classes(10);
        let net = dnal_zoo::init::seeded(PlainCnn::build(&config, &device).unwrap(), 7);
        let b = batch();
        let train_mode = logits(&net, &b, &device);
        let eval_before = logits(&net.valid(), &b, &device.clone().inner());
        assert!(
            max_rel_diff(&eval_before, &train_mode) > 0.05,
            "the initial statistics already fit: the test shows nothing"
        );

        let net = recalibrate_batch_norm(net, (0..120).map(|_| Ok(b.clone())), &device).unwrap();
        let eval_after = logits(&net.valid(), &b, &device.clone().inner());
        let d = max_rel_diff(&eval_after, &train_mode);
        assert!(d < 2e-3, "evaluation differs from training by {d}");
        // Training mode depends on the weights alone: they did not move.
        assert_eq!(logits(&net, &b, &device), train_mode);
    }
}
