//! Values built once per process from a key (a convolution's map size, kernel, padding and
//! stride) and shared between calls: the direct kernels' taps and im2col's gather tables. At
//! batch 1 building them took as long as a thin layer's convolution.

use rustc_hash::FxHashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex, OnceLock};

/// Entries a memo holds at most before it starts over (a process sees a handful of geometries).
const CAPACITY: usize = 256;

/// A process-wide map from keys to shared values, built on first use of a key.
pub(crate) struct Memo<K, V>(OnceLock<Mutex<FxHashMap<K, Arc<V>>>>);

impl<K: Hash + Eq, V> Memo<K, V> {
    pub(crate) const fn new() -> Self {
        Self(OnceLock::new())
    }

    /// The value of `key`, built by `build` if this memo does not hold it.
    pub(crate) fn get(&self, key: K, build: impl FnOnce() -> V) -> Arc<V> {
        let mut map = self
            .0
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(value) = map.get(&key) {
            return value.clone();
        }
        if map.len() >= CAPACITY {
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
}
