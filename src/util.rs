//! Small helpers every layer may use: parameter materialisation, the exact GELU, atomic file
//! writes (through [`crate::disk`]), portable paths for what a run records and a seeded generator. This module imports nothing of the crate
//! but [`crate::error`], so that the layers above it never have to point at each other.

use std::path::{Path, PathBuf};

use burn::module::{ModuleVisitor, Param};
use burn::prelude::*;

use crate::error::{Error, Result};

/// `println!` that never panics: when standard output is a file on a full disk or a closed
/// pipe, the line is lost instead of the run (`println!` would panic, from whatever thread).
#[cfg(feature = "harness")]
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}
#[cfg(feature = "harness")]
pub(crate) use say;

/// `eprintln!` that never panics (see [`say`]).
#[cfg(feature = "harness")]
macro_rules! say_err {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}
#[cfg(feature = "harness")]
pub(crate) use say_err;

/// Initialises every lazily initialised parameter of `module` now.
///
/// Burn initialises parameters on first use, and a clone of a module whose parameters were
/// never used draws *new* random values. Our `init` functions materialise the parameters so
/// that `model.clone()` is always the same model.
pub fn materialize<B: Backend, M: Module<B>>(module: M) -> M {
    struct Touch;
    impl<B: Backend> ModuleVisitor<B> for Touch {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let _ = param.val();
        }
    }
    module.visit(&mut Touch);
    module
}

/// GELU, `x Φ(x) = x (1 + erf(x / √2)) / 2`, written with `erf` so that every backend
/// differentiates it exactly. Burn 0.21's default `gelu_backward`, which ndarray and WGPU use,
/// is the derivative of the tanh approximation (about 1e-4 relative off, while the forward is
/// exact); LibTorch's is exact — so `activation::gelu` gave backend-dependent gradients.
pub fn gelu_exact<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    x.clone() * ((x / std::f64::consts::SQRT_2).erf() + 1.0) * 0.5
}

/// `dir/name-partial-<pid>`: the temporary name of an atomic write, this process's alone: two
/// runs filling the same token cache at once must not rename each other's temporary file away
/// (the second rename then failed with "No such file or directory"). Burn's recorders replace
/// the extension, so the temporary name has none of its own.
pub fn partial_name(path: &Path) -> PathBuf {
    let stem = path
        .file_name()
        .map_or_else(|| "record".into(), |n| n.to_string_lossy().into_owned());
    path.with_file_name(format!("{stem}-partial-{}", std::process::id()))
}

/// A closure that names `path` in an I/O error.
pub fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::io(path, source)
}

/// Writes bytes atomically: to a temporary file, flushed to disk, then renamed into place, so
/// a crash leaves either the old file or the new one, never a truncated one.
pub fn write_bytes_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let tmp = partial_name(path);
    let written = std::fs::File::create(&tmp).and_then(|mut file| {
        crate::disk::write_all(&mut file, data)?;
        file.sync_all()
    });
    if let Err(source) = written {
        // Nothing half-written stays behind to take up space or be read.
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(path, source));
    }
    std::fs::rename(&tmp, path).map_err(|source| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(path, source)
    })
}

/// Writes a text file atomically (see [`write_bytes_atomic`]).
pub fn write_atomic(path: &Path, text: &str) -> Result<()> {
    write_bytes_atomic(path, text.as_bytes())
}

/// Writes `value` as pretty-printed JSON, atomically (see [`write_bytes_atomic`]).
pub fn write_json_atomic<T: serde::Serialize + ?Sized>(path: &Path, value: &T) -> Result<()> {
    write_atomic(path, &serde_json::to_string_pretty(value)?)
}

/// How a run records a path so that its files name no machine: a relative path stays as it
/// is, an absolute path under the working directory becomes relative to it, and any other
/// absolute path is reduced to its last component (the run's name).
pub fn portable_path(path: &Path) -> String {
    if path.is_relative() {
        return path.display().to_string();
    }
    if let Some(rel) = std::env::current_dir()
        .ok()
        .and_then(|cwd| path.strip_prefix(cwd).ok().map(Path::to_path_buf))
    {
        if !rel.as_os_str().is_empty() {
            return rel.display().to_string();
        }
    }
    path.file_name()
        .map_or_else(|| ".".into(), |n| n.to_string_lossy().into_owned())
}

/// A small deterministic pseudo-random generator (SplitMix64).
///
/// The same seed always gives the same stream on every platform, so generated data sets are
/// reproducible from their seed alone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rng {
    state: u64,
}

impl Rng {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    /// The next 64 uniformly random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A uniform integer in `0..n`, without modulo bias (Lemire's multiply-and-reject method).
    ///
    /// # Panics
    ///
    /// If `n == 0`.
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0, "Rng::below needs a non-empty range");
        // 2^64 mod n: products whose low half falls below it are rejected.
        let threshold = n.wrapping_neg() % n;
        loop {
            let product = u128::from(self.next_u64()) * u128::from(n);
            if (product as u64) >= threshold {
                return (product >> 64) as u64;
            }
        }
    }

    /// A uniform integer in `lo..=hi`.
    ///
    /// # Panics
    ///
    /// If `lo > hi`.
    pub fn range_inclusive(&mut self, lo: u64, hi: u64) -> u64 {
        assert!(
            lo <= hi,
            "Rng::range_inclusive needs lo <= hi, got {lo} > {hi}"
        );
        let span = hi - lo;
        if span == u64::MAX {
            self.next_u64()
        } else {
            lo + self.below(span + 1)
        }
    }

    /// A uniform bit, 0 or 1.
    pub fn bit(&mut self) -> i64 {
        (self.next_u64() >> 63) as i64
    }
}

/// Serialises the unit tests that build autodiff graphs and call `backward()`. Burn 0.21's
/// `backward()` sweeps every graph of the process at its end and can free a step of a graph that
/// another thread is still building, so a parameter's gradient goes missing without an error
/// (tracel-ai/burn#5573); the test harness runs tests on several threads. It also serialises
/// the draws from the backend's shared random state: a test that reseeds it and draws the same
/// values twice (`attention::fused_tests`) gets different ones if another test draws between.
#[cfg(test)]
pub(crate) fn autodiff_test_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    // A test that failed while holding the lock poisons it; the next one may still run.
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn another_process_s_temporary_file_is_left_alone() {
        let dir = std::env::temp_dir().join(format!("dape-util-other-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("cache.bin");
        // What another process writing the same file has in flight.
        let theirs = dir.join(format!("cache.bin-partial-{}", std::process::id() + 1));
        std::fs::write(&theirs, "theirs").unwrap();
        let ours = partial_name(&path);
        assert!(
            ours.to_string_lossy()
                .ends_with(&format!("-partial-{}", std::process::id())),
            "{ours:?} is not this process's own"
        );
        write_atomic(&path, "ours").unwrap();
        assert_eq!(std::fs::read_to_string(&theirs).unwrap(), "theirs");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "ours");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn atomic_write_replaces_the_file_and_leaves_no_temporary() {
        let dir = std::env::temp_dir().join(format!("dape-util-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("a.json");
        write_atomic(&path, "one").unwrap();
        write_atomic(&path, "two").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "two");
        assert!(!partial_name(&path).exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn portable_paths_name_no_machine() {
        assert_eq!(portable_path(Path::new("runs/alibi")), "runs/alibi");
        assert_eq!(portable_path(Path::new("/elsewhere/lm/alibi")), "alibi");
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(portable_path(&cwd.join("runs").join("x")), "runs/x");
    }
}
