//! AVX2 vector masks for the 16-lane masks of the direct and depthwise kernels' taps: AVX2
//! has no mask registers, so a 16-position vector is two 8-lane halves, and each half's 8-bit
//! mask becomes a vector mask (for `_mm256_maskload_ps`) through a table.
#![allow(unsafe_code)]

use std::arch::x86_64::*;

/// Lanes per AVX2 vector: half of a 16-lane mask.
pub(crate) const HALF: usize = 8;

/// The vector mask of each 8-bit lane mask: lane `j` all ones where bit `j` is set.
static BYTE_MASKS: [[i32; HALF]; 256] = {
    let mut table = [[0; HALF]; 256];
    let mut bits = 0;
    while bits < 256 {
        let mut j = 0;
        while j < HALF {
            if bits & (1 << j) != 0 {
                table[bits][j] = -1;
            }
            j += 1;
        }
        bits += 1;
    }
    table
};

/// The vector mask of half `k` of a 16-lane mask.
#[target_feature(enable = "avx2")]
#[inline]
pub(crate) fn half_mask(bits: u16, k: usize) -> __m256i {
    let byte = usize::from((bits >> (8 * k)) as u8);
    // SAFETY: the table's rows are 8 values.
    unsafe { _mm256_loadu_si256(BYTE_MASKS[byte].as_ptr().cast()) }
}

/// The vector masks of the two halves of a 16-lane mask: lane `j` of half `k` is all ones
/// where bit `8k + j` is set.
#[target_feature(enable = "avx2")]
#[inline]
pub(crate) fn half_masks(bits: u16) -> [__m256i; 2] {
    [half_mask(bits, 0), half_mask(bits, 1)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_half_turns_on_the_lanes_of_its_bits() {
        if !crate::simd::runs(crate::simd::Isa::Avx2) {
            return;
        }
        for bits in [0u16, 1, 0x8001, 0x00ff, 0xff00, 0xa5c3, u16::MAX] {
            // SAFETY: the CPU has AVX2 (checked above).
            let halves = unsafe { half_masks(bits) };
            for (k, half) in halves.iter().enumerate() {
                let mut lanes = [0i32; HALF];
                // SAFETY: `lanes` holds one vector.
                unsafe { _mm256_storeu_si256(lanes.as_mut_ptr().cast(), *half) };
                for (j, &lane) in lanes.iter().enumerate() {
                    let on = bits & (1 << (8 * k + j)) != 0;
                    assert_eq!(
                        lane,
                        if on { -1 } else { 0 },
                        "bits {bits:#x}, half {k}, lane {j}"
                    );
                }
            }
        }
    }
}
