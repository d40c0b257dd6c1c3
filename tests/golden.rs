//! Parity with the DAPE paper's reference PyTorch modules.
//!
//! Loads every `*.json` case in `$DAPE_GOLDEN_DIR` (default: `tests/fixtures/golden`, committed
//! with the crate; see its README), maps the PyTorch parameter names into our modules, runs them
//! on the case's logits (through the offset / KV-cache path when `query_offset > 0`) and
//! compares the causal entries within the case's tolerances. Prints `golden: N cases passed`;
//! exits non-zero on any mismatch, unknown module, or an empty or missing folder: a checkout
//! without its fixtures fails here rather than passing with nothing checked.
//!
//! This is a `harness = false` test so that its summary line is always printed.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use burn::backend::NdArray;
use burn::module::Param;
use burn::nn::Linear;
use burn::prelude::*;
use serde::Deserialize;

use dape::encoding::{
    AdditiveBias, AlibiConfig, CopeConfig, DapeConfig, DapeV2Config, FireActivation, FireConfig,
    KerpleConfig, KerpleKind,
};
use dape::Span;

type B = NdArray<f32>;
type Device = burn::backend::ndarray::NdArrayDevice;

#[derive(Deserialize)]
struct Array {
    shape: Vec<usize>,
    data: Vec<f64>,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    module: String,
    #[serde(default)]
    config: HashMap<String, serde_json::Value>,
    #[serde(default)]
    params: HashMap<String, Array>,
    inputs: HashMap<String, Array>,
    #[serde(default)]
    query_offset: usize,
    output: Array,
    #[serde(default = "default_compare")]
    compare: String,
    atol: f64,
    rtol: f64,
}

fn default_compare() -> String {
    "causal".into()
}

fn tensor<const D: usize>(a: &Array, device: &Device) -> Tensor<B, D> {
    let data: Vec<f32> = a.data.iter().map(|&x| x as f32).collect();
    let flat = Tensor::<B, 1>::from_data(TensorData::new(data, [a.data.len()]), device);
    let shape: [usize; D] = a
        .shape
        .clone()
        .try_into()
        .unwrap_or_else(|s: Vec<usize>| panic!("expected a {D}-d tensor, got shape {s:?}"));
    flat.reshape(shape)
}

struct Params<'a> {
    case: &'a Case,
    device: Device,
}

impl Params<'_> {
    fn get(&self, name: &str) -> Result<&Array, String> {
        self.case
            .params
            .get(name)
            .ok_or_else(|| format!("missing parameter `{name}`"))
    }
    fn t<const D: usize>(&self, name: &str) -> Result<Tensor<B, D>, String> {
        let a = self.get(name)?;
        if a.shape.len() != D {
            return Err(format!(
                "parameter `{name}` has shape {:?}, expected {D} dims",
                a.shape
            ));
        }
        Ok(tensor(a, &self.device))
    }
    /// A parameter flattened to 1-d (scalars become `[1]`).
    fn flat(&self, name: &str) -> Result<Tensor<B, 1>, String> {
        let a = self.get(name)?;
        Ok(tensor(
            &Array {
                shape: vec![a.data.len()],
                data: a.data.clone(),
            },
            &self.device,
        ))
    }
    fn scalar(&self, name: &str) -> Result<f64, String> {
        self.get(name)?
            .data
            .first()
            .copied()
            .ok_or_else(|| format!("parameter `{name}` is empty"))
    }
    /// A PyTorch `nn.Linear` (`weight [out, in]`) as a Burn `Linear` (`weight [in, out]`).
    fn linear(&self, prefix: &str, into: &mut Linear<B>) -> Result<(), String> {
        into.weight = Param::from_tensor(self.t::<2>(&format!("{prefix}.weight"))?.transpose());
        into.bias = Some(Param::from_tensor(self.t::<1>(&format!("{prefix}.bias"))?));
        Ok(())
    }
    fn config_f64(&self, key: &str) -> Option<f64> {
        self.case.config.get(key).and_then(|v| v.as_f64())
    }
}

fn heads_of(case: &Case) -> Result<usize, String> {
    case.config
        .get("heads")
        .and_then(|v| v.as_u64())
        .map(|h| h as usize)
        .or_else(|| case.inputs.get("logits").map(|a| a.shape[1]))
        .ok_or_else(|| "cannot tell the number of heads".to_string())
}

/// The base bias of a module name (`None` for NoPE), with FIRE's activation chosen as in the
/// reference: ReLU standalone, LeakyReLU under DAPE.
fn build_bias(
    p: &Params,
    base: &str,
    heads: usize,
    under_dape: bool,
) -> Result<Option<AdditiveBias<B>>, String> {
    let device = &p.device;
    let err = |e: dape::Error| e.to_string();
    Ok(Some(match base {
        "nope" => return Ok(None),
        "alibi" => {
            let mut m = AlibiConfig::new().init::<B>(heads, device).map_err(err)?;
            m.slopes = p.flat("slopes")?;
            AdditiveBias::Alibi(m)
        }
        "kerple_log" | "kerple_power" => {
            let kind = if base == "kerple_log" {
                KerpleKind::Log
            } else {
                KerpleKind::Power
            };
            let mut m = KerpleConfig::new()
                .init::<B>(heads, kind, device)
                .map_err(err)?;
            m.p = Param::from_tensor(p.flat("bias_p")?);
            m.a = Param::from_tensor(p.flat("bias_a")?);
            AdditiveBias::Kerple(m)
        }
        "fire" => {
            let width = p.get("mlp.0.weight")?.shape[0];
            let activation = if under_dape {
                FireActivation::LeakyRelu
            } else {
                FireActivation::Relu
            };
            let mut m = FireConfig::new()
                .with_mlp_width(width)
                .with_activation(activation)
                .init::<B>(heads, device)
                .map_err(err)?;
            m.c = Param::from_tensor(p.flat("c")?);
            m.l_multiplier = Param::from_tensor(p.flat("L_multiplier")?);
            m.init_l = p.scalar("init_L")?;
            if let Some(eps) = p.config_f64("eps") {
                m.eps = eps;
            }
            p.linear("mlp.0", &mut m.mlp_in)?;
            p.linear("mlp.2", &mut m.mlp_out)?;
            AdditiveBias::Fire(m)
        }
        other => return Err(format!("unknown base encoding `{other}`")),
    }))
}

fn run(case: &Case) -> Result<Tensor<B, 4>, String> {
    let device = Default::default();
    let p = Params {
        case,
        device: Default::default(),
    };
    let logits: Tensor<B, 4> = tensor(
        case.inputs.get("logits").ok_or("missing input `logits`")?,
        &device,
    );
    let [_, h, lq, lk] = logits.dims();
    if lk != case.query_offset + lq {
        return Err(format!(
            "logits have {lk} keys but query_offset {} + {lq} rows",
            case.query_offset
        ));
    }
    let heads = heads_of(case)?;
    if heads != h {
        return Err(format!("config says {heads} heads, logits have {h}"));
    }
    let span = Span {
        query_start: case.query_offset,
        query_len: lq,
        key_len: lk,
        causal: true,
        positions: None,
    };
    let err = |e: dape::Error| e.to_string();
    let m = case.module.as_str();
    if m == "cope" {
        let q: Tensor<B, 4> = tensor(
            case.inputs.get("query").ok_or("missing input `query`")?,
            &device,
        );
        let pos = p.get("pos_emb")?;
        let (dh, npos) = (pos.shape[1], pos.shape[2]);
        let mut cope = CopeConfig::new()
            .with_npos_max(npos)
            .init::<B>(dh, &device)
            .map_err(err)?;
        cope.pos_emb = Param::from_tensor(p.t::<3>("pos_emb")?.reshape([dh, npos]));
        return Ok(cope.forward(logits, q, &span));
    }
    if let Some(base) = m.strip_suffix("_dapev2") {
        let bias = build_bias(&p, base, heads, true)?;
        let w = p.get("mlp2.0.weight")?.shape.clone();
        // The reference zeroes only the input map (see `DapeV2Config::mask_future_hidden`).
        let mut dape = DapeV2Config::new()
            .with_mask_future_hidden(false)
            .with_mlp_width(w[0])
            .with_kernel_size(w[3])
            .init::<B>(heads, bias, &device)
            .map_err(err)?;
        dape.conv_in.weight = Param::from_tensor(p.t::<4>("mlp2.0.weight")?);
        dape.conv_in.bias = Some(Param::from_tensor(p.t::<1>("mlp2.0.bias")?));
        dape.conv_out.weight = Param::from_tensor(p.t::<4>("mlp2.2.weight")?);
        dape.conv_out.bias = Some(Param::from_tensor(p.t::<1>("mlp2.2.bias")?));
        return Ok(dape.forward(logits, &span));
    }
    if let Some(base) = m.strip_suffix("_dape") {
        let bias = build_bias(&p, base, heads, true)?;
        let width = p.get("mlp2.0.weight")?.shape[0];
        let mut dape = DapeConfig::new()
            .with_mlp_width(width)
            .init::<B>(heads, bias, &device)
            .map_err(err)?;
        p.linear("mlp2.0", &mut dape.mlp_in)?;
        p.linear("mlp2.2", &mut dape.mlp_out)?;
        return Ok(dape.forward(logits, &span));
    }
    match build_bias(&p, m, heads, false)? {
        Some(bias) => Ok(logits + bias.forward(&span, &device)),
        None => Err(format!("unknown module `{m}`")),
    }
}

fn check(case: &Case) -> Result<usize, String> {
    if case.compare != "causal" && case.compare != "all" {
        return Err(format!("unknown compare mode `{}`", case.compare));
    }
    let ours = run(case)?;
    let dims = ours.dims();
    if dims.to_vec() != case.output.shape {
        return Err(format!(
            "output shape {:?}, expected {:?}",
            dims, case.output.shape
        ));
    }
    let got: Vec<f32> = ours.into_data().to_vec().map_err(|e| format!("{e:?}"))?;
    let [_, _, lq, lk] = dims;
    let mut compared = 0;
    let mut worst: Option<(usize, f64, f64)> = None;
    for (idx, (&g, &r)) in got.iter().zip(&case.output.data).enumerate() {
        let (i, j) = ((idx / lk) % lq, idx % lk);
        if case.compare == "causal" && j > i + case.query_offset {
            continue;
        }
        compared += 1;
        let g = g as f64;
        let ok = g.is_finite() && (g - r).abs() <= case.atol + case.rtol * r.abs();
        if !ok && worst.is_none_or(|(_, wg, wr)| (g - r).abs() > (wg - wr).abs()) {
            worst = Some((idx, g, r));
        }
    }
    match worst {
        Some((idx, g, r)) => Err(format!(
            "mismatch at flat index {idx}: ours {g}, reference {r} (atol {}, rtol {})",
            case.atol, case.rtol
        )),
        None if compared == 0 => Err("no entries to compare".into()),
        None => Ok(compared),
    }
}

fn golden_dir() -> PathBuf {
    std::env::var_os("DAPE_GOLDEN_DIR").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/golden"),
        PathBuf::from,
    )
}

fn main() {
    let dir = golden_dir();
    if !dir.is_dir() {
        eprintln!(
            "golden: the reference cases are missing: {} is not a folder (they are committed \
             under tests/fixtures/golden; DAPE_GOLDEN_DIR overrides the folder)",
            dir.display()
        );
        std::process::exit(1);
    }
    let mut files: Vec<PathBuf> = match std::fs::read_dir(&dir) {
        Ok(entries) => entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect(),
        Err(e) => {
            eprintln!("golden: cannot read {}: {e}", dir.display());
            std::process::exit(1);
        }
    };
    files.sort();
    if files.is_empty() {
        eprintln!("golden: no *.json cases in {}", dir.display());
        std::process::exit(1);
    }
    let mut failures = 0;
    for path in &files {
        let result = std::fs::read_to_string(path)
            .map_err(|e| e.to_string())
            .and_then(|s| serde_json::from_str::<Case>(&s).map_err(|e| e.to_string()))
            .and_then(|case| check(&case).map(|n| (case.name, n)));
        match result {
            Ok((name, n)) => println!("ok    {name} ({n} entries)"),
            Err(e) => {
                failures += 1;
                println!("FAIL  {}: {e}", path.display());
            }
        }
    }
    if failures > 0 {
        eprintln!("golden: {failures} of {} cases failed", files.len());
        std::process::exit(1);
    }
    println!("golden: {} cases passed", files.len());
}
