//! Small helpers every layer may use: parameter materialisation, the exact GELU, atomic file
//! writes and portable paths for what a run records. This module imports nothing of the crate
//! but [`crate::error`], so that the layers above it never have to point at each other.

use std::path::{Path, PathBuf};

use burn::module::{ModuleVisitor, Param};
use burn::prelude::*;

use crate::error::{Error, Result};

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

/// `dir/name-partial`: the temporary name of an atomic write. Burn's recorders replace the
/// extension, so the temporary name has none of its own.
pub fn partial_name(path: &Path) -> PathBuf {
    let stem = path
        .file_name()
        .map_or_else(|| "record".into(), |n| n.to_string_lossy().into_owned());
    path.with_file_name(format!("{stem}-partial"))
}

/// A closure that names `path` in an I/O error.
pub fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes bytes atomically: to a temporary file, flushed to disk, then renamed into place, so
/// a crash leaves either the old file or the new one, never a truncated one.
pub fn write_bytes_atomic(path: &Path, data: &[u8]) -> Result<()> {
    use std::io::Write;
    let tmp = partial_name(path);
    let mut file = std::fs::File::create(&tmp).map_err(io_error(&tmp))?;
    file.write_all(data)
        .and_then(|()| file.sync_all())
        .map_err(io_error(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io_error(path))
}

/// Writes a text file atomically (see [`write_bytes_atomic`]).
pub fn write_atomic(path: &Path, text: &str) -> Result<()> {
    write_bytes_atomic(path, text.as_bytes())
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

#[cfg(test)]
mod tests {
    use super::*;

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
