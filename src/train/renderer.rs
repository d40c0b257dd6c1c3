//! A compact metrics renderer: one line every `every` iterations with every registered metric,
//! and one line per validation round. burn-train's own CLI renderer prints a debug dump of every
//! iteration, and its TUI needs a terminal; this one suits logs, CI and scripted sweeps.

use std::collections::BTreeMap;

use burn::train::metric::{MetricDefinition, MetricId};
use burn::train::renderer::{
    EvaluationName, EvaluationProgress, MetricState, MetricsRenderer, MetricsRendererEvaluation,
    MetricsRendererTraining, ProgressType, TrainingProgress,
};

/// Prints `prefix step N/T  name value  ...` every `every` iterations.
pub struct LineRenderer {
    prefix: String,
    every: usize,
    names: BTreeMap<String, String>,
    train: BTreeMap<String, String>,
    valid: BTreeMap<String, String>,
}

impl LineRenderer {
    /// A renderer that prints every `every` iterations (at least 1), each line starting with
    /// `prefix`.
    pub fn new(prefix: impl Into<String>, every: usize) -> Self {
        Self {
            prefix: prefix.into(),
            every: every.max(1),
            names: BTreeMap::new(),
            train: BTreeMap::new(),
            valid: BTreeMap::new(),
        }
    }

    fn key(id: &MetricId) -> String {
        format!("{id:?}")
    }

    fn record(&self, store: &mut BTreeMap<String, String>, state: MetricState) {
        let entry = match state {
            MetricState::Generic(e) | MetricState::Numeric(e, _) => e,
        };
        let name = self
            .names
            .get(&Self::key(&entry.metric_id))
            .cloned()
            .unwrap_or_else(|| "metric".into());
        // burn formats numeric metrics as "epoch <running> - batch <current>": keep the running
        // value, which is what a line every N steps should show.
        let text = entry.serialized_entry.formatted;
        let shown = text
            .strip_prefix("epoch ")
            .and_then(|rest| rest.split(" - batch").next())
            .unwrap_or(&text)
            .to_string();
        store.insert(name, shown);
    }

    fn line(values: &BTreeMap<String, String>) -> String {
        values
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join("  ")
    }
}

impl MetricsRendererTraining for LineRenderer {
    fn update_train(&mut self, state: MetricState) {
        let mut train = std::mem::take(&mut self.train);
        self.record(&mut train, state);
        self.train = train;
    }

    fn update_valid(&mut self, state: MetricState) {
        let mut valid = std::mem::take(&mut self.valid);
        self.record(&mut valid, state);
        self.valid = valid;
    }

    fn render_train(&mut self, item: TrainingProgress, _: Vec<ProgressType>) {
        let Some(p) = item.progress else { return };
        let done = p.items_processed;
        if done % self.every == 0 || done == p.items_total {
            println!(
                "{}step {done}/{}  {}",
                self.prefix,
                p.items_total,
                Self::line(&self.train)
            );
        }
    }

    fn render_valid(&mut self, item: TrainingProgress, _: Vec<ProgressType>) {
        if let Some(p) = item.progress {
            if p.items_processed == p.items_total {
                println!("{}valid  {}", self.prefix, Self::line(&self.valid));
            }
        }
    }
}

impl MetricsRendererEvaluation for LineRenderer {
    fn update_test(&mut self, _name: EvaluationName, state: MetricState) {
        let mut valid = std::mem::take(&mut self.valid);
        self.record(&mut valid, state);
        self.valid = valid;
    }

    fn render_test(&mut self, _item: EvaluationProgress, _: Vec<ProgressType>) {}
}

impl MetricsRenderer for LineRenderer {
    fn manual_close(&mut self) {}

    fn register_metric(&mut self, definition: MetricDefinition) {
        self.names
            .insert(Self::key(&definition.metric_id), definition.name.clone());
    }
}
