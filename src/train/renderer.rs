//! A compact metrics renderer: one line every `every` iterations with every registered metric,
//! and one line per validation round. burn-train's own CLI renderer prints a debug dump of every
//! iteration, and its TUI needs a terminal; this one suits logs, CI and scripted sweeps.

use std::collections::BTreeMap;

use crate::util::say;
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
    steps: Option<StepCount>,
}

/// How burn-train's per-epoch iterations map to optimiser steps of the whole run.
#[derive(Clone, Copy, Debug)]
struct StepCount {
    per_epoch: usize,
    total: usize,
    accumulation: usize,
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
            steps: None,
        }
    }

    /// Counts optimiser steps over the whole run instead of items of the current epoch:
    /// `per_epoch` steps per epoch, `total` in all, each of `accumulation` iterations.
    pub fn with_steps(mut self, per_epoch: usize, total: usize, accumulation: usize) -> Self {
        self.steps = Some(StepCount {
            per_epoch,
            total,
            accumulation: accumulation.max(1),
        });
        self
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
        let (done, total, epoch_end) = match self.steps {
            Some(s) => {
                let iteration = item.iteration.unwrap_or(p.items_processed);
                if !iteration.is_multiple_of(s.accumulation) {
                    return;
                }
                let epoch = item.global_progress.items_processed.max(1);
                let step = (epoch - 1) * s.per_epoch + iteration / s.accumulation;
                (step, s.total, p.items_processed == p.items_total)
            }
            None => (
                p.items_processed,
                p.items_total,
                p.items_processed == p.items_total,
            ),
        };
        if done % self.every == 0 || epoch_end {
            say!(
                "{}step {done}/{total}  {}",
                self.prefix,
                Self::line(&self.train)
            );
        }
    }

    fn render_valid(&mut self, item: TrainingProgress, _: Vec<ProgressType>) {
        if let Some(p) = item.progress {
            if p.items_processed == p.items_total {
                say!("{}valid  {}", self.prefix, Self::line(&self.valid));
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
