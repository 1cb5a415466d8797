//! Values built once per process from a key (a convolution's map size, kernel, padding and
//! stride) and shared between calls: the direct kernels' taps and im2col's gather tables (at
//! batch 1 building them took as long as a thin layer's convolution), and the index tensors a
//! pruned network's steps read on a device.

use rustc_hash::FxHashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex, OnceLock};

/// Which device a held tensor lives on: its description (the backend and the device's number)
/// and whether it records gradients (`Device`'s equality ignores that, and has no hash).
pub(crate) type DeviceKey = (String, bool);

/// The [`DeviceKey`] of `device`.
pub(crate) fn device_key(device: &burn::tensor::Device) -> DeviceKey {
    (format!("{device:?}"), device.is_autodiff())
}

/// Entries a [`Memo::new`] holds at most before it starts over (a process sees a handful of
/// geometries).
const CAPACITY: usize = 256;

/// A process-wide map from keys to shared values, built on first use of a key.
pub(crate) struct Memo<K, V> {
    map: OnceLock<Mutex<FxHashMap<K, Arc<V>>>>,
    /// Entries held at most before the map starts over.
    capacity: usize,
}

impl<K: Hash + Eq, V> Memo<K, V> {
    /// A memo that starts over when it holds [`CAPACITY`] entries: for values any caller may
    /// build again.
    pub(crate) const fn new() -> Self {
        Self {
            map: OnceLock::new(),
            capacity: CAPACITY,
        }
    }

    /// A memo that never drops what it holds: for values whose identity matters (a tensor a
    /// recorded graph of launches reads at its address) and whose keys a process has few of.
    pub(crate) const fn kept() -> Self {
        Self {
            map: OnceLock::new(),
            capacity: usize::MAX,
        }
    }

    /// The value of `key`, built by `build` if this memo does not hold it.
    pub(crate) fn get(&self, key: K, build: impl FnOnce() -> V) -> Arc<V> {
        let mut map = self
            .map
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(value) = map.get(&key) {
            return value.clone();
        }
        if map.len() >= self.capacity {
            map.clear();
        }
        map.entry(key).or_insert_with(|| Arc::new(build())).clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_each_key_once_and_starts_over_when_full() {
        static MEMO: Memo<usize, usize> = Memo::new();
        let builds = std::cell::Cell::new(0);
        let build = |v: usize| {
            builds.set(builds.get() + 1);
            v * 10
        };
        assert_eq!(*MEMO.get(1, || build(1)), 10);
        assert_eq!(*MEMO.get(1, || build(1)), 10);
        assert_eq!(builds.get(), 1);
        let first = MEMO.get(2, || build(2));
        assert!(Arc::ptr_eq(&first, &MEMO.get(2, || build(2))));
        for k in 0..CAPACITY + 1 {
            MEMO.get(100 + k, || k);
        }
        // Full: started over, so key 2 is built again; the value handed out earlier lives on.
        assert_eq!(*MEMO.get(2, || build(2)), 20);
        assert_eq!(builds.get(), 3);
        assert_eq!(*first, 20);
    }

    #[test]
    fn a_kept_memo_hands_out_the_same_values_past_the_capacity() {
        static KEPT: Memo<usize, usize> = Memo::kept();
        let first = KEPT.get(0, || 7);
        for k in 1..=2 * CAPACITY {
            KEPT.get(k, || k);
        }
        assert!(Arc::ptr_eq(&first, &KEPT.get(0, || 8)));
        assert_eq!(*KEPT.get(CAPACITY, || 0), CAPACITY);
    }
}
