//! BatchNorm with a per-channel factor (a gate's) folded into its affine transform, the unit's
//! activation and an optional residual, in training (batch statistics, running statistics
//! moved) and in evaluation, on whichever engine the tensors' backend has.

use burn::module::{ModuleMapper, Param, RunningState};
use burn::nn::BatchNorm;
use burn::prelude::*;
#[cfg(any(feature = "flex", feature = "cube"))]
use burn::tensor::DType;

#[cfg(any(feature = "flex", feature = "cube"))]
use crate::cpu::Clamp;
use crate::{Activation, channels};
#[cfg(feature = "cube")]
use crate::{cube, memo, takes_cube_path};
#[cfg(feature = "flex")]
use crate::{flex, outputs, takes_fast_path};

/// What a conv -> BN unit adds to its output before the activation.
pub(crate) enum Residual<'a> {
    None,
    /// A tensor shaped like the output.
    Whole(Tensor<4>),
    /// A stream into whose channels (the positions) the output is added.
    Into(Tensor<4>, &'a [usize]),
}

impl Residual<'_> {
    #[cfg(any(feature = "flex", feature = "cube"))]
    pub(crate) fn tensor(&self) -> Option<&Tensor<4>> {
        match self {
            Self::None => None,
            Self::Whole(r) | Self::Into(r, _) => Some(r),
        }
    }
}

/// `act(bn(x) * factor)`: BatchNorm followed by a per-channel `factor` (a channel gate's,
/// `None` for no gate), with the factor folded into BatchNorm's affine transform, and the
/// activation `act`.
///
/// Training (an autodiff device and a BatchNorm not frozen) uses the batch statistics and
/// updates the running ones exactly as burn's BatchNorm does; evaluation uses the running
/// statistics.
pub fn batch_norm(
    bn: &BatchNorm,
    factor: Option<Tensor<1>>,
    act: Activation,
    x: Tensor<4>,
) -> Tensor<4> {
    batch_norm_gated(bn, factor, act, x, Residual::None)
}

/// A per-channel affine transform `(a, b)` (BatchNorm's `gamma`, `beta`), both multiplied by a
/// per-channel `factor` where there is one.
pub(crate) struct Affine {
    pub(crate) a: Tensor<1>,
    pub(crate) b: Tensor<1>,
    pub(crate) factor: Option<Tensor<1>>,
}

impl Affine {
    /// `bn`'s transform with `factor`.
    pub(crate) fn of(bn: &BatchNorm, factor: Option<Tensor<1>>) -> Self {
        Self {
            a: bn.gamma.val(),
            b: bn.beta.val(),
            factor,
        }
    }

    /// A transform without a factor.
    fn plain(a: Tensor<1>, b: Tensor<1>) -> Self {
        Self { a, b, factor: None }
    }

    /// The transform with the factor multiplied in: `(a * f, b * f)`.
    pub(crate) fn folded(self) -> (Tensor<1>, Tensor<1>) {
        let Self { a, b, factor } = self;
        match factor {
            Some(f) => {
                let f = f.cast(a.dtype());
                (a * f.clone(), b * f)
            }
            None => (a, b),
        }
    }
}

/// `(scale, shift)` of the inference transform `x * scale + shift` with the running statistics.
fn running_affine(
    bn: &BatchNorm,
    a: Tensor<1>,
    b: Tensor<1>,
    device: &Device,
) -> (Tensor<1>, Tensor<1>) {
    let mean = bn.running_mean.value().to_device(device);
    let var = bn.running_var.value().to_device(device);
    let scale = a * (var + bn.epsilon).sqrt().recip();
    let shift = b - mean * scale.clone();
    (scale, shift)
}

/// `act(bn(x) * factor (+ residual))`, in training or evaluation as the device and `bn` say.
pub(crate) fn batch_norm_gated(
    bn: &BatchNorm,
    factor: Option<Tensor<1>>,
    act: Activation,
    x: Tensor<4>,
    residual: Residual,
) -> Tensor<4> {
    let affine = Affine::of(bn, factor);
    let training = x.device().is_autodiff() && bn.training.is_enabled();
    if !training {
        let (a, b) = affine.folded();
        let (scale, shift) = running_affine(bn, a, b, &x.device());
        let [_, c, _, _] = x.dims();
        let y = x * scale.reshape([1, c, 1, 1]) + shift.reshape([1, c, 1, 1]);
        return act.apply(match residual {
            Residual::None => y,
            Residual::Whole(r) => y + r,
            Residual::Into(s, pos) => channels::add_into(s, pos, y),
        });
    }
    let device = x.device();
    // Taken out of the network for the step (the gain stands in meanwhile), so that kernels
    // moving them in place hold their only handles.
    let stand_in = || affine.a.clone().detach();
    let running = Running::Due {
        mean: swap_running(&bn.running_mean, stand_in()).to_device(&device),
        var: swap_running(&bn.running_var, stand_in()).to_device(&device),
        momentum: bn.momentum,
    };
    let Trained {
        output,
        mean,
        variance,
        running,
    } = batch_norm_train_residual(x, affine, bn.epsilon, act, residual, Some(running));
    // The CubeCL kernels move the running statistics themselves; elsewhere tensor operations.
    let (mean, var) = match running {
        Some(Running::Moved { mean, var }) => (mean, var),
        Some(Running::Due {
            mean: old_mean,
            var: old_var,
            momentum: m,
        }) => {
            let moved = |old: Tensor<1>, stat: Tensor<1>| {
                old.mul_scalar(1.0 - m) + stat.detach().mul_scalar(m)
            };
            (moved(old_mean, mean), moved(old_var, variance))
        }
        None => unreachable!("the running statistics passed in come back"),
    };
    drop(swap_running(&bn.running_mean, mean.detach()));
    drop(swap_running(&bn.running_var, var.detach()));
    output
}

/// Makes `value` the running statistic `state` holds, and returns the one it held.
///
/// burn's `RunningState::update` keeps a value per thread and averages them on the next read:
/// with one thread a division by one, which on the CubeCL backends is an element-wise launch
/// per BatchNorm and step (fusion cannot merge it into the opaque kernels around it). A
/// network in dnal is stepped on one thread per replica (data parallelism forks the
/// statistics per replica and averages them itself), so the value is stored directly.
fn swap_running(state: &RunningState<Tensor<1>>, value: Tensor<1>) -> Tensor<1> {
    /// Replaces the one tensor it maps, keeping it.
    struct Swap {
        value: Option<Tensor<1>>,
        held: Option<Tensor<1>>,
    }

    impl ModuleMapper for Swap {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            let Some(value) = self.value.take() else {
                return param;
            };
            let (id, held, mapper) = param.consume();
            // Running statistics are one-dimensional: `D` is 1.
            self.held = Some(Tensor::from_dispatch(held.into_dispatch()));
            Param::from_mapped_value(id, Tensor::from_dispatch(value.into_dispatch()), mapper)
        }
    }

    // Any per-thread values folded in first (none where dnal steps the network).
    drop(state.value_sync());
    let mut swap = Swap {
        value: Some(value),
        held: None,
    };
    // A clone shares the state's value, so mapping it writes the network's statistic; once
    // it is written, the held one is the only handle left.
    let _ = state.clone().map(&mut swap);
    swap.held.expect("a running state maps its one value")
}

/// A BatchNorm's running statistics: due to move in a training step (with the momentum that
/// moves them), or moved by the backend's kernels.
pub(crate) enum Running {
    Due {
        mean: Tensor<1>,
        var: Tensor<1>,
        momentum: f64,
    },
    #[cfg_attr(not(feature = "cube"), allow(dead_code))]
    Moved { mean: Tensor<1>, var: Tensor<1> },
}

/// A training BatchNorm's output, its batch statistics (mean, biased variance), and the running
/// statistics passed in: moved where the backend's kernels move them, else still due.
pub(crate) struct Trained {
    pub(crate) output: Tensor<4>,
    pub(crate) mean: Tensor<1>,
    pub(crate) variance: Tensor<1>,
    pub(crate) running: Option<Running>,
}

impl Trained {
    pub(crate) fn statistics(self) -> (Tensor<4>, Tensor<1>, Tensor<1>) {
        (self.output, self.mean, self.variance)
    }
}

/// `act((x - mean) / sqrt(var + eps) * a + b)` with the batch's statistics, and those
/// statistics (mean, biased variance; detached). On flex the activation is applied in the same
/// pass, and its gradient in BatchNorm's backward passes.
pub fn batch_norm_train(
    x: Tensor<4>,
    a: Tensor<1>,
    b: Tensor<1>,
    epsilon: f64,
    act: Activation,
) -> (Tensor<4>, Tensor<1>, Tensor<1>) {
    let affine = Affine::plain(a, b);
    batch_norm_train_residual(x, affine, epsilon, act, Residual::None, None).statistics()
}

/// A flex BatchNorm extension's output as tensors (the running statistics left to move).
#[cfg(feature = "flex")]
fn norm_tensors(
    out: outputs::NormOutput<burn::backend::Dispatch>,
    running: Option<Running>,
) -> Trained {
    Trained {
        output: Tensor::from_dispatch(out.output),
        mean: Tensor::from_dispatch(out.mean),
        variance: Tensor::from_dispatch(out.variance),
        running,
    }
}

/// [`batch_norm_train`] with `residual` (shaped like `x`: a residual block's shortcut) added
/// before the activation.
pub fn batch_norm_add_train(
    x: Tensor<4>,
    a: Tensor<1>,
    b: Tensor<1>,
    residual: Tensor<4>,
    epsilon: f64,
    act: Activation,
) -> (Tensor<4>, Tensor<1>, Tensor<1>) {
    let affine = Affine::plain(a, b);
    batch_norm_train_residual(x, affine, epsilon, act, Residual::Whole(residual), None).statistics()
}

/// BatchNorm in training with the batch's statistics and the transform `affine`; `running`
/// comes back in [`Trained::running`], moved where the backend's kernels move it (in place
/// where they hold its only handles), else still due (the caller moves it with tensor
/// operations). The CubeCL kernels apply a factor themselves; elsewhere it is multiplied into
/// the transform first.
pub(crate) fn batch_norm_train_residual(
    x: Tensor<4>,
    affine: Affine,
    epsilon: f64,
    act: Activation,
    residual: Residual,
    running: Option<Running>,
) -> Trained {
    #[cfg(feature = "cube")]
    if takes_cube_path(&x)
        && affine.a.dtype() == DType::F32
        && affine.b.dtype() == DType::F32
        && affine
            .factor
            .as_ref()
            .is_none_or(|f| f.dtype() == DType::F32)
        && residual.tensor().is_none_or(|r| r.dtype() == DType::F32)
        && running.as_ref().is_none_or(|r| match r {
            Running::Due { mean, var, .. } => {
                mean.dtype() == DType::F32 && var.dtype() == DType::F32
            }
            Running::Moved { .. } => false,
        })
    {
        use burn::backend::Dispatch;
        use cube::CubeNorm;
        let Clamp { lo, hi } = act.clamp();
        let device = x.device();
        // Without running statistics to move, the kernel moves zeros by nothing.
        let moves = running.is_some();
        let (rm, rv, momentum) = match running {
            Some(Running::Due {
                mean,
                var,
                momentum,
            }) => (mean, var, momentum),
            _ => {
                let zeros = || Tensor::<1>::zeros([affine.a.dims()[0]], &device);
                (zeros(), zeros(), 0.0)
            }
        };
        let Affine { a, b, factor } = affine;
        // Without a factor, a one-element stand-in the kernels never read.
        let gated = factor.is_some();
        let f = factor.unwrap_or_else(|| factor_stand_in(&device));
        let (x, a, b, f) = (
            x.into_dispatch(),
            a.into_dispatch(),
            b.into_dispatch(),
            f.into_dispatch(),
        );
        let (rm, rv) = (rm.into_dispatch(), rv.into_dispatch());
        let out = match residual {
            Residual::None => <Dispatch as CubeNorm>::dnal_cube_norm_train(
                x, a, b, f, gated, rm, rv, momentum, epsilon, lo, hi,
            ),
            Residual::Whole(r) => <Dispatch as CubeNorm>::dnal_cube_norm_add_train(
                x,
                a,
                b,
                f,
                gated,
                r.into_dispatch(),
                rm,
                rv,
                momentum,
                epsilon,
                lo,
                hi,
            ),
            Residual::Into(s, pos) => {
                let map = channels::held_map(pos, s.dims()[1], &s.device());
                <Dispatch as CubeNorm>::dnal_cube_norm_add_into_train(
                    x,
                    a,
                    b,
                    f,
                    gated,
                    s.into_dispatch(),
                    map.into_dispatch(),
                    rm,
                    rv,
                    momentum,
                    epsilon,
                    lo,
                    hi,
                )
            }
        };
        return Trained {
            output: Tensor::from_dispatch(out.output),
            mean: Tensor::from_dispatch(out.mean),
            variance: Tensor::from_dispatch(out.variance),
            running: moves.then(|| Running::Moved {
                mean: Tensor::from_dispatch(out.running_mean),
                var: Tensor::from_dispatch(out.running_var),
            }),
        };
    }
    let (a, b) = affine.folded();
    #[cfg(feature = "flex")]
    if takes_fast_path(&x)
        && a.dtype() == DType::F32
        && b.dtype() == DType::F32
        && residual.tensor().is_none_or(|r| r.dtype() == DType::F32)
    {
        use burn::backend::Dispatch;
        use flex::DnalKernels;
        let Clamp { lo, hi } = act.clamp();
        let (x, a, b) = (x.into_dispatch(), a.into_dispatch(), b.into_dispatch());
        let out = match residual {
            Residual::None => {
                <Dispatch as DnalKernels>::dnal_batch_norm_train(x, a, b, epsilon, lo, hi)
            }
            Residual::Whole(r) => <Dispatch as DnalKernels>::dnal_batch_norm_add_train(
                x,
                a,
                b,
                r.into_dispatch(),
                epsilon,
                lo,
                hi,
            ),
            Residual::Into(s, pos) => <Dispatch as DnalKernels>::dnal_batch_norm_add_into_train(
                x,
                a,
                b,
                s.into_dispatch(),
                pos.to_vec(),
                epsilon,
                lo,
                hi,
            ),
        };
        return norm_tensors(out, running);
    }
    // Elsewhere a stream is added into after BatchNorm, with tensor operations.
    let residual = match residual {
        Residual::None => None,
        Residual::Whole(r) => Some(r),
        Residual::Into(s, pos) => {
            let t = batch_norm_train_residual(
                x,
                Affine::plain(a, b),
                epsilon,
                Activation::Identity,
                Residual::None,
                running,
            );
            return Trained {
                output: act.apply(channels::add_into(s, pos, t.output)),
                ..t
            };
        }
    };
    let out = burn::tensor::module::batch_norm_train(x, a, b, epsilon);
    let y = match residual {
        Some(r) => out.output + r,
        None => out.output,
    };
    Trained {
        output: act.apply(y),
        mean: out.mean,
        variance: out.variance,
        running,
    }
}

/// The factor an ungated BatchNorm hands dnal's CubeCL kernels, which never read it: one
/// element, made once per device and held (a step would otherwise allocate one per ungated
/// BatchNorm, 55 in a ResNet-56 step). Held, it is never a custom operation's last use, so
/// fusion neither frees nor reuses it.
#[cfg(feature = "cube")]
fn factor_stand_in(device: &Device) -> Tensor<1> {
    static STAND_INS: memo::Memo<memo::DeviceKey, Tensor<1>> = memo::Memo::kept();
    Tensor::clone(&STAND_INS.get(memo::device_key(device), || Tensor::zeros([1], device)))
}
