//! DAPE and the attention around it in one kernel, over `fused/attention.rs`'s tile on
//! ndarray: [`Dape::attention`] and [`DapeV2::attention`] (separate q, k, v, any chunk of query
//! rows), their packed forms over the projection of a whole sequence, and [`tile_attention`],
//! which the attention layer calls for either form through [`TiledCorrection`].

use burn::prelude::*;

use super::{Dape, DapeV2, Span, ATTENTION_TILE};

/// Queries, keys and values as the tile takes them (the queries not yet scaled).
#[derive(Debug)]
pub(crate) enum Qkv<T> {
    /// q `[batch, H, rows, d_head]`, k `[batch, H, keys, d_head]`, v `[batch, H, keys, d_v]`.
    Separate([T; 3]),
    /// `[batch, seq, 3 · H, d_head]` as one projection yields them: q's heads, then k's, then
    /// v's (rows = keys = seq). Under autodiff the node's parent is this tensor itself, and
    /// its backward pass writes the packed gradient at once (no zero-filled copies per part).
    Packed(T),
}

/// Which of DAPE's `f` the tile runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TileForm {
    /// DAPE V1: `Linear(C → D) → LeakyReLU → Linear(D → H)` per (query, key) pair.
    V1,
    /// DAPE V2: `Conv(1 × k, C → D) → LeakyReLU → Conv(1 × k, D → H)` along the keys.
    V2 {
        /// The kernel width `k`.
        kernel: usize,
        /// See [`super::DapeV2Config::mask_future_hidden`].
        mask_future_hidden: bool,
    },
}

/// DAPE's `f` as the tile takes it: two weights as matrices and two optional biases.
pub(crate) struct TileWeights<B: Backend> {
    pub form: TileForm,
    /// V1: `[C, D]` (Burn's `Linear` layout); V2: `[D, C · k]` (`Conv2d`'s `[D, C, 1, k]`).
    pub w1: Tensor<B, 2>,
    /// `[D]`.
    pub b1: Option<Tensor<B, 1>>,
    /// V1: `[D, H]`; V2: `[H, D · k]` (`Conv2d`'s `[H, D, 1, k]`).
    pub w2: Tensor<B, 2>,
    /// `[H]`.
    pub b2: Option<Tensor<B, 1>>,
    /// LeakyReLU's slope.
    pub slope: f32,
}

impl<B: Backend> TileWeights<B> {
    /// The heads `H`: `f`'s outputs.
    pub(crate) fn heads(&self) -> usize {
        match self.form {
            TileForm::V1 => self.w2.dims()[1],
            TileForm::V2 { .. } => self.w2.dims()[0],
        }
    }

    /// `[C, D, H]` when the four tensors agree with each other and with `heads` outputs, else
    /// `None`.
    pub(crate) fn dims(&self, heads: usize) -> Option<[usize; 3]> {
        let ([r1, c1], w2) = (self.w1.dims(), self.w2.dims());
        // `[C, D, H]`, and the second weight's shape they imply.
        let ([c, d, h], w2_implied) = match self.form {
            TileForm::V1 => ([r1, c1, w2[1]], [c1, w2[1]]),
            TileForm::V2 { kernel, .. } if kernel > 0 && c1 % kernel == 0 => {
                ([c1 / kernel, r1, w2[0]], [w2[0], r1 * kernel])
            }
            TileForm::V2 { .. } => return None,
        };
        let biases = self.b1.as_ref().is_none_or(|t| t.dims() == [d])
            && self.b2.as_ref().is_none_or(|t| t.dims() == [h]);
        (h == heads && w2 == w2_implied && biases).then_some([c, d, h])
    }
}

/// A DAPE module that the tile can run: its `f` and its own base bias.
pub(crate) trait TiledCorrection<B: Backend> {
    /// `f`'s weights.
    fn tile_weights(&self) -> TileWeights<B>;
    /// The base bias map over `span`, `[1, H, rows, keys]`; `None` over NoPE.
    fn own_bias(&self, span: &Span, device: &B::Device) -> Option<Tensor<B, 4>>;
    /// The base bias by distance for `span`'s rows, `[H, n]` backwards (see
    /// `DapeAttentionInputs::bias_by_distance`), where it depends on the distance alone and
    /// `span` is causal with its tokens at their indices; `None` otherwise.
    fn own_bias_by_distance(&self, _span: &Span, _device: &B::Device) -> Option<Tensor<B, 2>> {
        None
    }
}

impl<B: Backend> TiledCorrection<B> for Dape<B> {
    fn tile_weights(&self) -> TileWeights<B> {
        TileWeights {
            form: TileForm::V1,
            w1: self.mlp_in.weight.val(),
            b1: self.mlp_in.bias.as_ref().map(|b| b.val()),
            w2: self.mlp_out.weight.val(),
            b2: self.mlp_out.bias.as_ref().map(|b| b.val()),
            slope: self.negative_slope as f32,
        }
    }

    fn own_bias(&self, span: &Span, device: &B::Device) -> Option<Tensor<B, 4>> {
        self.bias.as_ref().map(|bias| bias.forward(span, device))
    }

    fn own_bias_by_distance(&self, span: &Span, device: &B::Device) -> Option<Tensor<B, 2>> {
        let bias = self.bias.as_ref()?;
        let n = span.query_start + span.query_len;
        let fits = bias.depends_on_distance_only() && span.causal && span.positions.is_none();
        if !fits || span.query_len == 0 {
            return None;
        }
        // The row of one query at position n − 1 over the keys at 0 .. n: distance n − 1 − m
        // in column m.
        let far = Span {
            query_start: n - 1,
            query_len: 1,
            key_len: n,
            causal: true,
            positions: None,
        };
        let row = bias.forward(&far, device);
        let h = row.dims()[1];
        Some(row.reshape([h, n]))
    }
}

impl<B: Backend> TiledCorrection<B> for DapeV2<B> {
    fn tile_weights(&self) -> TileWeights<B> {
        let as_matrix = |w: Tensor<B, 4>| {
            let [out, inp, _, k] = w.dims();
            w.reshape([out, inp * k])
        };
        TileWeights {
            form: TileForm::V2 {
                kernel: self.conv_in.weight.dims()[3],
                mask_future_hidden: self.mask_future_hidden,
            },
            w1: as_matrix(self.conv_in.weight.val()),
            b1: self.conv_in.bias.as_ref().map(|b| b.val()),
            w2: as_matrix(self.conv_out.weight.val()),
            b2: self.conv_out.bias.as_ref().map(|b| b.val()),
            slope: self.negative_slope as f32,
        }
    }

    fn own_bias(&self, span: &Span, device: &B::Device) -> Option<Tensor<B, 4>> {
        self.bias.as_ref().map(|bias| bias.forward(span, device))
    }
}

/// The fewest query rows for which the tile reads DAPE V1's bias by distance: the table costs
/// as much as one row's pairs (`D · H` multiply-adds per distance), and a decode step's single
/// row would pay it for nothing.
const BY_DISTANCE_MIN_ROWS: usize = 16;

/// DAPE (`f`) and the attention around it in one kernel: `softmax(c ⊙ Z, mask) · v` with
/// `Z = S + B + f([S ‖ B])`, `S = scale · q kᵀ`, over the rows and keys of `span`, `[batch,
/// rows, H, d_v]`. `B` is `map` when given (`[1 or batch, H, rows, keys]`, a base bias computed
/// outside: forgetting attention's), else `f`'s own bias over `span` (none over NoPE); `c` is
/// Scalable-Softmax's `row_scale` `[H, rows]` when given, else 1. Blocks of query rows
/// `[batch, H, rb, keys]` stay under `budget` floats (one row at least); the result does not
/// depend on it (up to rounding).
///
/// On ndarray (`f32`, with or without autodiff) it runs one block of query rows at a time and,
/// in training, is one graph node that keeps no `[batch, H, rows, keys]` tensor: its backward
/// pass recomputes each block. `None` elsewhere or when a shape does not fit (the caller takes
/// the tensor path: the logits, the module's `forward`, the softmax and the product with `v`).
/// Without the `ndarray` feature there is no tile, and it is always `None`.
pub(crate) fn tile_attention<B: Backend>(
    f: &dyn TiledCorrection<B>,
    qkv: Qkv<Tensor<B, 4>>,
    map: Option<Tensor<B, 4>>,
    row_scale: Option<Tensor<B, 2>>,
    span: &Span,
    scale: f32,
    budget: usize,
) -> Option<Tensor<B, 4>> {
    #[cfg(feature = "ndarray")]
    {
        use super::fused;
        if !(fused::applies::<B>() || fused::applies_autodiff::<B>()) {
            return None;
        }
        let weights = f.tile_weights();
        let device = weights.w1.device();
        // Evaluation of DAPE V1 over its own bias of the distance alone reads the bias and its
        // half of the first layer by distance, and builds no map.
        let by_distance = map.is_none()
            && fused::applies::<B>()
            && weights.form == TileForm::V1
            && span.query_len >= BY_DISTANCE_MIN_ROWS;
        let bias_by_distance = by_distance
            .then(|| f.own_bias_by_distance(span, &device))
            .flatten();
        let bias = match bias_by_distance {
            Some(_) => None,
            None => map.or_else(|| f.own_bias(span, &device)),
        };
        let inputs = fused::DapeAttentionInputs {
            qkv,
            heads: weights.heads(),
            bias,
            bias_by_distance,
            f: weights,
            row_scale,
            scale,
            budget,
        };
        fused::dape_attention(inputs, span)
    }
    #[cfg(not(feature = "ndarray"))]
    {
        let _ = (f, qkv, map, row_scale, span, scale, budget);
        None
    }
}

impl<B: Backend> Dape<B> {
    /// DAPE and the attention around it in one kernel: `softmax(Z, mask) · v` with
    /// `Z = S + B + f([S ‖ B])`, `S = scale · q kᵀ`, for `q` `[batch, H, rows, d_head]`, `k`
    /// `[batch, H, keys, d_head]`, `v` `[batch, H, keys, d_v]` over the rows and keys of `span`;
    /// `[batch, rows, H, d_v]`. `B` is `map` when given (`[1 or batch, H, rows, keys]`, a base
    /// bias computed outside: forgetting attention's), else this module's own bias over `span`
    /// (none over NoPE).
    ///
    /// On ndarray (`f32`, with or without autodiff) it runs one block of query rows at a time
    /// and, in training, is one graph node that keeps no `[batch, H, rows, keys]` tensor: its
    /// backward pass recomputes each block. `None` elsewhere (the caller takes the tensor path:
    /// the logits, [`Self::forward`], the softmax and the product with `v`).
    pub fn attention(
        &self,
        qkv: [Tensor<B, 4>; 3],
        map: Option<Tensor<B, 4>>,
        span: &Span,
        scale: f32,
    ) -> Option<Tensor<B, 4>> {
        let qkv = Qkv::Separate(qkv);
        tile_attention(self, qkv, map, None, span, scale, ATTENTION_TILE)
    }

    /// [`Self::attention`] under Scalable-Softmax: the softmax of row `i` in head `h` reads
    /// `c_hi · Z_ij`, with `row_scale` `c` `[H, rows]` (the layer's `s_h · ln n_i`; see
    /// [`crate::SsmaxConfig`]). Under autodiff `c` is one more parent of the node, and its
    /// gradient `Σ_batch Σ_j Z_ij · dZ'_ij` comes from the same recomputed blocks.
    pub fn attention_row_scaled(
        &self,
        qkv: [Tensor<B, 4>; 3],
        map: Option<Tensor<B, 4>>,
        row_scale: Tensor<B, 2>,
        span: &Span,
        scale: f32,
    ) -> Option<Tensor<B, 4>> {
        let qkv = Qkv::Separate(qkv);
        tile_attention(self, qkv, map, Some(row_scale), span, scale, ATTENTION_TILE)
    }

    /// [`Self::attention`] over the packed projection of a whole sequence, `qkv` `[batch, seq,
    /// 3 · H, d_head]` (q's heads, then k's, then v's); `span` covers the sequence (`seq` rows
    /// and keys, else `None`). Under autodiff the node's parent is `qkv` itself, so its
    /// backward pass writes the packed gradient at once. `[batch, seq, H, d_head]`.
    pub fn attention_packed(
        &self,
        qkv: Tensor<B, 4>,
        map: Option<Tensor<B, 4>>,
        span: &Span,
        scale: f32,
    ) -> Option<Tensor<B, 4>> {
        let qkv = whole_sequence(qkv, span)?;
        tile_attention(self, qkv, map, None, span, scale, ATTENTION_TILE)
    }
}

impl<B: Backend> DapeV2<B> {
    /// DAPE V2 and the attention around it in one kernel, as [`Dape::attention`]: `softmax(Z,
    /// mask) · v` with `Z = S + B + f(tril([S ‖ B]))` (`f` the two key convolutions), over
    /// the rows and keys of `span`, `[batch, rows, H, d_v]`. Each block of query rows holds
    /// whole rows of keys, so the convolutions see every neighbouring column. `None` where the
    /// tile does not apply (off ndarray); the caller then takes the tensor path.
    pub fn attention(
        &self,
        qkv: [Tensor<B, 4>; 3],
        span: &Span,
        scale: f32,
    ) -> Option<Tensor<B, 4>> {
        let qkv = Qkv::Separate(qkv);
        tile_attention(self, qkv, None, None, span, scale, ATTENTION_TILE)
    }

    /// [`Self::attention`] over the packed projection of a whole sequence, as
    /// [`Dape::attention_packed`].
    pub fn attention_packed(
        &self,
        qkv: Tensor<B, 4>,
        span: &Span,
        scale: f32,
    ) -> Option<Tensor<B, 4>> {
        let qkv = whole_sequence(qkv, span)?;
        tile_attention(self, qkv, None, None, span, scale, ATTENTION_TILE)
    }
}

/// The packed projection `[batch, seq, 3 · H, d_head]` when `span` covers its whole sequence.
pub(crate) fn whole_sequence<B: Backend>(
    qkv: Tensor<B, 4>,
    span: &Span,
) -> Option<Qkv<Tensor<B, 4>>> {
    let seq = qkv.dims()[1];
    ((span.query_len, span.key_len) == (seq, seq)).then_some(Qkv::Packed(qkv))
}
