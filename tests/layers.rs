//! The import graph of `src/` only points down.
//!
//! Every module of the crate has a layer; a module may name (`crate::…`, in a `use` or in a
//! path) only modules of strictly lower layers, never a sibling of its own layer and never one
//! above. The layers, bottom up:
//!
//! | layer | modules |
//! | --- | --- |
//! | 0 | `disk` (every byte written to a file: full-disk errors, the write budget tests fill) |
//! | 1 | `error` |
//! | 2 | `util` (materialisation, exact GELU, atomic writes) |
//! | 3 | `kernel` (fused CPU kernels for ndarray, PyTorch's on LibTorch, host-copy helpers) |
//! | 4 | `encoding`, `norm` (the layer norm module over the fused kernel), `optim` (fused AdamW) |
//! | 5 | `attention`, `schedule` (per-layer encodings of a hybrid stack) |
//! | 6 | `model` — the library ends here (it builds without the `harness` feature) |
//! | 7 | `progress`, `sysmem`, `backend` |
//! | 8 | `data` |
//! | 9 | `experiment` (what training and evaluation share) |
//! | 10 | `train`, `eval` (neither reaches into the other) |
//! | 11 | `suite`, `results` (tables of several LM runs), `retrieval_suite`, `bench`, `compare`, `consistency` |
//! | 12 | the CLI (`src/main.rs`, `src/cli/`), which uses the library as `dape::…` |

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

const LAYERS: &[(&str, usize)] = &[
    ("disk", 0),
    ("error", 1),
    ("util", 2),
    ("kernel", 3),
    ("encoding", 4),
    ("norm", 4),
    ("optim", 4),
    ("attention", 5),
    ("schedule", 5),
    ("model", 6),
    ("progress", 7),
    ("sysmem", 7),
    ("backend", 7),
    ("data", 8),
    ("experiment", 9),
    ("train", 10),
    ("eval", 10),
    ("suite", 11),
    ("results", 11),
    ("retrieval_suite", 11),
    ("bench", 11),
    ("compare", 11),
    ("consistency", 11),
    ("cli", 12),
];

/// Items `lib.rs` re-exports at the crate root, and the module each comes from.
const ROOT_EXPORTS: &[(&str, &str)] = &[
    ("Error", "error"),
    ("Result", "error"),
    ("AttentionConfig", "attention"),
    ("KvCache", "attention"),
    ("MultiHeadAttention", "attention"),
    ("PositionalEncoding", "encoding"),
    ("PositionalEncodingConfig", "encoding"),
    ("Span", "encoding"),
    ("ENCODING_NAMES", "encoding"),
    ("LanguageModel", "model"),
    ("LanguageModelConfig", "model"),
    ("LmCache", "model"),
    ("SequenceModel", "model"),
    ("SequenceModelConfig", "model"),
    ("TransformerConfig", "model"),
];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The layer module of a file under `src/`: its first path component (`main.rs` is the CLI).
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).unwrap();
    let first = rel.components().next()?.as_os_str().to_string_lossy();
    match first.as_ref() {
        "lib.rs" => None,
        "main.rs" => Some("cli".into()),
        name => Some(name.trim_end_matches(".rs").to_string()),
    }
}

/// The text without comments (line comments and doc comments; block comments are not used).
fn strip_comments(text: &str) -> String {
    text.lines()
        .map(|line| match line.find("//") {
            Some(i) if !line[..i].contains('"') => &line[..i],
            _ => line,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The crate modules a source text names: `crate::m…` and the first segments of
/// `crate::{a::…, B, …}` (root re-exports mapped to their modules).
fn referenced(text: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find("crate::") {
        let after = &rest[i + "crate::".len()..];
        if let Some(group) = after.strip_prefix('{') {
            let mut depth = 1;
            let end = group
                .char_indices()
                .find(|&(_, c)| {
                    match c {
                        '{' => depth += 1,
                        '}' => depth -= 1,
                        _ => {}
                    }
                    depth == 0
                })
                .map_or(group.len(), |(j, _)| j);
            let inner = &group[..end];
            let mut depth = 0;
            let mut start = 0;
            let mut items = Vec::new();
            for (j, c) in inner.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        items.push(&inner[start..j]);
                        start = j + 1;
                    }
                    _ => {}
                }
            }
            items.push(&inner[start..]);
            for item in items {
                let head = item.trim().split("::").next().unwrap_or("").trim();
                if !head.is_empty() {
                    found.push(head.to_string());
                }
            }
        } else {
            let head: String = after
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            found.push(head);
        }
        rest = after;
    }
    found
        .into_iter()
        .map(|name| {
            ROOT_EXPORTS
                .iter()
                .find(|(item, _)| *item == name)
                .map_or(name, |(_, module)| module.to_string())
        })
        .collect()
}

#[test]
fn imports_only_point_down() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let layers: BTreeMap<&str, usize> = LAYERS.iter().cloned().collect();
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    let mut arrows = 0;
    let mut wrong = Vec::new();
    for file in &files {
        let Some(module) = module_of(&src, file) else {
            continue;
        };
        let Some(&own) = layers.get(module.as_str()) else {
            wrong.push(format!(
                "{}: module `{module}` has no layer in tests/layers.rs",
                file.display()
            ));
            continue;
        };
        let text = strip_comments(&std::fs::read_to_string(file).unwrap());
        for target in referenced(&text) {
            if target == module || target == "self" {
                continue;
            }
            arrows += 1;
            match layers.get(target.as_str()) {
                Some(&layer) if layer < own => {}
                Some(&layer) => wrong.push(format!(
                    "{}: `{module}` (layer {own}) names `crate::{target}` (layer {layer})",
                    file.display()
                )),
                None => wrong.push(format!(
                    "{}: `crate::{target}` is neither a layered module nor a root re-export",
                    file.display()
                )),
            }
        }
    }
    assert!(
        arrows > 50,
        "found only {arrows} crate-internal references: is the scan broken?"
    );
    assert!(
        wrong.is_empty(),
        "imports that point up or sideways:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn the_scan_sees_grouped_and_root_imports() {
    let text = "use crate::{error::Error, model::{A, B}};\nuse crate::Result;\nlet x = crate::util::f();\n// crate::train in a comment";
    let refs = referenced(&strip_comments(text));
    assert_eq!(refs, ["error", "model", "error", "util"]);
}

#[test]
fn the_library_modules_build_without_the_harness() {
    // The core layers are compiled unconditionally in lib.rs; everything above them is behind
    // `harness`. A core module marked `cfg(feature = "harness")` or a harness module without
    // it would break the `default-features = false` build or bloat it.
    let lib =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/lib.rs")).unwrap();
    let lines: Vec<&str> = lib.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        let Some(name) = line
            .strip_prefix("pub mod ")
            .and_then(|r| r.strip_suffix(';'))
        else {
            continue;
        };
        let gated = lines[..i]
            .iter()
            .rev()
            .take_while(|l| l.starts_with("#["))
            .any(|l| l.contains("feature = \"harness\""));
        let layer_of = |module: &str| {
            LAYERS
                .iter()
                .find(|(m, _)| *m == module)
                .unwrap_or_else(|| panic!("lib.rs module `{module}` has no layer"))
                .1
        };
        let layer = layer_of(name);
        assert_eq!(
            gated,
            layer > layer_of("model"),
            "module `{name}` (layer {layer}) must be behind `harness` exactly when it is above `model`"
        );
    }
}
