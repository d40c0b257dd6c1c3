//! Absolute encodings, added to the token embeddings before the first block: NoPE (nothing),
//! sinusoidal (Vaswani et al., 2017) and learned absolute positions.

use burn::module::Param;
use burn::prelude::*;

use super::default_from_new;
use crate::error::{ensure, Error, Result};

/// No positional encoding: causal attention alone carries the order (Kazemnejad et al., 2023).
#[derive(Module, Clone, Debug, Default)]
pub struct NoPe;

/// Configuration of [`Sinusoidal`].
#[derive(Config, Debug, PartialEq)]
pub struct SinusoidalConfig {
    /// Base of the geometric wavelength progression.
    #[config(default = 10000.0)]
    pub base: f64,
}
default_from_new!(SinusoidalConfig);

impl SinusoidalConfig {
    /// Builds the encoding for `d_model` features (must be even).
    pub fn init(&self, d_model: usize) -> Result<Sinusoidal> {
        ensure(
            d_model > 0 && d_model.is_multiple_of(2),
            "d_model",
            d_model,
            "sinusoidal positions need an even, non-zero model width",
        )?;
        ensure(self.base > 1.0, "base", self.base, "must be greater than 1")?;
        Ok(Sinusoidal {
            d_model,
            base: self.base,
        })
    }
}

/// Fixed sinusoidal positions: `pe[p, 2i] = sin(p / base^(2i/d))`, `pe[p, 2i+1] = cos(...)`.
#[derive(Module, Clone, Debug)]
pub struct Sinusoidal {
    /// Model width.
    pub d_model: usize,
    /// Wavelength base.
    pub base: f64,
}

impl Sinusoidal {
    /// The table of positions `start .. start + len`: `[len, d_model]`.
    pub fn table<B: Backend>(&self, start: usize, len: usize, device: &B::Device) -> Tensor<B, 2> {
        let positions: Vec<i64> = (start as i64..(start + len) as i64).collect();
        self.table_at(&positions, device)
    }

    /// The table of arbitrary positions (randomized positions): `[positions.len(), d_model]`.
    pub fn table_at<B: Backend>(&self, positions: &[i64], device: &B::Device) -> Tensor<B, 2> {
        let d = self.d_model;
        let len = positions.len();
        let mut data = Vec::with_capacity(len * d);
        for &p in positions {
            for i in 0..d / 2 {
                let angle = p as f64 / self.base.powf(2.0 * i as f64 / d as f64);
                data.push(angle.sin() as f32);
                data.push(angle.cos() as f32);
            }
        }
        Tensor::from_data(TensorData::new(data, [len, d]), device)
    }

    /// `x: [batch, seq, d_model]` at positions `start..start+seq` -> `x + pe`.
    pub fn forward<B: Backend>(&self, x: Tensor<B, 3>, start: usize) -> Tensor<B, 3> {
        let [_, len, _] = x.dims();
        let table = self.table::<B>(start, len, &x.device());
        x + table.unsqueeze::<3>()
    }

    /// `x: [batch, seq, d_model]` at `positions` (one per token) -> `x + pe`.
    pub fn forward_at<B: Backend>(&self, x: Tensor<B, 3>, positions: &[i64]) -> Tensor<B, 3> {
        let table = self.table_at::<B>(positions, &x.device());
        x + table.unsqueeze::<3>()
    }
}

/// Configuration of [`LearnedPositions`].
#[derive(Config, Debug, PartialEq)]
pub struct LearnedConfig {
    /// Number of positions that have an embedding; longer inputs are an error.
    #[config(default = 2048)]
    pub max_len: usize,
    /// Standard deviation of the normal initialisation.
    #[config(default = 0.02)]
    pub init_std: f64,
}
default_from_new!(LearnedConfig);

impl LearnedConfig {
    /// Builds the embedding table for `d_model` features.
    pub fn init<B: Backend>(
        &self,
        d_model: usize,
        device: &B::Device,
    ) -> Result<LearnedPositions<B>> {
        ensure(
            self.max_len > 0,
            "max_len",
            self.max_len,
            "must be at least 1",
        )?;
        ensure(d_model > 0, "d_model", d_model, "must be at least 1")?;
        let std = self.init_std;
        let weight: Param<Tensor<B, 2>> =
            burn::nn::Initializer::Normal { mean: 0.0, std }.init([self.max_len, d_model], device);
        Ok(LearnedPositions {
            weight,
            max_len: self.max_len,
        })
    }
}

/// Learned absolute positions: a `[max_len, d_model]` table added to the embeddings.
#[derive(Module, Debug)]
pub struct LearnedPositions<B: Backend> {
    /// Position embeddings `[max_len, d_model]`.
    pub weight: Param<Tensor<B, 2>>,
    /// Number of positions.
    pub max_len: usize,
}

impl<B: Backend> LearnedPositions<B> {
    /// `x: [batch, seq, d_model]` at positions `start..start+seq` -> `x + pe`, or
    /// [`Error::SequenceTooLong`] past `max_len`.
    pub fn forward(&self, x: Tensor<B, 3>, start: usize) -> Result<Tensor<B, 3>> {
        let [_, len, _] = x.dims();
        if start + len > self.max_len {
            return Err(Error::SequenceTooLong {
                what: "learned absolute positions".into(),
                length: start + len,
                max: self.max_len,
            });
        }
        let rows = self.weight.val().narrow(0, start, len);
        Ok(x + rows.unsqueeze::<3>())
    }

    /// `x: [batch, seq, d_model]` at `positions` (one per token, randomized positions) ->
    /// `x + pe`, or [`Error::SequenceTooLong`] for a position past the table.
    pub fn forward_at(&self, x: Tensor<B, 3>, positions: &[i64]) -> Result<Tensor<B, 3>> {
        let last = positions.iter().copied().max().unwrap_or(0);
        if last >= self.max_len as i64 {
            return Err(Error::SequenceTooLong {
                what: "learned absolute positions (the largest position)".into(),
                length: last as usize + 1,
                max: self.max_len,
            });
        }
        let n = positions.len();
        let idx =
            Tensor::<B, 1, Int>::from_data(TensorData::new(positions.to_vec(), [n]), &x.device());
        let rows = self.weight.val().select(0, idx);
        Ok(x + rows.unsqueeze::<3>())
    }
}
