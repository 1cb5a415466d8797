//! Residual streams: the channels of a stage's residual stream are the union of what writes
//! into it (the stage's entry and every block's kept outputs), each writer adds into its own
//! positions, and pruning keeps the positions the new union still holds. The CIFAR ResNets,
//! MobileNetV2 and the supernet share this code.

use burn::prelude::*;

use crate::layers::indices;

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

/// Whether `pos` (positions in a stream of `width` channels) is every channel in order, so
/// that adding into the stream is a plain add.
pub fn covers(pos: &[usize], width: usize) -> bool {
    pos.len() == width && (pos.is_empty() || run_start(pos) == Some(0))
}

/// The first position of `pos` when it is one run of consecutive channels.
fn run_start(pos: &[usize]) -> Option<usize> {
    let &first = pos.first()?;
    pos.iter()
        .enumerate()
        .all(|(i, &p)| p == first + i)
        .then_some(first)
}

/// Adds `values` (`[N, k, H, W]`) into the channels `pos` of `into` (`[N, C, H, W]`): a plain
/// add when `pos` is every channel in order; when `pos` is one run of consecutive channels (a
/// block that keeps a prefix of a stream a padded shortcut widened), the run added and put back
/// between the untouched channels; an index add otherwise (burn's, which costs several times as
/// much: a third of a thin pruned ResNet-56's forward).
pub fn add_into(into: Tensor<4>, pos: &[usize], values: Tensor<4>) -> Tensor<4> {
    let [n, c, h, w] = into.dims();
    if pos.len() == c {
        return into + values;
    }
    if let Some(first) = run_start(pos) {
        let end = first + pos.len();
        let run = into.clone().slice([0..n, first..end, 0..h, 0..w]) + values;
        let mut parts = Vec::with_capacity(3);
        if first > 0 {
            parts.push(into.clone().slice([0..n, 0..first, 0..h, 0..w]));
        }
        parts.push(run);
        if end < c {
            parts.push(into.slice([0..n, end..c, 0..h, 0..w]));
        }
        return Tensor::cat(parts, 1);
    }
    let device = into.device();
    into.select_assign(
        1,
        indices(pos, &device),
        values,
        burn::tensor::IndexingUpdateOp::Add,
    )
}

/// Places `values` (`[N, k, H, W]`) at the channels `pos` of a zero tensor with `width` channels:
/// zeros on either side when `pos` is one run of consecutive channels (a ResNet's padded
/// shortcut), an index add otherwise.
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
    add_into(Tensor::zeros([n, width, h, w], &device), pos, values)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_of_channels_adds_as_the_index_add_does() {
        let device = Device::default();
        let into = Tensor::<4>::random([2, 6, 3, 3], burn::tensor::Distribution::Default, &device);
        for pos in [vec![1, 2, 3], vec![0, 1], vec![4, 5], vec![2]] {
            let values = Tensor::<4>::random(
                [2, pos.len(), 3, 3],
                burn::tensor::Distribution::Default,
                &device,
            );
            let fast = add_into(into.clone(), &pos, values.clone());
            let index = into.clone().select_assign(
                1,
                indices(&pos, &device),
                values,
                burn::tensor::IndexingUpdateOp::Add,
            );
            assert_eq!(fast.into_data(), index.into_data(), "{pos:?}");
        }
    }
}
