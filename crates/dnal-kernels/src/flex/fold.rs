//! BatchNorm's inference transform, `x * scale + shift` per channel, folded from its
//! parameters and running statistics, and kept between calls on the same tensors: at batch 1
//! every unit folds its BatchNorm on every forward, and the fold (four reads, two new
//! tensors) was a twentieth of a thin pruned network's forward.

use super::{Affine, tensor};
use burn::backend::Flex;
use burn::backend::flex::FlexTensor;
use burn::tensor::Bytes;
use rustc_hash::FxHashMap;
use std::sync::{Arc, Mutex, OnceLock};

/// Values (inputs held and folds kept) the cache holds at most before it starts over. A
/// network has one fold per BatchNorm; the bound is for a process that evaluates many
/// networks, or one network after every epoch of training.
const CAPACITY: usize = 1 << 22;

/// Where one input's values lie: their address and length.
type Place = (usize, usize);
/// The four inputs' places and epsilon's bits.
type Key = ([Place; 4], u64);

#[derive(Default)]
struct Cache {
    entries: FxHashMap<Key, Entry>,
    /// Values the entries hold.
    values: usize,
}

struct Entry {
    /// The four inputs' storages, held so that they cannot be freed (their addresses reused)
    /// or written in place (flex's storage is copy-on-write) while the entry exists.
    _held: [Arc<Bytes>; 4],
    scale: FlexTensor,
    shift: FlexTensor,
}

/// `scale = a / sqrt(var + epsilon)`, `shift = b - mean * scale`, as burn's operations compute
/// them in f32. Inputs that other tensors share (a module's parameters and running statistics,
/// which it keeps) are looked up first: while an entry holds their storages, values at the
/// same addresses with the same lengths are the same values. An input that nobody else holds
/// (a gate's factor multiplied in this forward) is folded afresh and not kept.
pub(super) fn fold_batch_norm(
    a: FlexTensor,
    b: FlexTensor,
    mean: FlexTensor,
    var: FlexTensor,
    epsilon: f64,
) -> Affine<Flex> {
    static CACHE: OnceLock<Mutex<Cache>> = OnceLock::new();
    let inputs = [&a, &b, &mean, &var];
    let mut places = [(0, 0); 4];
    for (place, t) in places.iter_mut().zip(inputs) {
        match kept_place(t) {
            Some(p) => *place = p,
            None => return fold(inputs, epsilon),
        }
    }
    let key = (places, epsilon.to_bits());
    let mut cache = CACHE
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(entry) = cache.entries.get(&key) {
        return Affine {
            scale: entry.scale.clone(),
            shift: entry.shift.clone(),
        };
    }
    let folded = fold(inputs, epsilon);
    // The inputs' values and the two folds.
    let size = places.iter().map(|&(_, len)| len).sum::<usize>() + 2 * places[0].1;
    if cache.values + size > CAPACITY {
        *cache = Cache::default();
    }
    cache.values += size;
    cache.entries.insert(
        key,
        Entry {
            _held: inputs.map(FlexTensor::data_arc),
            scale: folded.scale.clone(),
            shift: folded.shift.clone(),
        },
    );
    folded
}

/// Where `t`'s values lie, when another tensor shares its storage and the values are
/// contiguous f32.
fn kept_place(t: &FlexTensor) -> Option<Place> {
    if t.is_unique() {
        return None;
    }
    let values = t.as_slice::<f32>()?;
    Some((values.as_ptr() as usize, values.len()))
}

fn fold([a, b, mean, var]: [&FlexTensor; 4], epsilon: f64) -> Affine<Flex> {
    let parts = [a, b, mean, var].map(super::vec_of);
    let [a, b, mean, var] = parts.each_ref().map(|t| &t[..]);
    let c = a.len();
    assert!(
        [b, mean, var].iter().all(|t| t.len() == c),
        "BatchNorm parameters of different lengths"
    );
    let eps = epsilon as f32;
    let (mut scale, mut shift) = (Vec::with_capacity(c), Vec::with_capacity(c));
    for i in 0..c {
        let s = a[i] * (1.0 / (var[i] + eps).sqrt());
        scale.push(s);
        shift.push(b[i] - mean[i] * s);
    }
    Affine {
        scale: tensor(scale, &[c]),
        shift: tensor(shift, &[c]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::TensorData;

    fn t(values: &[f32]) -> FlexTensor {
        FlexTensor::from_data(TensorData::new(values.to_vec(), [values.len()]))
    }

    fn values(t: &FlexTensor) -> Vec<f32> {
        t.as_slice::<f32>().expect("contiguous").to_vec()
    }

    #[test]
    fn kept_inputs_fold_once_and_fresh_ones_every_time() {
        let (a, b, mean, var) = (
            t(&[2.0, 3.0]),
            t(&[0.5, -1.0]),
            t(&[1.0, 2.0]),
            t(&[3.0, 0.0]),
        );
        let expected_scale: Vec<f32> = [(2.0f32, 3.0f32), (3.0, 0.0)]
            .iter()
            .map(|&(a, v)| a * (1.0 / (v + 1.0f32).sqrt()))
            .collect();
        let fold_kept = || fold_batch_norm(a.clone(), b.clone(), mean.clone(), var.clone(), 1.0);
        let first = fold_kept();
        assert_eq!(values(&first.scale), expected_scale);
        assert_eq!(values(&first.shift)[1], -1.0 - 2.0 * expected_scale[1]);
        // The same storages: the kept fold, the same tensor storage handed out again.
        let again = fold_kept();
        assert!(Arc::ptr_eq(
            &again.scale.data_arc(),
            &first.scale.data_arc()
        ));
        // A fresh `a` (no other holder): folded afresh, from its own values.
        let fresh = fold_batch_norm(t(&[4.0, 6.0]), b.clone(), mean.clone(), var.clone(), 1.0);
        assert_eq!(
            values(&fresh.scale),
            expected_scale.iter().map(|s| 2.0 * s).collect::<Vec<_>>()
        );
        assert!(!Arc::ptr_eq(
            &fresh.scale.data_arc(),
            &first.scale.data_arc()
        ));
        // Another epsilon is another fold.
        let other = fold_batch_norm(a.clone(), b.clone(), mean.clone(), var.clone(), 0.5);
        assert_ne!(values(&other.scale), expected_scale);
    }

    #[test]
    fn a_written_input_is_not_mistaken_for_the_kept_one() {
        let (a, b, mean) = (t(&[1.0]), t(&[0.0]), t(&[0.0]));
        let mut var = t(&[3.0]);
        let first = fold_batch_norm(a.clone(), b.clone(), mean.clone(), var.clone(), 1.0);
        assert_eq!(values(&first.scale), [0.5]);
        // Written in place: the cache holds the old storage, so the write copies it first
        // and the new values have another storage.
        var.storage_mut::<f32>()[0] = 15.0;
        let second = fold_batch_norm(a.clone(), b.clone(), mean.clone(), var.clone(), 1.0);
        assert_eq!(values(&second.scale), [0.25]);
    }
}
