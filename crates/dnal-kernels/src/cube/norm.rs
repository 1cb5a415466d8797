//! BatchNorm in training on the CubeCL backends (cuda, wgpu) as a burn backend extension:
//! the trait ([`CubeNorm`]), its implementation on burn's cubecl backend with dnal's kernels
//! ([`norm_kernels`], launched by [`norm_launch`]), lazy under fusion (each call one opaque operation in fusion's stream), and
//! its autodiff implementation with the backward pass registered on burn's graph.
//!
//! The BatchNorm -> (gate) -> residual add -> activation tail of every unit is one operation
//! forward and one backward here. Built from burn's operations it took about twenty-five
//! kernel launches per unit and step (two transposing copies for the channel reductions,
//! unfused broadcasts, separate activation and add), which on a GPU costs more than the
//! arithmetic.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::fusion::custom::TensorSpec;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, AutodiffBackend, Cube, ExtensionType, backend_extension};
use burn::tensor::Shape;
use burn_cubecl::CubeBackend;

use super::norm_launch::{self, Affine};

/// The gradients of a BatchNorm with respect to its input, affine parameters and factor, and
/// to the residual added before the clamp (`factor` has one element without a factor, and
/// `residual` the input's shape where there is one and one element otherwise).
#[derive(ExtensionType)]
#[extension_type(fusion)]
pub struct NormGrads<B: burn::backend::Backend> {
    /// Gradient of the input.
    pub x: FloatTensor<B>,
    /// Gradient of `a`.
    pub a: FloatTensor<B>,
    /// Gradient of `b`.
    pub b: FloatTensor<B>,
    /// Gradient of the factor.
    pub factor: FloatTensor<B>,
    /// Gradient of the residual (the clamp's input gradient).
    pub residual: FloatTensor<B>,
}

/// A training BatchNorm's output, the batch statistics it used, and the running statistics
/// moved towards them.
#[derive(ExtensionType)]
#[extension_type(fusion)]
pub struct TrainOutput<B: burn::backend::Backend> {
    /// `clamp((x - mean) * inv_std * a + b (+ residual))`.
    pub output: FloatTensor<B>,
    /// Per-channel batch mean.
    pub mean: FloatTensor<B>,
    /// Per-channel biased batch variance.
    pub variance: FloatTensor<B>,
    /// `running_mean * (1 - momentum) + mean * momentum`.
    pub running_mean: FloatTensor<B>,
    /// `running_var * (1 - momentum) + variance * momentum`.
    pub running_var: FloatTensor<B>,
}

fn normalized_meta(x: &TensorSpec) -> TrainOutputMetadata {
    let c = TensorSpec::new(Shape::new([x.shape[1]]), x.dtype);
    TrainOutputMetadata {
        output: x.clone(),
        mean: c.clone(),
        variance: c.clone(),
        running_mean: c.clone(),
        running_var: c,
    }
}

fn into_meta(x: &TensorSpec, stream: &TensorSpec) -> TrainOutputMetadata {
    TrainOutputMetadata {
        output: stream.clone(),
        ..normalized_meta(x)
    }
}

fn into_grads_meta(x: &TensorSpec, y: &TensorSpec, gated: bool) -> NormGradsMetadata {
    NormGradsMetadata {
        residual: y.clone(),
        ..grads_meta(x, gated, false)
    }
}

fn grads_meta(x: &TensorSpec, gated: bool, residual: bool) -> NormGradsMetadata {
    let c = Shape::new([x.shape[1]]);
    let one = Shape::new([1]);
    let r = if residual {
        x.shape.clone()
    } else {
        one.clone()
    };
    let f = if gated { c.clone() } else { one };
    NormGradsMetadata {
        x: x.clone(),
        a: TensorSpec::new(c.clone(), x.dtype),
        b: TensorSpec::new(c, x.dtype),
        factor: TensorSpec::new(f, x.dtype),
        residual: TensorSpec::new(r, x.dtype),
    }
}

/// BatchNorm with batch statistics on the cubecl backends (f32 `[N, C, H, W]`), with a
/// per-channel affine transform `a`, `b` (gamma and beta), both multiplied by a per-channel
/// `factor` (a gate's) where `gated` (without a gate `factor` is a stand-in never read), an
/// optional residual added, and a clamp to `[lo, hi]` (an infinite bound is no bound).
#[backend_extension(Cube, Fusion, Autodiff)]
pub trait CubeNorm: burn::backend::Backend {
    /// `clamp(bn(x) * a' + b')` (`a' = a * factor`, `b' = b * factor` where `gated`) with the
    /// batch's statistics, those statistics, and the running statistics (`[C]`) moved towards
    /// them by `momentum`.
    #[allow(clippy::too_many_arguments)]
    #[fusion(meta = |x, _a, _b, _f, _gated, _rm, _rv, _momentum, _epsilon, _lo, _hi| normalized_meta(x))]
    fn dnal_cube_norm_train(
        x: FloatTensor<Self>,
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        factor: FloatTensor<Self>,
        gated: bool,
        running_mean: FloatTensor<Self>,
        running_var: FloatTensor<Self>,
        momentum: f64,
        epsilon: f64,
        lo: f32,
        hi: f32,
    ) -> TrainOutput<Self>;

    /// [`dnal_cube_norm_train`](Self::dnal_cube_norm_train) with `residual` (shaped like `x`)
    /// added before the clamp.
    #[allow(clippy::too_many_arguments)]
    #[fusion(meta = |x, _a, _b, _f, _gated, _r, _rm, _rv, _momentum, _epsilon, _lo, _hi| normalized_meta(x))]
    fn dnal_cube_norm_add_train(
        x: FloatTensor<Self>,
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        factor: FloatTensor<Self>,
        gated: bool,
        residual: FloatTensor<Self>,
        running_mean: FloatTensor<Self>,
        running_var: FloatTensor<Self>,
        momentum: f64,
        epsilon: f64,
        lo: f32,
        hi: f32,
    ) -> TrainOutput<Self>;

    /// [`dnal_cube_norm_train`](Self::dnal_cube_norm_train) added into some channels of
    /// `stream` (`[N, S, H, W]`) before the clamp, the output shaped like the stream: `map`
    /// (`[S]`) holds, per stream channel, the BatchNorm channel added into it, or -1.
    #[allow(clippy::too_many_arguments)]
    #[fusion(meta = |x, _a, _b, _f, _gated, s, _map, _rm, _rv, _momentum, _epsilon, _lo, _hi| into_meta(x, s))]
    fn dnal_cube_norm_add_into_train(
        x: FloatTensor<Self>,
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        factor: FloatTensor<Self>,
        gated: bool,
        stream: FloatTensor<Self>,
        map: FloatTensor<Self>,
        running_mean: FloatTensor<Self>,
        running_var: FloatTensor<Self>,
        momentum: f64,
        epsilon: f64,
        lo: f32,
        hi: f32,
    ) -> TrainOutput<Self>;

    /// The gradients of [`dnal_cube_norm_add_into_train`](Self::dnal_cube_norm_add_into_train)
    /// from its (stream-shaped) output `y` and the output's gradient `dy`: the stream's in
    /// `residual`.
    #[allow(clippy::too_many_arguments)]
    #[fusion(meta = |x, y, _dy, _a, _b, _f, gated, _mean, _var, _map, _epsilon, _lo, _hi| into_grads_meta(x, y, *gated))]
    fn dnal_cube_norm_into_backward(
        x: FloatTensor<Self>,
        y: FloatTensor<Self>,
        dy: FloatTensor<Self>,
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        factor: FloatTensor<Self>,
        gated: bool,
        mean: FloatTensor<Self>,
        variance: FloatTensor<Self>,
        map: FloatTensor<Self>,
        epsilon: f64,
        lo: f32,
        hi: f32,
    ) -> NormGrads<Self>;

    /// The gradients of the training BatchNorm from its output `y`, the output's gradient
    /// `dy`, its input `x`, its affine transform and factor, and the statistics it used; with
    /// `residual`, the residual's gradient too.
    #[allow(clippy::too_many_arguments)]
    #[fusion(meta = |x, _y, _dy, _a, _b, _f, gated, _mean, _var, _epsilon, _lo, _hi, residual| grads_meta(x, *gated, *residual))]
    fn dnal_cube_norm_backward(
        x: FloatTensor<Self>,
        y: FloatTensor<Self>,
        dy: FloatTensor<Self>,
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        factor: FloatTensor<Self>,
        gated: bool,
        mean: FloatTensor<Self>,
        variance: FloatTensor<Self>,
        epsilon: f64,
        lo: f32,
        hi: f32,
        residual: bool,
    ) -> NormGrads<Self>;
}

/// The kernels' affine transform: `factor` applied where `gated` (else a stand-in never read).
fn affine(
    a: FloatTensor<CubeBackend>,
    b: FloatTensor<CubeBackend>,
    factor: FloatTensor<CubeBackend>,
    gated: bool,
) -> Affine {
    Affine {
        a,
        b,
        factor: gated.then_some(factor),
    }
}

impl CubeNorm for CubeBackend {
    fn dnal_cube_norm_train(
        x: FloatTensor<Self>,
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        factor: FloatTensor<Self>,
        gated: bool,
        running_mean: FloatTensor<Self>,
        running_var: FloatTensor<Self>,
        momentum: f64,
        epsilon: f64,
        lo: f32,
        hi: f32,
    ) -> TrainOutput<Self> {
        let running = (running_mean, running_var, momentum);
        let affine = affine(a, b, factor, gated);
        norm_launch::forward(x, affine, None, running, epsilon, lo, hi)
    }

    fn dnal_cube_norm_add_train(
        x: FloatTensor<Self>,
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        factor: FloatTensor<Self>,
        gated: bool,
        residual: FloatTensor<Self>,
        running_mean: FloatTensor<Self>,
        running_var: FloatTensor<Self>,
        momentum: f64,
        epsilon: f64,
        lo: f32,
        hi: f32,
    ) -> TrainOutput<Self> {
        let running = (running_mean, running_var, momentum);
        let affine = affine(a, b, factor, gated);
        norm_launch::forward(x, affine, Some(residual), running, epsilon, lo, hi)
    }

    fn dnal_cube_norm_add_into_train(
        x: FloatTensor<Self>,
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        factor: FloatTensor<Self>,
        gated: bool,
        stream: FloatTensor<Self>,
        map: FloatTensor<Self>,
        running_mean: FloatTensor<Self>,
        running_var: FloatTensor<Self>,
        momentum: f64,
        epsilon: f64,
        lo: f32,
        hi: f32,
    ) -> TrainOutput<Self> {
        let running = (running_mean, running_var, momentum);
        let affine = affine(a, b, factor, gated);
        norm_launch::forward_into(x, affine, stream, map, running, epsilon, lo, hi)
    }

    fn dnal_cube_norm_into_backward(
        x: FloatTensor<Self>,
        y: FloatTensor<Self>,
        dy: FloatTensor<Self>,
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        factor: FloatTensor<Self>,
        gated: bool,
        mean: FloatTensor<Self>,
        variance: FloatTensor<Self>,
        map: FloatTensor<Self>,
        epsilon: f64,
        lo: f32,
        hi: f32,
    ) -> NormGrads<Self> {
        let affine = affine(a, b, factor, gated);
        norm_launch::backward_into(x, y, dy, affine, mean, variance, map, epsilon, lo, hi)
    }

    fn dnal_cube_norm_backward(
        x: FloatTensor<Self>,
        y: FloatTensor<Self>,
        dy: FloatTensor<Self>,
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        factor: FloatTensor<Self>,
        gated: bool,
        mean: FloatTensor<Self>,
        variance: FloatTensor<Self>,
        epsilon: f64,
        lo: f32,
        hi: f32,
        residual: bool,
    ) -> NormGrads<Self> {
        let affine = affine(a, b, factor, gated);
        norm_launch::backward(x, y, dy, affine, mean, variance, epsilon, lo, hi, residual)
    }
}

/// What the backward keeps: the forward's input and output, its affine transform and factor,
/// the batch statistics, epsilon and the clamp.
#[derive(Clone, Debug)]
struct NormState {
    x: FloatTensor<Cube>,
    y: FloatTensor<Cube>,
    a: FloatTensor<Cube>,
    b: FloatTensor<Cube>,
    factor: FloatTensor<Cube>,
    gated: bool,
    mean: FloatTensor<Cube>,
    variance: FloatTensor<Cube>,
    epsilon: f64,
    lo: f32,
    hi: f32,
}

impl NormState {
    /// The gradients from the output's gradient `dy`: through the plain backward, or with
    /// `map` through the one of an output added into a stream.
    fn grads(
        self,
        dy: FloatTensor<Cube>,
        residual: bool,
        map: Option<FloatTensor<Cube>>,
    ) -> NormGrads<Cube> {
        let Self {
            x,
            y,
            a,
            b,
            factor,
            gated,
            mean,
            variance,
            epsilon,
            lo,
            hi,
        } = self;
        match map {
            Some(map) => Cube::dnal_cube_norm_into_backward(
                x, y, dy, a, b, factor, gated, mean, variance, map, epsilon, lo, hi,
            ),
            None => Cube::dnal_cube_norm_backward(
                x, y, dy, a, b, factor, gated, mean, variance, epsilon, lo, hi, residual,
            ),
        }
    }
}

#[derive(Debug)]
struct NormBackward;

impl Backward<Cube, 4> for NormBackward {
    type State = NormState;

    fn backward(self, ops: Ops<Self::State, 4>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dy = grads.consume::<Cube>(&ops.node);
        let g = ops.state.grads(dy, false, None);
        register(
            grads,
            ops.parents.map(|n| n.map(|n| n.id)),
            [g.x, g.a, g.b, g.factor],
        );
    }
}

#[derive(Debug)]
struct NormAddBackward;

impl Backward<Cube, 5> for NormAddBackward {
    type State = NormState;

    fn backward(self, ops: Ops<Self::State, 5>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dy = grads.consume::<Cube>(&ops.node);
        let g = ops.state.grads(dy, true, None);
        register(
            grads,
            ops.parents.map(|n| n.map(|n| n.id)),
            [g.x, g.a, g.b, g.factor, g.residual],
        );
    }
}

#[derive(Debug)]
struct NormIntoBackward;

impl Backward<Cube, 5> for NormIntoBackward {
    /// [`NormState`] (its output the stream-shaped one) and the channel map.
    type State = (NormState, FloatTensor<Cube>);

    fn backward(self, ops: Ops<Self::State, 5>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dy = grads.consume::<Cube>(&ops.node);
        let (state, map) = ops.state;
        let g = state.grads(dy, false, Some(map));
        register(
            grads,
            ops.parents.map(|n| n.map(|n| n.id)),
            [g.x, g.a, g.b, g.factor, g.residual],
        );
    }
}

/// Registers each gradient whose parent is tracked.
fn register<const N: usize>(
    grads: &mut Gradients,
    ids: [Option<burn::backend::autodiff::NodeId>; N],
    values: [FloatTensor<Cube>; N],
) {
    for (id, grad) in ids.into_iter().zip(values) {
        if let Some(id) = id {
            grads.register::<Cube>(id, grad);
        }
    }
}

/// A training call's input, affine transform and factor on the inner backend, which its
/// backward keeps.
struct Inner {
    x: FloatTensor<Cube>,
    a: FloatTensor<Cube>,
    b: FloatTensor<Cube>,
    factor: FloatTensor<Cube>,
}

impl Inner {
    fn new<C: CheckpointStrategy>([x, a, b, factor]: [FloatTensor<Autodiff<Cube, C>>; 4]) -> Self {
        Self {
            x: x.into_primitive(),
            a: a.into_primitive(),
            b: b.into_primitive(),
            factor: factor.into_primitive(),
        }
    }

    /// What the backward keeps of a call with these inputs and `out`.
    fn state(
        &self,
        out: &TrainOutput<Cube>,
        gated: bool,
        epsilon: f64,
        (lo, hi): (f32, f32),
    ) -> NormState {
        NormState {
            x: self.x.clone(),
            y: out.output.clone(),
            a: self.a.clone(),
            b: self.b.clone(),
            factor: self.factor.clone(),
            gated,
            mean: out.mean.clone(),
            variance: out.variance.clone(),
            epsilon,
            lo,
            hi,
        }
    }
}

impl<C: CheckpointStrategy> CubeNorm for Autodiff<Cube, C> {
    fn dnal_cube_norm_train(
        x: FloatTensor<Self>,
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        factor: FloatTensor<Self>,
        gated: bool,
        running_mean: FloatTensor<Self>,
        running_var: FloatTensor<Self>,
        momentum: f64,
        epsilon: f64,
        lo: f32,
        hi: f32,
    ) -> TrainOutput<Self> {
        let prep = NormBackward
            .prepare::<C>([x.node(), a.node(), b.node(), factor.node()])
            .compute_bound()
            .stateful();
        let i = Inner::new::<C>([x, a, b, factor]);
        // Moved, not cloned: the kernels move the running statistics in place where they hold
        // their only handles.
        let (rm, rv) = (running_mean.into_primitive(), running_var.into_primitive());
        let out = Cube::dnal_cube_norm_train(
            i.x.clone(),
            i.a.clone(),
            i.b.clone(),
            i.factor.clone(),
            gated,
            rm,
            rv,
            momentum,
            epsilon,
            lo,
            hi,
        );
        let output = match prep {
            OpsKind::Tracked(prep) => {
                prep.finish(i.state(&out, gated, epsilon, (lo, hi)), out.output.clone())
            }
            OpsKind::UnTracked(prep) => prep.finish(out.output.clone()),
        };
        tracked::<C>(output, out)
    }

    fn dnal_cube_norm_add_train(
        x: FloatTensor<Self>,
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        factor: FloatTensor<Self>,
        gated: bool,
        residual: FloatTensor<Self>,
        running_mean: FloatTensor<Self>,
        running_var: FloatTensor<Self>,
        momentum: f64,
        epsilon: f64,
        lo: f32,
        hi: f32,
    ) -> TrainOutput<Self> {
        let prep = NormAddBackward
            .prepare::<C>([x.node(), a.node(), b.node(), factor.node(), residual.node()])
            .compute_bound()
            .stateful();
        let r = residual.into_primitive();
        let i = Inner::new::<C>([x, a, b, factor]);
        // Moved, not cloned: the kernels move the running statistics in place where they hold
        // their only handles.
        let (rm, rv) = (running_mean.into_primitive(), running_var.into_primitive());
        let out = Cube::dnal_cube_norm_add_train(
            i.x.clone(),
            i.a.clone(),
            i.b.clone(),
            i.factor.clone(),
            gated,
            r,
            rm,
            rv,
            momentum,
            epsilon,
            lo,
            hi,
        );
        let output = match prep {
            OpsKind::Tracked(prep) => {
                prep.finish(i.state(&out, gated, epsilon, (lo, hi)), out.output.clone())
            }
            OpsKind::UnTracked(prep) => prep.finish(out.output.clone()),
        };
        tracked::<C>(output, out)
    }

    fn dnal_cube_norm_add_into_train(
        x: FloatTensor<Self>,
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        factor: FloatTensor<Self>,
        gated: bool,
        stream: FloatTensor<Self>,
        map: FloatTensor<Self>,
        running_mean: FloatTensor<Self>,
        running_var: FloatTensor<Self>,
        momentum: f64,
        epsilon: f64,
        lo: f32,
        hi: f32,
    ) -> TrainOutput<Self> {
        let prep = NormIntoBackward
            .prepare::<C>([x.node(), a.node(), b.node(), factor.node(), stream.node()])
            .compute_bound()
            .stateful();
        let (s, map) = (stream.into_primitive(), map.into_primitive());
        let i = Inner::new::<C>([x, a, b, factor]);
        // Moved, not cloned: the kernels move the running statistics in place where they hold
        // their only handles.
        let (rm, rv) = (running_mean.into_primitive(), running_var.into_primitive());
        let out = Cube::dnal_cube_norm_add_into_train(
            i.x.clone(),
            i.a.clone(),
            i.b.clone(),
            i.factor.clone(),
            gated,
            s,
            map.clone(),
            rm,
            rv,
            momentum,
            epsilon,
            lo,
            hi,
        );
        let output = match prep {
            OpsKind::Tracked(prep) => prep.finish(
                (i.state(&out, gated, epsilon, (lo, hi)), map),
                out.output.clone(),
            ),
            OpsKind::UnTracked(prep) => prep.finish(out.output.clone()),
        };
        tracked::<C>(output, out)
    }

    fn dnal_cube_norm_into_backward(
        x: FloatTensor<Self>,
        y: FloatTensor<Self>,
        dy: FloatTensor<Self>,
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        factor: FloatTensor<Self>,
        gated: bool,
        mean: FloatTensor<Self>,
        variance: FloatTensor<Self>,
        map: FloatTensor<Self>,
        epsilon: f64,
        lo: f32,
        hi: f32,
    ) -> NormGrads<Self> {
        // Not differentiated itself: the gradients as constants.
        constants::<C>(Cube::dnal_cube_norm_into_backward(
            x.into_primitive(),
            y.into_primitive(),
            dy.into_primitive(),
            a.into_primitive(),
            b.into_primitive(),
            factor.into_primitive(),
            gated,
            mean.into_primitive(),
            variance.into_primitive(),
            map.into_primitive(),
            epsilon,
            lo,
            hi,
        ))
    }

    fn dnal_cube_norm_backward(
        x: FloatTensor<Self>,
        y: FloatTensor<Self>,
        dy: FloatTensor<Self>,
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        factor: FloatTensor<Self>,
        gated: bool,
        mean: FloatTensor<Self>,
        variance: FloatTensor<Self>,
        epsilon: f64,
        lo: f32,
        hi: f32,
        residual: bool,
    ) -> NormGrads<Self> {
        // Not differentiated itself: the gradients as constants.
        constants::<C>(Cube::dnal_cube_norm_backward(
            x.into_primitive(),
            y.into_primitive(),
            dy.into_primitive(),
            a.into_primitive(),
            b.into_primitive(),
            factor.into_primitive(),
            gated,
            mean.into_primitive(),
            variance.into_primitive(),
            epsilon,
            lo,
            hi,
            residual,
        ))
    }
}

/// Gradients on the autodiff backend, as constants.
fn constants<C: CheckpointStrategy>(g: NormGrads<Cube>) -> NormGrads<Autodiff<Cube, C>> {
    NormGrads {
        x: Autodiff::<Cube, C>::from_inner(g.x),
        a: Autodiff::<Cube, C>::from_inner(g.a),
        b: Autodiff::<Cube, C>::from_inner(g.b),
        factor: Autodiff::<Cube, C>::from_inner(g.factor),
        residual: Autodiff::<Cube, C>::from_inner(g.residual),
    }
}

/// The autodiff output: the tracked `output`, the untracked statistics.
fn tracked<C: CheckpointStrategy>(
    output: FloatTensor<Autodiff<Cube, C>>,
    out: TrainOutput<Cube>,
) -> TrainOutput<Autodiff<Cube, C>> {
    TrainOutput {
        output,
        mean: Autodiff::<Cube, C>::from_inner(out.mean),
        variance: Autodiff::<Cube, C>::from_inner(out.variance),
        running_mean: Autodiff::<Cube, C>::from_inner(out.running_mean),
        running_var: Autodiff::<Cube, C>::from_inner(out.running_var),
    }
}
