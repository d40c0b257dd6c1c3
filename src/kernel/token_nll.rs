//! The cross-entropy of each token: which backend gets which kernel, and the tensor path.

use burn::prelude::*;

#[cfg(feature = "ndarray")]
use super::ndarray::{applies, applies_autodiff, token_nll_autodiff, token_nll_nd};

/// The negative log-likelihood of each target under the softmax of its row of logits:
/// `-log softmax(logits)[b, t, targets[b, t]]` for `logits` `[batch, seq, vocab]` and
/// `targets` `[batch, seq]`, giving `[batch, seq]` (the cross-entropy of each token).
///
/// On ndarray one graph node: one pass per row forward (the row's log-sum-exp is all it keeps
/// besides the logits), and one pass per row backward, `g · (softmax − onehot(target))`.
/// Burn's `log_softmax` and `gather` are six composite ops with a backward pass each, the
/// `gather`'s filling a zero tensor of the logits' size. Every other backend, and a target
/// outside `0..vocab`, takes that tensor path ([`token_nll_tensor`]); the tests hold the two
/// together in values and gradients.
pub fn token_nll<B: Backend>(logits: Tensor<B, 3>, targets: Tensor<B, 2, Int>) -> Tensor<B, 2> {
    #[cfg(feature = "ndarray")]
    if logits.dtype() == burn::tensor::DType::F32 && (applies::<B>() || applies_autodiff::<B>()) {
        let [b, l, vocab] = logits.dims();
        if targets.dims() == [b, l] && vocab > 0 {
            let picked: Option<Vec<usize>> = targets
                .clone()
                .into_data()
                .convert::<i64>()
                .to_vec::<i64>()
                .ok()
                .and_then(|t| {
                    t.into_iter()
                        .map(|t| usize::try_from(t).ok().filter(|&t| t < vocab))
                        .collect()
                });
            if let Some(picked) = picked {
                let fused = if applies::<B>() {
                    token_nll_nd(logits.clone(), &picked)
                } else {
                    token_nll_autodiff(logits.clone(), picked)
                };
                if let Some(y) = fused {
                    return y;
                }
            }
        }
    }
    token_nll_tensor(logits, targets)
}

/// [`token_nll`] by Burn's tensor ops (`log_softmax`, then `gather`): the tensor path.
pub fn token_nll_tensor<B: Backend>(
    logits: Tensor<B, 3>,
    targets: Tensor<B, 2, Int>,
) -> Tensor<B, 2> {
    burn::tensor::activation::log_softmax(logits, 2)
        .gather(2, targets.unsqueeze_dim(2))
        .squeeze_dim::<2>(2)
        .neg()
}
