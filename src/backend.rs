//! Backend selection at run time. Every command is generic over `B: AutodiffBackend`;
//! [`dispatch`] monomorphises it for the backend the user names, so no model code is
//! backend-specific. A backend whose Cargo feature was not compiled in is an error naming the
//! feature.

use burn::tensor::backend::AutodiffBackend;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// A backend the CLI can run on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
#[value(rename_all = "kebab-case")]
pub enum BackendKind {
    /// ndarray on the CPU (feature `ndarray`, on by default).
    Ndarray,
    /// WGPU: Vulkan, Metal or DX12; on Linux without a GPU, Mesa's lavapipe (feature `wgpu`).
    Wgpu,
    /// LibTorch on the CPU (feature `tch`).
    TchCpu,
    /// LibTorch on CUDA device 0 (feature `tch`).
    TchCuda,
}

impl BackendKind {
    /// The CLI name.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Ndarray => "ndarray",
            Self::Wgpu => "wgpu",
            Self::TchCpu => "tch-cpu",
            Self::TchCuda => "tch-cuda",
        }
    }

    /// The Cargo feature that compiles this backend in.
    pub fn feature(&self) -> &'static str {
        match self {
            Self::Ndarray => "ndarray",
            Self::Wgpu => "wgpu",
            Self::TchCpu | Self::TchCuda => "tch",
        }
    }

    /// Whether this binary was built with the backend's feature.
    pub fn compiled(&self) -> bool {
        match self {
            Self::Ndarray => cfg!(feature = "ndarray"),
            Self::Wgpu => cfg!(feature = "wgpu"),
            Self::TchCpu | Self::TchCuda => cfg!(feature = "tch"),
        }
    }
}

impl std::fmt::Display for BackendKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Work that runs on any autodiff backend.
pub trait BackendTask {
    /// What the work returns.
    type Output;
    /// Runs on backend `B` (`kind` names it for reports).
    fn run<B: AutodiffBackend>(self, device: B::Device, kind: BackendKind) -> Result<Self::Output>;
}

fn not_compiled(kind: BackendKind) -> Error {
    Error::invalid(
        "backend",
        kind,
        format!(
            "this binary was built without the `{}` feature; rebuild with `--features {}`",
            kind.feature(),
            kind.feature()
        ),
    )
}

/// Runs `task` on the backend `kind`.
pub fn dispatch<T: BackendTask>(kind: BackendKind, task: T) -> Result<T::Output> {
    match kind {
        BackendKind::Ndarray => {
            #[cfg(feature = "ndarray")]
            {
                use burn::backend::{ndarray::NdArrayDevice, Autodiff, NdArray};
                task.run::<Autodiff<NdArray<f32>>>(NdArrayDevice::Cpu, kind)
            }
            #[cfg(not(feature = "ndarray"))]
            {
                let _ = task;
                Err(not_compiled(kind))
            }
        }
        BackendKind::Wgpu => {
            #[cfg(feature = "wgpu")]
            {
                use burn::backend::{wgpu::WgpuDevice, Autodiff, Wgpu};
                task.run::<Autodiff<Wgpu>>(WgpuDevice::default(), kind)
            }
            #[cfg(not(feature = "wgpu"))]
            {
                let _ = task;
                Err(not_compiled(kind))
            }
        }
        BackendKind::TchCpu | BackendKind::TchCuda => {
            #[cfg(feature = "tch")]
            {
                use burn::backend::{libtorch::LibTorchDevice, Autodiff, LibTorch};
                let device = if kind == BackendKind::TchCuda {
                    LibTorchDevice::Cuda(0)
                } else {
                    LibTorchDevice::Cpu
                };
                task.run::<Autodiff<LibTorch<f32>>>(device, kind)
            }
            #[cfg(not(feature = "tch"))]
            {
                let _ = task;
                Err(not_compiled(kind))
            }
        }
    }
}
