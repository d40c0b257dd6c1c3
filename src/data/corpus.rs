//! Real-text corpora: a folder of UTF-8 `.txt` documents, split by document into train, valid
//! and test with a seed, tokenized (`bytes` or GPT-2 BPE) and cached on disk.
//!
//! Any folder works: `scripts/fetch-corpus.sh books data/books` prepares the books corpus of
//! `DATA.md`, but a user's own folder of `.txt` files is read the same way (recursively, in
//! sorted path order). The split is recorded in a [`Manifest`] (names, sizes, SHA-256) that the
//! trainer writes into the run folder and the evaluator checks against.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::data::che::Rng;
use crate::error::{ensure, Error, Result};
use crate::progress::ProgressBar;
use crate::util::say_err;

/// A tokenizer. Token ids are stored as `u16`, which holds both vocabularies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Tokenizer {
    /// UTF-8 bytes: ids 0..=255, and 256 for the end of a document. The fast choice for tiny
    /// CPU models, whose cost a 50k-entry output layer would dominate.
    Bytes,
    /// GPT-2 BPE (`r50k_base`, the DAPE paper's tokenizer, embedded in `tiktoken-rs`):
    /// 50,257 ids, `<|endoftext|>` = 50256 ends a document.
    Gpt2,
}

impl Tokenizer {
    /// The name used in configs and cache keys.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Bytes => "bytes",
            Self::Gpt2 => "gpt2",
        }
    }

    /// Number of ids, including the end-of-document id.
    pub fn vocab_size(&self) -> usize {
        match self {
            Self::Bytes => 257,
            Self::Gpt2 => 50257,
        }
    }

    /// The id that separates documents in a token stream.
    pub fn end_of_document(&self) -> u16 {
        match self {
            Self::Bytes => 256,
            Self::Gpt2 => 50256,
        }
    }

    /// Token ids of `text` (without an end-of-document id).
    pub fn encode(&self, text: &str) -> Vec<u16> {
        match self {
            Self::Bytes => text.bytes().map(u16::from).collect(),
            Self::Gpt2 => tiktoken_rs::r50k_base_singleton()
                .encode_ordinary(text)
                .into_iter()
                // r50k ranks are below 50257, so they fit in u16.
                .map(|id| id as u16)
                .collect(),
        }
    }
}

impl std::str::FromStr for Tokenizer {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "bytes" => Ok(Self::Bytes),
            "gpt2" => Ok(Self::Gpt2),
            other => Err(Error::invalid(
                "tokenizer",
                other,
                "known tokenizers: bytes, gpt2",
            )),
        }
    }
}

/// One document of a corpus.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Document {
    /// Path relative to the corpus folder, with `/` separators.
    pub name: String,
    /// Size in bytes.
    pub bytes: u64,
    /// SHA-256 of the content, lowercase hex.
    pub sha256: String,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn sha256_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::io(path.to_path_buf(), source)
}

/// A folder of `.txt` documents.
#[derive(Clone, Debug)]
pub struct Corpus {
    /// The folder.
    pub root: PathBuf,
    /// Its documents, in sorted name order.
    pub documents: Vec<Document>,
    /// SHA-256 over every document's name and hash: the corpus identity used by the token cache.
    pub sha256: String,
}

fn collect_txt(dir: &Path, found: &mut Vec<PathBuf>) -> Result<()> {
    for entry in std::fs::read_dir(dir).map_err(io(dir))? {
        let path = entry.map_err(io(dir))?.path();
        if path.is_dir() {
            collect_txt(&path, found)?;
        } else if path.extension().is_some_and(|e| e == "txt") {
            found.push(path);
        }
    }
    Ok(())
}

impl Corpus {
    /// Reads the folder's `.txt` files (recursively), checking that each is UTF-8.
    pub fn open(root: &Path) -> Result<Self> {
        if !root.is_dir() {
            return Err(Error::invalid(
                "data",
                root.display(),
                "is not a folder; prepare one with `scripts/fetch-corpus.sh books data/books` \
                 or pass any folder of .txt files",
            ));
        }
        let mut paths = Vec::new();
        collect_txt(root, &mut paths)?;
        paths.sort();
        let mut documents = Vec::with_capacity(paths.len());
        for path in &paths {
            let data = std::fs::read(path).map_err(io(path))?;
            if std::str::from_utf8(&data).is_err() {
                return Err(Error::InvalidInput(format!(
                    "{} is not valid UTF-8",
                    path.display()
                )));
            }
            let name = path
                .strip_prefix(root)
                .unwrap_or(path)
                .components()
                .map(|c| c.as_os_str().to_string_lossy())
                .collect::<Vec<_>>()
                .join("/");
            documents.push(Document {
                name,
                bytes: data.len() as u64,
                sha256: sha256_hex(&data),
            });
        }
        ensure(
            documents.len() >= 3,
            "data",
            root.display(),
            &format!(
                "holds {} .txt documents; a train/valid/test split needs at least 3",
                documents.len()
            ),
        )?;
        let listing: String = documents
            .iter()
            .map(|d| format!("{}\t{}\n", d.name, d.sha256))
            .collect();
        Ok(Self {
            root: root.to_path_buf(),
            sha256: sha256_hex(listing.as_bytes()),
            documents,
        })
    }

    /// The text of document `index`.
    pub fn read(&self, index: usize) -> Result<String> {
        let path = self.root.join(&self.documents[index].name);
        std::fs::read_to_string(&path).map_err(io(&path))
    }

    /// Total size in bytes.
    pub fn bytes(&self) -> u64 {
        self.documents.iter().map(|d| d.bytes).sum()
    }
}

/// How documents are split.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SplitConfig {
    /// Seed of the document shuffle.
    pub seed: u64,
    /// Fraction of documents held out for validation (at least one document).
    pub valid_fraction: f64,
    /// Fraction of documents held out for the test (at least one document).
    pub test_fraction: f64,
}

impl Default for SplitConfig {
    fn default() -> Self {
        Self {
            seed: 0,
            valid_fraction: 0.05,
            test_fraction: 0.05,
        }
    }
}

impl SplitConfig {
    /// Checks the fractions.
    pub fn validate(&self) -> Result<()> {
        for (field, value) in [
            ("split.valid_fraction", self.valid_fraction),
            ("split.test_fraction", self.test_fraction),
        ] {
            ensure(
                (0.0..0.5).contains(&value),
                field,
                value,
                "must be in [0, 0.5)",
            )?;
        }
        Ok(())
    }
}

/// The record of a split: which documents went where, with their hashes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// The corpus folder as given.
    pub corpus: PathBuf,
    /// [`Corpus::sha256`].
    pub corpus_sha256: String,
    /// The split settings.
    pub split: SplitConfig,
    /// Training documents.
    pub train: Vec<Document>,
    /// Validation documents.
    pub valid: Vec<Document>,
    /// Test documents.
    pub test: Vec<Document>,
}

/// The three parts of a split.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    /// Training documents.
    Train,
    /// Validation documents.
    Valid,
    /// Test documents.
    Test,
}

impl Manifest {
    /// Splits `corpus` by document: a seeded shuffle, then test, valid and the rest for train.
    pub fn split(corpus: &Corpus, config: &SplitConfig) -> Result<Self> {
        config.validate()?;
        let n = corpus.documents.len();
        let mut order: Vec<usize> = (0..n).collect();
        let mut rng = Rng::new(config.seed ^ 0xC0_4B05);
        for i in (1..n).rev() {
            let j = rng.below(i as u64 + 1) as usize;
            order.swap(i, j);
        }
        let count = |f: f64| ((n as f64 * f).round() as usize).max(1);
        let (n_test, n_valid) = (count(config.test_fraction), count(config.valid_fraction));
        ensure(
            n_test + n_valid < n,
            "data",
            corpus.root.display(),
            &format!("{n} documents leave none for training after the held-out ones"),
        )?;
        let pick = |range: std::ops::Range<usize>| {
            let mut idx: Vec<usize> = order[range].to_vec();
            idx.sort_unstable();
            idx.into_iter()
                .map(|i| corpus.documents[i].clone())
                .collect::<Vec<_>>()
        };
        Ok(Self {
            corpus: corpus.root.clone(),
            corpus_sha256: corpus.sha256.clone(),
            split: config.clone(),
            test: pick(0..n_test),
            valid: pick(n_test..n_test + n_valid),
            train: pick(n_test + n_valid..n),
        })
    }

    /// The documents of one part.
    pub fn part(&self, part: Part) -> &[Document] {
        match part {
            Part::Train => &self.train,
            Part::Valid => &self.valid,
            Part::Test => &self.test,
        }
    }
}

/// Every document of a corpus as token ids, in the corpus's document order.
#[derive(Clone, Debug)]
pub struct TokenizedCorpus {
    /// The tokenizer used.
    pub tokenizer: Tokenizer,
    /// Document names, parallel to `documents`.
    pub names: Vec<String>,
    /// Token ids per document.
    pub documents: Vec<Vec<u16>>,
}

const CACHE_MAGIC: &[u8; 8] = b"DAPETOK1";

/// Where tokens are cached: `$DAPE_CACHE/tokens`, else `$HOME/.cache/dape/tokens`.
pub fn default_cache_dir() -> PathBuf {
    let base = std::env::var_os("DAPE_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/dape")))
        .unwrap_or_else(|| PathBuf::from(".dape-cache"));
    base.join("tokens")
}

impl TokenizedCorpus {
    /// Tokens of `corpus`, read from `cache_dir` when a cache for this corpus hash and tokenizer
    /// exists, tokenized (with a progress report) and cached otherwise.
    pub fn load(corpus: &Corpus, tokenizer: Tokenizer, cache_dir: &Path) -> Result<Self> {
        let path = cache_dir.join(format!("{}-{}.bin", &corpus.sha256[..24], tokenizer.name()));
        let names: Vec<String> = corpus.documents.iter().map(|d| d.name.clone()).collect();
        if let Ok(data) = std::fs::read(&path) {
            match decode_cache(&data, names.len()) {
                Some(documents) => {
                    return Ok(Self {
                        tokenizer,
                        names,
                        documents,
                    })
                }
                None => say_err!(
                    "token cache {} is damaged; tokenizing again",
                    path.display()
                ),
            }
        }
        let mut bar = ProgressBar::new(
            format!("tokenizing ({})", tokenizer.name()),
            corpus.documents.len(),
        );
        let mut documents = Vec::with_capacity(names.len());
        for i in 0..corpus.documents.len() {
            documents.push(tokenizer.encode(&corpus.read(i)?));
            bar.inc(1);
        }
        bar.finish();
        std::fs::create_dir_all(cache_dir).map_err(io(cache_dir))?;
        crate::util::write_bytes_atomic(&path, &encode_cache(&documents))?;
        Ok(Self {
            tokenizer,
            names,
            documents,
        })
    }

    /// The token ids of the documents of `part` in `manifest`, each followed by the
    /// end-of-document id (for a stream) or not.
    pub fn part(&self, manifest: &Manifest, part: Part) -> Result<Vec<&[u16]>> {
        manifest
            .part(part)
            .iter()
            .map(|doc| {
                self.names
                    .binary_search(&doc.name)
                    .map(|i| self.documents[i].as_slice())
                    .map_err(|_| {
                        Error::InvalidInput(format!(
                            "document {} of the manifest is not in the corpus",
                            doc.name
                        ))
                    })
            })
            .collect()
    }

    /// The documents of `part` concatenated, each followed by the end-of-document id.
    pub fn stream(&self, manifest: &Manifest, part: Part) -> Result<Vec<u16>> {
        let eod = self.tokenizer.end_of_document();
        let docs = self.part(manifest, part)?;
        let mut out = Vec::with_capacity(docs.iter().map(|d| d.len() + 1).sum());
        for doc in docs {
            out.extend_from_slice(doc);
            out.push(eod);
        }
        Ok(out)
    }
}

fn encode_cache(documents: &[Vec<u16>]) -> Vec<u8> {
    let total: usize = documents.iter().map(Vec::len).sum();
    let mut out = Vec::with_capacity(16 + 8 * documents.len() + 2 * total);
    out.extend_from_slice(CACHE_MAGIC);
    out.extend_from_slice(&(documents.len() as u64).to_le_bytes());
    for d in documents {
        out.extend_from_slice(&(d.len() as u64).to_le_bytes());
    }
    for d in documents {
        for t in d {
            out.extend_from_slice(&t.to_le_bytes());
        }
    }
    out
}

fn decode_cache(data: &[u8], expected_docs: usize) -> Option<Vec<Vec<u16>>> {
    let word = |at: usize| -> Option<u64> {
        Some(u64::from_le_bytes(data.get(at..at + 8)?.try_into().ok()?))
    };
    if data.get(..8)? != CACHE_MAGIC || word(8)? as usize != expected_docs {
        return None;
    }
    let lengths: Vec<usize> = (0..expected_docs)
        .map(|i| word(16 + 8 * i).map(|v| v as usize))
        .collect::<Option<_>>()?;
    let mut at = 16 + 8 * expected_docs;
    if data.len() != at + 2 * lengths.iter().sum::<usize>() {
        return None;
    }
    let mut documents = Vec::with_capacity(expected_docs);
    for len in lengths {
        let bytes = &data[at..at + 2 * len];
        documents.push(
            bytes
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .collect(),
        );
        at += 2 * len;
    }
    Some(documents)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_round_trip_and_damage() {
        let docs = vec![vec![1u16, 2, 3], vec![], vec![65535, 0]];
        let data = encode_cache(&docs);
        assert_eq!(decode_cache(&data, 3), Some(docs));
        assert_eq!(decode_cache(&data[..data.len() - 1], 3), None);
        assert_eq!(decode_cache(&data, 2), None);
    }

    #[test]
    fn tokenizers() {
        assert_eq!(Tokenizer::Bytes.encode("hé"), vec![104, 195, 169]);
        // "Hello world" is two GPT-2 tokens: 15496, 995.
        assert_eq!(Tokenizer::Gpt2.encode("Hello world"), vec![15496, 995]);
        assert!("sentencepiece".parse::<Tokenizer>().is_err());
    }
}
