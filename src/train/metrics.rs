//! burn-train metrics over per-step statistics that are synced to the host once per step.

use burn::train::metric::state::{FormatOptions, NumericMetricState};
use burn::train::metric::{
    Adaptor, Metric, MetricAttributes, MetricMetadata, MetricName, Numeric, NumericAttributes,
    NumericEntry, SerializedEntry,
};
use std::sync::Arc;
use std::time::Instant;

/// What one training or validation step reports, already on the host.
#[derive(Clone, Debug, Default)]
pub struct StepStats {
    /// The step's loss.
    pub loss: f64,
    /// Correctly predicted (masked-in) positions.
    pub correct: f64,
    /// Masked-in positions.
    pub counted: f64,
    /// Sequences in the step.
    pub sequences: usize,
}

impl Adaptor<StepStats> for StepStats {
    fn adapt(&self) -> StepStats {
        self.clone()
    }
}

macro_rules! numeric_metric {
    ($name:ident, $input:ty, $label:expr, $unit:expr, $higher:expr, $value:expr, $weight:expr, $doc:expr) => {
        #[doc = $doc]
        #[derive(Clone, Default)]
        pub struct $name {
            state: NumericMetricState,
        }

        impl $name {
            /// A new metric.
            pub fn new() -> Self {
                Self::default()
            }
        }

        impl Metric for $name {
            type Input = $input;

            fn name(&self) -> MetricName {
                Arc::new($label.to_string())
            }

            fn attributes(&self) -> MetricAttributes {
                NumericAttributes {
                    unit: $unit.map(str::to_string),
                    higher_is_better: $higher,
                }
                .into()
            }

            fn update(&mut self, item: &$input, _: &MetricMetadata) -> SerializedEntry {
                let value: fn(&$input) -> f64 = $value;
                let weight: fn(&$input) -> usize = $weight;
                let mut format = FormatOptions::new(self.name()).precision(4);
                if let Some(unit) = $unit {
                    format = format.unit(unit);
                }
                self.state.update(value(item), weight(item).max(1), format)
            }

            fn clear(&mut self) {
                self.state.reset()
            }
        }

        impl Numeric for $name {
            fn value(&self) -> NumericEntry {
                self.state.current_value()
            }

            fn running_value(&self) -> NumericEntry {
                self.state.running_value()
            }
        }
    };
}

numeric_metric!(
    LossMetric,
    StepStats,
    "Loss",
    None::<&str>,
    false,
    |s| s.loss,
    |s| s.sequences,
    "The step loss."
);
numeric_metric!(
    MaskedAccuracyMetric,
    StepStats,
    "Accuracy",
    Some("%"),
    true,
    |s| if s.counted > 0.0 {
        100.0 * s.correct / s.counted
    } else {
        0.0
    },
    |s| s.sequences,
    "Per-position accuracy over the masked-in output positions, in percent."
);

/// What one language-model step reports, already on the host.
#[derive(Clone, Debug, Default)]
pub struct LmStats {
    /// Mean cross-entropy per counted target (nats).
    pub loss: f64,
    /// Targets the loss counted (every token, or a masked batch's answers).
    pub tokens: usize,
    /// Tokens the model read (for throughput).
    pub read: usize,
    /// Window length of the step.
    pub length: usize,
}

impl Adaptor<LmStats> for LmStats {
    fn adapt(&self) -> LmStats {
        self.clone()
    }
}

numeric_metric!(
    LmLossMetric,
    LmStats,
    "Loss",
    None::<&str>,
    false,
    |s| s.loss,
    |s| s.tokens,
    "Mean cross-entropy per token (nats)."
);

/// Numeric entry for an aggregated value over `count` items.
fn entry(value: f64, count: usize) -> NumericEntry {
    NumericEntry::Aggregated {
        aggregated_value: value,
        count,
    }
}

/// Perplexity, `exp` of the token-weighted mean cross-entropy. The running value aggregates
/// the cross-entropy (not the per-step perplexities), as perplexity is defined.
#[derive(Clone)]
pub struct PerplexityMetric {
    name: MetricName,
    /// Only items of this window length count (`None`: all).
    length: Option<usize>,
    nll: f64,
    tokens: usize,
    current: f64,
}

impl PerplexityMetric {
    /// Perplexity over every step.
    pub fn new() -> Self {
        Self {
            name: Arc::new("Perplexity".into()),
            length: None,
            nll: 0.0,
            tokens: 0,
            current: f64::NAN,
        }
    }

    /// The metrics plugin: validation perplexity over the windows of length `length` only,
    /// named `ppl@<length>`. Register one per evaluation length; the validation set holds one
    /// item per length, so the value of a round is that length's perplexity.
    pub fn at_length(length: usize) -> Self {
        Self {
            name: Arc::new(format!("ppl@{length}")),
            length: Some(length),
            ..Self::new()
        }
    }

    fn running(&self) -> f64 {
        if self.tokens == 0 {
            f64::NAN
        } else {
            (self.nll / self.tokens as f64).exp()
        }
    }
}

impl Default for PerplexityMetric {
    fn default() -> Self {
        Self::new()
    }
}

impl Metric for PerplexityMetric {
    type Input = LmStats;

    fn name(&self) -> MetricName {
        self.name.clone()
    }

    fn attributes(&self) -> MetricAttributes {
        NumericAttributes {
            unit: None,
            higher_is_better: false,
        }
        .into()
    }

    fn update(&mut self, item: &LmStats, _: &MetricMetadata) -> SerializedEntry {
        let counts = self.length.is_none_or(|l| l == item.length);
        if counts {
            self.nll += item.loss * item.tokens as f64;
            self.tokens += item.tokens;
            self.current = item.loss.exp();
        }
        let running = self.running();
        // Items of other lengths are logged with weight 0, so the logged aggregate of a round
        // is this length's perplexity alone.
        let weight = if counts { item.tokens.max(1) } else { 0 };
        let value = if counts { self.current } else { 0.0 };
        SerializedEntry::new(
            format!("epoch {running:.3} - batch {:.3}", self.current),
            entry(value, weight).serialize(),
        )
    }

    fn clear(&mut self) {
        self.nll = 0.0;
        self.tokens = 0;
        self.current = f64::NAN;
    }
}

impl Numeric for PerplexityMetric {
    fn value(&self) -> NumericEntry {
        entry(self.current, 1)
    }

    fn running_value(&self) -> NumericEntry {
        entry(self.running(), self.tokens.max(1))
    }
}

/// Training throughput: tokens read per second of wall time between steps.
#[derive(Clone, Default)]
pub struct TokensPerSecondMetric {
    state: NumericMetricState,
    last: Option<Instant>,
}

impl TokensPerSecondMetric {
    /// A new metric.
    pub fn new() -> Self {
        Self::default()
    }
}

impl Metric for TokensPerSecondMetric {
    type Input = LmStats;

    fn name(&self) -> MetricName {
        Arc::new("Tokens per second".into())
    }

    fn attributes(&self) -> MetricAttributes {
        NumericAttributes {
            unit: Some("tok/s".into()),
            higher_is_better: true,
        }
        .into()
    }

    fn update(&mut self, item: &LmStats, _: &MetricMetadata) -> SerializedEntry {
        let now = Instant::now();
        // The first step has no previous one to time against; it counts once the second ends.
        let rate = self.last.map_or(0.0, |t| {
            item.read as f64 / now.duration_since(t).as_secs_f64().max(1e-9)
        });
        self.last = Some(now);
        self.state.update(
            rate,
            1,
            FormatOptions::new(self.name()).precision(0).unit("tok/s"),
        )
    }

    fn clear(&mut self) {
        self.state.reset();
        self.last = None;
    }
}

impl Numeric for TokensPerSecondMetric {
    fn value(&self) -> NumericEntry {
        self.state.current_value()
    }

    fn running_value(&self) -> NumericEntry {
        self.state.running_value()
    }
}
