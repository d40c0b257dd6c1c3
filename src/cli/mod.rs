//! The `dape` command line: argument parsing and printing over library functions, one file per
//! command family.
//!
//! * [`lm`]: `train`, `eval`, `plot` (language models on real text);
//! * [`che`]: `che sample | train | eval | suite` (the Chomsky-hierarchy tasks);
//! * [`retrieval`]: `retrieval sample | train | eval | suite | plot` (MQAR and passkey);
//! * [`tools`]: `encodings`, `config`, `check`, `compare-backends`, `bench`.

/// `println!` that never panics: when standard output is a file on a full disk or a closed
/// pipe, the line is lost instead of the run (`println!` would panic, from whatever thread).
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// `eprintln!` that never panics (see `say`).
macro_rules! say_err {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

mod che;
mod lm;
mod retrieval;
mod tools;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use dape::{PositionalEncodingConfig, Result, ENCODING_NAMES};

#[derive(Parser)]
#[command(
    name = "dape",
    version,
    about = "Positional encodings for length extrapolation, on Burn"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// List every positional encoding and where it acts.
    Encodings,
    /// Print the default JSON config of an encoding.
    Config(tools::ConfigArgs),
    /// Check, for each encoding, that chunked and KV-cache decoding equal the full forward.
    Check(tools::CheckArgs),
    /// Run one model (weights saved once on ndarray) on several backends: differences of
    /// logits and loss against ndarray, and forward / forward+backward tokens per second.
    CompareBackends(tools::CompareArgs),
    /// Train a language model on a folder of .txt documents (burn-train Learner, AdamW, cosine
    /// schedule, checkpoints); writes config, manifest, metric logs and the model into --out.
    Train(lm::TrainArgs),
    /// Perplexity by evaluation length on the test documents of trained runs; writes eval.json,
    /// eval.csv and ppl_by_length.svg into each run, and with several runs one combined plot.
    Eval(lm::EvalArgs),
    /// Time a training or evaluation step of torch_ref.py's model (4 layers, d_model 256,
    /// 8 heads, vocabulary 256); prints one JSON line with torch_ref.py's keys.
    Bench(tools::BenchArgs),
    /// Draw the perplexity-by-length curves of evaluated runs in one plot, with a table.
    Plot(lm::PlotArgs),
    /// Draw the learned positional bias that one query puts on every key it sees, one line per
    /// head (the DAPE paper's Figure 1), for an LM or CHE run; also writes the values as JSON.
    Bias(lm::BiasArgs),
    /// The CHE (Chomsky hierarchy) length-generalisation tasks.
    Che {
        #[command(subcommand)]
        command: che::CheCommand,
    },
    /// Retrieval beyond the training length: multi-query associative recall (MQAR) and
    /// passkey retrieval.
    Retrieval {
        #[command(subcommand)]
        command: retrieval::RetrievalCommand,
    },
}

/// Runs a command; `Ok(false)` when it ran but a check it made failed.
fn run(cli: Cli) -> Result<bool> {
    match cli.command {
        Command::Encodings => tools::encodings(),
        Command::Config(args) => tools::config(args),
        Command::Check(args) => tools::check(args),
        Command::CompareBackends(args) => tools::compare_backends(args),
        Command::Train(args) => lm::train(args),
        Command::Eval(args) => lm::eval(args),
        Command::Bench(args) => tools::bench(args),
        Command::Plot(args) => lm::plot(args),
        Command::Bias(args) => lm::bias(args),
        Command::Che { command } => che::run(command),
        Command::Retrieval { command } => retrieval::run(command),
    }
}

/// An encoding given by name, or by the path of a JSON config.
fn encoding_arg(text: &str) -> Result<PositionalEncodingConfig> {
    let path = std::path::Path::new(text);
    if text.ends_with(".json") || path.is_file() {
        let json = std::fs::read_to_string(path).map_err(dape::util::io_error(path))?;
        return PositionalEncodingConfig::from_json(&json);
    }
    PositionalEncodingConfig::from_name(text)
}

/// A comma-separated list of encoding names, or `all`.
fn parse_encodings(list: &str) -> Result<Vec<PositionalEncodingConfig>> {
    if list == "all" {
        return ENCODING_NAMES
            .iter()
            .map(|n| PositionalEncodingConfig::from_name(n))
            .collect();
    }
    list.split(',')
        .map(|n| PositionalEncodingConfig::from_name(n.trim()))
        .collect()
}

/// Tensors of tens of MiB are allocated and freed at every step. By default glibc's malloc maps
/// each one fresh from the kernel and unmaps it on free (page faults every time), which made a
/// DAPE training step 1.7× slower here (25.3 s vs 14.9 s for 10 CHE steps). Keep freed memory in
/// the process instead.
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called before any other thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_TOP_PAD, 256 << 20);
    }
}

/// The binary's entry point: exit status 0 on success, 1 when a check failed, 2 on an error.
pub fn main() -> ExitCode {
    tune_allocator();
    dape::kernel::join_compute_pool();
    match run(Cli::parse()) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            say_err!("error: some checks exceeded the tolerance");
            ExitCode::FAILURE
        }
        Err(e) => {
            say_err!("error: {e}");
            ExitCode::from(2)
        }
    }
}
