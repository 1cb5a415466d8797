//! The host side of BatchNorm's CubeCL kernels (`norm_kernels.rs`): the statistics'
//! launches (separate or folded, [`Reduction::folds`]), the output's, and the backward's, with
//! the memory each reads and writes laid out and reserved.

use burn::tensor::Shape;
use burn_cubecl::CubeBackend;
use burn_cubecl::cubecl::calculate_cube_count_elemwise;
use burn_cubecl::cubecl::prelude::*;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;

use super::layout::{empties, empty_like, laid_out, writable};
use super::norm::{NormGrads, TrainOutput};
use super::norm_kernels::{
    grad_finalize, grad_folded, grad_input, grad_into, grad_partials, normalize, normalize_into,
    stats_finalize, stats_folded, stats_partials,
};
use super::reduction::{Reduction, arrivals, finishing};

/// `[N, C, H, W]` as `(channels, plane = H * W, count = N * H * W)`.
fn geometry(x: &CubeTensor) -> (usize, usize, usize) {
    let shape = x.meta.shape();
    let channels = shape[1];
    let plane: usize = shape.iter().skip(2).product();
    (channels, plane, shape.num_elements() / channels)
}

/// A clamp's bounds as the kernels take them: finite (an infinite bound becomes the largest
/// finite value, which clamps no finite value and which every shader language can hold).
fn bounds(lo: f32, hi: f32) -> (f32, f32) {
    (lo.max(f32::MIN), hi.min(f32::MAX))
}

/// BatchNorm's per-channel affine transform `(a, b)` (`[C]`), both times `factor` (`[C]`) where
/// there is one: a channel gate's factor folded in by the kernels themselves.
pub(super) struct Affine {
    pub a: CubeTensor,
    pub b: CubeTensor,
    pub factor: Option<CubeTensor>,
}

impl Affine {
    /// `a`, `b`, the factor (a one-element stand-in the kernels never read where there is
    /// none) as contiguous tensors, and whether there is a factor.
    fn bound(self, stand_in: CubeTensor) -> (CubeTensor, CubeTensor, CubeTensor, bool) {
        let gated = self.factor.is_some();
        let factor = self.factor.map_or(stand_in, into_contiguous);
        (
            into_contiguous(self.a),
            into_contiguous(self.b),
            factor,
            gated,
        )
    }
}

/// What BatchNorm's statistics launches leave for the output's: the input as laid out, the
/// batch statistics, the per-channel coefficients, the running statistics moved, and a
/// one-element stand-in for a missing residual.
struct Statistics {
    x: CubeTensor,
    x_cl: bool,
    mean: CubeTensor,
    variance: CubeTensor,
    coef: CubeTensor,
    running_mean: CubeTensor,
    running_var: CubeTensor,
    no_residual: CubeTensor,
}

/// The batch statistics of `x` (`[N, C, H, W]`), the coefficients `a' * inv_std` and
/// `b' - mean * a' * inv_std` per channel (`(a', b')` the affine transform with any factor
/// applied), and the running statistics moved by `momentum`.
fn statistics(
    x: CubeTensor,
    affine: Affine,
    (running_mean, running_var, momentum): (CubeTensor, CubeTensor, f64),
    epsilon: f64,
) -> Statistics {
    let (x, x_cl) = laid_out(x);
    // Moved in place (in a copy where another handle shares them): a step recorded as a graph
    // then moves the same memory at every replay.
    let [running_mean, running_var] =
        [running_mean, running_var].map(|t| writable(into_contiguous(t)));
    let (channels, plane, count) = geometry(&x);
    let r = Reduction::new(channels, count, x_cl);
    let splits = r.splits;
    let client = x.client.clone();
    // The batch's per-channel results in one reservation with the partial sums (all gone by
    // the end of the step), the last two one-element stand-ins for a missing residual and a
    // missing factor, which the kernels never read.
    let [partials, mean, variance, coef, no_residual, no_factor] = empties(
        &x,
        [
            Shape::new([channels * splits * 2]),
            Shape::new([channels]),
            Shape::new([channels]),
            Shape::new([channels * 2]),
            Shape::new([1]),
            Shape::new([1]),
        ],
    );
    let (a, b, factor, gated) = affine.bound(no_factor);
    if r.folds(&client, 2) {
        stats_folded::launch(
            &client,
            r.cubes(),
            CubeDim::new_1d(r.block),
            x.clone().into_buffer_arg(),
            partials.into_buffer_arg(),
            arrivals(&x, r.groups),
            a.into_buffer_arg(),
            b.into_buffer_arg(),
            factor.into_buffer_arg(),
            running_mean.clone().into_buffer_arg(),
            running_var.clone().into_buffer_arg(),
            mean.clone().into_buffer_arg(),
            variance.clone().into_buffer_arg(),
            coef.clone().into_buffer_arg(),
            plane,
            channels,
            count,
            r.width,
            epsilon as f32,
            momentum as f32,
            r.block,
            gated,
            x_cl,
        );
    } else {
        stats_partials::launch(
            &client,
            r.cubes(),
            CubeDim::new_1d(r.block),
            x.clone().into_buffer_arg(),
            partials.clone().into_buffer_arg(),
            plane,
            channels,
            count,
            r.width,
            r.block,
            x_cl,
        );
        let (cubes, dim, units) = finishing(&client, channels, splits);
        stats_finalize::launch(
            &client,
            cubes,
            dim,
            x.clone().into_buffer_arg(),
            partials.into_buffer_arg(),
            a.into_buffer_arg(),
            b.into_buffer_arg(),
            factor.into_buffer_arg(),
            running_mean.clone().into_buffer_arg(),
            running_var.clone().into_buffer_arg(),
            mean.clone().into_buffer_arg(),
            variance.clone().into_buffer_arg(),
            coef.clone().into_buffer_arg(),
            plane,
            channels,
            splits,
            count,
            epsilon as f32,
            momentum as f32,
            units,
            gated,
            x_cl,
        );
    }
    Statistics {
        x,
        x_cl,
        mean,
        variance,
        coef,
        running_mean,
        running_var,
        no_residual,
    }
}

/// BatchNorm's output, the batch statistics it trains with, and the running statistics moved
/// by `momentum`. `x` and `residual` are `[N, C, H, W]`, `running_mean` and `running_var`
/// `[C]`.
pub(super) fn forward(
    x: CubeTensor,
    affine: Affine,
    residual: Option<CubeTensor>,
    running: (CubeTensor, CubeTensor, f64),
    epsilon: f64,
    lo: f32,
    hi: f32,
) -> TrainOutput<CubeBackend> {
    let residual = residual.map(laid_out);
    let Statistics {
        x,
        x_cl,
        mean,
        variance,
        coef,
        running_mean,
        running_var,
        no_residual,
    } = statistics(x, affine, running, epsilon);
    let (channels, plane, _) = geometry(&x);
    let client = x.client.clone();
    let output = empty_like(&x, x_cl);
    let elements = output.meta.num_elements();
    let (lo, hi) = bounds(lo, hi);
    let has_residual = residual.is_some();
    let r_cl = residual.as_ref().is_some_and(|r| r.1);
    let dim = CubeDim::new(&client, elements);
    normalize::launch(
        &client,
        calculate_cube_count_elemwise(&client, elements, dim),
        dim,
        x.clone().into_buffer_arg(),
        coef.into_buffer_arg(),
        residual.map_or(no_residual, |r| r.0).into_buffer_arg(),
        output.clone().into_buffer_arg(),
        plane,
        channels,
        lo,
        hi,
        has_residual,
        x_cl,
        r_cl,
    );
    TrainOutput {
        output,
        mean,
        variance,
        running_mean,
        running_var,
    }
}

/// [`forward`] with its output added into some channels of `stream` (`[N, S, H, W]`) before
/// the clamp: the output has the stream's shape and `x`'s memory layout, and `map` (`[S]`, see
/// [`normalize_into`]) names the BatchNorm channel added into each stream channel. `x`'s layout
/// (a convolution's output, channel-last on the cubecl backends) is what the next convolution
/// reads without a copy: in the stream's, a stream that a padded shortcut widened
/// (channel-first) would be copied before every block of its stage.
#[allow(clippy::too_many_arguments)]
pub(super) fn forward_into(
    x: CubeTensor,
    affine: Affine,
    stream: CubeTensor,
    map: CubeTensor,
    running: (CubeTensor, CubeTensor, f64),
    epsilon: f64,
    lo: f32,
    hi: f32,
) -> TrainOutput<CubeBackend> {
    let ((stream, s_cl), map) = (laid_out(stream), into_contiguous(map));
    let st = statistics(x, affine, running, epsilon);
    let (channels, plane, _) = geometry(&st.x);
    let stream_channels = stream.meta.shape()[1];
    let client = st.x.client.clone();
    let output = empty_like(&stream, st.x_cl);
    let elements = output.meta.num_elements();
    let (lo, hi) = bounds(lo, hi);
    let dim = CubeDim::new(&client, elements);
    normalize_into::launch(
        &client,
        calculate_cube_count_elemwise(&client, elements, dim),
        dim,
        st.x.into_buffer_arg(),
        st.coef.into_buffer_arg(),
        stream.into_buffer_arg(),
        map.into_buffer_arg(),
        output.clone().into_buffer_arg(),
        plane,
        channels,
        stream_channels,
        lo,
        hi,
        st.x_cl,
        s_cl,
        st.x_cl,
    );
    TrainOutput {
        output,
        mean: st.mean,
        variance: st.variance,
        running_mean: st.running_mean,
        running_var: st.running_var,
    }
}

/// The gradients of [`forward_into`] from its output `y` and the output's gradient `dy`
/// (both stream-shaped): the stream's as `residual`, and BatchNorm's from the channels it was
/// added into, through [`backward`] without a clamp.
#[allow(clippy::too_many_arguments)]
pub(super) fn backward_into(
    x: CubeTensor,
    y: CubeTensor,
    dy: CubeTensor,
    affine: Affine,
    mean: CubeTensor,
    variance: CubeTensor,
    map: CubeTensor,
    epsilon: f64,
    lo: f32,
    hi: f32,
) -> NormGrads<CubeBackend> {
    let ((x, x_cl), (y, y_cl)) = (laid_out(x), laid_out(y));
    let ((dy, dy_cl), map) = (laid_out(dy), into_contiguous(map));
    let (channels, plane, _) = geometry(&x);
    let stream_channels = y.meta.shape()[1];
    let client = x.client.clone();
    let ds = empty_like(&y, y_cl);
    // Every element of BatchNorm's output was added into one stream element: all written.
    let dn = empty_like(&x, x_cl);
    let elements = ds.meta.num_elements();
    let (lo, hi) = bounds(lo, hi);
    let dim = CubeDim::new(&client, elements);
    grad_into::launch(
        &client,
        calculate_cube_count_elemwise(&client, elements, dim),
        dim,
        y.into_buffer_arg(),
        dy.into_buffer_arg(),
        map.into_buffer_arg(),
        ds.clone().into_buffer_arg(),
        dn.clone().into_buffer_arg(),
        plane,
        channels,
        stream_channels,
        lo,
        hi,
        y_cl,
        dy_cl,
        x_cl,
    );
    // No clamp of its own: every element passes its gradient (`x` stands in for the output,
    // which only the clamp's mask would read).
    let g = backward(
        x.clone(),
        x,
        dn,
        affine,
        mean,
        variance,
        epsilon,
        f32::NEG_INFINITY,
        f32::INFINITY,
        false,
    );
    NormGrads { residual: ds, ..g }
}

/// The gradients of [`forward`] from its output's gradient `dy`: of the input, of `a` and `b`,
/// of the factor (one unwritten element without one), and of the residual (one unwritten
/// element without `residual`). `y` is the forward's output (the clamp's gradient mask is read
/// from it), `mean` and `variance` its statistics.
#[allow(clippy::too_many_arguments)]
pub(super) fn backward(
    x: CubeTensor,
    y: CubeTensor,
    dy: CubeTensor,
    affine: Affine,
    mean: CubeTensor,
    variance: CubeTensor,
    epsilon: f64,
    lo: f32,
    hi: f32,
    residual: bool,
) -> NormGrads<CubeBackend> {
    let ((x, x_cl), (y, y_cl)) = (laid_out(x), laid_out(y));
    let (dy, dy_cl) = laid_out(dy);
    // `y` was written laid out as `x`; should either have been copied since, both are read
    // channel-first.
    let (x, y, x_cl) = if x_cl == y_cl {
        (x, y, x_cl)
    } else {
        (into_contiguous(x), into_contiguous(y), false)
    };
    let (channels, plane, count) = geometry(&x);
    let r = Reduction::new(channels, count, x_cl);
    let splits = r.splits;
    let client = x.client.clone();
    let (lo, hi) = bounds(lo, hi);
    let gated = affine.factor.is_some();
    // The per-channel results in one reservation with the partial sums; one-element stand-ins
    // for a missing residual's gradient and a missing factor and its gradient, which the
    // kernels never touch (two bindings of one tensor that a kernel writes are not allowed on
    // wgpu).
    let [partials, da, db, df, coef, no_residual, no_factor] = empties(
        &x,
        [
            Shape::new([channels * splits * 2]),
            Shape::new([channels]),
            Shape::new([channels]),
            Shape::new([if gated { channels } else { 1 }]),
            Shape::new([channels * 3]),
            Shape::new([1]),
            Shape::new([1]),
        ],
    );
    let (a, b, factor, gated) = affine.bound(no_factor);
    if r.folds(&client, 2) {
        grad_folded::launch(
            &client,
            r.cubes(),
            CubeDim::new_1d(r.block),
            x.clone().into_buffer_arg(),
            y.clone().into_buffer_arg(),
            dy.clone().into_buffer_arg(),
            mean.clone().into_buffer_arg(),
            partials.into_buffer_arg(),
            arrivals(&x, r.groups),
            a.into_buffer_arg(),
            b.into_buffer_arg(),
            factor.into_buffer_arg(),
            variance.into_buffer_arg(),
            da.clone().into_buffer_arg(),
            db.clone().into_buffer_arg(),
            df.clone().into_buffer_arg(),
            coef.clone().into_buffer_arg(),
            plane,
            channels,
            count,
            r.width,
            lo,
            hi,
            epsilon as f32,
            r.block,
            gated,
            x_cl,
            dy_cl,
        );
    } else {
        grad_partials::launch(
            &client,
            r.cubes(),
            CubeDim::new_1d(r.block),
            x.clone().into_buffer_arg(),
            y.clone().into_buffer_arg(),
            dy.clone().into_buffer_arg(),
            mean.clone().into_buffer_arg(),
            partials.clone().into_buffer_arg(),
            plane,
            channels,
            count,
            r.width,
            lo,
            hi,
            r.block,
            x_cl,
            dy_cl,
        );
        let (cubes, dim, units) = finishing(&client, channels, splits);
        grad_finalize::launch(
            &client,
            cubes,
            dim,
            partials.into_buffer_arg(),
            a.into_buffer_arg(),
            b.into_buffer_arg(),
            factor.into_buffer_arg(),
            variance.into_buffer_arg(),
            da.clone().into_buffer_arg(),
            db.clone().into_buffer_arg(),
            df.clone().into_buffer_arg(),
            coef.clone().into_buffer_arg(),
            channels,
            splits,
            count,
            epsilon as f32,
            units,
            gated,
        );
    }
    let dx = empty_like(&x, x_cl);
    let dr = if residual {
        empty_like(&x, x_cl)
    } else {
        no_residual
    };
    let elements = dx.meta.num_elements();
    let dim = CubeDim::new(&client, elements);
    grad_input::launch(
        &client,
        calculate_cube_count_elemwise(&client, elements, dim),
        dim,
        x.into_buffer_arg(),
        y.into_buffer_arg(),
        dy.into_buffer_arg(),
        mean.into_buffer_arg(),
        coef.into_buffer_arg(),
        dx.clone().into_buffer_arg(),
        dr.clone().into_buffer_arg(),
        plane,
        channels,
        lo,
        hi,
        residual,
        x_cl,
        dy_cl,
    );
    NormGrads {
        x: dx,
        a: da,
        b: db,
        factor: df,
        residual: dr,
    }
}
