//! Matrix products on host memory through the `gemm` crate: [`Mat`], a matrix read through its
//! strides (so a transposed operand is a swap of strides, not a copy), and `c = α·a·b + β·c`.

/// A matrix in borrowed or owned memory, read through its row and column strides (in
/// elements, never negative): what the GEMM takes, so that a transposed operand is a
/// swap of strides rather than a copy.
pub(crate) struct Mat<'a> {
    pub(super) data: std::borrow::Cow<'a, [f32]>,
    pub(super) rows: usize,
    pub(super) cols: usize,
    pub(super) rs: usize,
    pub(super) cs: usize,
}

impl<'a> Mat<'a> {
    /// A row-major `rows × cols` matrix.
    pub(crate) fn row_major(data: std::borrow::Cow<'a, [f32]>, rows: usize, cols: usize) -> Self {
        assert_eq!(data.len(), rows * cols, "matrix of {rows} x {cols}");
        Self {
            data,
            rows,
            cols,
            rs: cols,
            cs: 1,
        }
    }

    /// A `rows × cols` matrix whose element `(r, c)` is `data[r · rs + c · cs]` (a block of
    /// a larger row-major array, or a transposed layout).
    pub(crate) fn strided(data: &'a [f32], [rows, cols]: [usize; 2], [rs, cs]: [usize; 2]) -> Self {
        Self {
            data: std::borrow::Cow::Borrowed(data),
            rows,
            cols,
            rs,
            cs,
        }
    }

    /// An array as the matrix `[product of the leading dims, last dim]`: borrowed when the
    /// array is row-major, or (two dimensions) any layout of non-negative strides that fills
    /// its memory; copied to row-major otherwise.
    pub(super) fn of(view: ndarray::ArrayView<'a, f32, ndarray::IxDyn>) -> Self {
        let shape = view.shape().to_vec();
        let cols = shape.last().copied().unwrap_or(1);
        let rows = shape[..shape.len().saturating_sub(1)].iter().product();
        if shape.len() == 2 && view.strides().iter().all(|&s| s >= 0) {
            let (rs, cs) = (view.strides()[0] as usize, view.strides()[1] as usize);
            let start = view.as_ptr();
            if let Some(data) = view.to_slice_memory_order() {
                // The first element is the lowest address when no stride is negative.
                debug_assert_eq!(data.as_ptr(), start);
                return Self {
                    data: std::borrow::Cow::Borrowed(data),
                    rows,
                    cols,
                    rs,
                    cs,
                };
            }
        }
        let data = match view.to_slice() {
            Some(values) => std::borrow::Cow::Borrowed(values),
            None => std::borrow::Cow::Owned(view.iter().copied().collect()),
        };
        Self::row_major(data, rows, cols)
    }

    /// The values in row-major order: borrowed when the matrix already is, else copied.
    pub(super) fn row_major_values(&self) -> std::borrow::Cow<'_, [f32]> {
        if self.cs == 1 && self.rs == self.cols {
            std::borrow::Cow::Borrowed(&self.data[..self.rows * self.cols])
        } else {
            std::borrow::Cow::Owned(
                (0..self.rows)
                    .flat_map(|r| (0..self.cols).map(move |c| r * self.rs + c * self.cs))
                    .map(|at| self.data[at])
                    .collect(),
            )
        }
    }

    /// The transpose (no copy).
    pub(crate) fn t(&self) -> Mat<'_> {
        Mat {
            data: std::borrow::Cow::Borrowed(&self.data),
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
        }
    }

    /// Whether every element lies inside the memory.
    pub(super) fn in_bounds(&self) -> bool {
        self.rows == 0
            || self.cols == 0
            || (self.rows - 1) * self.rs + (self.cols - 1) * self.cs < self.data.len()
    }
}

/// `c = a · b + beta · c`, `c` row-major `a.rows × b.cols`.
pub(crate) fn gemm(a: &Mat, b: &Mat, beta: f32, c: &mut [f32]) {
    gemm_alpha(1.0, a, b, beta, c)
}

/// `c = alpha · a · b + beta · c`, `c` row-major `a.rows × b.cols`.
fn gemm_alpha(alpha: f32, a: &Mat, b: &Mat, beta: f32, c: &mut [f32]) {
    assert_eq!(c.len(), a.rows * b.cols, "output of a matrix product");
    // SAFETY: `c` is a live, initialised, exclusively borrowed buffer of the output's size.
    unsafe { gemm_raw(alpha, a, b, beta, c.as_mut_ptr()) }
}

/// `alpha · a · b` in a new row-major `a.rows × b.cols` buffer that the GEMM writes
/// without its being zeroed first (the fills were 3% of a training step).
pub(crate) fn gemm_new(alpha: f32, a: &Mat, b: &Mat) -> Vec<f32> {
    let n = a.rows * b.cols;
    let mut c: Vec<f32> = Vec::with_capacity(n);
    // SAFETY: `c` has room for `n` values and nothing else refers to it. With `beta = 0`
    // (`read_dst` false) `gemm` never reads `dst` and writes every one of its `n`
    // elements: zeros when the inner dimension is empty, `alpha · a · b` otherwise
    // (gemm-common 0.19's `gemm_basic_generic`: `alpha` is set to zero, so the first depth
    // block stores `lhs · rhs` without loading `dst`). So all `n` are initialised before
    // `set_len`.
    unsafe {
        gemm_raw(alpha, a, b, 0.0, c.as_mut_ptr());
        c.set_len(n);
    }
    c
}

/// `c = alpha · a · b + beta · c` into `c`, row-major `a.rows × b.cols`; with `beta = 0`
/// the memory at `c` is only written.
///
/// # Safety
/// `c` must be valid for writes of `a.rows × b.cols` values, aliased by nothing else, and
/// initialised when `beta != 0`.
unsafe fn gemm_raw(alpha: f32, a: &Mat, b: &Mat, beta: f32, c: *mut f32) {
    assert_eq!(a.cols, b.rows, "inner dimensions of a matrix product");
    assert!(
        a.in_bounds() && b.in_bounds(),
        "matrix strides past the memory"
    );
    if a.rows == 0 || b.cols == 0 {
        return;
    }
    // `gemm` splits a product over rayon's pool when it is large enough to pay (it keeps small
    // products serial). Inside a kernel's own parallel loop (the attention node's heads) the
    // split tasks mostly run on the thread that made them, as rayon's work stealing finds the
    // other workers busy; a step run by `on_workers` is on a worker too, and its products
    // must still split.
    let parallelism = gemm::Parallelism::Rayon(0);
    // SAFETY: the asserts above keep every element that the strides reach inside `a`'s
    // and `b`'s memory; the caller vouches for `c`. `gemm` computes
    // `dst = alpha · dst + beta · lhs · rhs` (its alpha and beta are BLAS's swapped) and
    // reads `dst` only when told to.
    unsafe {
        gemm::gemm(
            a.rows,
            b.cols,
            a.cols,
            c,
            1,
            b.cols as isize,
            beta != 0.0,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            beta,
            alpha,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// A 2-d view as a matrix without copying (non-negative strides), or copied to row-major.
pub(crate) fn view2<'a>(view: ndarray::ArrayView2<'a, f32>) -> Mat<'a> {
    let (rows, cols) = view.dim();
    let strides = view.strides();
    if rows == 0 || cols == 0 || strides.iter().any(|&s| s < 0) {
        let values = view.iter().copied().collect();
        return Mat::row_major(std::borrow::Cow::Owned(values), rows, cols);
    }
    let (rs, cs) = (strides[0] as usize, strides[1] as usize);
    let span = (rows - 1) * rs + (cols - 1) * cs + 1;
    // SAFETY: with non-negative strides, the view's first element is its lowest address and
    // its last (rows - 1, cols - 1) its highest; every address between lies in the same
    // allocation (the array's buffer), is initialised, and is not written while the view
    // borrows the array.
    let data = unsafe { std::slice::from_raw_parts(view.as_ptr(), span) };
    Mat {
        data: std::borrow::Cow::Borrowed(data),
        rows,
        cols,
        rs,
        cs,
    }
}

/// `c = alpha · a · b` (row-major `c`, overwritten).
pub(crate) fn gemm_scaled(alpha: f32, a: &Mat, b: &Mat, c: &mut [f32]) {
    gemm_alpha(alpha, a, b, 0.0, c);
}

/// `c += alpha · a · b` (row-major `c`).
pub(crate) fn gemm_scaled_add(alpha: f32, a: &Mat, b: &Mat, c: &mut [f32]) {
    gemm_alpha(alpha, a, b, 1.0, c);
}
