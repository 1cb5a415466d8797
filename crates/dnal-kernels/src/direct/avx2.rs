//! The direct kernels in AVX2 (with FMA), for CPUs without AVX-512: each 16-position vector
//! of the AVX-512 kernels as two 8-lane halves, its 16-bit lane masks turned into vector masks
//! through a table. AVX2 has 16 vector registers, so forward blocks hold at most 4 output
//! channels (8 accumulators for one vector, or 2 channels x 2 vectors), a forward tap loops
//! over a few channels at a time (`channel_run`), and weight-gradient blocks hold 2.
use super::{DW_ROWS, DwBlock, ForwardBlock, LANES, MAX_CHANNELS, TILE_SUMS};
use crate::lane_masks::{HALF, half_mask, half_masks};
use std::arch::x86_64::*;

/// Channels `first + r`, `r < R`, of every vector of positions of `block`'s images, `V`
/// vectors (of two halves) at a time, as [`super::avx512::forward`] computes them.
///
/// # Safety
/// AVX2 and FMA must be available; `block.taps` are the taps of the images' geometry (their
/// masks say which lanes of each tap are inside the image); `w` holds
/// `channels * taps * MAX_CHANNELS` values (the sizes are checked).
#[target_feature(enable = "avx2,fma")]
pub unsafe fn forward<const R: usize, const V: usize>(
    w: &[f32],
    block: ForwardBlock,
    out: &mut [std::mem::MaybeUninit<f32>],
) {
    let ForwardBlock {
        x,
        taps,
        channels,
        l,
        co,
        first,
        scale,
        shift,
        residual,
        bounds,
    } = block;
    let (offsets, ntaps) = (&taps.offsets, taps.taps);
    let image_len = channels * l;
    assert!(R * V * 2 <= 12);
    block.check::<R>(w, out.len());
    let (lo, hi) = (_mm256_set1_ps(bounds.0), _mm256_set1_ps(bounds.1));
    let dst = out.as_mut_ptr().cast::<f32>();
    // Each step's taps: how much of each is inside the image, and the masks of those partly
    // inside.
    let run = channel_run(l);
    let mut kinds = vec![Kind::Outside; ntaps];
    let mut masks = vec![[[_mm256_setzero_si256(); 2]; V]; ntaps];
    for (at, valid) in block.steps::<V>() {
        for (t, (kind, masks)) in kinds.iter_mut().zip(&mut masks).enumerate() {
            let bits: [u16; V] = std::array::from_fn(|h| taps.masks[at[h].1 * ntaps + t]);
            *kind = if bits.iter().all(|&b| b == 0) {
                Kind::Outside
            } else if bits.iter().all(|&b| b == u16::MAX) {
                Kind::Inside
            } else {
                *masks = std::array::from_fn(|h| half_masks(bits[h]));
                Kind::Edge
            };
        }
        let inputs: [*const f32; V] = std::array::from_fn(|h| {
            let (i, v) = at[h];
            x.as_ptr().wrapping_add(i * image_len + v * LANES)
        });
        let mut acc = [[[_mm256_setzero_ps(); 2]; V]; R];
        // Taps outside, channels inside, as in the AVX-512 kernel, but a few channels at a
        // time ([`channel_run`]): the input lines one tap reads lie a channel apart, which on
        // 32x32 maps is 4 KiB, so that every channel's line falls in the same L1 set; more
        // channels than the set's ways evicted each other between taps (16x16x32x32 ran at
        // half speed).
        for c0 in (0..channels).step_by(run) {
            let run = run.min(channels - c0);
            for (t, &offset) in offsets.iter().enumerate() {
                let tap = Tap {
                    starts: std::array::from_fn(|h| {
                        inputs[h].wrapping_offset(offset).wrapping_add(c0 * l)
                    }),
                    weights: w.as_ptr().wrapping_add((t * channels + c0) * MAX_CHANNELS),
                    channels: run,
                    l,
                };
                let masks = &masks[t];
                // SAFETY: contract (lanes on are inside the image, `Taps::new`): every lane
                // of an inside tap, the masked ones of an edge tap; `w` holds
                // `ntaps * channels * MAX_CHANNELS` values (checked).
                unsafe {
                    match kinds[t] {
                        Kind::Outside => {}
                        Kind::Inside => tap.accumulate(&mut acc, |at, _| _mm256_loadu_ps(at)),
                        Kind::Edge => tap
                            .accumulate(&mut acc, |at, (h, k)| _mm256_maskload_ps(at, masks[h][k])),
                    }
                }
            }
        }
        for (r, a) in acc.iter().enumerate() {
            let (m, b) = (_mm256_set1_ps(scale[r]), _mm256_set1_ps(shift[r]));
            for (h, &(i, v)) in at.iter().enumerate().take(valid) {
                let start = ((i * co + first + r) * l) + v * LANES;
                let lanes = taps.lanes[v];
                let lane_masks = half_masks(lanes);
                let y: [__m256; 2] = std::array::from_fn(|k| {
                    let mut y = _mm256_fmadd_ps(a[h][k], m, b);
                    if let Some(res) = residual {
                        // SAFETY: `residual` is as long as `out`, and the lanes on from
                        // `start` are inside channel `first + r < co` of image `i` (checked).
                        let r = unsafe {
                            _mm256_maskload_ps(res.as_ptr().add(start + k * HALF), lane_masks[k])
                        };
                        y = _mm256_add_ps(y, r);
                    }
                    // max/min return their second operand when it is NaN, so NaN passes
                    // through.
                    _mm256_min_ps(hi, _mm256_max_ps(lo, y))
                });
                if lanes == u16::MAX {
                    for (k, y) in y.iter().enumerate() {
                        // SAFETY: as for the residual, every lane on.
                        unsafe { _mm256_storeu_ps(dst.add(start + k * HALF), *y) };
                    }
                } else {
                    // A partial last vector: its first lanes, without a masked store (slow on
                    // some CPUs).
                    let mut values = [0.0f32; LANES];
                    // SAFETY: `values` holds two halves.
                    unsafe {
                        _mm256_storeu_ps(values.as_mut_ptr(), y[0]);
                        _mm256_storeu_ps(values.as_mut_ptr().add(HALF), y[1]);
                    }
                    let width = lanes.trailing_ones() as usize;
                    // SAFETY: as for the residual: the first `width` lanes are inside.
                    unsafe {
                        std::ptr::copy_nonoverlapping(values.as_ptr(), dst.add(start), width)
                    };
                }
            }
        }
    }
}

/// How much of a tap of a vector step is inside the image.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// No lane: the tap adds nothing.
    Outside,
    /// Every lane: plain loads.
    Inside,
    /// Some lanes: masked loads.
    Edge,
}

/// Most channels a tap's loop takes before the next tap, on maps of a multiple of 4 KiB
/// (fewer than an L1 set's ways: 16x16x32x32 ran 1.3x faster than with 8) and on others
/// (fewer per run cost smaller maps 5 %).
fn channel_run(l: usize) -> usize {
    if (l * size_of::<f32>()).is_multiple_of(4096) {
        4
    } else {
        8
    }
}

/// One tap of a forward step: the first input of each of its `V` vectors of positions in
/// the run's first channel, and its weights (`channels` groups of [`MAX_CHANNELS`]).
struct Tap<const V: usize> {
    starts: [*const f32; V],
    weights: *const f32,
    channels: usize,
    l: usize,
}

impl<const V: usize> Tap<V> {
    /// Adds the tap's products over its channels to `acc`, reading half `k` of vector `h` at
    /// `at` with `load(at, (h, k))`.
    ///
    /// # Safety
    /// AVX2 and FMA must be available; `load` reads only inside the image; `weights` holds
    /// `channels * MAX_CHANNELS` values and `R <= MAX_CHANNELS`.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn accumulate<const R: usize>(
        &self,
        acc: &mut [[[__m256; 2]; V]; R],
        load: impl Fn(*const f32, (usize, usize)) -> __m256,
    ) {
        for c in 0..self.channels {
            let xs: [[__m256; 2]; V] = std::array::from_fn(|h| {
                let at = self.starts[h].wrapping_add(c * self.l);
                std::array::from_fn(|k| load(at.wrapping_add(k * HALF), (h, k)))
            });
            // SAFETY: contract.
            let wk = unsafe { self.weights.add(c * MAX_CHANNELS) };
            for (r, a) in acc.iter_mut().enumerate() {
                // SAFETY: contract.
                let s = _mm256_set1_ps(unsafe { *wk.add(r) });
                for (ah, xh) in a.iter_mut().zip(&xs) {
                    for (ak, xk) in ah.iter_mut().zip(xh) {
                        *ak = _mm256_fmadd_ps(s, *xk, *ak);
                    }
                }
            }
        }
    }
}

/// As [`super::avx512::weight_grad`], in half vectors, for tiles whose rows share one tap
/// (`super::patch_rows`): each partial sum's first 8 lanes hold the sums of the positions
/// congruent to them mod 8 (its other 8 lanes stay zero), for `r < RC <= 2`. A half vector
/// that the tap leaves wholly outside the image is skipped, and one wholly inside takes plain
/// loads.
///
/// # Safety
/// AVX2 and FMA must be available; `block.x` and `block.dy` hold whole images of `block.g`
/// and their output gradients; every lane on in the masks of a row's tap is inside the
/// image at the row's offset.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn weight_grad<const RC: usize>(block: DwBlock, partial: &mut [f32]) {
    let DwBlock {
        x,
        dy,
        g,
        rows,
        masks,
        tap_stride,
    } = block;
    let (l, image_len) = (g.positions(), g.image());
    let (images, vectors) = (x.len() / image_len, l / LANES);
    assert!(RC <= 2);
    block.check::<RC>(partial.len());
    let slot = |r: usize, j: usize| (r * DW_ROWS + j) * LANES;
    for (tile, sums) in rows
        .chunks_exact(DW_ROWS)
        .zip(partial.chunks_exact_mut(TILE_SUMS))
    {
        let tap = tile[0].1;
        assert!(tile.iter().all(|row| row.1 == tap), "a tile of one tap");
        let mut acc: [[__m256; DW_ROWS]; RC] = std::array::from_fn(|r| {
            // SAFETY: `sums` holds `TILE_SUMS` values, slot + 8 inside.
            std::array::from_fn(|j| unsafe { _mm256_loadu_ps(sums.as_ptr().add(slot(r, j))) })
        });
        for i in 0..images {
            let image = x[i * image_len..][..image_len].as_ptr();
            let grad = dy[i * RC * l..][..RC * l].as_ptr();
            let starts: [*const f32; DW_ROWS] =
                std::array::from_fn(|j| image.wrapping_offset(tile[j].0));
            for v in 0..vectors {
                let bits = masks[v * tap_stride + tap];
                for k in 0..2 {
                    let byte = (bits >> (8 * k)) as u8;
                    if byte == 0 {
                        continue;
                    }
                    let at = v * LANES + k * HALF;
                    let d: [__m256; RC] = std::array::from_fn(|r| {
                        // SAFETY: `grad` holds the image's `vectors` groups of `RC` vectors
                        // of `LANES` values, and `v < vectors`.
                        unsafe { _mm256_loadu_ps(grad.add((v * RC + r) * LANES + k * HALF)) }
                    });
                    macro_rules! add {
                        ($load:expr) => {
                            for (j, start) in starts.iter().enumerate() {
                                let xs = $load(start.wrapping_add(at));
                                for (a, dr) in acc.iter_mut().zip(&d) {
                                    a[j] = _mm256_fmadd_ps(*dr, xs, a[j]);
                                }
                            }
                        };
                    }
                    if byte == u8::MAX {
                        // SAFETY: every lane of the half is inside the image (contract).
                        add!(|at| unsafe { _mm256_loadu_ps(at) });
                    } else {
                        let mask = half_mask(bits, k);
                        // SAFETY: the lanes on in `mask` are inside the image (contract).
                        add!(|at| unsafe { _mm256_maskload_ps(at, mask) });
                    }
                }
            }
        }
        for (r, a) in acc.iter().enumerate() {
            for (j, v) in a.iter().enumerate() {
                // SAFETY: as for the loads.
                unsafe { _mm256_storeu_ps(sums.as_mut_ptr().add(slot(r, j)), *v) };
            }
        }
    }
}
