//! The little dense linear algebra the models need: Cholesky factorisation of symmetric
//! positive-definite matrices (row-major), solving with it, and inverting with it.

/// Factorises `a` (n×n, row-major, symmetric positive definite) in place into its lower
/// Cholesky factor L (upper triangle left as garbage). Returns false if `a` is not positive
/// definite.
pub fn cholesky_in_place(a: &mut [f64], n: usize) -> bool {
    for j in 0..n {
        // Row j of L up to the diagonal.
        for i in 0..j {
            let (head, tail) = a.split_at_mut(j * n);
            let row_i = &head[i * n..i * n + i];
            let row_j = &tail[..i];
            let mut sum = tail[i];
            for k in 0..i {
                sum -= row_i[k] * row_j[k];
            }
            tail[i] = sum / head[i * n + i];
        }
        let row_j = &a[j * n..j * n + j];
        let mut diagonal = a[j * n + j];
        for value in row_j {
            diagonal -= value * value;
        }
        if diagonal <= 0.0 || !diagonal.is_finite() {
            return false;
        }
        a[j * n + j] = diagonal.sqrt();
    }
    true
}

/// Solves L Lᵀ x = b in place, with L from [`cholesky_in_place`].
pub fn cholesky_solve(l: &[f64], n: usize, b: &mut [f64]) {
    for i in 0..n {
        let mut sum = b[i];
        let row = &l[i * n..i * n + i];
        for k in 0..i {
            sum -= row[k] * b[k];
        }
        b[i] = sum / l[i * n + i];
    }
    for i in (0..n).rev() {
        let mut sum = b[i];
        for k in i + 1..n {
            sum -= l[k * n + i] * b[k];
        }
        b[i] = sum / l[i * n + i];
    }
}

/// Inverts a symmetric positive-definite matrix (row-major) through its Cholesky factor,
/// using up to `threads` threads. `None` if it is not positive definite.
pub fn spd_inverse(mut a: Vec<f64>, n: usize, threads: usize) -> Option<Vec<f64>> {
    if !cholesky_in_place(&mut a, n) {
        return None;
    }
    // Lᵀ row-major = L column-major: column k of L is contiguous, which the solves need.
    let mut lt = vec![0.0f64; n * n];
    for i in 0..n {
        for k in 0..=i {
            lt[k * n + i] = a[i * n + k];
        }
    }
    drop(a);
    // Column c of the inverse solves L Lᵀ x = e_c; columns are independent.
    let threads = threads.max(1);
    let mut inverse = vec![0.0f64; n * n];
    let chunk = n.div_ceil(threads).max(1);
    std::thread::scope(|scope| {
        for (part, rows) in inverse.chunks_mut(chunk * n).enumerate() {
            let lt = &lt;
            scope.spawn(move || {
                let first = part * chunk;
                let mut x = vec![0.0f64; n];
                for (offset, out) in rows.chunks_mut(n).enumerate() {
                    let c = first + offset;
                    solve_unit_column(lt, n, c, &mut x);
                    // The inverse is symmetric: its column c is its row c.
                    out.copy_from_slice(&x);
                }
            });
        }
    });
    Some(inverse)
}

/// Solves L Lᵀ x = e_c, with `lt` = Lᵀ row-major (so `lt[k*n..]` is column k of L).
fn solve_unit_column(lt: &[f64], n: usize, c: usize, x: &mut [f64]) {
    x.fill(0.0);
    // Forward: L y = e_c. y is 0 above c. Column-oriented so that the inner loop is
    // contiguous.
    x[c] = 1.0;
    for k in c..n {
        let column = &lt[k * n..(k + 1) * n];
        let value = x[k] / column[k];
        x[k] = value;
        if value != 0.0 {
            for (target, l) in x[k + 1..].iter_mut().zip(&column[k + 1..]) {
                *target -= l * value;
            }
        }
    }
    // Backward: Lᵀ x = y, row i of Lᵀ is column i of L (contiguous).
    for i in (0..n).rev() {
        let column = &lt[i * n..(i + 1) * n];
        let mut sum = x[i];
        for (l, value) in column[i + 1..].iter().zip(&x[i + 1..]) {
            sum -= l * value;
        }
        x[i] = sum / column[i];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spd() -> Vec<f64> {
        vec![4.0, 2.0, 0.6, 2.0, 5.0, 1.0, 0.6, 1.0, 3.0]
    }

    #[test]
    fn solves_and_inverts() {
        let a = spd();
        let mut l = a.clone();
        assert!(cholesky_in_place(&mut l, 3));
        let mut b = vec![1.0, 2.0, 3.0];
        cholesky_solve(&l, 3, &mut b);
        for i in 0..3 {
            let row: f64 = (0..3).map(|k| a[i * 3 + k] * b[k]).sum();
            assert!((row - (i as f64 + 1.0)).abs() < 1e-9, "row {i}: {row}");
        }
        let inverse = spd_inverse(a.clone(), 3, 2).expect("spd");
        for i in 0..3 {
            for j in 0..3 {
                let value: f64 = (0..3).map(|k| a[i * 3 + k] * inverse[k * 3 + j]).sum();
                let expected = if i == j { 1.0 } else { 0.0 };
                assert!((value - expected).abs() < 1e-9);
            }
        }
    }

    #[test]
    fn refuses_a_matrix_that_is_not_positive_definite() {
        let mut a = vec![1.0, 2.0, 2.0, 1.0];
        assert!(!cholesky_in_place(&mut a, 2));
    }
}
