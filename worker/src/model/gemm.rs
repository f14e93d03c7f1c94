//! A bounds-checked front for the `gemm` crate's f32 matrix multiply (the one candle's CPU backend
//! uses), for fused kernels that multiply many small matrices inside their own parallel loop.
//!
//! `gemm::gemm` takes raw pointers and strides; [`Mat`] checks at construction that every element
//! its shape and strides reach lies inside its slice, and [`matmul`] checks the destination the same
//! way, so the one `unsafe` call below cannot read or write out of bounds.
#![allow(unsafe_code)]

/// A strided, read-only matrix: element `(r, c)` is `data[r * row_stride + c * col_stride]`.
#[derive(Debug, Clone, Copy)]
pub struct Mat<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_stride: usize,
}

impl<'a> Mat<'a> {
    /// A view of `data`; panics if the shape and strides reach past its end.
    pub fn new(data: &'a [f32], (rows, cols): (usize, usize), (row_stride, col_stride): (usize, usize)) -> Self {
        if rows > 0 && cols > 0 {
            let last = (rows - 1) * row_stride + (cols - 1) * col_stride;
            assert!(
                last < data.len(),
                "a {rows} x {cols} matrix with strides ({row_stride}, {col_stride}) reaches {last}, past {}",
                data.len()
            );
        }
        Self { data, rows, cols, row_stride, col_stride }
    }

    /// The first `rows` x `cols` of a row-major matrix with `ld` values per row.
    pub fn rows(data: &'a [f32], rows: usize, cols: usize, ld: usize) -> Self {
        Self::new(data, (rows, cols), (ld, 1))
    }

    /// The transpose (no copy).
    pub fn t(self) -> Self {
        Self { rows: self.cols, cols: self.rows, row_stride: self.col_stride, col_stride: self.row_stride, ..self }
    }
}

/// `dst = a b` (or `dst += a b` when `accumulate`), `dst` row-major with `ld` values per row; one
/// thread (the caller parallelises). Panics on mismatched shapes or a destination too short.
pub fn matmul(dst: &mut [f32], ld: usize, a: Mat<'_>, b: Mat<'_>, accumulate: bool) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(k, b.rows, "inner dimensions differ: {m} x {k} times {} x {n}", b.rows);
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        ld >= n && (m - 1) * ld + n <= dst.len(),
        "a {m} x {n} destination with {ld} per row, {} values",
        dst.len()
    );
    if k == 0 {
        if !accumulate {
            (0..m).for_each(|r| dst[r * ld..r * ld + n].fill(0.0));
        }
        return;
    }
    // SAFETY: `Mat::new` checked that every element of `a` and `b` that the shapes and strides
    // address lies inside their slices, and the assertion above does the same for `dst`; `dst` is
    // borrowed mutably, so it cannot alias `a` or `b`.
    unsafe {
        ::gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            ld as isize,
            accumulate,
            a.data.as_ptr(),
            a.col_stride as isize,
            a.row_stride as isize,
            b.data.as_ptr(),
            b.col_stride as isize,
            b.row_stride as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            ::gemm::Parallelism::None,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: Mat<'_>, b: Mat<'_>) -> Vec<f32> {
        let at = |m: Mat<'_>, r: usize, c: usize| m.data[r * m.row_stride + c * m.col_stride];
        let mut out = vec![0f32; a.rows * b.cols];
        for r in 0..a.rows {
            for c in 0..b.cols {
                out[r * b.cols + c] = (0..a.cols).map(|i| at(a, r, i) * at(b, i, c)).sum();
            }
        }
        out
    }

    #[test]
    fn strided_and_transposed_products_match_the_definition() {
        let data: Vec<f32> = (0..200).map(|i| ((i * 37) % 23) as f32 - 11.0).collect();
        // a: 5 x 7 rows of a 10-wide matrix; b: the transpose of a 3 x 7 block.
        let a = Mat::rows(&data, 5, 7, 10);
        let b = Mat::rows(&data[60..], 3, 7, 9).t();
        let mut dst = vec![1f32; 5 * 4];
        matmul(&mut dst, 4, a, b, false);
        let want = naive(a, b);
        for r in 0..5 {
            assert_eq!(&dst[r * 4..r * 4 + 3], &want[r * 3..r * 3 + 3]);
            assert_eq!(dst[r * 4 + 3], 1.0, "the padding column is untouched");
        }
        matmul(&mut dst, 4, a, b, true);
        for r in 0..5 {
            for c in 0..3 {
                assert_eq!(dst[r * 4 + c], 2.0 * want[r * 3 + c]);
            }
        }
    }

    #[test]
    #[should_panic(expected = "past")]
    fn a_view_past_its_slice_is_refused() {
        let data = [0f32; 20];
        let _ = Mat::rows(&data, 3, 7, 7);
    }
}
