//! The combined results of several LM runs (`dape plot`, `dape eval` with several runs): runs
//! that differ only in their seed are one row, with the mean perplexity and the seed-to-seed
//! spread; runs still to come are listed as pending, never guessed; and the training cost of
//! each row, in seconds per 1,000 training tokens, from the runs' own `train.json`.

use std::path::{Path, PathBuf};

use crate::error::{ensure, Error, Result};
use crate::eval::lm::{plot_perplexity, read_report, LmEvalReport};
use crate::eval::plot::{bar_chart_svg, Bar, Series};
use crate::train::lm::LmTrainSummary;
use crate::util::{io_error, write_atomic};

/// One evaluated run with what it was trained with.
#[derive(Clone, Debug)]
pub struct RunRecord {
    /// The run's name: its folder's name.
    pub name: String,
    /// `eval.json`.
    pub report: LmEvalReport,
    /// `config.json` (absent for runs made elsewhere).
    pub config: Option<serde_json::Value>,
    /// `train.json` (absent for runs made elsewhere).
    pub train: Option<LmTrainSummary>,
}

impl RunRecord {
    /// Reads a run folder's `eval.json`, and its `config.json` and `train.json` where present.
    pub fn read(run: &Path) -> Result<RunRecord> {
        let report = read_report(run)?;
        let optional = |file: &str| -> Result<Option<String>> {
            let path = run.join(file);
            match std::fs::read_to_string(&path) {
                Ok(text) => Ok(Some(text)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(io_error(&path)(e)),
            }
        };
        let parse = |file: &str, text: &str| -> Result<serde_json::Value> {
            serde_json::from_str(text)
                .map_err(|e| Error::InvalidInput(format!("{}: {e}", run.join(file).display())))
        };
        let config = optional("config.json")?
            .map(|t| parse("config.json", &t))
            .transpose()?;
        let train = optional("train.json")?
            .map(|t| {
                serde_json::from_str::<LmTrainSummary>(&t).map_err(|e| {
                    Error::InvalidInput(format!("{}: {e}", run.join("train.json").display()))
                })
            })
            .transpose()?;
        let name = run
            .file_name()
            .map_or_else(|| report.encoding.clone(), |n| n.to_string_lossy().into());
        Ok(RunRecord {
            name,
            report,
            config,
            train,
        })
    }

    /// The run's seed (`seed` of its config), if known.
    pub fn seed(&self) -> Option<u64> {
        self.config.as_ref()?.get("seed")?.as_u64()
    }

    /// Training cost of the run's last invocation: `(wall, cpu)` seconds per 1,000 training
    /// tokens (`cpu` where `train.json` has CPU time), validation rounds included.
    pub fn cost(&self) -> Option<(f64, Option<f64>)> {
        let t = self.train.as_ref()?;
        let tokens = t.steps.checked_sub(t.started_at_step)? * t.tokens_per_step;
        (tokens > 0).then(|| {
            let per_k = |s: f64| s * 1000.0 / tokens as f64;
            (per_k(t.seconds), t.cpu_seconds.map(per_k))
        })
    }

    /// What makes two runs the same experiment: the config without its seed (the run's name
    /// when there is no config).
    fn key(&self) -> String {
        match &self.config {
            Some(serde_json::Value::Object(map)) => {
                let mut map = map.clone();
                map.remove("seed");
                serde_json::Value::Object(map).to_string()
            }
            _ => format!("run:{}", self.name),
        }
    }
}

/// A run's name without a trailing `-seed<N>`: the name of its row.
pub fn row_name(run: &str) -> &str {
    match run.rsplit_once("-seed") {
        Some((base, n)) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => base,
        _ => run,
    }
}

/// The runs of one row: same config but for the seed.
#[derive(Clone, Debug)]
pub struct RunGroup {
    /// Row name ([`row_name`] of its first run).
    pub name: String,
    /// Its runs, in the order given.
    pub runs: Vec<RunRecord>,
}

impl RunGroup {
    /// The lengths every run of the row evaluated, ascending.
    pub fn lengths(&self) -> Vec<usize> {
        let mut lengths: Vec<usize> = self.runs[0]
            .report
            .lengths
            .iter()
            .map(|l| l.length)
            .filter(|l| self.runs.iter().all(|r| r.ppl_at(*l).is_some()))
            .collect();
        lengths.sort_unstable();
        lengths
    }

    /// Mean over the runs of the last-tokens perplexity at `length`, and max − min (0 for a
    /// single run); `None` unless every run evaluated that length.
    pub fn stats(&self, length: usize) -> Option<(f64, f64)> {
        let values: Vec<f64> = self
            .runs
            .iter()
            .map(|r| r.ppl_at(length))
            .collect::<Option<_>>()?;
        let mean = values.iter().sum::<f64>() / values.len() as f64;
        let (lo, hi) = values
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| {
                (a.min(v), b.max(v))
            });
        Some((mean, hi - lo))
    }

    /// Seeds of the runs, as given (unknown seeds are left out).
    pub fn seeds(&self) -> Vec<u64> {
        self.runs.iter().filter_map(RunRecord::seed).collect()
    }

    /// Mean training cost over the runs that report it: `(wall, cpu)` seconds per 1,000 tokens.
    pub fn cost(&self) -> Option<(f64, Option<f64>)> {
        let costs: Vec<(f64, Option<f64>)> = self.runs.iter().filter_map(RunRecord::cost).collect();
        if costs.is_empty() {
            return None;
        }
        let n = costs.len() as f64;
        let wall = costs.iter().map(|c| c.0).sum::<f64>() / n;
        let cpu: Option<Vec<f64>> = costs.iter().map(|c| c.1).collect();
        Some((wall, cpu.map(|c| c.iter().sum::<f64>() / n)))
    }
}

impl RunRecord {
    fn ppl_at(&self, length: usize) -> Option<f64> {
        self.report
            .lengths
            .iter()
            .find(|l| l.length == length)
            .map(|l| l.ppl_last)
    }
}

/// Groups runs into rows (runs whose configs differ only in `seed`), in order of first
/// appearance. Runs of one row must agree on the training length and the protocol.
pub fn group_runs(runs: Vec<RunRecord>) -> Result<Vec<RunGroup>> {
    let mut keys: Vec<String> = Vec::new();
    let mut groups: Vec<RunGroup> = Vec::new();
    for run in runs {
        let key = run.key();
        match keys.iter().position(|k| *k == key) {
            Some(i) => {
                if let Some(seed) = run.seed() {
                    ensure(
                        !groups[i].seeds().contains(&seed),
                        "run",
                        &run.name,
                        &format!(
                            "has the same config and seed as a run of row {}",
                            groups[i].name
                        ),
                    )?;
                }
                groups[i].runs.push(run)
            }
            None => {
                keys.push(key);
                groups.push(RunGroup {
                    name: row_name(&run.name).to_string(),
                    runs: vec![run],
                });
            }
        }
    }
    Ok(groups)
}

/// The markdown of the combined results: mean perplexity by length (one row per group, with its
/// seed count), the seed-to-seed spread of the rows with several seeds, the training cost, the
/// lengths that could not be evaluated, and the `pending` runs (not finished: no numbers).
pub fn results_markdown(groups: &[RunGroup], pending: &[String]) -> String {
    let mut lengths: Vec<usize> = groups
        .iter()
        .flat_map(|g| {
            g.runs.iter().flat_map(|r| {
                r.report
                    .lengths
                    .iter()
                    .map(|l| l.length)
                    .chain(r.report.skipped.iter().map(|s| s.length))
            })
        })
        .collect();
    lengths.sort_unstable();
    lengths.dedup();
    let first = groups.first().map(|g| &g.runs[0].report);
    let last = first.map_or(256, |r| r.last);
    let seeded = groups.iter().any(|g| g.runs.len() > 1);
    let header = |md: &mut String, first: &str| {
        md.push_str(&format!("| {first} |"));
        if seeded {
            md.push_str(" seeds |");
        }
        for l in &lengths {
            md.push_str(&format!(" {l} |"));
        }
        md.push_str("\n| --- |");
        if seeded {
            md.push_str(" ---: |");
        }
        md.push_str(&" ---: |".repeat(lengths.len()));
        md.push('\n');
    };
    let mut md = format!(
        "Perplexity on the last {last} tokens of each window, by evaluation length (lower is \
         better; training length {}){}.\n\n",
        first.map_or(0, |r| r.train_length),
        if seeded {
            "; rows with several seeds give the mean over their seeds"
        } else {
            ""
        }
    );
    header(&mut md, "encoding");
    for g in groups {
        md.push_str(&format!("| {} |", g.name));
        if seeded {
            md.push_str(&format!(" {} |", g.runs.len()));
        }
        for l in &lengths {
            match g.stats(*l) {
                Some((mean, _)) => md.push_str(&format!(" {mean:.2} |")),
                None => md.push_str(" — |"),
            }
        }
        md.push('\n');
    }
    // A pending run of a row that has finished seeds adds to that row later; a pending run of
    // its own is a row of its own, without numbers.
    let mut pending_rows: Vec<&str> = Vec::new();
    for p in pending.iter().map(|p| row_name(p)) {
        if !groups.iter().any(|g| g.name == p) && !pending_rows.contains(&p) {
            pending_rows.push(p);
            md.push_str(&format!("| {p} |"));
            if seeded {
                md.push_str(" 0 |");
            }
            md.push_str(" pending |");
            md.push_str(&" |".repeat(lengths.len().saturating_sub(1)));
            md.push('\n');
        }
    }
    if seeded {
        md.push_str(
            "\nSeed-to-seed spread (max − min of the last-tokens perplexity over the row's \
             seeds):\n\n",
        );
        header(&mut md, "encoding");
        for g in groups.iter().filter(|g| g.runs.len() > 1) {
            let seeds: Vec<String> = g.seeds().iter().map(u64::to_string).collect();
            md.push_str(&format!(
                "| {} (seeds {}) | {} |",
                g.name,
                seeds.join(", "),
                g.runs.len()
            ));
            for l in &lengths {
                match g.stats(*l) {
                    Some((_, spread)) => md.push_str(&format!(" {spread:.2} |")),
                    None => md.push_str(" — |"),
                }
            }
            md.push('\n');
        }
    }
    let costs: Vec<(&RunGroup, (f64, Option<f64>))> =
        groups.iter().filter_map(|g| Some((g, g.cost()?))).collect();
    if !costs.is_empty() {
        md.push_str(
            "\nTraining cost per 1,000 training tokens (validation rounds included; the mean \
             over the row's runs; CPU seconds count every thread and do not grow while other \
             processes hold the cores):\n\n| encoding | wall s | CPU s |\n| --- | ---: | ---: |\n",
        );
        for (g, (wall, cpu)) in &costs {
            let cpu = cpu.map_or_else(|| "—".to_string(), |c| format!("{c:.3}"));
            md.push_str(&format!("| {} | {wall:.3} | {cpu} |\n", g.name));
        }
    }
    let notes: Vec<String> = groups
        .iter()
        .flat_map(|g| {
            g.runs.iter().flat_map(|r| {
                r.report
                    .skipped
                    .iter()
                    .map(move |s| format!("- {} at {}: {}", r.name, s.length, s.reason))
            })
        })
        .collect();
    if !notes.is_empty() {
        md.push_str("\nNot evaluated:\n\n");
        md.push_str(&notes.join("\n"));
        md.push('\n');
    }
    if let Some(table) = longppl_markdown(groups, &lengths) {
        md.push_str(&table);
    }
    if !pending.is_empty() {
        md.push_str(&format!(
            "\nPending (not finished, so not in the table): {}.\n",
            pending.join(", ")
        ));
    }
    md
}

/// Mean over a row's runs of `value(run, length)`, and max − min; `None` unless every run has it.
fn row_stats(
    g: &RunGroup,
    length: usize,
    value: impl Fn(&RunRecord, usize) -> Option<f64>,
) -> Option<(f64, f64)> {
    let values: Vec<f64> = g
        .runs
        .iter()
        .map(|r| value(r, length))
        .collect::<Option<_>>()?;
    let mean = values.iter().sum::<f64>() / values.len() as f64;
    let hi = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let lo = values.iter().copied().fold(f64::INFINITY, f64::min);
    Some((mean, hi - lo))
}

fn longppl_at(r: &RunRecord, length: usize) -> Option<f64> {
    r.report
        .lengths
        .iter()
        .find(|l| l.length == length)?
        .longppl
}

/// Spearman's rank correlation of two equally long lists (average ranks for ties).
pub fn spearman(a: &[f64], b: &[f64]) -> f64 {
    fn ranks(v: &[f64]) -> Vec<f64> {
        let mut order: Vec<usize> = (0..v.len()).collect();
        order.sort_by(|&i, &j| v[i].total_cmp(&v[j]));
        let mut r = vec![0.0; v.len()];
        let mut i = 0;
        while i < order.len() {
            let mut j = i;
            while j + 1 < order.len() && v[order[j + 1]] == v[order[i]] {
                j += 1;
            }
            for &k in &order[i..=j] {
                r[k] = (i + j) as f64 / 2.0;
            }
            i = j + 1;
        }
        r
    }
    let (ra, rb) = (ranks(a), ranks(b));
    let n = a.len() as f64;
    let mean = (n - 1.0) / 2.0;
    let cov: f64 = ra
        .iter()
        .zip(&rb)
        .map(|(x, y)| (x - mean) * (y - mean))
        .sum();
    let var_a: f64 = ra.iter().map(|x| (x - mean).powi(2)).sum();
    let var_b: f64 = rb.iter().map(|y| (y - mean).powi(2)).sum();
    cov / (var_a * var_b).sqrt()
}

/// The LongPPL table, when some run was evaluated with `--longppl`: LongPPL by length (the mean
/// over a row's seeds, `± spread` with several), and per length Spearman's rank correlation
/// between the rows' orders by perplexity and by LongPPL (1: the same order).
fn longppl_markdown(groups: &[RunGroup], lengths: &[usize]) -> Option<String> {
    if !groups.iter().any(|g| {
        g.runs
            .iter()
            .any(|r| r.report.lengths.iter().any(|l| l.longppl.is_some()))
    }) {
        return None;
    }
    let mut md = String::from(
        "\nLongPPL: perplexity on the key tokens (the targets whose log-likelihood the whole \
         window improves by more than 2 nats over the last 128 tokens, for the fixed evaluator; \
         Fang et al., 2025); lower is better:\n\n| encoding |",
    );
    for l in lengths {
        md.push_str(&format!(" {l} |"));
    }
    md.push_str("\n| --- |");
    md.push_str(&" ---: |".repeat(lengths.len()));
    md.push('\n');
    for g in groups {
        md.push_str(&format!("| {} |", g.name));
        for &l in lengths {
            match row_stats(g, l, longppl_at) {
                Some((mean, spread)) if g.runs.len() > 1 => {
                    md.push_str(&format!(" {mean:.2} ± {spread:.2} |"))
                }
                Some((mean, _)) => md.push_str(&format!(" {mean:.2} |")),
                None => md.push_str(" — |"),
            }
        }
        md.push('\n');
    }
    md.push_str("| Spearman ρ (perplexity order vs LongPPL order) |");
    for &l in lengths {
        let pairs: Vec<(f64, f64)> = groups
            .iter()
            .filter_map(|g| Some((g.stats(l)?.0, row_stats(g, l, longppl_at)?.0)))
            .collect();
        if pairs.len() < 3 {
            md.push_str(" — |");
            continue;
        }
        let (a, b): (Vec<f64>, Vec<f64>) = pairs.into_iter().unzip();
        md.push_str(&format!(" {:.2} |", spearman(&a, &b)));
    }
    md.push('\n');
    Some(md)
}

/// What [`plot_runs`] wrote.
#[derive(Clone, Debug)]
pub struct PlotFiles {
    /// `ppl_by_length.svg`: one curve per row (the mean over its seeds).
    pub curves: PathBuf,
    /// `results.md`.
    pub table: PathBuf,
    /// `train_cost.svg`, when any run has a `train.json`.
    pub cost: Option<PathBuf>,
}

/// Writes `ppl_by_length.svg`, `results.md` and `train_cost.svg` into `out` for the rows of
/// `groups` and the `pending` runs.
pub fn plot_runs(groups: &[RunGroup], pending: &[String], out: &Path) -> Result<PlotFiles> {
    ensure(
        !groups.is_empty(),
        "run",
        "[]",
        "give at least one evaluated run",
    )?;
    std::fs::create_dir_all(out).map_err(io_error(out))?;
    let series: Vec<Series> = groups
        .iter()
        .map(|g| Series {
            name: match g.runs.len() {
                1 => g.name.clone(),
                n => format!("{} (mean of {n} seeds)", g.name),
            },
            points: g
                .lengths()
                .into_iter()
                .filter_map(|l| Some((l as f64, g.stats(l)?.0)))
                .collect(),
        })
        .collect();
    let curves = out.join("ppl_by_length.svg");
    plot_perplexity(&curves, groups[0].runs[0].report.train_length, &series)?;
    let table = out.join("results.md");
    write_atomic(&table, &results_markdown(groups, pending))?;
    let bars: Vec<Bar> = groups
        .iter()
        .filter_map(|g| {
            let (wall, cpu) = g.cost()?;
            Some(Bar {
                name: g.name.clone(),
                value: cpu.unwrap_or(wall),
            })
        })
        .collect();
    let cost = if bars.is_empty() {
        None
    } else {
        let all_cpu = groups
            .iter()
            .filter_map(RunGroup::cost)
            .all(|c| c.1.is_some());
        let path = out.join("train_cost.svg");
        bar_chart_svg(
            &path,
            "Training cost by encoding",
            if all_cpu {
                "CPU seconds (all threads) per 1,000 training tokens"
            } else {
                "seconds per 1,000 training tokens (CPU where recorded, else wall)"
            },
            &bars,
        )?;
        Some(path)
    };
    Ok(PlotFiles {
        curves,
        table,
        cost,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::lm::LengthPerplexity;

    fn run(name: &str, seed: u64, ppl: &[(usize, f64)], seconds: f64) -> RunRecord {
        RunRecord {
            name: name.into(),
            report: LmEvalReport {
                run: name.into(),
                encoding: row_name(name).into(),
                train_length: 128,
                backend: "ndarray".into(),
                tokenizer: "bytes".into(),
                last: 256,
                window_source: "test documents".into(),
                lengths: ppl
                    .iter()
                    .map(|&(length, p)| LengthPerplexity {
                        length,
                        ppl_last: p,
                        ppl_all: p,
                        windows: 1,
                        tokens: length,
                        seconds: 0.0,
                        peak_rss_bytes: None,
                        longppl: None,
                        key_tokens: None,
                    })
                    .collect(),
                skipped: vec![],
            },
            config: Some(serde_json::json!({
                "encoding": {"type": row_name(name)}, "seed": seed, "steps": 10
            })),
            train: Some(LmTrainSummary {
                out: name.into(),
                backend: "ndarray".into(),
                steps: 10,
                started_at_step: 0,
                tokens_per_step: 100,
                seconds,
                cpu_seconds: Some(2.0 * seconds),
                valid_lengths: vec![128],
            }),
        }
    }

    #[test]
    fn seeds_of_one_config_are_one_row_with_mean_and_spread() {
        let groups = group_runs(vec![
            run("alibi", 0, &[(128, 8.0), (256, 9.0)], 1.0),
            run("rope", 0, &[(128, 7.0), (256, 20.0)], 1.0),
            run("alibi-seed1", 1, &[(128, 8.5), (256, 8.0)], 3.0),
        ])
        .unwrap();
        assert_eq!(groups.len(), 2);
        assert_eq!(groups[0].name, "alibi");
        assert_eq!(groups[0].seeds(), [0, 1]);
        assert_eq!(groups[0].stats(128), Some((8.25, 0.5)));
        assert_eq!(groups[0].stats(256), Some((8.5, 1.0)));
        assert_eq!(groups[1].stats(256), Some((20.0, 0.0)));
        // 10 steps of 100 tokens: 1 s and 3 s → 1 and 3 s per 1k tokens, mean 2; CPU twice.
        assert_eq!(groups[0].cost(), Some((2.0, Some(4.0))));
        let pending = ["fox".into(), "rope-seed1".into(), "fox-seed1".into()];
        let md = results_markdown(&groups, &pending);
        assert!(md.contains("| alibi | 2 | 8.25 | 8.50 |"), "{md}");
        assert!(md.contains("| rope | 1 | 7.00 | 20.00 |"), "{md}");
        assert!(
            md.contains("| alibi (seeds 0, 1) | 2 | 0.50 | 1.00 |"),
            "{md}"
        );
        // A pending run with no finished seed is a row without numbers; a pending seed of a
        // finished row is only listed.
        assert!(md.contains("| fox | 0 | pending | |"), "{md}");
        assert_eq!(
            md.matches("| fox |").count(),
            1,
            "one pending row for fox: {md}"
        );
        assert!(!md.contains("| rope-seed1 |"), "{md}");
        assert!(
            md.contains("Pending (not finished, so not in the table): fox, rope-seed1, fox-seed1.")
        );
        assert!(md.contains("| alibi | 2.000 | 4.000 |"), "{md}");
    }

    #[test]
    fn runs_differing_in_more_than_the_seed_are_separate_rows() {
        let mut other = run("alibi-seed1", 1, &[(128, 8.5)], 1.0);
        other.config.as_mut().unwrap()["steps"] = 20.into();
        let groups = group_runs(vec![run("alibi", 0, &[(128, 8.0)], 1.0), other]).unwrap();
        assert_eq!(groups.len(), 2);
        // Without several seeds in a row there is no seeds column and no spread table.
        let md = results_markdown(&groups, &[]);
        assert!(md.contains("| alibi | 8.00 |"), "{md}");
        assert!(!md.contains("spread"), "{md}");
    }

    #[test]
    fn the_same_seed_twice_is_an_error_naming_the_run() {
        let mut copy = run("alibi-copy", 0, &[(128, 8.0)], 1.0);
        copy.config = run("alibi", 0, &[], 1.0).config;
        let err = group_runs(vec![run("alibi", 0, &[(128, 8.0)], 1.0), copy])
            .unwrap_err()
            .to_string();
        assert!(err.contains("alibi-copy"), "{err}");
    }

    #[test]
    fn a_length_missing_from_one_seed_is_not_averaged() {
        let groups = group_runs(vec![
            run("kerple", 0, &[(128, 8.0), (256, 9.0)], 1.0),
            run("kerple-seed1", 1, &[(128, 8.0)], 1.0),
        ])
        .unwrap();
        assert_eq!(groups[0].stats(256), None);
        assert_eq!(groups[0].lengths(), [128]);
        assert!(results_markdown(&groups, &[]).contains("| kerple | 2 | 8.00 | — |"));
    }

    #[test]
    fn row_names_drop_only_a_numeric_seed_suffix() {
        assert_eq!(row_name("kerple_log-seed2"), "kerple_log");
        assert_eq!(row_name("kerple_log"), "kerple_log");
        assert_eq!(row_name("a-seedling"), "a-seedling");
        assert_eq!(row_name("a-seed"), "a-seed");
    }

    #[test]
    fn spearman_is_one_for_the_same_order_and_minus_one_for_the_reverse() {
        let a = [1.0, 2.0, 3.0, 4.0];
        assert!((spearman(&a, &[10.0, 20.0, 30.0, 40.0]) - 1.0).abs() < 1e-12);
        assert!((spearman(&a, &[4.0, 3.0, 2.0, 1.0]) + 1.0).abs() < 1e-12);
        // Ties share their average rank.
        assert!((spearman(&[1.0, 1.0, 2.0], &[1.0, 1.0, 2.0]) - 1.0).abs() < 1e-12);
        assert!(spearman(&a, &[2.0, 1.0, 4.0, 3.0]) < 1.0);
    }

    #[test]
    fn the_longppl_table_gives_means_spreads_and_the_rank_agreement() {
        let mut runs = vec![
            run("a", 0, &[(512, 4.0)], 1.0),
            run("a-seed1", 1, &[(512, 4.2)], 1.0),
            run("b", 0, &[(512, 5.0)], 1.0),
            run("c", 0, &[(512, 6.0)], 1.0),
        ];
        for (r, longppl) in runs.iter_mut().zip([9.0, 11.0, 8.0, 7.0]) {
            r.report.lengths[0].longppl = Some(longppl);
            r.report.lengths[0].key_tokens = Some(3);
        }
        let groups = group_runs(runs).unwrap();
        let md = results_markdown(&groups, &[]);
        assert!(md.contains("LongPPL: perplexity on the key tokens"), "{md}");
        assert!(md.contains("| a | 10.00 ± 2.00 |"), "{md}");
        assert!(md.contains("| c | 7.00 |"), "{md}");
        // Perplexity orders a < b < c, LongPPL c < b < a: the reverse.
        assert!(
            md.contains("| Spearman ρ (perplexity order vs LongPPL order) | -1.00 |"),
            "{md}"
        );
        let plain = group_runs(vec![run("a", 0, &[(512, 4.0)], 1.0)]).unwrap();
        assert!(!results_markdown(&plain, &[]).contains("LongPPL"));
    }
}
