//! The plain reference: DAPE V1 and V2 as Burn tensor operations, on every backend. The fused
//! ndarray kernels (`fused/`) and PyTorch's (LibTorch) are tested against these functions.
//!
//! Both run channel-first, as matrix products over the `seq_q · seq_k` (query, key) pairs, so
//! no `[batch, seq_q, seq_k, ·]` transpose is ever materialised:
//!
//! * V1: `hidden = W1_A · A + W1_B · B + b1` (`[D, H] @ [batch, H, pairs]`; the
//!   batch-independent bias half once, not once per batch row), `f = W2 · LeakyReLU(hidden) + b2`.
//! * V2: each `1 × k` convolution is `Σ_t W_t @ shift_t(x)` over the key-shifted, zero-padded
//!   map ([`key_conv`]), on `tril`'d inputs (and hidden channels, with `mask_future_hidden`).
//!
//! `f` is pointwise in the query row, so both run over blocks of query rows whose hidden tensor
//! `[batch, D, rows · seq_k]` stays under a budget ([`HIDDEN_BLOCK`] by default): exact, with
//! memory beyond the logits bounded at any length.

use burn::prelude::*;
use burn::tensor::activation::leaky_relu;

use super::{Dape, DapeV2, HIDDEN_BLOCK};
use crate::encoding::Span;

impl<B: Backend> Dape<B> {
    /// [`Self::forward_in_blocks`] on Burn's tensor path on every backend: the reference that
    /// the fused ndarray and LibTorch paths are tested against.
    pub fn forward_tensor_path(
        &self,
        logits: Tensor<B, 4>,
        span: &Span,
        budget: usize,
    ) -> Tensor<B, 4> {
        let bmap = self
            .bias
            .as_ref()
            .map(|bias| bias.forward(span, &logits.device()));
        self.blocked(logits, bmap, budget)
    }

    /// The tensor path over the base bias's map `bmap` (`[1, H, seq_q, seq_k]`).
    pub(super) fn blocked(
        &self,
        logits: Tensor<B, 4>,
        bmap: Option<Tensor<B, 4>>,
        budget: usize,
    ) -> Tensor<B, 4> {
        let [b, _, lq, lk] = logits.dims();
        let d = self.mlp_in.weight.dims()[1];
        let f = by_row_blocks(budget, b * d * lk, lq, |r0, rows| {
            let a = narrow_rows(&logits, r0, rows, lq);
            let m = bmap.as_ref().map(|m| narrow_rows(m, r0, rows, lq));
            self.correction(a, m)
        });
        match bmap {
            Some(m) => logits + m + f,
            None => logits + f,
        }
    }

    /// [`Self::forward_with_map`] on Burn's tensor path, in blocks of rows as
    /// [`Self::forward`], with `f` at every key: the reference of the fused paths.
    pub fn forward_with_map_tensor_path(
        &self,
        logits: Tensor<B, 4>,
        map: Tensor<B, 4>,
    ) -> Tensor<B, 4> {
        let [b, _, lq, lk] = logits.dims();
        let d = self.mlp_in.weight.dims()[1];
        let f = by_row_blocks(HIDDEN_BLOCK, b * d * lk, lq, |r0, rows| {
            let a = narrow_rows(&logits, r0, rows, lq);
            let m = narrow_rows(&map, r0, rows, lq);
            self.correction(a, Some(m))
        });
        logits + map + f
    }

    /// `f([logits ‖ bias])` for one block of rows: `[batch, H, rows, seq_k]`.
    pub(super) fn correction(
        &self,
        logits: Tensor<B, 4>,
        bias: Option<Tensor<B, 4>>,
    ) -> Tensor<B, 4> {
        let [b, h, lq, lk] = logits.dims();
        let pairs = lq * lk;
        let weight = self.mlp_in.weight.val(); // [C, D]
        let d = weight.dims()[1];
        let w_logits = weight.clone().narrow(0, 0, h).transpose().unsqueeze::<3>(); // [1, D, H]
        let hidden = w_logits.matmul(logits.reshape([b, h, pairs])); // [b, D, pairs]

        // The part of the first layer that reads the bias, `W_B · bias + b_1`, is `[1, D, pairs]`
        // for a batch-independent bias: it is formed once and added to the batch in a single
        // pass (`[batch, D, pairs]` for a bias per sequence).
        let term = bias.map(|bmap| {
            let w_bias = weight.narrow(0, h, h).transpose().unsqueeze::<3>();
            let batch = bmap.dims()[0];
            w_bias.matmul(bmap.reshape([batch, h, pairs]))
        });
        let b1 = self
            .mlp_in
            .bias
            .as_ref()
            .map(|b1| b1.val().reshape([1, d, 1]));
        let hidden = plus_shared(hidden, term, b1);
        let hidden = leaky_relu(hidden, self.negative_slope);
        let w_out = self.mlp_out.weight.val().transpose().unsqueeze::<3>(); // [1, H, D]
        let mut f = w_out.matmul(hidden); // [b, H, pairs]
        if let Some(b2) = &self.mlp_out.bias {
            f = f + b2.val().reshape([1, h, 1]);
        }
        f.reshape([b, h, lq, lk])
    }
}

/// `x + (term + bias)`: the batch-independent parts (`[1, ...]`, broadcast over the batch) are
/// summed first, so the batch-sized tensor takes a single addition.
fn plus_shared<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    term: Option<Tensor<B, D>>,
    bias: Option<Tensor<B, D>>,
) -> Tensor<B, D> {
    let shared = match (term, bias) {
        (Some(t), Some(b)) => Some(t + b),
        (t, b) => t.or(b),
    };
    match shared {
        Some(s) => x + s,
        None => x,
    }
}

/// Runs `block(first_row, rows)` over consecutive blocks of the `seq_q` query rows, each with at
/// most `budget / per_row` rows (at least one), and concatenates the results along the row axis.
fn by_row_blocks<B: Backend>(
    budget: usize,
    per_row: usize,
    seq_q: usize,
    mut block: impl FnMut(usize, usize) -> Tensor<B, 4>,
) -> Tensor<B, 4> {
    let rows = (budget / per_row.max(1)).max(1);
    if rows >= seq_q {
        return block(0, seq_q);
    }
    let mut parts = Vec::with_capacity(seq_q.div_ceil(rows));
    let mut r0 = 0;
    while r0 < seq_q {
        let n = rows.min(seq_q - r0);
        parts.push(block(r0, n));
        r0 += n;
    }
    Tensor::cat(parts, 2)
}

/// Rows `r0..r0 + rows` of `[·, ·, seq_q, ·]` (the tensor itself when that is all of it).
fn narrow_rows<B: Backend, const D: usize, K>(
    x: &Tensor<B, D, K>,
    r0: usize,
    rows: usize,
    seq_q: usize,
) -> Tensor<B, D, K>
where
    K: burn::tensor::TensorKind<B> + burn::tensor::BasicOps<B>,
{
    if r0 == 0 && rows == seq_q {
        x.clone()
    } else {
        x.clone().narrow(D - 2, r0, rows)
    }
}

impl<B: Backend> DapeV2<B> {
    /// [`Self::forward`] on Burn's tensor path on every backend, in blocks of rows whose hidden
    /// tensor stays under `budget` elements: the reference that the fused ndarray kernels are
    /// tested against.
    pub fn forward_tensor_path(
        &self,
        logits: Tensor<B, 4>,
        span: &Span,
        budget: usize,
    ) -> Tensor<B, 4> {
        self.forward_blocked(logits, span, budget)
    }

    /// [`Self::forward`] with blocks of rows whose hidden tensor stays under `budget` elements.
    pub(super) fn forward_blocked(
        &self,
        logits: Tensor<B, 4>,
        span: &Span,
        budget: usize,
    ) -> Tensor<B, 4> {
        let device = logits.device();
        let [b, _, lq, lk] = logits.dims();
        let d = self.conv_in.weight.dims()[0];
        let future = span
            .has_future()
            .then(|| span.future_mask::<B>(&device).unsqueeze::<4>()); // [1, 1, lq, lk]
        let bmap = self.bias.as_ref().map(|bias| bias.forward(span, &device)); // [1, h, lq, lk]

        // Rows are independent (the convolutions run along keys), so blocks of rows are exact.
        let f = by_row_blocks(budget, b * d * lk, lq, |r0, rows| {
            self.correction(
                narrow_rows(&logits, r0, rows, lq),
                bmap.as_ref().map(|m| narrow_rows(m, r0, rows, lq)),
                future.as_ref().map(|m| narrow_rows(m, r0, rows, lq)),
            )
        });
        match bmap {
            Some(m) => logits + m + f,
            None => logits + f,
        }
    }

    /// `f(tril([logits ‖ bias]))` for one block of rows: `[batch, H, rows, seq_k]`; `future` is
    /// the block's `[1, 1, rows, seq_k]` mask of keys after each row.
    pub(super) fn correction(
        &self,
        logits: Tensor<B, 4>,
        bias: Option<Tensor<B, 4>>,
        future: Option<Tensor<B, 4, Bool>>,
    ) -> Tensor<B, 4> {
        let [_, h, lq, lk] = logits.dims();
        let zero_future = |x: Tensor<B, 4>| match &future {
            Some(mask) => {
                let [xb, c, _, _] = x.dims();
                x.mask_fill(mask.clone().expand([xb, c, lq, lk]), 0.0)
            }
            None => x,
        };
        let w_in = self.conv_in.weight.val(); // [D, C, 1, k]
        let hidden = key_conv(w_in.clone().narrow(1, 0, h), zero_future(logits));
        let term = bias.map(|bmap| key_conv(w_in.narrow(1, h, h), zero_future(bmap)));
        let b1 = self
            .conv_in
            .bias
            .as_ref()
            .map(|b1| b1.val().reshape([1, -1, 1, 1]));
        let mut hidden = leaky_relu(plus_shared(hidden, term, b1), self.negative_slope);
        if self.mask_future_hidden {
            hidden = zero_future(hidden);
        }
        let mut f = key_conv(self.conv_out.weight.val(), hidden);
        if let Some(b2) = &self.conv_out.bias {
            f = f + b2.val().reshape([1, h as i64, 1, 1]);
        }
        f
    }
}

/// The `1 × k` cross-correlation along the key axis with zero padding `k / 2` on each side,
/// without bias: `weight: [D, C, 1, k]`, `x: [b, C, seq_q, seq_k]` → `[b, D, seq_q, seq_k]`.
///
/// Written as `Σ_t W_t @ x[.., j + t - k/2]`, each term a `[D, C] @ [C, seq_q · seq_k]` product.
pub(super) fn key_conv<B: Backend>(weight: Tensor<B, 4>, x: Tensor<B, 4>) -> Tensor<B, 4> {
    let [d, c, _, k] = weight.dims();
    let [b, _, lq, lk] = x.dims();
    let half = k / 2;
    let padded = if half > 0 {
        let zeros = Tensor::<B, 4>::zeros([b, c, lq, half], &x.device());
        Tensor::cat(vec![zeros.clone(), x, zeros], 3)
    } else {
        x
    };
    let mut out: Option<Tensor<B, 3>> = None;
    for t in 0..k {
        let w_t = weight.clone().narrow(3, t, 1).reshape([1, d, c]);
        let x_t = padded.clone().narrow(3, t, lk).reshape([b, c, lq * lk]);
        let term = w_t.matmul(x_t);
        out = Some(match out {
            Some(acc) => acc + term,
            None => term,
        });
    }
    out.expect("kernel_size is at least 1")
        .reshape([b, d, lq, lk])
}
