//! burn-train metrics over per-step statistics that are synced to the host once per step.

use burn::train::metric::state::{FormatOptions, NumericMetricState};
use burn::train::metric::{
    Adaptor, Metric, MetricAttributes, MetricMetadata, MetricName, Numeric, NumericAttributes,
    NumericEntry, SerializedEntry,
};
use std::sync::Arc;

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
    ($name:ident, $label:expr, $unit:expr, $higher:expr, $value:expr, $doc:expr) => {
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
            type Input = StepStats;

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

            fn update(&mut self, item: &StepStats, _: &MetricMetadata) -> SerializedEntry {
                let value: fn(&StepStats) -> f64 = $value;
                let mut format = FormatOptions::new(self.name()).precision(4);
                if let Some(unit) = $unit {
                    format = format.unit(unit);
                }
                self.state
                    .update(value(item), item.sequences.max(1), format)
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
    "Loss",
    None::<&str>,
    false,
    |s| s.loss,
    "The step loss."
);
numeric_metric!(
    MaskedAccuracyMetric,
    "Accuracy",
    Some("%"),
    true,
    |s| if s.counted > 0.0 {
        100.0 * s.correct / s.counted
    } else {
        0.0
    },
    "Per-position accuracy over the masked-in output positions, in percent."
);
