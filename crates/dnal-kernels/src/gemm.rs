//! Safe strided matrix views over `f32` slices and the one matrix product the kernels need,
//! `dst (+)= lhs x rhs`, computed by the `gemm` crate (the library flex's own `matmul` uses).
//!
//! Calling `gemm` directly instead of `Flex::float_matmul` lets the convolution write each
//! image's product straight into its place in the output tensor, accumulate the weight
//! gradient in place and reuse its buffers. The call into `gemm` is unsafe; every view is checked
//! to lie inside its slice when it is made, so the call is sound.
#![allow(unsafe_code)]

use std::mem::MaybeUninit;

/// A read-only `rows x cols` matrix: element `(i, j)` is `data[i * rs + j * cs]`.
#[derive(Debug, Clone, Copy)]
pub struct MatRef<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

/// Panics unless every element of a `rows x cols` view with strides `rs`, `cs` lies in `len`
/// values.
fn check_fits(len: usize, rows: usize, cols: usize, rs: usize, cs: usize) {
    let fits = rows == 0 || cols == 0 || (rows - 1) * rs + (cols - 1) * cs < len;
    assert!(
        fits,
        "a {rows}x{cols} view with strides ({rs}, {cs}) does not fit in {len} values"
    );
}

impl<'a> MatRef<'a> {
    /// A strided view; panics if it reaches past the end of `data`.
    pub fn new(data: &'a [f32], rows: usize, cols: usize, rs: usize, cs: usize) -> Self {
        check_fits(data.len(), rows, cols, rs, cs);
        Self {
            data,
            rows,
            cols,
            rs,
            cs,
        }
    }

    /// The row-major `rows x cols` matrix at the start of `data`.
    pub fn row_major(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self::new(data, rows, cols, cols, 1)
    }

    /// The transpose (a view of the same values).
    pub fn t(self) -> Self {
        Self {
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
            ..self
        }
    }
}

/// A writable row-major `rows x cols` matrix with row stride `rs >= cols` (so that no two
/// elements share a value).
#[derive(Debug)]
pub struct MatMut<'a> {
    data: &'a mut [f32],
    rows: usize,
    cols: usize,
    rs: usize,
}

impl<'a> MatMut<'a> {
    /// A view with row stride `rs`; panics if `rs < cols` or it reaches past the end of `data`.
    pub fn new(data: &'a mut [f32], rows: usize, cols: usize, rs: usize) -> Self {
        assert!(rs >= cols || rows <= 1, "row stride {rs} < {cols} columns");
        check_fits(data.len(), rows, cols, rs, 1);
        Self {
            data,
            rows,
            cols,
            rs,
        }
    }

    /// The row-major `rows x cols` matrix at the start of `data`.
    pub fn row_major(data: &'a mut [f32], rows: usize, cols: usize) -> Self {
        Self::new(data, rows, cols, cols)
    }
}

/// `dst = lhs x rhs`, or `dst += lhs x rhs` when `accumulate`. `parallel` lets `gemm` split
/// the product over rayon's threads (for callers that are not already parallel).
pub fn matmul(dst: MatMut, lhs: MatRef, rhs: MatRef, accumulate: bool, parallel: bool) {
    assert_eq!(lhs.cols, rhs.rows, "inner dimensions differ");
    assert_eq!(
        (dst.rows, dst.cols),
        (lhs.rows, rhs.cols),
        "output shape differs"
    );
    if dst.rows == 0 || dst.cols == 0 {
        return;
    }
    if lhs.cols == 0 {
        if !accumulate {
            for row in dst.data.chunks_mut(dst.rs.max(1)).take(dst.rows) {
                row[..dst.cols].fill(0.0);
            }
        }
        return;
    }
    // SAFETY: `MatMut::new` checked that every element of the view lies inside its slice,
    // whose values are initialised (read when accumulating); the elements are distinct
    // (`rs >= cols`, column stride 1) and borrowed mutably, so they alias neither input.
    unsafe {
        product(
            dst.data.as_mut_ptr(),
            dst.rs,
            lhs,
            rhs,
            accumulate,
            parallel,
        )
    }
}

/// `dst = lhs x rhs` into the row-major `lhs.rows x rhs.cols` matrix `dst` (exactly that many
/// values), whose values need not be initialised: every one is written, none is read. For
/// outputs that are allocated and then filled, without zeroing them first. Returns `dst`,
/// initialised.
pub fn matmul_uninit<'a>(
    dst: &'a mut [MaybeUninit<f32>],
    lhs: MatRef,
    rhs: MatRef,
    parallel: bool,
) -> &'a mut [f32] {
    assert_eq!(lhs.cols, rhs.rows, "inner dimensions differ");
    let (m, n) = (lhs.rows, rhs.cols);
    assert_eq!(dst.len(), m * n, "output shape differs");
    if lhs.cols == 0 {
        dst.fill(MaybeUninit::new(0.0));
    } else if m > 0 && n > 0 {
        // SAFETY: `dst` holds exactly the `m x n` row-major elements, borrowed mutably, so
        // they alias neither input; `gemm` without `read_dst` writes every one and reads none.
        unsafe { product(dst.as_mut_ptr().cast(), n, lhs, rhs, false, parallel) }
    }
    // SAFETY: every element was written above (or there are none).
    unsafe { &mut *(dst as *mut [MaybeUninit<f32>] as *mut [f32]) }
}

/// `gemm`'s product into the row-major `lhs.rows x rhs.cols` matrix at `dst` with row stride
/// `rs` (`dst = lhs x rhs`, or `+=` when `accumulate`), for `lhs.cols > 0`.
///
/// # Safety
/// The matrix's elements at `dst` must be valid for writes, distinct and not alias `lhs` or
/// `rhs`; when `accumulate`, initialised.
unsafe fn product(
    dst: *mut f32,
    rs: usize,
    lhs: MatRef,
    rhs: MatRef,
    accumulate: bool,
    parallel: bool,
) {
    let (m, n, k) = (lhs.rows, rhs.cols, lhs.cols);
    let parallelism = if parallel {
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    };
    let stride = |s: usize| s as isize;
    // SAFETY: `MatRef::new` checked that every element of the two input views lies inside its
    // slice; the destination is as the caller promises.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            stride(rs),
            accumulate,
            lhs.data.as_ptr(),
            stride(lhs.cs),
            stride(lhs.rs),
            rhs.data.as_ptr(),
            stride(rhs.cs),
            stride(rhs.rs),
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|p| a[i * k + p] * b[p * n + j]).sum();
            }
        }
        c
    }

    #[test]
    fn products_of_views_match_the_naive_product() {
        let (m, k, n) = (5, 7, 3);
        let a: Vec<f32> = (0..m * k).map(|i| (i % 11) as f32 - 5.0).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i % 7) as f32 * 0.5).collect();
        let want = naive(&a, &b, m, k, n);
        let mut c = vec![0.0; m * n];
        matmul(
            MatMut::row_major(&mut c, m, n),
            MatRef::row_major(&a, m, k),
            MatRef::row_major(&b, k, n),
            false,
            false,
        );
        assert_eq!(c, want);
        // Accumulating, through a transposed view of b^T, into a wider destination.
        let bt: Vec<f32> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect();
        let mut wide = vec![1.0; m * (n + 2)];
        matmul(
            MatMut::new(&mut wide, m, n, n + 2),
            MatRef::row_major(&a, m, k),
            MatRef::row_major(&bt, n, k).t(),
            true,
            true,
        );
        for i in 0..m {
            for j in 0..n + 2 {
                let expect = if j < n { want[i * n + j] + 1.0 } else { 1.0 };
                assert_eq!(wide[i * (n + 2) + j], expect, "({i}, {j})");
            }
        }
    }

    #[test]
    fn a_product_into_unwritten_memory_writes_every_value() {
        // Sizes past the small-product path, and a depth `gemm` takes in several blocks.
        for (m, k, n) in [(5, 7, 3), (70, 300, 40), (33, 1100, 17)] {
            let a: Vec<f32> = (0..m * k).map(|i| (i % 11) as f32 - 5.0).collect();
            let b: Vec<f32> = (0..k * n).map(|i| (i % 7) as f32 * 0.5).collect();
            let want = naive(&a, &b, m, k, n);
            for parallel in [false, true] {
                // Memory holding NaN where the product goes: a value read instead of
                // overwritten would stay NaN.
                let mut dst = vec![MaybeUninit::new(f32::NAN); m * n];
                let lhs = MatRef::row_major(&a, m, k);
                let got = matmul_uninit(&mut dst, lhs, MatRef::row_major(&b, k, n), parallel);
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (g - w).abs() <= 1e-3 * w.abs().max(1.0),
                        "{m}x{k}x{n} at {i}"
                    );
                }
            }
        }
        let mut dst = vec![MaybeUninit::new(f32::NAN); 6];
        let none: [f32; 0] = [];
        let got = matmul_uninit(
            &mut dst,
            MatRef::row_major(&none, 2, 0),
            MatRef::row_major(&none, 0, 3),
            false,
        );
        assert_eq!(got, [0.0; 6]);
    }

    #[test]
    #[should_panic(expected = "does not fit")]
    fn a_view_past_the_end_of_its_slice_is_refused() {
        let data = [0.0f32; 11];
        let _ = MatRef::new(&data, 3, 4, 4, 1);
    }
}
