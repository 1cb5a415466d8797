//! Which engine runs an operation: the process-wide switches (dnal's operations, its direct
//! kernels, how CubeCL reductions finish) and the tests of a tensor's backend and type.

use burn::prelude::*;
use burn::tensor::DType;
use std::sync::atomic::{AtomicBool, Ordering};

static ENABLED: AtomicBool = AtomicBool::new(true);

/// Turns dnal's own operations (on flex, and the CubeCL kernels on cuda and wgpu) on (the
/// default) or off for the whole process; off, every layer uses burn's convolution and
/// `batch_norm_train` (the gate stays folded), and SGD's step burn's tensor operations.
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// Whether dnal's flex operations are on.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

static DIRECT: AtomicBool = AtomicBool::new(true);

/// Lets dnal's flex convolution use its direct kernels (AVX-512 or AVX2, [`crate::isa`]) where they
/// are faster (the default), or makes it use im2col and `gemm` everywhere (the benchmarks time
/// both).
pub fn set_direct(on: bool) {
    DIRECT.store(on, Ordering::Relaxed);
}

/// Whether the direct kernels may be used.
pub fn direct_enabled() -> bool {
    DIRECT.load(Ordering::Relaxed)
}

/// How dnal's CubeCL reductions over the batch (BatchNorm's statistics and their gradients,
/// the depthwise convolution's weight gradient) add up their partial sums: in a second launch, or in the launch that makes them, by the
/// last cube to store its share (one launch fewer per reduction).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// In the same launch where the runtime promises that one cube's writes reach another
    /// within a launch (cuda) and the finishing cube's share is small; else a second launch.
    Auto,
    /// Always in the same launch. Where the runtime does not promise that one cube's writes
    /// reach another (WGSL), only correct where memory is coherent anyway, as on a CPU Vulkan
    /// driver (lavapipe): for testing the folded kernels there.
    Folded,
    /// Always in a second launch.
    Separate,
}

impl std::str::FromStr for Finish {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Finish::Auto),
            "folded" => Ok(Finish::Folded),
            "separate" => Ok(Finish::Separate),
            _ => Err(format!(
                "unknown reduction finish `{s}`; choose one of auto, folded, separate"
            )),
        }
    }
}

static FINISH: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// Sets how dnal's CubeCL reductions finish, process-wide ([`Finish::Auto`] by default).
pub fn set_reduction_finish(finish: Finish) {
    let code = match finish {
        Finish::Auto => 0,
        Finish::Folded => 1,
        Finish::Separate => 2,
    };
    FINISH.store(code, Ordering::Relaxed);
}

/// How dnal's CubeCL reductions finish.
pub fn reduction_finish() -> Finish {
    match FINISH.load(Ordering::Relaxed) {
        1 => Finish::Folded,
        2 => Finish::Separate,
        _ => Finish::Auto,
    }
}

/// Whether `x` takes the flex operation: it is on, `x` is f32 and lives on flex (with or
/// without autodiff).
pub fn takes_fast_path<const D: usize>(x: &Tensor<D>) -> bool {
    enabled() && x.dtype() == DType::F32 && flex_device(x.device())
}

/// Whether `device` is flex (with or without autodiff).
pub fn is_flex(device: &Device) -> bool {
    flex_device(device.clone())
}

fn flex_device(device: Device) -> bool {
    #[cfg(feature = "flex")]
    {
        use burn::backend::DispatchDevice;
        matches!(device.inner().as_dispatch(), DispatchDevice::Flex(_))
    }
    #[cfg(not(feature = "flex"))]
    {
        let _ = device;
        false
    }
}

/// Whether `x` takes dnal's CubeCL kernels: it is f32 on a cubecl device (cuda, wgpu), with or
/// without autodiff, and not empty.
#[cfg(feature = "cube")]
pub(crate) fn takes_cube_path<const D: usize>(x: &Tensor<D>) -> bool {
    use burn::backend::DispatchDevice;
    enabled()
        && x.dtype() == DType::F32
        && x.shape().num_elements() > 0
        && matches!(x.device().inner().as_dispatch(), DispatchDevice::Cube(_))
}
