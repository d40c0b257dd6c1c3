//! How the fused kernels walk the logits `[batch, H, rows, keys]`: one task per query row (all
//! its batch elements and heads), in parallel over rows (rayon), with the matching rows of the
//! bias map (`[1, H, rows, keys]` shared by the batch, or `[batch, H, rows, keys]` one per
//! sequence) and the number of keys the row can see.

use rayon::prelude::*;

use crate::encoding::Span;

/// Splits `[planes, lq, lk]` values into one group per query row: group `i` holds row `i` of
/// every plane, in plane order. Groups are disjoint, so rows can be processed in parallel.
pub(super) fn rows_by_query(data: &mut [f32], lq: usize, lk: usize) -> Vec<Vec<&mut [f32]>> {
    let planes = data.len() / (lq * lk).max(1);
    let mut groups: Vec<Vec<&mut [f32]>> = (0..lq).map(|_| Vec::with_capacity(planes)).collect();
    if lk == 0 {
        return groups;
    }
    for plane in data.chunks_mut(lq * lk) {
        for (i, row) in plane.chunks_mut(lk).enumerate() {
            groups[i].push(row);
        }
    }
    groups
}

/// Row `i` of every plane of a bias map `[1 or batch, H, lq, lk]`, in plane order.
pub(super) fn bias_rows(bias: Option<&[f32]>, i: usize, lq: usize, lk: usize) -> Vec<&[f32]> {
    match bias {
        Some(m) if lq * lk > 0 => (0..m.len() / (lq * lk))
            .map(|p| &m[(p * lq + i) * lk..][..lk])
            .collect(),
        _ => Vec::new(),
    }
}

/// The `H` rows of batch element `bi` among the rows of a bias map `[1 or batch, H, ..]` (the
/// only ones when the map is shared by the batch); empty without a bias.
pub(super) fn batch_rows<T>(rows: &[T], h: usize, bi: usize) -> &[T] {
    if rows.is_empty() || h == 0 {
        return rows;
    }
    let maps = rows.len() / h;
    &rows[(bi % maps) * h..][..h]
}

/// Index of the bias row that plane `plane` (batch element `plane / H`, head `plane % H`) of the
/// logits reads among `rows` bias rows (`H` for a shared map, `batch · H` for one per sequence).
pub(super) fn bias_plane(plane: usize, h: usize, rows: usize) -> usize {
    let maps = (rows / h.max(1)).max(1);
    (plane / h.max(1) % maps) * h + plane % h.max(1)
}

/// Keys `0..visible` of row `i` can be attended to; the rest are masked afterwards.
pub(super) fn visible_keys(span: &Span, i: usize, lk: usize) -> usize {
    if span.causal {
        (span.query_start + i + 1).min(lk)
    } else {
        lk
    }
}

/// Runs `row(scratch, i, planes, bias rows, visible keys)` for every query row `i` of
/// `logits: [batch, H, rows, keys]`, in parallel over query rows, with one `init()` scratch per
/// worker; `planes` holds the row of every (batch element, head) plane in plane order, updated
/// in place, and the bias rows are the row of every plane of the map (`bias` is `[1 or batch,
/// H, rows, keys]`: `H` rows for a map shared by the batch, `batch · H` for one per sequence;
/// [`batch_rows`] picks a batch element's).
pub(super) fn each_row<S>(
    logits: &mut [f32],
    [lq, lk]: [usize; 2],
    bias: Option<&[f32]>,
    span: &Span,
    init: impl Fn() -> S + Send + Sync,
    row: impl Fn(&mut S, usize, &mut [&mut [f32]], &[&[f32]], usize) + Send + Sync,
) {
    rows_by_query(logits, lq, lk)
        .into_par_iter()
        .enumerate()
        .for_each_init(init, |scratch, (i, mut planes)| {
            let bias = bias_rows(bias, i, lq, lk);
            row(scratch, i, &mut planes, &bias, visible_keys(span, i, lk));
        });
}
