//! Choosing the device: one function maps a backend name to a burn [`Device`].

use std::fmt;
use std::str::FromStr;

use burn::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::{CoreError, Result};

/// The backends dnal can run on, each behind the cargo feature of the same name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// burn-flex: pure-Rust CPU backend (the default; the fastest CPU backend measured).
    Flex,
    /// burn-ndarray: CPU backend (deprecated by burn, slow for convolutions).
    Ndarray,
    /// burn-wgpu: any GPU through Vulkan/Metal/DX12, or Mesa's software Vulkan on CPU.
    Wgpu,
    /// burn-cuda: NVIDIA GPUs.
    Cuda,
}

impl BackendKind {
    /// All backends, compiled in or not.
    pub const ALL: [BackendKind; 4] = [
        BackendKind::Flex,
        BackendKind::Ndarray,
        BackendKind::Wgpu,
        BackendKind::Cuda,
    ];

    /// The name used on the command line and as the cargo feature.
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Flex => "flex",
            BackendKind::Ndarray => "ndarray",
            BackendKind::Wgpu => "wgpu",
            BackendKind::Cuda => "cuda",
        }
    }

    /// Whether this build contains the backend.
    pub fn is_compiled(self) -> bool {
        match self {
            BackendKind::Flex => cfg!(feature = "flex"),
            BackendKind::Ndarray => cfg!(feature = "ndarray"),
            BackendKind::Wgpu => cfg!(feature = "wgpu"),
            BackendKind::Cuda => cfg!(feature = "cuda"),
        }
    }

    /// The backends this build contains.
    pub fn compiled() -> Vec<BackendKind> {
        Self::ALL.into_iter().filter(|b| b.is_compiled()).collect()
    }

    /// The device of this backend (without autodiff), or an error naming the cargo feature to
    /// enable when it was not compiled in.
    pub fn device(self) -> Result<Device> {
        if !self.is_compiled() {
            let have: Vec<&str> = Self::compiled().iter().map(|b| b.name()).collect();
            return Err(CoreError::Backend(format!(
                "backend `{name}` is not compiled into this build (compiled: {have}); rebuild with \
                 `--features {name}` (e.g. `cargo xtask train --backend {name}` does this)",
                name = self.name(),
                have = if have.is_empty() {
                    "none".to_string()
                } else {
                    have.join(", ")
                },
            )));
        }
        Ok(self.make_device())
    }

    #[allow(unreachable_code, deprecated)]
    fn make_device(self) -> Device {
        match self {
            #[cfg(feature = "flex")]
            BackendKind::Flex => Device::flex(),
            #[cfg(feature = "ndarray")]
            BackendKind::Ndarray => Device::ndarray(),
            #[cfg(feature = "wgpu")]
            BackendKind::Wgpu => Device::wgpu(wgpu_device_kind()),
            #[cfg(feature = "cuda")]
            BackendKind::Cuda => Device::cuda(0),
            _ => unreachable!("checked by is_compiled"),
        }
    }

    /// Like [`BackendKind::device`], then runs a tiny computation on it, so that a missing GPU
    /// adapter or driver is reported here as an error instead of failing later.
    pub fn probe(self) -> Result<Device> {
        let device = self.device()?;
        let check = device.clone();
        let outcome = std::panic::catch_unwind(move || {
            let t = Tensor::<1>::ones([4], &check).sum();
            t.into_data().try_into_vec_as::<f32>().map(|v| v[0])
        });
        match outcome {
            Ok(Ok(4.0)) => Ok(device),
            Ok(Ok(v)) => Err(CoreError::Backend(format!(
                "backend `{}` computed 1+1+1+1 = {v}; the device is not usable",
                self.name()
            ))),
            Ok(Err(e)) => Err(CoreError::Backend(format!(
                "backend `{}` failed: {e:?}",
                self.name()
            ))),
            Err(panic) => {
                let msg = panic
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| panic.downcast_ref::<&str>().copied())
                    .unwrap_or("unknown error");
                Err(CoreError::Backend(format!(
                    "backend `{}` could not start: {msg}. {}",
                    self.name(),
                    self.hint()
                )))
            }
        }
    }

    fn hint(self) -> &'static str {
        match self {
            BackendKind::Wgpu => {
                "No GPU adapter was found: install a Vulkan driver (on Debian, \
                 `apt-get install mesa-vulkan-drivers` gives a software one), or use `--backend flex`"
            }
            BackendKind::Cuda => {
                "No CUDA device was found: check the NVIDIA driver and CUDA toolkit (libnvrtc), \
                 or use `--backend flex`"
            }
            _ => "",
        }
    }
}

/// `DNAL_WGPU_DEVICE=cpu` selects a software (CPU) adapter; anything else the best available.
#[cfg(feature = "wgpu")]
fn wgpu_device_kind() -> burn::tensor::DeviceKind {
    match std::env::var("DNAL_WGPU_DEVICE").as_deref() {
        Ok("cpu") => burn::tensor::DeviceKind::Cpu,
        _ => burn::tensor::DeviceKind::DefaultDevice,
    }
}

impl Default for BackendKind {
    /// flex when compiled in, else the first compiled backend.
    fn default() -> Self {
        Self::compiled()
            .first()
            .copied()
            .unwrap_or(BackendKind::Flex)
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for BackendKind {
    type Err = CoreError;

    fn from_str(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|b| b.name() == s.to_ascii_lowercase())
            .ok_or_else(|| CoreError::InvalidValue {
                key: "backend".into(),
                message: format!("unknown backend `{s}`; choose one of flex, ndarray, wgpu, cuda"),
            })
    }
}
