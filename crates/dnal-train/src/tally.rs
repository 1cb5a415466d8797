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

/// Values of a batch in the device buffers: loss, penalty, hits.
const ROW: usize = 3;

/// The running sums of an epoch.
pub(crate) struct Tally {
    /// Per batch not yet read: iteration, batch size, whether it had a penalty.
    pending: Vec<(usize, usize, bool)>,
    /// The pending batches' `[loss, penalty, hits]` rows on the device, [`READ_BACK`] rows per
    /// buffer, each written in place by one operation per batch
    /// ([`dnal_kernels::write_values`]); the last buffer is kept for the next rows.
    rows: Vec<Tensor<1>>,
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
            rows: Vec::new(),
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
        let (loss, hits) = (loss.detach().inner(), hits.inner());
        // The row's buffer is the last one; a new one when every row of it is pending.
        if self.rows.len() <= self.pending.len() / READ_BACK {
            self.rows
                .push(Tensor::zeros([READ_BACK * ROW], &loss.device()));
        }
        let at = self.pending.len() % READ_BACK * ROW;
        let with_penalty = penalty.is_some();
        let (places, values) = match penalty {
            Some(p) => (
                vec![at, at + 1, at + 2],
                vec![loss, p.detach().inner(), hits],
            ),
            None => (vec![at, at + 2], vec![loss, hits]),
        };
        let buffer = self.rows.pop().expect("a buffer for the row");
        self.rows
            .push(dnal_kernels::write_values(buffer, &places, values));
        self.pending.push((iteration, n, with_penalty));
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
        // One transfer per buffer (one, when read back as due); the last buffer stays for the
        // rows to come, written over from its first.
        let mut values: Vec<f32> = Vec::with_capacity(self.rows.len() * READ_BACK * ROW);
        for rows in &self.rows {
            values.extend(
                rows.clone()
                    .into_data()
                    .convert::<f32>()
                    .try_to_vec::<f32>()
                    .expect("f32 after convert"),
            );
        }
        self.rows.drain(..self.rows.len() - 1);
        for ((iteration, n, with_penalty), v) in pending.iter().zip(values.chunks_exact(ROW)) {
            let (loss, hits) = (v[0], v[2]);
            let pen = if *with_penalty { v[1] } else { 0.0 };
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
