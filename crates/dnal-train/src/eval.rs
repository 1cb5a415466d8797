//! Accuracy and latency of a network.

use std::time::Instant;

use burn::prelude::*;
use dnal_data::Loader;
use dnal_zoo::Network;
use serde::{Deserialize, Serialize};

use crate::error::Result;

/// Accuracy on a test set.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Accuracy {
    /// Top-1, percent.
    pub top1: f64,
    /// Top-5, percent (100 when there are at most 5 classes).
    pub top5: f64,
    /// Mean cross-entropy.
    pub loss: f64,
}

/// Evaluates `model` (in eval mode, on `device`) on every batch of `loader` (epoch 0).
pub fn evaluate<N: Network>(model: &N, loader: &Loader, device: &Device) -> Result<Accuracy> {
    let model = model.valid();
    let (mut top1, mut top5, mut loss, mut n) = (0usize, 0usize, 0f64, 0usize);
    for batch in loader.epoch(0) {
        let batch = batch?;
        let labels = batch.labels.clone();
        let logits = model.forward(batch.into_device(device).images);
        let [b, classes] = logits.dims();
        let values: Vec<f32> = logits
            .into_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .expect("f32 logits");
        for (row, &label) in values.chunks_exact(classes).zip(&labels) {
            let label = label as usize;
            let target = row[label];
            let higher = row.iter().filter(|&&v| v > target).count();
            top1 += usize::from(higher == 0);
            top5 += usize::from(higher < 5);
            let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
            let lse = max
                + row
                    .iter()
                    .map(|&v| (v as f64 - max).exp())
                    .sum::<f64>()
                    .ln();
            loss += lse - target as f64;
        }
        n += b;
    }
    let pct = |k: usize| 100.0 * k as f64 / n.max(1) as f64;
    Ok(Accuracy {
        top1: pct(top1),
        top5: pct(top5),
        loss: loss / n.max(1) as f64,
    })
}

/// Median wall time in milliseconds of a forward pass of a `[batch, C, H, W]` input (after two
/// warm-up passes), as inference runs it on `device` ([`dnal_zoo::Inference`]: frozen on
/// flex); the result is read back to the host each time, so asynchronous backends are timed to
/// completion.
pub fn latency_ms<N: Network>(
    model: &N,
    [batch, c, h, w]: [usize; 4],
    runs: usize,
    device: &Device,
) -> Result<f64> {
    let model = dnal_zoo::Inference::new(model, device)?;
    let x = Tensor::<4>::zeros([batch, c, h, w], device).add_scalar(0.5);
    let mut times = Vec::with_capacity(runs);
    for i in 0..runs + 2 {
        let start = Instant::now();
        let out = model.forward(x.clone())?;
        let _ = out.into_data();
        if i >= 2 {
            times.push(start.elapsed().as_secs_f64() * 1e3);
        }
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}
