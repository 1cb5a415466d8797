//! Accuracy and latency of a network.

use std::time::Instant;

use burn::prelude::*;
use dnal_data::Loader;
use dnal_zoo::Network;
use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::tally::READ_BACK;

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
///
/// An image counts as right within the top k when fewer than k logits are strictly higher than
/// its label's (a tie counts in its favour). Each batch's counts and summed cross-entropy are
/// computed on the device and read back [`READ_BACK`] batches at a time, so a GPU is not made to
/// wait for the host after every batch; the host sums them in f64.
pub fn evaluate<N: Network>(model: &N, loader: &Loader, device: &Device) -> Result<Accuracy> {
    let model = model.valid();
    let mut sums = Sums::default();
    let mut rows = Vec::with_capacity(READ_BACK);
    for batch in loader.epoch(0) {
        let batch = batch?.into_device(device);
        sums.n += batch.labels.dims()[0];
        rows.push(batch_figures(model.forward(batch.images), batch.labels));
        if rows.len() == READ_BACK {
            sums.read(std::mem::take(&mut rows));
        }
    }
    sums.read(rows);
    let pct = |k: f64| 100.0 * k / sums.n.max(1) as f64;
    Ok(Accuracy {
        top1: pct(sums.top1),
        top5: pct(sums.top5),
        loss: sums.loss / sums.n.max(1) as f64,
    })
}

/// Running sums of [`evaluate`], on the host.
#[derive(Default)]
struct Sums {
    top1: f64,
    top5: f64,
    loss: f64,
    n: usize,
}

impl Sums {
    /// Adds batches' `[top-1, top-5, loss]` rows, read back in one transfer.
    fn read(&mut self, rows: Vec<Tensor<1>>) {
        if rows.is_empty() {
            return;
        }
        let values: Vec<f32> = Tensor::cat(rows, 0)
            .into_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .expect("f32 after convert");
        for row in values.chunks_exact(3) {
            self.top1 += row[0] as f64;
            self.top5 += row[1] as f64;
            self.loss += row[2] as f64;
        }
    }
}

/// A batch's `[right at top 1, right within top 5, summed cross-entropy]` (`[3]`), from its
/// `logits` (`[N, C]`) and class indices (`[N]`), computed where they are.
fn batch_figures(logits: Tensor<2>, labels: Tensor<1, Int>) -> Tensor<1> {
    let [n, classes] = logits.dims();
    let target = logits.clone().gather(1, labels.reshape([n, 1]));
    let higher = logits
        .clone()
        .greater(target.clone().expand([n, classes]))
        .int()
        .sum_dim(1);
    let top1 = higher.clone().equal_elem(0).float().sum();
    let top5 = higher.lower_elem(5).float().sum();
    let max = logits.clone().max_dim(1);
    let lse = (logits - max.clone().expand([n, classes]))
        .exp()
        .sum_dim(1)
        .log()
        + max;
    let loss = (lse - target).sum();
    Tensor::cat(vec![top1, top5, loss], 0)
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The figures of one batch as the host would count them, in f64.
    fn on_host(values: &[f32], classes: usize, labels: &[i64]) -> [f64; 3] {
        let mut out = [0.0; 3];
        for (row, &label) in values.chunks_exact(classes).zip(labels) {
            let target = row[label as usize];
            let higher = row.iter().filter(|&&v| v > target).count();
            out[0] += f64::from(u8::from(higher == 0));
            out[1] += f64::from(u8::from(higher < 5));
            let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
            let sum: f64 = row.iter().map(|&v| (v as f64 - max).exp()).sum();
            out[2] += max + sum.ln() - target as f64;
        }
        out
    }

    #[test]
    fn batch_figures_count_ties_in_the_labels_favour_and_match_the_host() {
        let device = Device::default();
        let (n, classes) = (64, 12);
        // Logits on a coarse grid, so many rows tie with their label's; some large.
        let values: Vec<f32> = (0..n * classes)
            .map(|i| ((i * 7919 % 7) as f32 - 3.0) * if i % 97 == 0 { 40.0 } else { 0.5 })
            .collect();
        let labels: Vec<i64> = (0..n).map(|i| (i * 5 % classes) as i64).collect();
        let got: Vec<f32> = batch_figures(
            Tensor::<1>::from_floats(values.as_slice(), &device).reshape([n, classes]),
            Tensor::<1, Int>::from_ints(labels.as_slice(), &device),
        )
        .into_data()
        .try_to_vec::<f32>()
        .unwrap();
        let want = on_host(&values, classes, &labels);
        let ties = values
            .chunks_exact(classes)
            .zip(&labels)
            .filter(|(row, l)| row.iter().filter(|&&v| v == row[**l as usize]).count() > 1)
            .count();
        assert!(ties > 40, "the case should have ties, has {ties}");
        assert_eq!(got[0] as f64, want[0]);
        assert_eq!(got[1] as f64, want[1]);
        assert!(want[0] > 0.0 && want[1] > want[0] && want[1] < n as f64);
        assert!(
            (got[2] as f64 - want[2]).abs() < 1e-5 * want[2].abs().max(1.0),
            "loss {} against {}",
            got[2],
            want[2]
        );
    }

    #[test]
    fn sums_add_every_row_of_every_read() {
        let device = Device::default();
        let mut sums = Sums::default();
        let row = |k: f32| Tensor::<1>::from_floats([k, 2.0 * k, 0.25 * k], &device);
        sums.read((1..=READ_BACK).map(|k| row(k as f32)).collect());
        sums.read(vec![row(100.0)]);
        sums.read(Vec::new());
        let first = (READ_BACK * (READ_BACK + 1) / 2) as f64;
        assert_eq!(sums.top1, first + 100.0);
        assert_eq!(sums.top5, 2.0 * (first + 100.0));
        assert_eq!(sums.loss, 0.25 * (first + 100.0));
    }
}
