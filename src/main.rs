//! The `dape` command line.

use std::process::ExitCode;

use burn::tensor::backend::AutodiffBackend;
use clap::{Parser, Subcommand};

use dape::backend::{dispatch, BackendKind, BackendTask};
use dape::consistency::{check_encoding, ConsistencyConfig, ConsistencyReport};
use dape::encoding::Hook;
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
    Config {
        /// Encoding name, e.g. dape_kerple_log.
        name: String,
    },
    /// Check, for each encoding, that chunked and KV-cache decoding equal the full forward.
    Check {
        /// Comma-separated encoding names, or `all`.
        #[arg(long, default_value = "all")]
        encodings: String,
        /// Sequence length.
        #[arg(long, default_value_t = 128)]
        length: usize,
        /// Tokens decoded one at a time at the end.
        #[arg(long, default_value_t = 16)]
        decode: usize,
        /// Query rows per chunk.
        #[arg(long, default_value_t = 32)]
        chunk: usize,
        /// Backend.
        #[arg(long, value_enum, default_value_t = BackendKind::Ndarray)]
        backend: BackendKind,
        /// Largest absolute difference that still passes.
        #[arg(long, default_value_t = 1e-3)]
        tolerance: f32,
        /// Write the reports as JSON to this file.
        #[arg(long)]
        json: Option<std::path::PathBuf>,
    },
}

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

struct CheckTask {
    encodings: Vec<PositionalEncodingConfig>,
    config: ConsistencyConfig,
}

impl BackendTask for CheckTask {
    type Output = Vec<ConsistencyReport>;
    fn run<B: AutodiffBackend>(self, device: B::Device, _: BackendKind) -> Result<Self::Output> {
        self.encodings
            .iter()
            .map(|e| check_encoding::<B::InnerBackend>(e, &self.config, &device))
            .collect()
    }
}

fn hook_name(hook: Hook) -> &'static str {
    match hook {
        Hook::None => "none",
        Hook::Embedding => "token embeddings",
        Hook::Rotary => "rotates q, k",
        Hook::Logits => "attention logits",
    }
}

fn run(cli: Cli) -> Result<bool> {
    match cli.command {
        Command::Encodings => {
            println!("| encoding | acts on |\n| --- | --- |");
            for name in ENCODING_NAMES {
                let hook = PositionalEncodingConfig::from_name(name)?.hook();
                println!("| {name} | {} |", hook_name(hook));
            }
            Ok(true)
        }
        Command::Config { name } => {
            let config = PositionalEncodingConfig::from_name(&name)?;
            println!("{}", serde_json::to_string_pretty(&config)?);
            Ok(true)
        }
        Command::Check {
            encodings,
            length,
            decode,
            chunk,
            backend,
            tolerance,
            json,
        } => {
            let config = ConsistencyConfig {
                length,
                decode,
                chunk,
                ..Default::default()
            };
            let task = CheckTask {
                encodings: parse_encodings(&encodings)?,
                config,
            };
            println!(
                "Consistency on {backend}: length {length}, chunk {chunk}, last {decode} tokens decoded with the KV cache"
            );
            let reports = dispatch(backend, task)?;
            println!("| encoding | chunked max abs diff | decode max abs diff | full s | chunked s | decode s/token | ok |");
            println!("| --- | --- | --- | --- | --- | --- | --- |");
            let mut all_ok = true;
            for r in &reports {
                let ok = r.chunked_max_abs_diff <= tolerance && r.decode_max_abs_diff <= tolerance;
                all_ok &= ok;
                println!(
                    "| {} | {:.2e} | {:.2e} | {:.3} | {:.3} | {:.4} | {} |",
                    r.encoding,
                    r.chunked_max_abs_diff,
                    r.decode_max_abs_diff,
                    r.full_seconds,
                    r.chunked_seconds,
                    r.decode_seconds_per_token,
                    if ok { "yes" } else { "NO" }
                );
            }
            if let Some(path) = json {
                let text = serde_json::to_string_pretty(&reports)?;
                std::fs::write(&path, text).map_err(|source| dape::Error::Io { path, source })?;
            }
            Ok(all_ok)
        }
    }
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("error: some checks exceeded the tolerance");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}
