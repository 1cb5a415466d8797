//! The training loss with its correct predictions, and the tally's rows.

use super::*;

/// The training loss ([`crate::cross_entropy`]) and its tally ([`crate::write_values`]): the
/// mean cross-entropy, the correct
/// predictions and the logits' gradient (the loss scaled by half the rows first: the gradient
/// coming in is not 1, and the logits' gradient is of the order of 1, as the comparison's
/// scale is), for CIFAR's and ImageNet's batches and classes, a batch of more rows
/// than the CubeCL kernel's cube has units (several rows per unit), one row, and logits up to
/// +-60 (log-sum-exp must not overflow).
pub fn loss(device: &Device, reference: &Device) -> Vec<Comparison> {
    let names = ["loss", "hits", "dlogits"];
    let mut out = Vec::new();
    for (rows, classes, scale) in [
        (128, 10, 3.0),
        (64, 1000, 4.0),
        (300, 7, 2.0),
        (1, 5, 1.0),
        (33, 10, 60.0),
    ] {
        let case = format!("cross-entropy of [{rows}, {classes}] logits up to {scale}");
        let run = |d: &Device| loss_case(rows, classes, scale, d);
        out.extend(compare(
            TOLERANCE,
            &case,
            &names,
            run(device),
            run(reference),
        ));
    }
    out.extend(compare(
        TOLERANCE,
        "a batch's loss and hits written into the tally's buffer, twice",
        &["buffer"],
        tally_case(device),
        tally_case(reference),
    ));
    out
}

/// The values of [`crate::write_values`] writing two rows' loss and hit count into a 4 x 3
/// buffer, then a penalty into the first row.
fn tally_case(device: &Device) -> Result<Vec<Vec<f32>>, String> {
    let one = |v: f32| Tensor::<1>::from_data(TensorData::new(vec![v], [1]), device);
    let buffer = Tensor::<1>::from_data(TensorData::new(wave(12, 0.4), [12]), device);
    let written = vec![one(2.5), one(17.0), one(0.75), one(3.0)];
    let buffer = crate::write_values(buffer, &[0, 2, 6, 8], written);
    let buffer = crate::write_values(buffer, &[1], vec![one(0.125)]);
    Ok(vec![values(buffer)?])
}

/// Loss, hits and the logits' gradient of `[rows, classes]` logits `scale * wave` and labels
/// that hit the largest logit in about a third of the rows.
fn loss_case(
    rows: usize,
    classes: usize,
    scale: f32,
    device: &Device,
) -> Result<Vec<Vec<f32>>, String> {
    let device = &device.clone().autodiff();
    let raw: Vec<f32> = wave(rows * classes, 0.9)
        .into_iter()
        .map(|v| v * scale)
        .collect();
    let labels: Vec<i64> = (0..rows)
        .map(|r| {
            let row = &raw[r * classes..(r + 1) * classes];
            let top = (0..classes).fold(0, |b, k| if row[k] > row[b] { k } else { b });
            if r % 3 == 0 {
                top as i64
            } else {
                ((r * 7 + 3) % classes) as i64
            }
        })
        .collect();
    let logits =
        Tensor::<2>::from_data(TensorData::new(raw, [rows, classes]), device).require_grad();
    let labels = Tensor::<1, Int>::from_data(TensorData::new(labels, [rows]), device);
    let (loss, hits) = crate::cross_entropy(logits.clone(), labels);
    let grads = (loss.clone() * (rows as f32 / 2.0)).backward();
    Ok(vec![
        values(loss)?,
        values(hits)?,
        grad_of(&logits, &grads)?,
    ])
}
