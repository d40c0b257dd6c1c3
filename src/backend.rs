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

/// Runs one tiny kernel on `device`, turning a missing device (no Vulkan adapter, no CUDA),
/// which panics inside the runtimes, into an error that says what to install.
#[allow(dead_code)]
fn probe<B: AutodiffBackend>(kind: BackendKind, device: &B::Device) -> Result<()> {
    use burn::tensor::Tensor;
    let device = device.clone();
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
        Tensor::<B, 1>::ones([4], &device).sum().into_data()
    }));
    std::panic::set_hook(hook);
    outcome.map(|_| ()).map_err(|payload| {
        let message = payload
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        // Runtimes put whole C++ backtraces in their messages: keep the first line.
        let first: String = message
            .lines()
            .next()
            .unwrap_or("")
            .chars()
            .take(300)
            .collect();
        let hint = match kind {
            BackendKind::Wgpu => {
                "no usable WGPU adapter: install a Vulkan driver (on Debian without a GPU: \
                 apt-get install mesa-vulkan-drivers libvulkan1)"
            }
            BackendKind::TchCuda => {
                "LibTorch sees no CUDA device: run on a machine with an NVIDIA GPU and driver, \
                 or use --backend tch-cpu"
            }
            _ => "the device cannot run a kernel",
        };
        Error::invalid("backend", kind, format!("{hint} ({first})"))
    })
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
                let device = WgpuDevice::default();
                probe::<Autodiff<Wgpu>>(kind, &device)?;
                task.run::<Autodiff<Wgpu>>(device, kind)
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
                probe::<Autodiff<LibTorch<f32>>>(kind, &device)?;
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

/// The devices of one backend to train on: the first `N` (`--devices 2`) or explicit indices
/// (`--devices 0,2`), counted from the device the backend was started with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeviceSpec {
    /// The first `N` devices.
    Count(usize),
    /// These device indices.
    List(Vec<u16>),
}

impl Default for DeviceSpec {
    fn default() -> Self {
        Self::Count(1)
    }
}

impl std::str::FromStr for DeviceSpec {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self> {
        let bad = || {
            Error::invalid(
                "devices",
                text,
                "expected a count (e.g. 2) or a comma-separated list of device indices (e.g. 0,1)",
            )
        };
        if text.contains(',') {
            let list = text
                .split(',')
                .map(|s| s.trim().parse::<u16>().map_err(|_| bad()))
                .collect::<Result<Vec<_>>>()?;
            Ok(Self::List(list))
        } else {
            match text.trim().parse::<usize>() {
                Ok(0) | Err(_) => Err(bad()),
                Ok(n) => Ok(Self::Count(n)),
            }
        }
    }
}

impl DeviceSpec {
    /// Number of devices.
    pub fn len(&self) -> usize {
        match self {
            Self::Count(n) => *n,
            Self::List(l) => l.len(),
        }
    }

    /// Whether no device is named.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Device handles of the backend of `first`. On ndarray, every index is the one CPU device
    /// (burn-train then runs its data-parallel steps side by side on it).
    pub fn devices<D: burn::tensor::backend::Device + Clone>(&self, first: &D) -> Vec<D> {
        use burn::tensor::backend::DeviceId;
        let id = first.to_id();
        let at = |index_id: u16| {
            D::from_id(DeviceId {
                type_id: id.type_id,
                index_id,
            })
        };
        match self {
            Self::Count(1) => vec![first.clone()],
            Self::Count(n) => (0..*n as u16).map(|i| at(id.index_id + i)).collect(),
            Self::List(list) => list.iter().map(|&i| at(i)).collect(),
        }
    }
}
