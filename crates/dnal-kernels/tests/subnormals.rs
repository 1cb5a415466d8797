//! `subnormals::flush_subnormals` on the calling thread and on rayon's threads (its own test
//! binary: the flags stay set for the rest of the process).

use dnal_kernels::subnormals::{flush_subnormals, flushed_here};
use rayon::prelude::*;
use std::hint::black_box;

/// A product whose exact value, 1e-40, is subnormal in f32, and a subnormal operand read.
fn subnormal_results() -> (f32, f32) {
    let tiny = black_box(1e-20f32) * black_box(1e-20f32);
    let read = black_box(f32::from_bits(1)) * black_box(1.0f32);
    (tiny, read)
}

#[test]
fn flushing_zeroes_subnormal_results_and_operands_on_every_thread() {
    if !cfg!(target_arch = "x86_64") {
        return;
    }
    let (tiny, read) = subnormal_results();
    assert!(
        tiny > 0.0 && tiny < f32::MIN_POSITIVE,
        "not yet flushed: {tiny:e}"
    );
    assert!(read > 0.0 && !flushed_here(), "not yet flushed: {read:e}");
    flush_subnormals();
    assert!(flushed_here());
    assert_eq!(subnormal_results(), (0.0, 0.0), "the calling thread");
    let on_pool: Vec<(bool, (f32, f32))> =
        rayon::broadcast(|_| (flushed_here(), subnormal_results()));
    assert_eq!(on_pool.len(), rayon::current_num_threads());
    for (flag, results) in on_pool {
        assert!(flag, "a pool thread without the flags");
        assert_eq!(results, (0.0, 0.0), "a pool thread");
    }
    // A parallel map (the way the kernels use the pool) sees the same, and normal values
    // are untouched.
    let normal: Vec<f32> = (0..1024)
        .into_par_iter()
        .map(|i| black_box(1e-20f32) * black_box(1e-20f32) + black_box(i as f32))
        .collect();
    assert!(normal.iter().enumerate().all(|(i, &v)| v == i as f32));
    let smallest_normal = black_box(f32::MIN_POSITIVE) * black_box(1.0f32);
    assert_eq!(smallest_normal, f32::MIN_POSITIVE);
}
