//! The distance-table lookup against `select`.

use super::*;

/// The distance-table lookup under autodiff against Burn's `select` of the same table (the
/// tensor path): values, and the table's gradient under a weighted sum (pairs at the same
/// distance add up), for a causal chunk after earlier keys, a non-causal block (both signs
/// of the offset) and sparse randomized positions; a distance past the table hands back.
#[test]
fn distance_table_lookup_is_select_in_values_and_gradients() {
    let _graphs = crate::util::autodiff_test_lock();
    type A = Autodiff<NdArray<f32>>;
    let device = Default::default();
    let normal = Distribution::Normal(0.0, 1.0);
    let h = 3;
    for (case, rows, cols) in [
        (
            "causal chunk",
            (4..9).collect::<Vec<i64>>(),
            (0..9).collect::<Vec<i64>>(),
        ),
        ("non-causal", (0..6).collect(), (0..6).collect()),
        (
            "randomized",
            vec![3, 10, 17, 40],
            vec![0, 3, 10, 17, 22, 40],
        ),
    ] {
        let n = 41;
        let table = Tensor::<A, 2>::random([h, n], normal, &device).require_grad();
        let ours = distance_table_bias(table.clone(), &rows, &cols)
            .expect("a kernel on Autodiff<NdArray<f32>>");
        let (lq, lk) = (rows.len(), cols.len());
        let index: Vec<i64> = rows
            .iter()
            .flat_map(|&p| cols.iter().map(move |&c| (p - c).abs()))
            .collect();
        let index = Tensor::<A, 1, Int>::from_data(TensorData::new(index, [lq * lk]), &device);
        let want = table.clone().select(1, index).reshape([1, h, lq, lk]);
        assert_eq!(
            max_diff(ours.clone().inner(), want.clone().inner()),
            0.0,
            "{case}"
        );
        let w = Tensor::<A, 4>::random([1, h, lq, lk], normal, &device);
        let g1 = (ours * w.clone()).sum().backward();
        let g2 = (want * w).sum().backward();
        let d = max_diff(table.grad(&g1).unwrap(), table.grad(&g2).unwrap());
        assert!(d < 1e-5, "{case}: the table's gradient differs by {d}");
    }
    let table = Tensor::<A, 2>::zeros([h, 4], &device);
    assert!(distance_table_bias(table, &[0, 1, 2, 3, 4], &[0, 1, 2, 3, 4]).is_none());
}
