//! The direct kernels in AVX-512: one 16-lane vector per 16 positions, lane masks in mask
//! registers.
use super::{DW_ROWS, DwBlock, ForwardBlock, LANES, MAX_CHANNELS, TILE_SUMS, TILE_VECTORS};
use std::arch::x86_64::*;

/// Channels `first + r`, `r < R`, of every vector of positions of `block`'s images, `V`
/// vectors at a time: the sum over patch rows `k = (c, t)` of `w[k][r]` times each
/// vector's shifted input, through the epilogue, stored into `out` (`[n, co, l]`). A last
/// step with fewer than `V` vectors left repeats the last one and stores it once.
///
/// # Safety
/// AVX-512F must be available; `block.taps` are the taps of the images' geometry (their
/// masks say which lanes of each tap are inside the image); `w` holds
/// `channels * taps * MAX_CHANNELS` values (the sizes are checked).
#[target_feature(enable = "avx512f")]
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
    assert!(R <= MAX_CHANNELS && V <= TILE_VECTORS);
    block.check::<R>(w, out.len());
    let (lo, hi) = (_mm512_set1_ps(bounds.0), _mm512_set1_ps(bounds.1));
    let dst = out.as_mut_ptr().cast::<f32>();
    for (at, valid) in block.steps::<V>() {
        let inputs: [*const f32; V] = std::array::from_fn(|h| {
            let (i, v) = at[h];
            x.as_ptr().wrapping_add(i * image_len + v * LANES)
        });
        let mask_rows: [*const u16; V] =
            std::array::from_fn(|h| taps.masks[at[h].1 * ntaps..][..ntaps].as_ptr());
        let mut acc = [[_mm512_setzero_ps(); V]; R];
        // Taps outside, channels inside: a tap's lane masks stay in mask registers and the
        // channel loop is one index step for the inputs and one for the weights.
        for (t, &offset) in offsets.iter().enumerate() {
            // SAFETY: each row holds `ntaps` masks and `t < ntaps`.
            let masks: [__mmask16; V] = std::array::from_fn(|h| unsafe { *mask_rows[h].add(t) });
            let starts: [*const f32; V] =
                std::array::from_fn(|h| inputs[h].wrapping_offset(offset));
            // Tap t's weights, `channels * MAX_CHANNELS` values; a pointer, so that the tap
            // loop cannot panic (a bounds check in it kept the accumulators in memory,
            // stored at every tap).
            let wt = w.as_ptr().wrapping_add(t * channels * MAX_CHANNELS);
            for c in 0..channels {
                let xs: [__m512; V] = std::array::from_fn(|h| {
                    // SAFETY: contract (lanes on are inside the image, `Taps::new`).
                    unsafe { _mm512_maskz_loadu_ps(masks[h], starts[h].wrapping_add(c * l)) }
                });
                // SAFETY: `w` holds `ntaps * channels * MAX_CHANNELS` values (checked), and
                // `R <= MAX_CHANNELS`.
                let wk = unsafe { wt.add(c * MAX_CHANNELS) };
                for (r, a) in acc.iter_mut().enumerate() {
                    // SAFETY: as above.
                    let s = _mm512_set1_ps(unsafe { *wk.add(r) });
                    for (ah, xh) in a.iter_mut().zip(&xs) {
                        *ah = _mm512_fmadd_ps(s, *xh, *ah);
                    }
                }
            }
        }
        for (r, a) in acc.iter().enumerate() {
            let (m, b) = (_mm512_set1_ps(scale[r]), _mm512_set1_ps(shift[r]));
            // max/min return their second operand when it is NaN, so NaN passes through.
            for (h, &(i, v)) in at.iter().enumerate().take(valid) {
                let start = ((i * co + first + r) * l) + v * LANES;
                let lanes: __mmask16 = taps.lanes[v];
                let mut y = _mm512_fmadd_ps(a[h], m, b);
                if let Some(res) = residual {
                    // SAFETY: `residual` is as long as `out`, and the lanes on from
                    // `start` are inside channel `first + r < co` of image `i < images`
                    // (checked above).
                    let r = unsafe { _mm512_maskz_loadu_ps(lanes, res.as_ptr().add(start)) };
                    y = _mm512_add_ps(y, r);
                }
                let y = _mm512_min_ps(hi, _mm512_max_ps(lo, y));
                // SAFETY: as for the residual.
                unsafe { _mm512_mask_storeu_ps(dst.add(start), lanes, y) };
            }
        }
    }
}

/// For each tile of [`DW_ROWS`] patch rows, adds to its partial sums (`[r][j]`, 16 lanes
/// each) the products of `dy[c0 + r]` and row `j`'s shifted input over the positions of
/// the block's images, for `r < RC`.
///
/// # Safety
/// AVX-512F must be available; `block.x` and `block.dy` hold whole images of `block.g`
/// and their output gradients; every lane on in the masks of a row's tap is inside the
/// image at the row's offset.
#[target_feature(enable = "avx512f")]
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
    block.check::<RC>(partial.len());
    let slot = |r: usize, j: usize| (r * DW_ROWS + j) * LANES;
    for (tile, sums) in rows
        .chunks_exact(DW_ROWS)
        .zip(partial.chunks_exact_mut(TILE_SUMS))
    {
        let taps: [usize; DW_ROWS] = std::array::from_fn(|j| tile[j].1);
        let mut acc: [[__m512; DW_ROWS]; RC] = std::array::from_fn(|r| {
            // SAFETY: `sums` holds `TILE_SUMS` values, slot + 16 inside.
            std::array::from_fn(|j| unsafe { _mm512_loadu_ps(sums.as_ptr().add(slot(r, j))) })
        });
        let mut grad = dy.as_ptr();
        for i in 0..images {
            let image = x[i * image_len..][..image_len].as_ptr();
            let starts: [*const f32; DW_ROWS] =
                std::array::from_fn(|j| image.wrapping_offset(tile[j].0));
            let mut m = masks.as_ptr();
            for v in 0..vectors {
                let at = v * LANES;
                let d: [__m512; RC] = std::array::from_fn(|r| {
                    // SAFETY: `dy` holds `images * vectors` groups of `RC` vectors (checked),
                    // and `grad` is at group `i * vectors + v`.
                    unsafe { _mm512_loadu_ps(grad.add(r * LANES)) }
                });
                grad = grad.wrapping_add(RC * LANES);
                for (j, start) in starts.iter().enumerate() {
                    // SAFETY: `m` is vector v's row of masks (`tap_stride` values) and
                    // lanes on in a tap's mask are inside the image (contract).
                    let xs =
                        unsafe { _mm512_maskz_loadu_ps(*m.add(taps[j]), start.wrapping_add(at)) };
                    for (a, dr) in acc.iter_mut().zip(&d) {
                        a[j] = _mm512_fmadd_ps(*dr, xs, a[j]);
                    }
                }
                m = m.wrapping_add(tap_stride);
            }
        }
        for (r, a) in acc.iter().enumerate() {
            for (j, v) in a.iter().enumerate() {
                // SAFETY: as for the loads.
                unsafe { _mm512_storeu_ps(sums.as_mut_ptr().add(slot(r, j)), *v) };
            }
        }
    }
}
