//! Adding a tensor into some of the channels of another: how the blocks of a pruned residual
//! network write into a residual stream that holds more channels than they produce.

use burn::prelude::*;

use crate::memo::{DeviceKey, Memo, device_key};

/// Whether `pos` (positions in a stream of `width` channels) is every channel in order, so
/// that adding into the stream is a plain add.
pub fn covers(pos: &[usize], width: usize) -> bool {
    pos.len() == width && (pos.is_empty() || run_start(pos) == Some(0))
}

/// The first position of `pos` when it is one run of consecutive channels.
pub fn run_start(pos: &[usize]) -> Option<usize> {
    let &first = pos.first()?;
    pos.iter()
        .enumerate()
        .all(|(i, &p)| p == first + i)
        .then_some(first)
}

/// `keep` as an index tensor.
pub fn indices(keep: &[usize], device: &Device) -> Tensor<1, Int> {
    let v: Vec<i64> = keep.iter().map(|&i| i as i64).collect();
    Tensor::from_data(TensorData::new(v, [keep.len()]), device)
}

/// Index tensors the forward and backward passes use, kept on their devices once made.
static HELD: Memo<(DeviceKey, Vec<usize>), Tensor<1, Int>> = Memo::kept();

/// `keep` as an index tensor on `device`, made at the first call and held for the rest of the
/// process. A training step recorded as a graph of launches (`train --graph` on cuda and wgpu)
/// may contain no upload from the host, only launches; with the tensors held, the steps before
/// the recording upload them and the recorded one reads them where they stay, as long as the
/// graph lives: the memo never drops a tensor, so nothing a replay reads is freed. A process
/// holds one tensor per distinct channel list of the networks it runs (a few dozen small ones
/// for a pruned network).
fn held_indices(keep: &[usize], device: &Device) -> Tensor<1, Int> {
    Tensor::clone(&HELD.get((device_key(device), keep.to_vec()), || {
        indices(keep, device)
    }))
}

/// Channel maps, held as index tensors are.
#[cfg_attr(not(feature = "cube"), allow(dead_code))]
static HELD_MAPS: Memo<(DeviceKey, Vec<usize>, usize), Tensor<1>> = Memo::kept();

/// For a stream of `width` channels into whose channels `pos` the channels of a narrower
/// tensor are added, in order: per stream channel, the narrower tensor's channel added into it
/// (as f32), or -1. Held on `device` as [`held_indices`] are (dnal's CubeCL kernel for
/// BatchNorm added into a stream reads it).
#[cfg_attr(not(feature = "cube"), allow(dead_code))]
pub(crate) fn held_map(pos: &[usize], width: usize, device: &Device) -> Tensor<1> {
    let key = (device_key(device), pos.to_vec(), width);
    Tensor::clone(&HELD_MAPS.get(key, || {
        let mut map = vec![-1.0f32; width];
        for (k, &p) in pos.iter().enumerate() {
            map[p] = k as f32;
        }
        Tensor::from_data(TensorData::new(map, [width]), device)
    }))
}

/// Channel positions as f32 values, held as index tensors are (dnal's CubeCL kernel for a
/// placement's backward reads them).
#[cfg_attr(not(feature = "cube"), allow(dead_code))]
static HELD_POSITIONS: Memo<(DeviceKey, Vec<usize>), Tensor<1>> = Memo::kept();

#[cfg_attr(not(feature = "cube"), allow(dead_code))]
fn held_positions(pos: &[usize], device: &Device) -> Tensor<1> {
    Tensor::clone(&HELD_POSITIONS.get((device_key(device), pos.to_vec()), || {
        let v: Vec<f32> = pos.iter().map(|&p| p as f32).collect();
        Tensor::from_data(TensorData::new(v, [pos.len()]), device)
    }))
}

/// `values` (`[N, k, H, W]`) subsampled by `stride` (rows and columns `0, stride, 2 *
/// stride, ...`) and placed at the channels `pos` of a zero tensor with `width` channels,
/// `[N, width, ceil(H / stride), ceil(W / stride)]`: a residual stream widened to the next
/// one (a CIFAR ResNet's parameter-free shortcut subsamples by 2 and places the channels
/// between zeros; a pruned network's streams place them wherever their union puts them).
/// `pos` holds distinct channels below `width`. On cuda and wgpu one CubeCL launch each way;
/// elsewhere a strided slice, then zeros on either side of a run of consecutive positions or
/// the channels picked into place ([`select`]).
pub fn place(values: Tensor<4>, pos: &[usize], width: usize, stride: usize) -> Tensor<4> {
    let [n, c, _, _] = values.dims();
    assert!(stride > 0, "place: the stride must be at least 1");
    assert_eq!(pos.len(), c, "place: one position per channel");
    let mut taken = vec![false; width];
    for &p in pos {
        assert!(
            p < width && !std::mem::replace(&mut taken[p], true),
            "place: distinct positions below the width"
        );
    }
    if stride == 1 && covers(pos, width) {
        return values;
    }
    #[cfg(feature = "cube")]
    if crate::takes_cube_path(&values) {
        use crate::cube::CubePlace;
        use burn::backend::Dispatch;
        let device = values.device();
        let map = held_map(pos, width, &device);
        let positions = held_positions(pos, &device);
        return Tensor::from_dispatch(<Dispatch as CubePlace>::dnal_cube_place(
            values.into_dispatch(),
            map.into_dispatch(),
            positions.into_dispatch(),
            stride,
        ));
    }
    let values = if stride > 1 {
        values.slice(burn::tensor::s![.., .., ..;stride, ..;stride])
    } else {
        values
    };
    if covers(pos, width) {
        return values;
    }
    let [_, _, h, w] = values.dims();
    if let Some(first) = run_start(pos) {
        let device = values.device();
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
    select(values, &sources)
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
        held_indices(pos, &device),
        values,
        burn::tensor::IndexingUpdateOp::Add,
    )
}

/// `x` (`[N, C, H, W]`) with its channels rearranged: output channel `o` is `x`'s channel
/// `sources[o]`, zeros where that is `None` (a stream widened, a unit's channels placed in a
/// stream, a stream's channels read). Each channel of `x` is picked once at most. On flex one
/// pass of plane copies each way (dnal's operation; burn's `select` and index add move values
/// one by one, and their backward passes too); elsewhere burn's `select`, and an index add into
/// zeros where some sources are `None`.
pub fn select(x: Tensor<4>, sources: &[Option<usize>]) -> Tensor<4> {
    let [n, c, h, w] = x.dims();
    let mut picked = vec![false; c];
    for &s in sources.iter().flatten() {
        assert!(
            s < c && !std::mem::replace(&mut picked[s], true),
            "each channel of the input picked once at most"
        );
    }
    #[cfg(feature = "flex")]
    if crate::takes_fast_path(&x) {
        use crate::flex::DnalKernels;
        use burn::backend::Dispatch;
        let out =
            <Dispatch as DnalKernels>::dnal_select_channels(x.into_dispatch(), sources.to_vec());
        return Tensor::from_dispatch(out);
    }
    let device = x.device();
    let (from, to): (Vec<usize>, Vec<usize>) = sources
        .iter()
        .enumerate()
        .filter_map(|(o, s)| s.map(|s| (s, o)))
        .unzip();
    let values = x.select(1, held_indices(&from, &device));
    if to.len() == sources.len() {
        return values;
    }
    Tensor::zeros([n, sources.len(), h, w], &device).select_assign(
        1,
        held_indices(&to, &device),
        values,
        burn::tensor::IndexingUpdateOp::Add,
    )
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
