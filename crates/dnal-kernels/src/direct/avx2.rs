//! The direct forward kernel in AVX2 (with FMA), for CPUs without AVX-512: each 16-position
//! vector of the AVX-512 kernel as two 8-lane halves, its 16-bit lane masks turned into
//! vector masks once per tap and step. AVX2 has 16 vector registers, so blocks hold at most 4
//! output channels (8 accumulators for one vector, or 2 channels x 2 vectors), and a tap
//! loops over a few channels at a time (`channel_run`).
use super::{ForwardBlock, LANES, MAX_CHANNELS};
use std::arch::x86_64::*;

/// Lanes per AVX2 vector: half of one of [`LANES`] positions.
const HALF: usize = LANES / 2;

/// The vector masks of the two halves of a 16-lane mask: lane `j` of half `k` is all ones
/// where bit `8k + j` is set.
#[target_feature(enable = "avx2")]
#[inline]
fn half_masks(bits: u16) -> [__m256i; 2] {
    let bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    std::array::from_fn(|k| {
        let byte = _mm256_set1_epi32(i32::from((bits >> (8 * k)) as u8));
        _mm256_cmpeq_epi32(_mm256_and_si256(byte, bit), bit)
    })
}

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
