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

    /// What this build does with CubeCL's autotune results and compiled kernels (the cuda and
    /// wgpu backends' warm-up); `None` in a build with neither backend.
    pub fn kernel_cache() -> Option<&'static str> {
        if !(cfg!(feature = "wgpu") || cfg!(feature = "cuda")) {
            return None;
        }
        #[cfg(feature = "persistence")]
        keep_compiled_kernels();
        Some(if cfg!(feature = "persistence") {
            "autotune results and compiled kernels kept on disk between runs (under \
             target/environment of the Cargo workspace a run starts in, else ~/.cache/cubecl)"
        } else {
            "redone by every process (autotuning and compiling at the start of each run); \
             build with `--features persistence` to keep it on disk"
        })
    }

    /// The device of host-side work that names no backend (exporting, classifying files,
    /// building a network to count its MACs, reading an optimiser's record): the CPU backend of
    /// this build, flex where compiled. burn's `Device::default()` would pick a GPU backend
    /// whenever one is compiled in, and fail on a machine without its driver.
    pub fn host_device() -> Device {
        Self::ALL
            .into_iter()
            .find(|b| b.single_device() && b.is_compiled())
            .map_or_else(Device::default, |b| b.make_device(None))
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
        Ok(self.make_device(None))
    }

    /// Device `index` of this backend (`None`: its default device), without autodiff.
    pub fn device_at(self, index: Option<usize>) -> Result<Device> {
        let default = self.device()?;
        Ok(match index {
            None => default,
            Some(_) => self.make_device(index),
        })
    }

    #[allow(unreachable_code, deprecated, unused_variables)]
    fn make_device(self, index: Option<usize>) -> Device {
        #[cfg(feature = "persistence")]
        keep_compiled_kernels();
        match self {
            #[cfg(feature = "flex")]
            BackendKind::Flex => Device::flex(),
            #[cfg(feature = "ndarray")]
            BackendKind::Ndarray => Device::ndarray(),
            #[cfg(feature = "wgpu")]
            BackendKind::Wgpu => Device::wgpu(wgpu_device_kind(index)),
            #[cfg(feature = "cuda")]
            BackendKind::Cuda => Device::cuda(index.unwrap_or(0)),
            _ => unreachable!("checked by is_compiled"),
        }
    }

    /// Whether the backend has one device only (the CPU backends): an index other than 0 is
    /// an error there, while naming its device several times still gives several replicas.
    fn single_device(self) -> bool {
        matches!(self, BackendKind::Flex | BackendKind::Ndarray)
    }

    /// The devices of a data-parallel run, one per replica, from a list like `cuda:0,cuda:1`,
    /// `0,1` or `flex,flex`: each entry is `[backend][:index]` or a bare index, and names this
    /// backend. `None` is the backend's default device. A device may be named more than once
    /// (replicas sharing it); CPU backends have device 0 only.
    pub fn parse_devices(self, spec: &str) -> Result<Vec<Option<usize>>> {
        let bad = |message: String| CoreError::InvalidValue {
            key: "devices".into(),
            message,
        };
        let mut out = Vec::new();
        for entry in spec.split(',').map(str::trim) {
            let (name, index) = match entry.split_once(':') {
                Some((name, index)) => (Some(name), Some(index)),
                None if !entry.is_empty() && entry.bytes().all(|b| b.is_ascii_digit()) => {
                    (None, Some(entry))
                }
                None => (Some(entry), None),
            };
            if let Some(name) = name {
                let named: BackendKind = name.parse().map_err(|_| {
                    bad(format!(
                        "`{entry}` is not a device; write `{backend}:INDEX` or `INDEX`, e.g. `{backend}:0,{backend}:1`",
                        backend = self.name()
                    ))
                })?;
                if named != self {
                    return Err(bad(format!(
                        "`{entry}` is a {named} device but the run uses the {self} backend; add `--backend {named}`"
                    )));
                }
            }
            let index = index
                .map(|i| {
                    i.parse::<usize>().map_err(|_| {
                        bad(format!(
                            "`{entry}`: the device index `{i}` is not a non-negative integer"
                        ))
                    })
                })
                .transpose()?;
            if self.single_device() && index.is_some_and(|i| i > 0) {
                return Err(bad(format!(
                    "`{entry}`: the {self} backend has one device, 0; name it several times \
                     (`{self},{self}`) for several replicas on it"
                )));
            }
            out.push(index);
        }
        Ok(out)
    }

    /// Like [`BackendKind::device`], then runs a tiny computation on it, so that a missing GPU
    /// adapter or driver is reported here as an error instead of failing later.
    pub fn probe(self) -> Result<Device> {
        self.probe_at(None)
    }

    /// [`BackendKind::probe`] for device `index` of the backend (`None`: its default device).
    pub fn probe_at(self, index: Option<usize>) -> Result<Device> {
        #[cfg(feature = "cuda")]
        if self == BackendKind::Cuda {
            cuda_driver_present()?;
        }
        let device = self.device_at(index)?;
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

    /// Whether this backend is compiled in and starts here, probing it when it is; the time
    /// the probe took includes starting the device (on a GPU: its runtime and first kernel).
    pub fn status(self) -> BackendStatus {
        let (state, detail, seconds) = if !self.is_compiled() {
            let hint = format!("rebuild with `--features {}`", self.name());
            (BackendState::NotCompiled, hint, None)
        } else {
            let start = std::time::Instant::now();
            let probed = self.probe();
            let seconds = Some(start.elapsed().as_secs_f64());
            match probed {
                Ok(device) => (BackendState::Usable, describe(&device), seconds),
                Err(e) => (BackendState::Unusable, e.to_string(), seconds),
            }
        };
        BackendStatus {
            backend: self,
            state,
            detail,
            probe_seconds: seconds,
        }
    }

    fn hint(self) -> &'static str {
        match self {
            BackendKind::Wgpu => {
                "No GPU adapter was found: install a Vulkan driver (on Debian, \
                 `apt-get install mesa-vulkan-drivers` gives a software one), or use `--backend flex`"
            }
            BackendKind::Cuda => {
                "No CUDA device was found: check the NVIDIA driver (`nvidia-smi` should list \
                 the card), or use `--backend flex`"
            }
            _ => "",
        }
    }
}

/// The device as its runtime names it (a GPU's part name and what its kernels are compiled
/// for) and the backend stack serving it (on wgpu: which shader compiler, `wgpu<spirv>` or
/// `wgpu<wgsl>`), else burn's debug form.
fn describe(device: &Device) -> String {
    #[cfg(any(feature = "wgpu", feature = "cuda"))]
    if let Some(id) = device.identity() {
        use burn::backend::{Backend, Dispatch};
        let stack = <Dispatch as Backend>::name(device.as_dispatch());
        return format!("{} ({}; {stack})", id.name, id.fingerprint);
    }
    format!("{device:?}")
}

/// What [`BackendKind::status`] found.
#[derive(Debug, Clone, Serialize)]
pub struct BackendStatus {
    /// The backend.
    pub backend: BackendKind,
    /// Compiled in, and whether it started.
    pub state: BackendState,
    /// The device when usable, the error when not, the cargo feature when not compiled in.
    pub detail: String,
    /// How long the probe took (absent when not compiled in).
    pub probe_seconds: Option<f64>,
}

/// Whether a backend can run here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BackendState {
    /// Compiled in, and a tiny computation on its default device gave the right answer.
    Usable,
    /// Compiled in, but it did not start (no driver, no adapter) or computed wrongly.
    Unusable,
    /// Not in this build.
    NotCompiled,
}

impl BackendState {
    /// `usable`, `unusable` or `not compiled`.
    pub fn label(self) -> &'static str {
        match self {
            BackendState::Usable => "usable",
            BackendState::Unusable => "unusable",
            BackendState::NotCompiled => "not compiled",
        }
    }
}

/// Switches on CubeCL's on-disk cache of compiled kernels (PTX on cuda), which CubeCL leaves
/// off unless `cubecl.toml` sets `[compilation] cache = true`: without it a `persistence`
/// build keeps only the autotune results, and every process compiles every kernel again.
/// The rest of the configuration is what CubeCL itself would load (`cubecl.toml` of the
/// working folder or a parent, then its environment variables). It has to run before CubeCL
/// reads its configuration, so it runs before the first device is made; a configuration
/// already read is left as it is.
#[cfg(feature = "persistence")]
fn keep_compiled_kernels() {
    use burn::cubecl::config::{CubeClRuntimeConfig, RuntimeConfig};
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let mut config = CubeClRuntimeConfig::from_current_dir().override_from_env();
        config.compilation.cache = true;
        CubeClRuntimeConfig::try_set(config);
    });
}

/// The NVIDIA driver's library, opened here first: burn's cuda backend opens it on a device
/// thread, where its absence is a panic that the probe would only see as a lost tensor.
#[cfg(feature = "cuda")]
#[allow(unsafe_code)]
fn cuda_driver_present() -> Result<()> {
    const NAMES: &[&str] = if cfg!(windows) {
        &["nvcuda.dll"]
    } else {
        &["libcuda.so.1", "libcuda.so"]
    };
    // SAFETY: the driver's library runs only its own initialisers when loaded, as it does when
    // burn's backend loads it.
    let found = NAMES
        .iter()
        .any(|&name| unsafe { libloading::Library::new(name) }.is_ok());
    if found {
        Ok(())
    } else {
        Err(CoreError::Backend(format!(
            "backend `cuda` could not start: the NVIDIA driver's library ({}) was not found. \
             Install the NVIDIA driver (or add the folder holding it to LD_LIBRARY_PATH), \
             or use `--backend flex`",
            NAMES.join(" or ")
        )))
    }
}

/// `DNAL_WGPU_DEVICE=cpu` selects a software (CPU) adapter; otherwise discrete GPU `index`, or
/// the best adapter available when no index is given.
#[cfg(feature = "wgpu")]
fn wgpu_device_kind(index: Option<usize>) -> burn::tensor::DeviceKind {
    use burn::tensor::DeviceKind;
    match (std::env::var("DNAL_WGPU_DEVICE").as_deref(), index) {
        (Ok("cpu"), _) => DeviceKind::Cpu,
        (_, Some(i)) => DeviceKind::DiscreteGpu(i),
        (_, None) => DeviceKind::DefaultDevice,
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A `persistence` build keeps compiled kernels too, not only CubeCL's autotune results.
    #[cfg(all(feature = "persistence", any(feature = "wgpu", feature = "cuda")))]
    #[test]
    fn persistence_builds_cache_compiled_kernels() {
        use burn::cubecl::config::{CubeClRuntimeConfig, RuntimeConfig};
        assert!(
            BackendKind::kernel_cache()
                .unwrap()
                .contains("compiled kernels")
        );
        assert!(CubeClRuntimeConfig::get().compilation.cache);
    }

    #[test]
    fn device_lists_name_indices_of_the_backend() {
        let cuda = BackendKind::Cuda;
        assert_eq!(
            cuda.parse_devices("cuda:0,cuda:1").unwrap(),
            vec![Some(0), Some(1)]
        );
        assert_eq!(cuda.parse_devices("0, 3").unwrap(), vec![Some(0), Some(3)]);
        assert_eq!(cuda.parse_devices("cuda").unwrap(), vec![None]);
        let flex = BackendKind::Flex;
        assert_eq!(
            flex.parse_devices("flex,flex:0").unwrap(),
            vec![None, Some(0)]
        );
    }

    /// Where the NVIDIA driver is missing, the probe names it instead of starting burn's cuda
    /// backend (which panics on a device thread); where it is present, there is nothing to check.
    #[cfg(feature = "cuda")]
    #[test]
    fn cuda_without_its_driver_is_an_error_naming_the_driver() {
        if cuda_driver_present().is_ok() {
            return;
        }
        let err = BackendKind::Cuda.probe().unwrap_err().to_string();
        assert!(err.contains("libcuda.so.1"), "{err}");
        assert!(err.contains("--backend flex"), "{err}");
    }

    #[test]
    fn status_probes_compiled_backends_and_names_the_feature_of_the_others() {
        for b in BackendKind::ALL {
            let s = b.status();
            if b.is_compiled() {
                assert!(s.probe_seconds.is_some(), "{s:?}");
                assert_ne!(s.state, BackendState::NotCompiled, "{s:?}");
            } else {
                assert_eq!(s.state, BackendState::NotCompiled, "{s:?}");
                assert!(
                    s.detail.contains(&format!("--features {}", b.name())),
                    "{s:?}"
                );
            }
        }
        #[cfg(feature = "flex")]
        assert_eq!(BackendKind::Flex.status().state, BackendState::Usable);
    }

    #[test]
    fn bad_device_lists_say_what_to_write() {
        let err = |b: BackendKind, s: &str| b.parse_devices(s).unwrap_err().to_string();
        assert!(err(BackendKind::Flex, "cuda:0").contains("--backend cuda"));
        let one = err(BackendKind::Flex, "flex:1");
        assert!(
            one.contains("one device, 0; name it several times (`flex,flex`)"),
            "{one}"
        );
        assert!(err(BackendKind::Cuda, "gpu0").contains("`cuda:INDEX`"));
        assert!(err(BackendKind::Cuda, "cuda:x").contains("`x`"));
        assert!(err(BackendKind::Cuda, "0,,1").contains("is not a device"));
    }
}
