//! Building a tensor's values in parallel, plane by plane, without zeroing them first.
//!
//! `vec![0.0; n]` writes every value once before the kernel writes it again; for the
//! element-wise passes of BatchNorm (a few megabytes per layer) that zero fill is a tenth of the
//! pass. [`par_planes`] writes each value once.
#![allow(unsafe_code)]

use rayon::prelude::*;
use std::mem::MaybeUninit;

/// Writes `values` into `dst` (as many as fit), returning how many were written; compiled for
/// the widest vector instructions this CPU has (AVX-512 or AVX2, chosen at run time), so that
/// the iterator's arithmetic vectorizes.
#[inline(always)]
fn write_plane<I: Iterator<Item = f32>>(dst: &mut [MaybeUninit<f32>], values: I) -> usize {
    crate::simd::widest_simd!({
        let mut written = 0;
        for (d, v) in dst.iter_mut().zip(values) {
            d.write(v);
            written += 1;
        }
        written
    })
}

/// Below this many values a pass runs on the calling thread. Handing work to rayon's pool from
/// outside it wakes a sleeping worker and puts the caller to sleep until the work is done,
/// which costs more than a small pass (at batch 1 those hand-offs took half of the pruned
/// MNIST CNN's forward).
pub const SERIAL_BELOW: usize = 1 << 14;

/// `each(i, plane)` for the planes of `l` values of `dst` (the last may be shorter), in
/// parallel, or on this thread below [`SERIAL_BELOW`] values; the results in plane order.
fn map_planes<E, T, F>(dst: &mut [E], l: usize, each: F) -> Vec<T>
where
    E: Send,
    T: Send,
    F: Fn((usize, &mut [E])) -> T + Sync,
{
    if dst.len() < SERIAL_BELOW {
        dst.chunks_mut(l.max(1)).enumerate().map(&each).collect()
    } else {
        dst.par_chunks_mut(l.max(1))
            .enumerate()
            .map(&each)
            .collect()
    }
}

/// `len` values in planes of `l` (the last may be shorter), plane `i` being the first values
/// of `plane(i)`, computed in parallel (on this thread below [`SERIAL_BELOW`] values). Panics
/// if an iterator yields fewer values than its plane holds.
pub fn par_planes<I, F>(len: usize, l: usize, plane: F) -> Vec<f32>
where
    I: Iterator<Item = f32>,
    F: Fn(usize) -> I + Sync,
{
    let mut out: Vec<f32> = Vec::with_capacity(len);
    let each = |(i, dst): (usize, &mut [MaybeUninit<f32>])| {
        let written = write_plane(dst, plane(i));
        assert_eq!(written, dst.len(), "plane {i} is short of values");
    };
    map_planes(&mut out.spare_capacity_mut()[..len], l, each);
    // SAFETY: every plane wrote all its values (a short one panicked above, so this line is
    // reached only when all `len` values are initialised).
    unsafe { out.set_len(len) };
    out
}

/// `each(i, plane)` for the planes of `l` values of `values` (the last may be shorter),
/// rewriting them in place, in parallel (on this thread below [`SERIAL_BELOW`] values).
pub fn each_plane_mut<F>(values: &mut [f32], l: usize, each: F)
where
    F: Fn(usize, &mut [f32]) + Sync,
{
    map_planes(values, l, |(i, plane)| each(i, plane));
}

/// `len` values in planes of `l` (the last may be shorter), computed in parallel (on this thread
/// below [`SERIAL_BELOW`] values) by `plane(i, values)`, which finds plane `i` zeroed: each
/// plane is zeroed just before its kernel runs, while it is in cache, rather than the whole
/// buffer in a pass of its own.
pub fn par_planes_zeroed<F>(len: usize, l: usize, plane: F) -> Vec<f32>
where
    F: Fn(usize, &mut [f32]) + Sync,
{
    let mut out: Vec<f32> = Vec::with_capacity(len);
    let each = |(i, dst): (usize, &mut [MaybeUninit<f32>])| {
        for d in dst.iter_mut() {
            d.write(0.0);
        }
        // SAFETY: every value of `dst` was written just above.
        let values =
            unsafe { std::slice::from_raw_parts_mut(dst.as_mut_ptr().cast::<f32>(), dst.len()) };
        plane(i, values);
    };
    map_planes(&mut out.spare_capacity_mut()[..len], l, each);
    // SAFETY: every plane was zeroed above before its kernel ran, so all `len` values are
    // initialised.
    unsafe { out.set_len(len) };
    out
}

/// [`par_planes`], and for each plane `fold(i, values)` of its values right after they are
/// written (while they are in cache), in plane order (on this thread below [`SERIAL_BELOW`]
/// values, like the others).
pub fn par_planes_fold<I, F, T, G>(len: usize, l: usize, plane: F, fold: G) -> (Vec<f32>, Vec<T>)
where
    I: Iterator<Item = f32>,
    F: Fn(usize) -> I + Sync,
    T: Send,
    G: Fn(usize, &[f32]) -> T + Sync,
{
    let mut out: Vec<f32> = Vec::with_capacity(len);
    let folds = map_planes(&mut out.spare_capacity_mut()[..len], l, |(i, dst)| {
        let written = write_plane(dst, plane(i));
        assert_eq!(written, dst.len(), "plane {i} is short of values");
        // SAFETY: every value of `dst` was written just above (a short plane panicked).
        let values = unsafe { std::slice::from_raw_parts(dst.as_ptr().cast::<f32>(), dst.len()) };
        crate::simd::widest_simd!(fold(i, values))
    });
    // SAFETY: as in `par_planes`: every plane wrote all its values.
    unsafe { out.set_len(len) };
    (out, folds)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folds_see_their_planes_in_order() {
        let (v, sums) = par_planes_fold(
            10,
            4,
            |i| (0..4).map(move |j| (i * 4 + j) as f32),
            |i, plane| (i, plane.iter().sum::<f32>()),
        );
        assert_eq!(v, (0..10).map(|x| x as f32).collect::<Vec<_>>());
        assert_eq!(sums, vec![(0, 6.0), (1, 22.0), (2, 17.0)]);
    }

    #[test]
    fn planes_land_in_order() {
        let v = par_planes(10, 4, |i| (0..4).map(move |j| (i * 4 + j) as f32));
        assert_eq!(v, (0..10).map(|x| x as f32).collect::<Vec<_>>());
    }

    #[test]
    #[should_panic(expected = "short of values")]
    fn a_short_plane_is_refused() {
        let _ = par_planes(8, 4, |i| (0..if i == 1 { 3 } else { 4 }).map(|x| x as f32));
    }
}
