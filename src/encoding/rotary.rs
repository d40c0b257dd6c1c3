//! Rotary encodings: RoPE (Su et al., 2021) in the interleaved layout (pairs `(2i, 2i+1)`, as in
//! burn-nn) and the half-split layout (pairs `(i, i + r/2)`, as in GPT-NeoX and Llama), with a
//! partial rotary fraction and the frequency-scaling methods used to stretch RoPE past its
//! training length: linear position interpolation (Chen et al., 2023), NTK-aware base scaling,
//! dynamic NTK, and YaRN with its attention factor (Peng et al., 2023). Also xPos (Sun et al.,
//! 2022), RoPE with a per-frequency exponential decay.
//!
//! Queries at positions `m` and keys at positions `n` are rotated by angles `m·θ_i` and `n·θ_i`,
//! so `q_m · k_n` depends on `m - n` only. Keys are rotated at every forward from their raw
//! (cached) values, so dynamic NTK, whose base depends on the sequence length, stays consistent
//! between the KV-cache path and the full forward.

use burn::prelude::*;
use serde::{Deserialize, Serialize};

use super::default_from_new;
use crate::error::{ensure, Result};

/// How the rotated dimensions are paired.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RopeLayout {
    /// Pairs `(2i, 2i+1)` (burn-nn, the original RoFormer, xPos).
    Interleaved,
    /// Pairs `(i, i + r/2)` (GPT-NeoX, Llama).
    HalfSplit,
}

/// Frequency scaling; chosen by the encoding name (`rope`, `rope_linear`, ...).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RopeScaling {
    /// Plain RoPE.
    None,
    /// Position interpolation: `θ_i / s`.
    Linear,
    /// NTK-aware: base `b · s^(r/(r-2))`.
    Ntk,
    /// Dynamic NTK: base `b · (s·L/L0 - (s-1))^(r/(r-2))` once the length `L` passes `L0`.
    DynamicNtk,
    /// YaRN: per-frequency blend of interpolation and extrapolation, plus an attention factor.
    Yarn,
}

/// Configuration of RoPE and its scaled variants.
#[derive(Config, Debug, PartialEq)]
pub struct RopeConfig {
    /// Frequency base `b` in `θ_i = b^(-2i/r)`.
    #[config(default = 10000.0)]
    pub base: f64,
    /// Pairing of rotated dimensions.
    #[config(default = "RopeLayout::HalfSplit")]
    pub layout: RopeLayout,
    /// Fraction of each head's dimensions that are rotated (GPT-NeoX `rotary_pct`); the rotated
    /// width `r = head_dim · fraction` must be even.
    #[config(default = 1.0)]
    pub rotary_fraction: f64,
    /// Scaling factor `s` (ignored by plain `rope`).
    #[config(default = 4.0)]
    pub scale_factor: f64,
    /// Training length `L0` (used by dynamic NTK and YaRN).
    #[config(default = 512)]
    pub original_max_len: usize,
    /// YaRN: rotations above which a frequency is extrapolated (not interpolated).
    #[config(default = 32.0)]
    pub beta_fast: f64,
    /// YaRN: rotations below which a frequency is fully interpolated.
    #[config(default = 1.0)]
    pub beta_slow: f64,
    /// YaRN attention factor multiplying cos/sin. When `None`: `m(s, mscale) / m(s,
    /// mscale_all_dim)` if both of those are set (and non-zero), else `m(s, 1)`, with
    /// `m(s, k) = 0.1·k·ln(s) + 1` for `s > 1` and 1 otherwise (Hugging Face's `get_mscale`).
    #[config(default = "None")]
    pub attention_factor: Option<f64>,
    /// YaRN `mscale` of Hugging Face's `rope_scaling` (DeepSeek-V2/V3 checkpoints): see
    /// `attention_factor`. Set alone it has no effect, as in `transformers`.
    #[config(default = "None")]
    pub mscale: Option<f64>,
    /// YaRN `mscale_all_dim` of Hugging Face's `rope_scaling`: see `attention_factor`.
    #[config(default = "None")]
    pub mscale_all_dim: Option<f64>,
    /// YaRN: round the ramp's ends to whole dimensions (floor and ceiling), as the paper and
    /// `transformers` do by default; `false` keeps them fractional (`"truncate": false`).
    #[config(default = true)]
    pub truncate: bool,
}

/// Hugging Face's `get_mscale(s, k)`: `0.1·k·ln(s) + 1` for `s > 1`, else 1.
fn yarn_mscale(s: f64, k: f64) -> f64 {
    if s <= 1.0 {
        1.0
    } else {
        0.1 * k * s.ln() + 1.0
    }
}
default_from_new!(RopeConfig);

/// Configuration of xPos.
#[derive(Config, Debug, PartialEq)]
pub struct XposConfig {
    /// Frequency base.
    #[config(default = 10000.0)]
    pub base: f64,
    /// Decay scale base: `q` is scaled by `ζ_i^(n/scale_base)`, `k` by `ζ_i^(-n/scale_base)`.
    #[config(default = 512.0)]
    pub scale_base: f64,
    /// Pairing of rotated dimensions.
    #[config(default = "RopeLayout::Interleaved")]
    pub layout: RopeLayout,
    /// Fraction of each head's dimensions that are rotated.
    #[config(default = 1.0)]
    pub rotary_fraction: f64,
}
default_from_new!(XposConfig);

fn rotary_dim(head_dim: usize, fraction: f64) -> Result<usize> {
    ensure(
        fraction > 0.0 && fraction <= 1.0,
        "rotary_fraction",
        fraction,
        "must be in (0, 1]",
    )?;
    // Truncated, as `int(head_dim * partial_rotary_factor)` in transformers (the tiny margin
    // keeps an exact product such as 0.3 × 10 from landing below its integer).
    let r = (head_dim as f64 * fraction + 1e-9).floor() as usize;
    ensure(
        r >= 2 && r.is_multiple_of(2),
        "rotary_dim",
        r,
        &format!("head_dim {head_dim} × rotary_fraction {fraction} must give an even rotary dimension of at least 2"),
    )?;
    Ok(r)
}

impl RopeConfig {
    /// Builds RoPE with the given scaling for heads of size `head_dim`.
    pub fn init(&self, head_dim: usize, scaling: RopeScaling) -> Result<Rotary> {
        let r = rotary_dim(head_dim, self.rotary_fraction)?;
        ensure(self.base > 1.0, "base", self.base, "must be greater than 1")?;
        if scaling != RopeScaling::None {
            ensure(
                self.scale_factor >= 1.0,
                "scale_factor",
                self.scale_factor,
                "must be at least 1",
            )?;
            ensure(
                self.original_max_len > 0,
                "original_max_len",
                self.original_max_len,
                "must be at least 1",
            )?;
        }
        if matches!(scaling, RopeScaling::Ntk | RopeScaling::DynamicNtk) {
            ensure(
                r > 2,
                "rotary_dim",
                r,
                "NTK scaling needs a rotary dimension above 2",
            )?;
        }
        if scaling == RopeScaling::Yarn {
            ensure(
                self.beta_fast > self.beta_slow && self.beta_slow > 0.0,
                "beta_fast",
                self.beta_fast,
                "YaRN needs beta_fast > beta_slow > 0",
            )?;
        }
        for (name, value) in [
            ("mscale", self.mscale),
            ("mscale_all_dim", self.mscale_all_dim),
        ] {
            if let Some(v) = value {
                ensure(v.is_finite(), name, v, "must be finite")?;
            }
        }
        let s = self.scale_factor;
        let attention_factor = match scaling {
            RopeScaling::Yarn => match (self.attention_factor, self.mscale, self.mscale_all_dim) {
                (Some(a), _, _) => a,
                (None, Some(m), Some(all)) if m != 0.0 && all != 0.0 => {
                    yarn_mscale(s, m) / yarn_mscale(s, all)
                }
                _ => yarn_mscale(s, 1.0),
            },
            _ => 1.0,
        };
        Ok(Rotary {
            rotary_dim: r,
            layout: self.layout,
            base: self.base,
            scaling,
            scale_factor: self.scale_factor,
            original_max_len: self.original_max_len,
            beta_fast: self.beta_fast,
            beta_slow: self.beta_slow,
            attention_factor,
            xpos_scale_base: None,
            truncate: self.truncate,
        })
    }
}

impl XposConfig {
    /// Builds xPos for heads of size `head_dim`.
    pub fn init(&self, head_dim: usize) -> Result<Rotary> {
        let r = rotary_dim(head_dim, self.rotary_fraction)?;
        ensure(self.base > 1.0, "base", self.base, "must be greater than 1")?;
        ensure(
            self.scale_base > 0.0,
            "scale_base",
            self.scale_base,
            "must be positive",
        )?;
        Ok(Rotary {
            rotary_dim: r,
            layout: self.layout,
            base: self.base,
            scaling: RopeScaling::None,
            scale_factor: 1.0,
            original_max_len: 1,
            beta_fast: 32.0,
            beta_slow: 1.0,
            attention_factor: 1.0,
            xpos_scale_base: Some(self.scale_base),
            truncate: true,
        })
    }
}

/// RoPE (any scaling) or xPos. Holds no parameters; tables are computed in f64.
#[derive(Module, Clone, Debug)]
pub struct Rotary {
    /// Number of rotated dimensions per head (`r`, even).
    pub rotary_dim: usize,
    /// Pairing of dimensions.
    pub layout: RopeLayout,
    /// Frequency base.
    pub base: f64,
    /// Frequency scaling.
    pub scaling: RopeScaling,
    /// Scaling factor `s`.
    pub scale_factor: f64,
    /// Training length `L0`.
    pub original_max_len: usize,
    /// YaRN `β_fast`.
    pub beta_fast: f64,
    /// YaRN `β_slow`.
    pub beta_slow: f64,
    /// Multiplies cos and sin (YaRN's `mscale`; 1 otherwise).
    pub attention_factor: f64,
    /// xPos decay scale base; `None` for RoPE.
    pub xpos_scale_base: Option<f64>,
    /// YaRN: whether the ramp's ends are whole dimensions.
    pub truncate: bool,
}

impl Rotary {
    /// Inverse frequencies `θ_i`, `i < r/2`, for a sequence whose keys span `total_len` positions.
    pub fn inv_freq(&self, total_len: usize) -> Vec<f64> {
        let r = self.rotary_dim as f64;
        let s = self.scale_factor;
        let ntk_exp = r / (r - 2.0);
        let base = match self.scaling {
            RopeScaling::Ntk => self.base * s.powf(ntk_exp),
            RopeScaling::DynamicNtk if total_len > self.original_max_len => {
                let ratio = s * total_len as f64 / self.original_max_len as f64 - (s - 1.0);
                self.base * ratio.powf(ntk_exp)
            }
            _ => self.base,
        };
        let half = self.rotary_dim / 2;
        let extrapolated: Vec<f64> = (0..half)
            .map(|i| base.powf(-(2.0 * i as f64) / r))
            .collect();
        match self.scaling {
            RopeScaling::Linear => extrapolated.iter().map(|f| f / s).collect(),
            RopeScaling::Yarn => {
                // Dimension index at which a frequency makes `rotations` turns over L0.
                let correction = |rotations: f64| {
                    r * (self.original_max_len as f64 / (rotations * 2.0 * std::f64::consts::PI))
                        .ln()
                        / (2.0 * self.base.ln())
                };
                // As transformers: the ends rounded outwards (unless `truncate` is off), then
                // clamped to `[0, r - 1]` (the rotary width, not its half).
                let (mut low, mut high) = (correction(self.beta_fast), correction(self.beta_slow));
                if self.truncate {
                    (low, high) = (low.floor(), high.ceil());
                }
                let (low, mut high) = (low.max(0.0), high.min(r - 1.0));
                if high == low {
                    high += 0.001;
                }
                extrapolated
                    .iter()
                    .enumerate()
                    .map(|(i, &f)| {
                        let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
                        let keep = 1.0 - ramp; // share of the extrapolated frequency
                        (f / s) * (1.0 - keep) + f * keep
                    })
                    .collect()
            }
            _ => extrapolated,
        }
    }

    /// cos and sin tables `[len, r/2]` for the positions `positions` (`start..start + len` when
    /// `None`). For xPos, `sign` is +1 for queries and -1 for keys and `center` is subtracted
    /// from positions in the decay.
    #[allow(clippy::too_many_arguments)]
    fn tables<B: Backend>(
        &self,
        inv_freq: &[f64],
        start: usize,
        len: usize,
        positions: Option<&[i64]>,
        sign: f64,
        center: f64,
        device: &B::Device,
    ) -> (Tensor<B, 2>, Tensor<B, 2>) {
        use std::hash::{Hash, Hasher};
        let half = inv_freq.len();
        // Everything the values depend on, hashed: frequencies, factor, decay settings.
        let mut h = std::collections::hash_map::DefaultHasher::new();
        for f in inv_freq {
            f.to_bits().hash(&mut h);
        }
        self.attention_factor.to_bits().hash(&mut h);
        self.rotary_dim.hash(&mut h);
        if let Some(sb) = self.xpos_scale_base {
            (sb.to_bits(), sign.to_bits(), center.to_bits()).hash(&mut h);
        }
        let settings = h.finish();
        let at = positions.map_or(String::new(), |p| {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            p.hash(&mut h);
            format!(" at {:x}", h.finish())
        });
        super::cache::cached::<B, _>(
            device,
            || format!("rope {settings:x} {start}+{len}{at}"),
            2 * len * half,
            || {
                let sequential: Vec<i64>;
                let positions = match positions {
                    Some(p) => p,
                    None => {
                        sequential = (start as i64..(start + len) as i64).collect();
                        &sequential
                    }
                };
                self.build_tables(inv_freq, positions, sign, center, device)
            },
        )
    }

    fn build_tables<B: Backend>(
        &self,
        inv_freq: &[f64],
        positions: &[i64],
        sign: f64,
        center: f64,
        device: &B::Device,
    ) -> (Tensor<B, 2>, Tensor<B, 2>) {
        let half = inv_freq.len();
        let len = positions.len();
        let mut cos = Vec::with_capacity(len * half);
        let mut sin = Vec::with_capacity(len * half);
        let r = self.rotary_dim as f64;
        for &p in positions {
            for (i, f) in inv_freq.iter().enumerate() {
                let angle = p as f64 * f;
                let mut scale = self.attention_factor;
                if let Some(sb) = self.xpos_scale_base {
                    let zeta = (2.0 * i as f64 / r + 0.4) / 1.4;
                    scale *= zeta.powf(sign * (p as f64 - center) / sb);
                }
                cos.push((angle.cos() * scale) as f32);
                sin.push((angle.sin() * scale) as f32);
            }
        }
        (
            Tensor::from_data(TensorData::new(cos, [len, half]), device),
            Tensor::from_data(TensorData::new(sin, [len, half]), device),
        )
    }

    /// Rotates `x: [batch, heads, seq, d_head]` with tables `[seq, r/2]`.
    fn apply<B: Backend>(
        &self,
        x: Tensor<B, 4>,
        cos: Tensor<B, 2>,
        sin: Tensor<B, 2>,
    ) -> Tensor<B, 4> {
        let l = x.dims()[2];
        let half = self.rotary_dim / 2;
        self.apply_broadcast(
            x,
            cos.reshape([1, 1, l, half]),
            sin.reshape([1, 1, l, half]),
        )
    }

    /// Rotates `x: [batch, heads, seq, d_head]` with tables `[1 or batch, 1, seq, r/2]`.
    fn apply_broadcast<B: Backend>(
        &self,
        x: Tensor<B, 4>,
        cos: Tensor<B, 4>,
        sin: Tensor<B, 4>,
    ) -> Tensor<B, 4> {
        let [b, h, l, d] = x.dims();
        let r = self.rotary_dim;
        let half = r / 2;
        let rot = x.clone().narrow(3, 0, r);
        let rotated = match self.layout {
            RopeLayout::HalfSplit => {
                let x1 = rot.clone().narrow(3, 0, half);
                let x2 = rot.narrow(3, half, half);
                Tensor::cat(
                    vec![
                        x1.clone() * cos.clone() - x2.clone() * sin.clone(),
                        x2 * cos + x1 * sin,
                    ],
                    3,
                )
            }
            RopeLayout::Interleaved => {
                let pairs = rot.reshape([b, h, l, half, 2]);
                let x1 = pairs.clone().narrow(4, 0, 1).reshape([b, h, l, half]);
                let x2 = pairs.narrow(4, 1, 1).reshape([b, h, l, half]);
                let o1 = x1.clone() * cos.clone() - x2.clone() * sin.clone();
                let o2 = x2 * cos + x1 * sin;
                Tensor::stack::<5>(vec![o1, o2], 4).reshape([b, h, l, r])
            }
        };
        if r < d {
            Tensor::cat(vec![rotated, x.narrow(3, r, d - r)], 3)
        } else {
            rotated
        }
    }

    /// Rotates queries at positions `q_start..` and keys at positions `0..seq_k`.
    /// `q: [batch, heads, seq_q, d_head]`, `k: [batch, heads, seq_k, d_head]`.
    pub fn forward<B: Backend>(
        &self,
        q: Tensor<B, 4>,
        k: Tensor<B, 4>,
        q_start: usize,
    ) -> (Tensor<B, 4>, Tensor<B, 4>) {
        self.rotate_tokens(q, k, q_start, None)
    }

    /// Rotates the queries of tokens `q_start..` and the keys of tokens `0..seq_k`, token `t` at
    /// position `positions[t]` (randomized positions; `None`: at `t`). Every scaling applies as
    /// for positions `0..=max`: dynamic NTK's length is the last key's position + 1.
    pub fn rotate_tokens<B: Backend>(
        &self,
        q: Tensor<B, 4>,
        k: Tensor<B, 4>,
        q_start: usize,
        positions: Option<&[i64]>,
    ) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let device = q.device();
        let lq = q.dims()[2];
        let lk = k.dims()[2];
        let (q_pos, k_pos) = match positions {
            Some(p) => (Some(&p[q_start..q_start + lq]), Some(&p[..lk])),
            None => (None, None),
        };
        let extent = match positions {
            Some(p) => (p[lk.max(q_start + lq) - 1] + 1) as usize,
            None => lk.max(q_start + lq),
        };
        let key_extent = match k_pos {
            Some(k) => (k[lk - 1] + 1) as usize,
            None => lk,
        };
        let inv = self.inv_freq(extent);
        let center = (key_extent / 2) as f64;
        let (qc, qs) = self.tables::<B>(&inv, q_start, lq, q_pos, 1.0, center, &device);
        let (kc, ks) = self.tables::<B>(&inv, 0, lk, k_pos, -1.0, center, &device);
        (self.apply(q, qc, qs), self.apply(k, kc, ks))
    }

    /// Rotates queries and keys by arbitrary per-row positions: `q: [batch, heads, seq_q,
    /// d_head]` at `q_pos: [batch, seq_q]`, `k: [batch, heads, seq_k, d_head]` at
    /// `k_pos: [batch, seq_k]` (BiPE-RoPE rotates by segment indices). Uses the unscaled
    /// frequencies (no length-dependent scaling, no xPos decay).
    pub fn forward_at<B: Backend>(
        &self,
        q: Tensor<B, 4>,
        k: Tensor<B, 4>,
        q_pos: Tensor<B, 2, Int>,
        k_pos: Tensor<B, 2, Int>,
    ) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let inv = self.inv_freq(1);
        let half = inv.len();
        let inv: Vec<f32> = inv.into_iter().map(|f| f as f32).collect();
        let inv = Tensor::<B, 1>::from_data(TensorData::new(inv, [half]), &q.device())
            .reshape([1, 1, 1, half]);
        let tables = |pos: Tensor<B, 2, Int>| {
            let [b, l] = pos.dims();
            let angle = pos.float().reshape([b, 1, l, 1]) * inv.clone();
            let factor = self.attention_factor;
            (angle.clone().cos() * factor, angle.sin() * factor)
        };
        let (qc, qs) = tables(q_pos);
        let (kc, ks) = tables(k_pos);
        (
            self.apply_broadcast(q, qc, qs),
            self.apply_broadcast(k, kc, ks),
        )
    }
}
