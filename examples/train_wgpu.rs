//! Train a small DAPE-Kerple model on WGPU, then evaluate it by length.
//!
//! `cargo run --release --features wgpu --example train_wgpu [-- STEPS]`
//!
//! Without a GPU, WGPU runs on Mesa's software Vulkan (`apt-get install mesa-vulkan-drivers
//! libvulkan1`): slow, but real. This example uses the built-in CHE data (reverse_string, trained
//! on lengths 1..40, tested on 41..120); the language-model corpus pipeline is not in the crate
//! yet.

use burn::backend::wgpu::WgpuDevice;
use burn::backend::{Autodiff, Wgpu};
use dape::data::che::Task;
use dape::eval::che::{evaluate_run, write_report, CheEvalConfig};
use dape::train::che::{train, CheTrainConfig, Progress};
use dape::PositionalEncodingConfig;

fn main() -> dape::Result<()> {
    let steps = std::env::args()
        .nth(1)
        .map(|s| {
            s.parse::<usize>()
                .map_err(|_| dape::Error::invalid("steps", s, "expected a number of steps"))
        })
        .transpose()?
        .unwrap_or(300);
    let device = WgpuDevice::default();
    let encoding = PositionalEncodingConfig::from_name("dape_kerple_log")?;
    let config = CheTrainConfig::new(Task::ReverseString, encoding)
        .with_steps(steps)
        .with_batch_size(32)
        .with_n_layers(2);
    let out = std::path::Path::new("runs/train_wgpu");
    println!(
        "Training DAPE-Kerple on reverse_string with WGPU for {steps} steps into {}",
        out.display()
    );
    let (model, summary) = train::<Autodiff<Wgpu>>(
        &config,
        out,
        &device,
        Progress::Lines(String::new(), (steps / 10).max(1)),
    )?;
    println!("trained in {:.1}s", summary.seconds);

    let eval = CheEvalConfig {
        lengths: (41..=120).step_by(8).collect(),
        sequences: 32,
        ..Default::default()
    };
    let report = evaluate_run(&model, &config, &eval, out, "wgpu", &device, |l| {
        println!(
            "length {:>4}  accuracy {:>6.2}%",
            l.length,
            100.0 * l.accuracy
        )
    })?;
    write_report(out, &report)?;
    println!(
        "mean accuracy over lengths 41..120: {:.1}%; wrote che.json, che.csv and che.svg into {}",
        100.0 * report.score,
        out.display()
    );
    Ok(())
}
