//! Residual streams: the channels of a stage's residual stream are the union of what writes
//! into it (the stage's entry and every block's kept outputs), each writer adds into its own
//! positions, and pruning keeps the positions the new union still holds. The CIFAR ResNets,
//! MobileNetV2 and the supernet share this code.

use burn::prelude::*;

use dnal_kernels::channels::run_start;

/// The union of `writers` (channel lists) within a stream of `width` channels, sorted.
pub fn union<'a>(width: usize, writers: impl IntoIterator<Item = &'a [usize]>) -> Vec<usize> {
    let mut present = vec![false; width];
    for channels in writers {
        channels.iter().for_each(|&c| present[c] = true);
    }
    (0..width).filter(|&c| present[c]).collect()
}

/// For each stream, the positions in the old stream that the new one keeps.
pub fn kept_positions(old: &[Vec<usize>], new: &[Vec<usize>]) -> Vec<Vec<usize>> {
    new.iter().zip(old).map(|(n, o)| positions(o, n)).collect()
}

/// What feeds a block of stage `s` (`first`: the stage's first block): `entry` for the first
/// block of stage 0, the previous stage's stream for the first block of a later stage, the
/// stage's own stream otherwise.
pub fn block_input<'a>(
    (s, first): (usize, bool),
    entry: &'a [usize],
    streams: &'a [Vec<usize>],
) -> &'a [usize] {
    match (first, s) {
        (true, 0) => entry,
        (true, _) => &streams[s - 1],
        (false, _) => &streams[s],
    }
}

/// `x`, whose channels are the stream `from`, as the wider stream `to` (which holds every
/// channel of `from`; the others are zero).
pub fn widen(x: Tensor<4>, from: &[usize], to: &[usize]) -> Tensor<4> {
    scatter(to.len(), &positions(to, from), x)
}

/// Positions of `channels` within `stream` (both sorted; every channel must be in the stream).
pub fn positions(stream: &[usize], channels: &[usize]) -> Vec<usize> {
    channels
        .iter()
        .map(|c| {
            stream
                .binary_search(c)
                .expect("a stream holds its writers' channels")
        })
        .collect()
}

/// Places `values` (`[N, k, H, W]`) at the channels `pos` of a zero tensor with `width` channels:
/// zeros on either side when `pos` is one run of consecutive channels (a ResNet's padded
/// shortcut), the channels picked into place otherwise (`dnal_kernels::channels::select`).
pub fn scatter(width: usize, pos: &[usize], values: Tensor<4>) -> Tensor<4> {
    let [n, c, h, w] = values.dims();
    if c == width {
        return values;
    }
    let device = values.device();
    if let Some(first) = run_start(pos) {
        let after = width - first - c;
        let mut parts = Vec::with_capacity(3);
        if first > 0 {
            parts.push(Tensor::zeros([n, first, h, w], &device));
        }
        parts.push(values);
        if after > 0 {
            parts.push(Tensor::zeros([n, after, h, w], &device));
        }
        return Tensor::cat(parts, 1);
    }
    let mut sources = vec![None; width];
    for (j, &p) in pos.iter().enumerate() {
        sources[p] = Some(j);
    }
    dnal_kernels::channels::select(values, &sources)
}
