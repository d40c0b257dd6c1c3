//! Data-independent additive biases `B[h, i, j]` on the attention logits: T5 buckets (Raffel et
//! al., 2020), ALiBi (Press et al., 2022), Kerple log and power (Chi et al., 2022) and FIRE (Li
//! et al., 2024). Each returns `[1, heads, seq_q, seq_k]` for a [`Span`]; every entry is finite,
//! also at future keys (DAPE reads them before the causal mask). With non-causal attention the
//! distance is `|i - j|`.

use burn::module::Param;
use burn::nn::{Linear, LinearConfig};
use burn::prelude::*;
use burn::tensor::activation::{leaky_relu, relu};
use serde::{Deserialize, Serialize};

use super::{default_from_new, uniform_param, Span};
use crate::error::{ensure, Result};

/// A data-independent additive bias.
#[derive(Module, Debug)]
#[allow(clippy::large_enum_variant)] // a handful per model; boxing would hide the modules from Burn
pub enum AdditiveBias<B: Backend> {
    /// ALiBi.
    Alibi(Alibi<B>),
    /// Kerple log or power.
    Kerple(Kerple<B>),
    /// FIRE.
    Fire(Fire<B>),
    /// T5 buckets.
    T5(T5Bias<B>),
    /// Sandwich (see [`super::sandwich`]).
    Sandwich(super::Sandwich<B>),
}

impl<B: Backend> AdditiveBias<B> {
    /// The bias for `span`: `[1, heads, seq_q, seq_k]`.
    pub fn forward(&self, span: &Span, device: &B::Device) -> Tensor<B, 4> {
        match self {
            Self::Alibi(m) => m.forward(span, device),
            Self::Kerple(m) => m.forward(span, device),
            Self::Fire(m) => m.forward(span, device),
            Self::T5(m) => m.forward(span, device),
            Self::Sandwich(m) => m.forward(span, device),
        }
    }

    /// Whether the bias depends on the distance `i − j` alone (every kind but FIRE, whose
    /// normaliser reads the query's position).
    pub fn depends_on_distance_only(&self) -> bool {
        !matches!(self, Self::Fire(_))
    }

    /// Number of heads.
    pub fn n_heads(&self) -> usize {
        match self {
            Self::Alibi(m) => m.slopes.dims()[0],
            Self::Kerple(m) => m.p.dims()[0],
            Self::Fire(m) => m.mlp_out.weight.dims()[1],
            Self::T5(m) => m.embedding.dims()[1],
            Self::Sandwich(m) => m.inv_ratio.dims()[0],
        }
    }
}

/// A bias that depends on the distance alone, from `f` evaluated once per distinct distance
/// (`f` maps distances `[1, 1, 1, n]` to `[1, heads, 1, n]`) and looked up by
/// [`crate::kernel::distance_table_bias`]; `None` where that kernel does not apply (autodiff,
/// other backends), and the caller evaluates `f` on the span's distances.
fn distance_table<B: Backend>(
    span: &Span,
    device: &B::Device,
    f: impl FnOnce(Tensor<B, 4>) -> Tensor<B, 4>,
) -> Option<Tensor<B, 4>> {
    if !crate::kernel::distance_table_applies::<B>() {
        return None;
    }
    let (low, high) = span.offset_range();
    let n = low.unsigned_abs().max(high.unsigned_abs()) as usize + 1;
    let d = Tensor::<B, 1, Int>::arange(0..n as i64, device)
        .float()
        .reshape([1, 1, 1, n]);
    let table = f(d);
    let h = table.dims()[1];
    let (rows, cols) = (span.query_position_values(), span.key_position_values());
    crate::kernel::distance_table_bias(table.reshape([h, n]), &rows, &cols)
}

// ---------------------------------------------------------------------------------------- ALiBi

/// Configuration of [`Alibi`].
#[derive(Config, Debug, PartialEq)]
pub struct AlibiConfig {}
default_from_new!(AlibiConfig);

/// The standard ALiBi slopes for `n` heads: `2^(-8h/n)`, `h = 1..n`, for powers of two; for
/// other counts, the slopes of the largest power of two `m < n` followed by every other slope
/// of `2m` heads.
pub fn alibi_slopes(n: usize) -> Vec<f64> {
    fn power_of_two(n: usize) -> Vec<f64> {
        let start = 2f64.powf(-8.0 / n as f64);
        (1..=n).map(|h| start.powi(h as i32)).collect()
    }
    if n == 0 {
        return Vec::new();
    }
    if n.is_power_of_two() {
        return power_of_two(n);
    }
    let m = 1usize << (usize::BITS - 1 - n.leading_zeros());
    let mut slopes = power_of_two(m);
    slopes.extend(power_of_two(2 * m).into_iter().step_by(2).take(n - m));
    slopes
}

impl AlibiConfig {
    /// Builds ALiBi with the standard slopes for `n_heads` heads.
    pub fn init<B: Backend>(&self, n_heads: usize, device: &B::Device) -> Result<Alibi<B>> {
        ensure(n_heads > 0, "n_heads", n_heads, "must be at least 1")?;
        let slopes: Vec<f32> = alibi_slopes(n_heads)
            .into_iter()
            .map(|s| s as f32)
            .collect();
        Ok(Alibi {
            slopes: Tensor::from_data(TensorData::new(slopes, [n_heads]), device),
        })
    }
}

/// ALiBi: `B[h, i, j] = -m_h · |i - j|` with fixed slopes `m_h`.
#[derive(Module, Debug)]
pub struct Alibi<B: Backend> {
    /// Slopes `[heads]` (a fixed buffer).
    pub slopes: Tensor<B, 1>,
}

impl<B: Backend> Alibi<B> {
    /// `[1, heads, seq_q, seq_k]`.
    ///
    /// Without autodiff on ndarray (evaluation) it is looked up from one value per distance
    /// ([`crate::kernel::distance_table_bias`]).
    pub fn forward(&self, span: &Span, device: &B::Device) -> Tensor<B, 4> {
        let h = self.slopes.dims()[0];
        let slopes = self.slopes.clone().reshape([1, h, 1, 1]).neg();
        if let Some(bias) = distance_table(span, device, |d| d * slopes.clone()) {
            return bias;
        }
        span.distance::<B>(device).unsqueeze::<4>() * slopes
    }
}

// --------------------------------------------------------------------------------------- Kerple

/// Which Kerple kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KerpleKind {
    /// `-p · ln(1 + a · d)`.
    Log,
    /// `-p · d^a`, `a ∈ (0, 2]`.
    Power,
}

/// Configuration of [`Kerple`]: parameters are initialised uniformly as in the reference.
#[derive(Config, Debug, PartialEq)]
pub struct KerpleConfig {
    /// Upper end of the uniform initialisation of `p` (from 0).
    #[config(default = 2.0)]
    pub init_p_max: f64,
    /// Upper end of the uniform initialisation of `a` (from 0).
    #[config(default = 1.0)]
    pub init_a_max: f64,
    /// Lower clamp of both parameters in the forward pass.
    #[config(default = 0.01)]
    pub eps: f64,
}
default_from_new!(KerpleConfig);

impl KerpleConfig {
    /// Builds Kerple of the given kind for `n_heads` heads.
    pub fn init<B: Backend>(
        &self,
        n_heads: usize,
        kind: KerpleKind,
        device: &B::Device,
    ) -> Result<Kerple<B>> {
        ensure(n_heads > 0, "n_heads", n_heads, "must be at least 1")?;
        ensure(self.eps > 0.0, "eps", self.eps, "must be positive")?;
        ensure(
            self.init_p_max > 0.0,
            "init_p_max",
            self.init_p_max,
            "must be positive",
        )?;
        ensure(
            self.init_a_max > 0.0,
            "init_a_max",
            self.init_a_max,
            "must be positive",
        )?;
        Ok(Kerple {
            p: uniform_param([n_heads], 0.0, self.init_p_max, device),
            a: uniform_param([n_heads], 0.0, self.init_a_max, device),
            kind,
            eps: self.eps,
        })
    }
}

/// Kerple (Chi et al., 2022). Log: `B = -p_h · ln(1 + a_h · |i-j|)`; power:
/// `B = -p_h · |i-j|^(a_h)`. Both parameters are clamped to `>= eps` in the forward pass (and `a`
/// to `<= 2` for the power kernel), as the reference clamps them.
#[derive(Module, Debug)]
pub struct Kerple<B: Backend> {
    /// `p` per head, `[heads]` (PyTorch `bias_p`).
    pub p: Param<Tensor<B, 1>>,
    /// `a` per head, `[heads]` (PyTorch `bias_a`).
    pub a: Param<Tensor<B, 1>>,
    /// Log or power kernel.
    #[module(skip)]
    pub kind: KerpleKind,
    /// Lower clamp.
    pub eps: f64,
}

impl<B: Backend> Kerple<B> {
    /// `[1, heads, seq_q, seq_k]`. Without autodiff on ndarray (evaluation) the kernel is
    /// evaluated once per distinct distance and looked up
    /// ([`crate::kernel::distance_table_bias`]); elsewhere it is built from tensor ops.
    pub fn forward(&self, span: &Span, device: &B::Device) -> Tensor<B, 4> {
        if let Some(bias) = distance_table(span, device, |d| self.kernel(d)) {
            return bias;
        }
        self.kernel(span.distance::<B>(device).unsqueeze::<4>())
    }

    /// The kernel at distances `d` `[1, 1, x, y]`: `[1, heads, x, y]`.
    fn kernel(&self, d: Tensor<B, 4>) -> Tensor<B, 4> {
        let h = self.p.dims()[0];
        let p = self.p.val().clamp_min(self.eps).reshape([1, h, 1, 1]);
        let a = self.a.val().clamp_min(self.eps);
        match self.kind {
            KerpleKind::Log => (d * a.reshape([1, h, 1, 1])).log1p() * p.neg(),
            KerpleKind::Power => {
                let a = a.clamp_max(2.0).reshape([1, h, 1, 1]);
                // d^a = exp(a ln d); at d = 0 the result is 0 and ln is taken of 1 so that no
                // gradient is NaN.
                let positive = d.clone().greater_elem(0.0).float();
                let pow = (d.clamp_min(1.0).log() * a).exp() * positive;
                pow * p.neg()
            }
        }
    }
}

// ----------------------------------------------------------------------------------------- FIRE

/// Activation of FIRE's MLP.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FireActivation {
    /// ReLU (the standalone FIRE module of the reference).
    Relu,
    /// LeakyReLU with slope 0.01 (FIRE inside the reference's DAPE).
    LeakyRelu,
    /// GELU.
    Gelu,
}

/// Configuration of [`Fire`].
#[derive(Config, Debug, PartialEq)]
pub struct FireConfig {
    /// Hidden width of the MLP `1 -> width -> heads`.
    #[config(default = 32)]
    pub mlp_width: usize,
    /// Initial value of the learnable `c` in `ψ(x) = ln(|c·x| + 1)`.
    #[config(default = 0.1)]
    pub init_c: f64,
    /// Frozen `L0`; the threshold is `L = |L_multiplier · L0|` with a learnable multiplier.
    #[config(default = 512.0)]
    pub init_l: f64,
    /// Added to the normaliser.
    #[config(default = 1e-6)]
    pub eps: f64,
    /// MLP activation.
    #[config(default = "FireActivation::Relu")]
    pub activation: FireActivation,
}
default_from_new!(FireConfig);

impl FireConfig {
    /// The FIRE settings used under DAPE in the reference (LeakyReLU activation).
    pub fn for_dape() -> Self {
        Self::new().with_activation(FireActivation::LeakyRelu)
    }

    /// Builds FIRE for `n_heads` heads.
    pub fn init<B: Backend>(&self, n_heads: usize, device: &B::Device) -> Result<Fire<B>> {
        ensure(n_heads > 0, "n_heads", n_heads, "must be at least 1")?;
        ensure(
            self.mlp_width > 0,
            "mlp_width",
            self.mlp_width,
            "must be at least 1",
        )?;
        ensure(self.init_l > 0.0, "init_l", self.init_l, "must be positive")?;
        ensure(self.eps >= 0.0, "eps", self.eps, "must not be negative")?;
        let scalar = |v: f64| Param::from_tensor(Tensor::<B, 1>::from_floats([v as f32], device));
        Ok(Fire {
            c: scalar(self.init_c),
            l_multiplier: scalar(1.0),
            init_l: self.init_l,
            mlp_in: LinearConfig::new(1, self.mlp_width).init(device),
            mlp_out: LinearConfig::new(self.mlp_width, n_heads).init(device),
            activation: self.activation,
            eps: self.eps,
        })
    }
}

/// FIRE: `B[h, i, j] = MLP(ψ(i - j) / (ψ(max(L, i)) + eps))_h`, `ψ(x) = ln(|c·x| + 1)`,
/// `L = |L_multiplier · L0|`, positions 0-based. With non-causal attention `|i - j|` is used.
#[derive(Module, Debug)]
pub struct Fire<B: Backend> {
    /// Learnable `c`, `[1]`.
    pub c: Param<Tensor<B, 1>>,
    /// Learnable multiplier of `L0`, `[1]`.
    pub l_multiplier: Param<Tensor<B, 1>>,
    /// Frozen `L0`.
    pub init_l: f64,
    /// First MLP layer `1 -> width`.
    pub mlp_in: Linear<B>,
    /// Second MLP layer `width -> heads`.
    pub mlp_out: Linear<B>,
    /// MLP activation.
    #[module(skip)]
    pub activation: FireActivation,
    /// Normaliser epsilon.
    pub eps: f64,
}

impl<B: Backend> Fire<B> {
    /// `[1, heads, seq_q, seq_k]`. On ndarray (evaluation and training), with ReLU or
    /// LeakyReLU, through [`crate::kernel::scalar_mlp_bias`] (the MLP as the piecewise-linear
    /// function it is); otherwise from tensor ops ([`Self::forward_tensors`]).
    pub fn forward(&self, span: &Span, device: &B::Device) -> Tensor<B, 4> {
        self.forward_kernel(span, device)
            .unwrap_or_else(|| self.forward_tensors(span, device))
    }

    /// The kernel's inputs: `ψ(d)` for every distance `d` the span reaches, and per query row
    /// its normaliser `ψ(max(L, i)) + eps`. `None` with GELU, or where the
    /// kernel does not apply.
    fn forward_kernel(&self, span: &Span, device: &B::Device) -> Option<Tensor<B, 4>> {
        let slope = match self.activation {
            FireActivation::Relu => 0.0,
            FireActivation::LeakyRelu => 0.01,
            FireActivation::Gelu => return None,
        };
        if !crate::kernel::scalar_mlp_applies::<B>() {
            return None;
        }
        let (low, high) = span.offset_range();
        let n = low.unsigned_abs().max(high.unsigned_abs()) as usize + 1;
        let c = self.c.val();
        let distances = Tensor::<B, 1, Int>::arange(0..n as i64, device).float();
        let psi = (distances * c.clone()).abs().log1p();
        let rows = span.query_position_values();
        let lq = rows.len();
        let threshold = (self.l_multiplier.val() * self.init_l).abs();
        let pos =
            Tensor::<B, 1, Int>::from_data(TensorData::new(rows.clone(), [lq]), device).float();
        let normaliser = (pos.max_pair(threshold.expand([lq])) * c).abs().log1p() + self.eps;
        let mlp = crate::kernel::ScalarMlp {
            w1: self.mlp_in.weight.val(),
            b1: self.mlp_in.bias.as_ref().map(|b| b.val()),
            w2: self.mlp_out.weight.val(),
            b2: self.mlp_out.bias.as_ref().map(|b| b.val()),
            slope,
        };
        let cols = span.key_position_values();
        crate::kernel::scalar_mlp_bias(mlp, psi, normaliser, &rows, &cols)
    }

    /// [`Self::forward`] from tensor ops: the MLP over every (query, key) pair's input.
    pub fn forward_tensors(&self, span: &Span, device: &B::Device) -> Tensor<B, 4> {
        let (lq, lk) = (span.query_len, span.key_len);
        let c = self.c.val().reshape([1, 1]);
        // ψ is even, so |i - j| serves both causal and non-causal attention.
        let psi_rel = (span.distance::<B>(device) * c.clone()).abs().log1p();
        let threshold = (self.l_multiplier.val() * self.init_l)
            .abs()
            .reshape([1, 1]);
        let rows = span.query_position_values();
        let pos = Tensor::<B, 1, Int>::from_data(TensorData::new(rows, [lq]), device)
            .float()
            .reshape([lq, 1]);
        let normaliser = (pos.max_pair(threshold.expand([lq, 1])) * c).abs().log1p() + self.eps;
        let x = (psi_rel / normaliser).reshape([lq, lk, 1]);
        let hidden = self.mlp_in.forward(x);
        let hidden = match self.activation {
            FireActivation::Relu => relu(hidden),
            FireActivation::LeakyRelu => leaky_relu(hidden, 0.01),
            FireActivation::Gelu => crate::kernel::gelu(hidden),
        };
        let out = self.mlp_out.forward(hidden); // [lq, lk, heads]
        out.permute([2, 0, 1]).unsqueeze::<4>()
    }
}

// ------------------------------------------------------------------------------------------- T5

/// Configuration of [`T5Bias`].
#[derive(Config, Debug, PartialEq)]
pub struct T5Config {
    /// Number of buckets.
    #[config(default = 32)]
    pub num_buckets: usize,
    /// Distance from which all positions share the last bucket.
    #[config(default = 128)]
    pub max_distance: usize,
}
default_from_new!(T5Config);

/// The T5 bucket of relative position `j - i`. Causal: distances `n = max(i - j, 0)`; the first
/// half of the buckets hold `n` exactly, the rest grow logarithmically up to `max_distance`.
/// Bidirectional: half of the buckets for each direction.
pub fn t5_bucket(relative: i64, causal: bool, num_buckets: usize, max_distance: usize) -> usize {
    let mut buckets = num_buckets as i64;
    let mut offset = 0i64;
    let n = if causal {
        (-relative).max(0)
    } else {
        buckets /= 2;
        if relative > 0 {
            offset = buckets;
        }
        relative.abs()
    };
    let max_exact = buckets / 2;
    let bucket = if n < max_exact {
        n
    } else {
        let large = max_exact as f64
            + ((n as f64 / max_exact as f64).ln() / (max_distance as f64 / max_exact as f64).ln()
                * (buckets - max_exact) as f64);
        (large as i64).min(buckets - 1)
    };
    (offset + bucket) as usize
}

impl T5Config {
    /// Builds the T5 bias for `n_heads` heads.
    pub fn init<B: Backend>(&self, n_heads: usize, device: &B::Device) -> Result<T5Bias<B>> {
        ensure(n_heads > 0, "n_heads", n_heads, "must be at least 1")?;
        ensure(
            self.num_buckets >= 4,
            "num_buckets",
            self.num_buckets,
            "must be at least 4",
        )?;
        ensure(
            self.max_distance > self.num_buckets / 2,
            "max_distance",
            self.max_distance,
            "must exceed half the number of buckets",
        )?;
        Ok(T5Bias {
            embedding: burn::nn::Initializer::Normal {
                mean: 0.0,
                std: 0.02,
            }
            .init([self.num_buckets, n_heads], device),
            num_buckets: self.num_buckets,
            max_distance: self.max_distance,
        })
    }
}

/// T5 relative bias: a learned scalar per (bucket, head).
#[derive(Module, Debug)]
pub struct T5Bias<B: Backend> {
    /// `[num_buckets, heads]`.
    pub embedding: Param<Tensor<B, 2>>,
    /// Number of buckets.
    pub num_buckets: usize,
    /// Maximum distance.
    pub max_distance: usize,
}

impl<B: Backend> T5Bias<B> {
    /// Bucket ids `[seq_q * seq_k]` for a span, row-major.
    pub fn buckets(&self, span: &Span) -> Vec<i64> {
        let mut ids = Vec::with_capacity(span.query_len * span.key_len);
        let cols = span.key_position_values();
        for i in span.query_position_values() {
            for &j in &cols {
                let rel = j - i;
                ids.push(t5_bucket(rel, span.causal, self.num_buckets, self.max_distance) as i64);
            }
        }
        ids
    }

    /// `[1, heads, seq_q, seq_k]`.
    ///
    /// Causal spans on ndarray look the bias up per distance
    /// ([`crate::kernel::past_distance_table_bias`]: a key ahead of the query is in bucket 0, as
    /// [`t5_bucket`] puts it) from a `[heads, n]` table of the buckets' embeddings; gathering
    /// `[seq_q · seq_k, heads]` embeddings and permuting them took 2 GB and most of an
    /// evaluation at 8192. Elsewhere, and for bidirectional spans, the gather.
    pub fn forward(&self, span: &Span, device: &B::Device) -> Tensor<B, 4> {
        if span.causal && crate::kernel::distance_table_applies::<B>() {
            let (low, high) = span.offset_range();
            let n = low.unsigned_abs().max(high.unsigned_abs()) as usize + 1;
            let (nb, md) = (self.num_buckets, self.max_distance);
            let ids = super::cache::cached::<B, _>(
                device,
                || format!("t5 distance buckets n{nb} max{md} {n}"),
                n,
                || {
                    let ids: Vec<i64> = (0..n as i64)
                        .map(|d| t5_bucket(-d, true, nb, md) as i64)
                        .collect();
                    Tensor::<B, 1, Int>::from_data(TensorData::new(ids, [n]), device)
                },
            );
            // [n, heads] → [heads, n]
            let table = self.embedding.val().select(0, ids).transpose();
            let (rows, cols) = (span.query_position_values(), span.key_position_values());
            if let Some(bias) = crate::kernel::past_distance_table_bias(table, &rows, &cols) {
                return bias;
            }
        }
        self.gathered(span, device)
    }

    /// The bias by a gather of every pair's bucket embedding (the cached bucket ids), then a
    /// permute: `[1, heads, seq_q, seq_k]`.
    fn gathered(&self, span: &Span, device: &B::Device) -> Tensor<B, 4> {
        let (nb, md) = (self.num_buckets, self.max_distance);
        let ids = super::cache::cached::<B, _>(
            device,
            || format!("t5 buckets n{nb} max{md} {}", span.cache_key()),
            span.query_len * span.key_len,
            || {
                let ids = self.buckets(span);
                let n = ids.len();
                Tensor::<B, 1, Int>::from_data(TensorData::new(ids, [n]), device)
            },
        );
        let h = self.embedding.dims()[1];
        self.embedding
            .val()
            .select(0, ids)
            .reshape([span.query_len, span.key_len, h])
            .permute([2, 0, 1])
            .unsqueeze::<4>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encoding::RandomizedConfig;
    use burn::backend::{Autodiff, NdArray};

    /// FIRE over 4 heads with `L = 64` whose 32 hidden units each change sign inside the
    /// inputs' range `(0, 1)` (`b1 = −w1 · u`, `u` uniform in `(0.05, 0.95)`), so that every
    /// piece of the kernel is read.
    fn fire_with_kinks<B: Backend>(activation: FireActivation, device: &B::Device) -> Fire<B> {
        let mut fire = FireConfig::new()
            .with_activation(activation)
            .with_init_l(64.0)
            .init::<B>(4, device)
            .unwrap();
        let normal = burn::tensor::Distribution::Normal(0.0, 1.0);
        let w1 = Tensor::<B, 2>::random([1, 32], normal, device);
        let uniform = burn::tensor::Distribution::Uniform(0.05, 0.95);
        let kinks = Tensor::<B, 1>::random([32], uniform, device);
        let b1 = -(w1.clone().reshape([32]) * kinks);
        fire.mlp_in.bias = Some(Param::from_tensor(b1.detach().require_grad()));
        fire.mlp_in.weight = Param::from_tensor(w1.detach().require_grad());
        fire
    }

    /// FIRE through the piecewise-linear kernel against its tensor path, for ReLU and
    /// LeakyReLU with every hidden unit's kink inside the inputs' range `(0, 1)`: a causal
    /// square, a chunk of rows past the threshold `L` (each row its own normaliser), a
    /// non-causal square, and randomized positions. GELU takes the tensor path.
    #[test]
    fn fire_kernel_is_the_tensor_path() {
        // The backend's random state is shared: tests that reseed it and draw twice (the fused
        // tests) hold this lock, so every test that draws from it does.
        let _rng = crate::util::autodiff_test_lock();
        type N = NdArray<f32>;
        let device = Default::default();
        let positions = RandomizedConfig::new(2048).sample(40, 9).unwrap();
        let spans = [
            (0, 30, 30, true, None),
            (600, 40, 640, true, None),
            (0, 24, 24, false, None),
            (8, 32, 40, true, Some(positions)),
        ];
        for activation in [FireActivation::Relu, FireActivation::LeakyRelu] {
            let fire = fire_with_kinks::<N>(activation, &device);
            for (query_start, query_len, key_len, causal, positions) in spans.clone() {
                let span = Span {
                    query_start,
                    query_len,
                    key_len,
                    causal,
                    positions,
                };
                let ours = fire.forward(&span, &device);
                let want = fire.forward_tensors(&span, &device);
                assert_eq!(ours.dims(), want.dims());
                let diff: f32 = (ours - want).abs().max().into_scalar();
                assert!(
                    diff < 1e-5,
                    "{activation:?}, span {query_start}+{query_len} of {key_len}: {diff}"
                );
            }
        }
    }

    /// FIRE's kernel node under autodiff against its tensor path: values, and the gradients
    /// of `c`, `L`'s multiplier and the MLP's four tensors under a random weighting, for both
    /// activations, on rows below and past the threshold, causal and not.
    #[test]
    fn fire_kernel_node_is_the_tensor_path_in_gradients() {
        let _graphs = crate::util::autodiff_test_lock();
        type A = Autodiff<NdArray<f32>>;
        let device = Default::default();
        let spans = [(0, 30, 30, true), (48, 40, 88, true), (0, 24, 24, false)];
        for activation in [FireActivation::Relu, FireActivation::LeakyRelu] {
            let fire = fire_with_kinks::<A>(activation, &device);
            let normal = burn::tensor::Distribution::Normal(0.0, 1.0);
            for (query_start, query_len, key_len, causal) in spans {
                let span = Span {
                    query_start,
                    query_len,
                    key_len,
                    causal,
                    positions: None,
                };
                let label = format!("{activation:?}, span {query_start}+{query_len} of {key_len}");
                let ours = fire.forward(&span, &device);
                let w = Tensor::<A, 4>::random(ours.dims(), normal, &device);
                let values = ours.clone().inner();
                let g1 = (ours * w.clone()).sum().backward();
                let want = fire.forward_tensors(&span, &device);
                let diff: f32 = (values - want.clone().inner()).abs().max().into_scalar();
                assert!(diff < 1e-5, "{label}: values differ by {diff}");
                let g2 = (want * w).sum().backward();
                let grads = |g: &<A as burn::tensor::backend::AutodiffBackend>::Gradients| -> Vec<(&str, Vec<f32>)> {
                    let v = |t: Option<Tensor<NdArray<f32>, 1>>| -> Vec<f32> {
                        t.unwrap().into_data().to_vec().unwrap()
                    };
                    let bias = |b: &Option<Param<Tensor<A, 1>>>| b.as_ref().unwrap().val();
                    vec![
                        ("c", v(fire.c.val().grad(g))),
                        ("L", v(fire.l_multiplier.val().grad(g))),
                        ("w1", v(fire.mlp_in.weight.val().grad(g).map(|t| t.reshape([-1])))),
                        ("b1", v(bias(&fire.mlp_in.bias).grad(g))),
                        ("w2", v(fire.mlp_out.weight.val().grad(g).map(|t| t.reshape([-1])))),
                        ("b2", v(bias(&fire.mlp_out.bias).grad(g))),
                    ]
                };
                for ((name, a), (_, b)) in grads(&g1).into_iter().zip(grads(&g2)) {
                    let scale = b.iter().fold(1f32, |m, x| m.max(x.abs()));
                    let diff = a
                        .iter()
                        .zip(&b)
                        .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
                    // `c` acts through both ψ(|i − j|) and the normaliser: per pair the two
                    // terms of ∂x/∂c nearly cancel (x is a ratio of logs), so the sums keep
                    // ~1e-4 of the parts' rounding (4e-4 of the result seen).
                    let tol = if name == "c" { 2e-3 } else { 1e-4 };
                    assert!(
                        diff <= tol * scale,
                        "{label}: d{name} differs by {diff} ({scale})"
                    );
                }
            }
        }
    }

    /// T5's per-distance lookup against the gather of every pair's bucket, in values (exactly:
    /// the same embeddings) and in the embedding's gradient: a causal square (keys ahead of a
    /// query take bucket 0), a causal chunk with one key past its last row (the column DAPE V2
    /// reads), and randomized positions.
    #[test]
    fn t5_lookup_is_the_gather_in_values_and_gradients() {
        let _graphs = crate::util::autodiff_test_lock();
        type A = Autodiff<NdArray<f32>>;
        let device = Default::default();
        let t5 = T5Config::new().init::<A>(3, &device).unwrap();
        let positions = RandomizedConfig::new(512).sample(24, 5).unwrap();
        let spans = [
            (0, 20, 20, None),
            (12, 6, 19, None),
            (8, 16, 24, Some(positions)),
        ];
        for (query_start, query_len, key_len, positions) in spans {
            let span = Span {
                query_start,
                query_len,
                key_len,
                causal: true,
                positions,
            };
            // One graph at a time: a backward pass frees the graph it ran on, and the two
            // share the embedding.
            let ours = t5.forward(&span, &device);
            let w =
                Tensor::<A, 4>::random(ours.dims(), burn::tensor::Distribution::Default, &device);
            let values = ours.clone().inner();
            let g1 = (ours * w.clone()).sum().backward();
            let want = t5.gathered(&span, &device);
            assert_eq!(values.dims(), want.dims());
            let diff: f32 = (values - want.clone().inner()).abs().max().into_scalar();
            assert_eq!(
                diff, 0.0,
                "span {query_start}+{query_len} of {key_len}: values"
            );
            let g2 = (want * w).sum().backward();
            let (a, b) = (
                t5.embedding.val().grad(&g1).unwrap(),
                t5.embedding.val().grad(&g2).unwrap(),
            );
            let diff: f32 = (a - b).abs().max().into_scalar();
            assert!(
                diff < 1e-4,
                "span {query_start}+{query_len} of {key_len}: gradient {diff}"
            );
        }
    }
}
