//! Residual streams: the channels of a stage's residual stream are the union of what writes
//! into it (the stage's entry and every block's kept outputs), each writer adds into its own
//! positions, and pruning keeps the positions the new union still holds. The CIFAR ResNets,
//! MobileNetV2 and the supernet share this code.

use burn::prelude::*;

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
/// channel of `from`; the others are zero), subsampled by `stride` on the way (a CIFAR
/// ResNet's parameter-free shortcut takes 2).
pub fn widen(x: Tensor<4>, from: &[usize], to: &[usize], stride: usize) -> Tensor<4> {
    dnal_kernels::channels::place(x, &positions(to, from), to.len(), stride)
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
