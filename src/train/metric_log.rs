//! burn-train's metric logs, written so that a failed write stops the run by name.
//!
//! burn-train's own `FileMetricLogger` writes from a logger thread and panics on the first
//! failed write ("Can log an item.: ... No space left on device"), which kills the process with
//! nothing returned. [`RunMetricLogger`] writes the same files synchronously, in the same layout
//! (`<run>/<split>/epoch-<e>/<metric name, spaces as _>.log`, one serialized entry per line,
//! each epoch's files started afresh), and on a failed write records the error in the run's
//! [`WriteFailure`], which stops the Learner; later entries are dropped. The logs are a record
//! of progress only: nothing of the crate reads them back to train or evaluate.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use burn::train::logger::MetricLogger;
use burn::train::metric::store::{EpochSummary, MetricsUpdate, Split};
use burn::train::metric::{MetricDefinition, MetricId, NumericEntry};

use super::failure::WriteFailure;
use crate::error::Error;

/// A [`MetricLogger`] over plain files whose write errors stop the run (see the module docs).
pub struct RunMetricLogger {
    directory: PathBuf,
    names: HashMap<MetricId, String>,
    files: HashMap<PathBuf, File>,
    epoch: Option<usize>,
    failure: WriteFailure,
}

impl RunMetricLogger {
    /// Logs under `directory` (the run folder); a failed write goes to `failure`.
    pub fn new(directory: &Path, failure: WriteFailure) -> Self {
        Self {
            directory: directory.to_path_buf(),
            names: HashMap::new(),
            files: HashMap::new(),
            epoch: None,
            failure,
        }
    }

    /// `<run>/<split>/epoch-<epoch>/<name>.log`.
    fn path(&self, name: &str, epoch: usize, split: &Split) -> PathBuf {
        self.directory
            .join(split.to_string())
            .join(format!("epoch-{epoch}"))
            .join(format!("{}.log", name.replace(' ', "_")))
    }

    /// Appends `line` to `path`, creating (and truncating) the file on its first line of this
    /// epoch.
    fn append(&mut self, path: PathBuf, line: &str) -> std::io::Result<()> {
        if !self.files.contains_key(&path) {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            self.files.insert(path.clone(), File::create(&path)?);
        }
        let file = self.files.get_mut(&path).expect("inserted above");
        crate::disk::write_all(file, format!("{line}\n").as_bytes())
    }
}

impl MetricLogger for RunMetricLogger {
    fn log(&mut self, update: MetricsUpdate, epoch: usize, split: &Split) {
        if self.failure.failed() {
            return;
        }
        if self.epoch != Some(epoch) {
            self.files.clear();
            self.epoch = Some(epoch);
        }
        let entries = update
            .entries
            .iter()
            .chain(update.entries_numeric.iter().map(|n| &n.entry));
        for entry in entries {
            let name = self
                .names
                .get(&entry.metric_id)
                .cloned()
                .unwrap_or_else(|| "unnamed".into());
            let path = self.path(&name, epoch, split);
            if let Err(source) = self.append(path.clone(), &entry.serialized_entry.serialized) {
                self.failure.record(Error::io(path, source));
                return;
            }
        }
    }

    fn read_numeric(
        &mut self,
        name: &str,
        epoch: usize,
        split: &Split,
    ) -> Result<Vec<NumericEntry>, String> {
        let path = self.path(name, epoch, split);
        let text =
            std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        text.lines()
            .filter(|l| !l.is_empty())
            .map(NumericEntry::deserialize)
            .collect()
    }

    fn log_metric_definition(&mut self, definition: MetricDefinition) {
        self.names.insert(definition.metric_id, definition.name);
    }

    fn log_epoch_summary(&mut self, _summary: EpochSummary) {
        self.files.clear();
    }
}
