//! An epoch's running figures (loss, penalty, correct predictions), kept on the device batch
//! by batch and read back to the host every [`READ_BACK`] batches in one transfer: reading a
//! scalar after every step would make a GPU wait for the host between steps.
//!
//! The host sums the same per-batch values in the same order as a read after every step
//! would, so the figures, and a resumed epoch's, do not depend on when they were read. A
//! non-finite loss is still found at its own batch, at most `READ_BACK - 1` batches late; the
//! weights of those batches are discarded with the error, as the last checkpoint is kept.

use burn::prelude::*;

use crate::progress::PartialEpoch;

/// Batches between two read-backs.
pub(crate) const READ_BACK: usize = 32;

/// A batch whose loss was not finite.
#[derive(Debug)]
pub(crate) struct NonFinite {
    /// Its iteration within the epoch.
    pub iteration: usize,
    /// The loss.
    pub value: f32,
}

/// The running sums of an epoch.
pub(crate) struct Tally {
    /// Per batch not yet read: iteration, batch size, `[loss, penalty, hits]` on the device.
    pending: Vec<(usize, usize, Tensor<1>)>,
    /// Sum over read batches of the loss times the batch size.
    pub loss_sum: f64,
    /// Sum over read batches of the penalty times the batch size.
    pub pen_sum: f64,
    /// Correct predictions in read batches.
    pub correct: usize,
    /// Images in read batches.
    pub seen: usize,
}

impl Tally {
    /// Sums continued from a stopped epoch (or zero).
    pub fn resume(start: &PartialEpoch) -> Self {
        Self {
            pending: Vec::with_capacity(READ_BACK),
            loss_sum: start.loss_sum,
            pen_sum: start.pen_sum,
            correct: start.correct,
            seen: start.seen,
        }
    }

    /// Records batch `iteration` of `n` images: its loss and penalty (`[1]`, detached from the
    /// graph here) and its number of correct predictions (`[1]`).
    pub fn push(
        &mut self,
        iteration: usize,
        n: usize,
        loss: Tensor<1>,
        penalty: Option<Tensor<1>>,
        hits: Tensor<1>,
    ) {
        let loss = loss.detach();
        let penalty = penalty.map_or_else(|| loss.zeros_like(), Tensor::detach);
        let row = Tensor::cat(vec![loss, penalty, hits], 0);
        self.pending.push((iteration, n, row));
    }

    /// Whether enough batches wait to be read.
    pub fn due(&self) -> bool {
        self.pending.len() >= READ_BACK
    }

    /// Reads every pending batch back (one transfer) into the sums; the first non-finite loss
    /// stops it.
    pub fn read_back(&mut self) -> Result<(), NonFinite> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let pending = std::mem::take(&mut self.pending);
        let rows: Vec<Tensor<1>> = pending.iter().map(|(_, _, r)| r.clone()).collect();
        let values: Vec<f32> = Tensor::cat(rows, 0)
            .into_data()
            .convert::<f32>()
            .try_to_vec::<f32>()
            .expect("f32 after convert");
        for ((iteration, n, _), v) in pending.iter().zip(values.chunks_exact(3)) {
            let (loss, pen, hits) = (v[0], v[1], v[2]);
            if !loss.is_finite() {
                return Err(NonFinite {
                    iteration: *iteration,
                    value: loss,
                });
            }
            self.loss_sum += loss as f64 * *n as f64;
            self.pen_sum += pen as f64 * *n as f64;
            self.correct += hits as usize;
            self.seen += n;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(device: &Device, loss: f32, hits: i64) -> (Tensor<1>, Option<Tensor<1>>, Tensor<1>) {
        (
            Tensor::from_floats([loss], device),
            Some(Tensor::from_floats([loss / 10.0], device)),
            Tensor::from_floats([hits as f32], device),
        )
    }

    #[test]
    fn sums_do_not_depend_on_when_they_are_read() {
        let device = Device::default();
        let losses: Vec<f32> = (0..70).map(|i| 2.3 / (1.0 + i as f32 * 0.37)).collect();
        let run = |read_every: usize| {
            let mut t = Tally::resume(&PartialEpoch::default());
            for (i, &l) in losses.iter().enumerate() {
                let (loss, pen, hits) = batch(&device, l, i as i64 % 5);
                t.push(i, 8 + i % 3, loss, pen, hits);
                if (i + 1) % read_every == 0 {
                    t.read_back().unwrap();
                }
            }
            t.read_back().unwrap();
            (t.loss_sum, t.pen_sum, t.correct, t.seen)
        };
        let every = run(1);
        assert_eq!(run(READ_BACK), every);
        assert_eq!(run(7), every);
        assert_eq!(every.2, (0..70).map(|i| i % 5).sum::<usize>());
    }

    #[test]
    fn a_non_finite_loss_is_found_at_its_batch() {
        let device = Device::default();
        let mut t = Tally::resume(&PartialEpoch::default());
        for i in 0..10 {
            let l = if i == 6 { f32::NAN } else { 1.0 };
            let (loss, pen, hits) = batch(&device, l, 1);
            t.push(i, 4, loss, pen, hits);
        }
        let e = t.read_back().expect_err("the NaN is found");
        assert_eq!(e.iteration, 6);
        assert!(e.value.is_nan());
    }
}
