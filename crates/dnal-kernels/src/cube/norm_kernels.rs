//! BatchNorm's training passes as CubeCL kernels on `[N, C, H, W]` f32 tensors, in
//! channel-first or channel-last memory: per-channel sums by cubes of units with a
//! shared-memory reduction, their totals turned into per-channel coefficients, and one
//! element-wise pass with the residual and the clamp fused. The totals are made by one small
//! kernel after the sums, or, where the reduction folds ([`Reduction::folds`]), by the last cube
//! of the sums' own launch: three launches forward and three backward, or two and two, where
//! burn's `batch_norm_train` with the separate activation and residual add took several times
//! as many. The running statistics are moved with the coefficients: as tensor operations they
//! were six launches more per unit on cuda, where fusion left them unmerged.

use burn::tensor::Shape;
use burn_cubecl::CubeBackend;
use burn_cubecl::cubecl::prelude::*;
use burn_cubecl::cubecl::{self, calculate_cube_count_elemwise};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;

use super::layout::{empties, empty_like, laid_out, offset, position, writable};
use super::norm::{NormGrads, TrainOutput};
use super::reduction::{Reduction, arrivals, cube_sum, finishing, last_to_arrive};

/// Adds two values per unit over the lanes of each channel of the cube (shared memory,
/// halving; unit `u` is lane `u / width` of the cube's channel `u % width`): the channel's
/// totals, valid in its lane 0.
#[cube]
pub(super) fn lane_sums(s1: f32, s2: f32, width: usize, #[comptime] block: u32) -> (f32, f32) {
    let u = UNIT_POS_X as usize;
    let mut sh1 = Shared::<[f32]>::new_slice(block as usize);
    let mut sh2 = Shared::<[f32]>::new_slice(block as usize);
    sh1[u] = s1;
    sh2[u] = s2;
    sync_cube();
    let lane = u / width;
    let mut half = block as usize / width / 2;
    while half > 0 {
        if lane < half {
            let (v1, v2) = (
                sh1[u] + sh1[u + half * width],
                sh2[u] + sh2[u + half * width],
            );
            sh1[u] = v1;
            sh2[u] = v2;
        }
        sync_cube();
        half /= 2;
    }
    (sh1[u], sh2[u])
}

/// [`lane_sums`] of the cube, stored by lane 0 of channel `c` at `partials[(c * splits + s) *
/// 2 ..]` (`s` the cube's place along the channel, of `splits`).
#[cube]
fn store_lane_sums(
    s1: f32,
    s2: f32,
    partials: &mut [f32],
    c: usize,
    channels: usize,
    width: usize,
    #[comptime] block: u32,
) {
    let (t1, t2) = lane_sums(s1, s2, width, block);
    if UNIT_POS_X as usize / width == 0 && c < channels {
        let slot = c * CUBE_COUNT_X as usize + CUBE_POS_X as usize;
        partials[slot * 2] = t1;
        partials[slot * 2 + 1] = t2;
    }
}

/// In the last cube of a folded reduction: channel `c`'s two totals over the partial sums its
/// group's cubes stored, added by the cube's lanes of `c` (as the elements were); valid in its
/// lane 0. (`partials` is the launch's writable binding, read here.)
#[cube]
fn group_totals(
    partials: &mut [f32],
    c: usize,
    channels: usize,
    width: usize,
    #[comptime] block: u32,
) -> (f32, f32) {
    let lanes = block as usize / width;
    let splits = CUBE_COUNT_X as usize;
    let mut s1 = 0.0f32;
    let mut s2 = 0.0f32;
    if c < channels {
        let mut s = UNIT_POS_X as usize / width;
        while s < splits {
            let slot = c * splits + s;
            s1 += partials[slot * 2];
            s2 += partials[slot * 2 + 1];
            s += lanes;
        }
    }
    lane_sums(s1, s2, width, block)
}

/// Channel `c`'s two totals over its `splits` cubes' partial sums (pairs at
/// `partials[(c * splits + s) * 2 ..]`), added by the cube's `units` units; valid in unit 0.
#[cube]
fn channel_totals(partials: &[f32], c: usize, splits: usize, #[comptime] units: u32) -> (f32, f32) {
    let first = c * splits * 2;
    let s1 = cube_sum(partials, first, 2, splits, units);
    let s2 = cube_sum(partials, first + 1, 2, splits, units);
    (s1, s2)
}

/// Sums of channels' elements over one stretch of the batch, per unit, and the unit's channel.
/// Cube `(s, g)` covers the `width` channels from `g * width`, each with `block / width` lanes
/// of units; the lane `l` of channel `c` sums `x - x[0, c, 0, 0]` and its square over the
/// elements `m = s * lanes + l + k * splits * lanes` (`m` counts images, then positions).
/// Channel-first memory takes one channel per cube (`width` 1), channel-last memory as many as
/// make a cube's reads of one position contiguous. The shift by the channel's first element
/// keeps the variance from cancelling when the mean is large against the spread.
#[cube]
fn stats_sums(
    x: &[f32],
    plane: usize,
    channels: usize,
    count: usize,
    width: usize,
    #[comptime] block: u32,
    #[comptime] x_cl: bool,
) -> (f32, f32, usize) {
    let u = UNIT_POS_X as usize;
    let lanes = block as usize / width;
    let c = CUBE_POS_Y as usize * width + u % width;
    let mut s1 = 0.0f32;
    let mut s2 = 0.0f32;
    if c < channels {
        let shift = x[offset(0, c, plane, channels, x_cl)];
        let step = CUBE_COUNT_X as usize * lanes;
        let mut m = CUBE_POS_X as usize * lanes + u / width;
        while m < count {
            let d = x[offset(m, c, plane, channels, x_cl)] - shift;
            s1 += d;
            s2 += d * d;
            m += step;
        }
    }
    (s1, s2, c)
}

/// The cube's [`stats_sums`] per channel, stored as partial sums at `partials[(c * splits + s)
/// * 2 ..]`.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn stats_partials(
    x: &[f32],
    partials: &mut [f32],
    plane: usize,
    channels: usize,
    count: usize,
    width: usize,
    #[comptime] block: u32,
    #[comptime] x_cl: bool,
) {
    let (s1, s2, c) = stats_sums(x, plane, channels, count, width, block, x_cl);
    store_lane_sums(s1, s2, partials, c, channels, width, block);
}

/// Channel `c`'s affine transform `(a, b)`, both times `factor[c]` where `gated`.
#[cube]
fn gated_affine(
    c: usize,
    a: &[f32],
    b: &[f32],
    factor: &[f32],
    #[comptime] gated: bool,
) -> (f32, f32) {
    let mut ac = a[c];
    let mut bc = b[c];
    if gated {
        let f = factor[c];
        ac *= f;
        bc *= f;
    }
    (ac, bc)
}

/// From channel `c`'s totals of `x - x[0, c, 0, 0]` and its square: the batch mean and biased
/// variance, the transform `y = x * scale + shift` with `scale = a' / sqrt(var + eps)`, `shift
/// = b' - mean * scale` (`(a', b')` the [`gated_affine`] transform), written to `coef[c * 2
/// ..]`, and the running statistics moved in place towards the batch's, `running' = running *
/// (1 - momentum) + batch * momentum` (burn's BatchNorm update).
#[cube]
#[allow(clippy::too_many_arguments)]
fn finish_stats(
    c: usize,
    s1: f32,
    s2: f32,
    x: &[f32],
    a: &[f32],
    b: &[f32],
    factor: &[f32],
    running_mean: &mut [f32],
    running_var: &mut [f32],
    mean: &mut [f32],
    var: &mut [f32],
    coef: &mut [f32],
    plane: usize,
    channels: usize,
    count: usize,
    epsilon: f32,
    momentum: f32,
    #[comptime] gated: bool,
    #[comptime] x_cl: bool,
) {
    let inv_count = 1.0f32 / f32::cast_from(count);
    let m1 = s1 * inv_count;
    let v = f32::max(s2 * inv_count - m1 * m1, 0.0f32);
    let mu = x[offset(0, c, plane, channels, x_cl)] + m1;
    let (ac, bc) = gated_affine(c, a, b, factor, gated);
    let scale = ac / f32::sqrt(v + epsilon);
    mean[c] = mu;
    var[c] = v;
    coef[c * 2] = scale;
    coef[c * 2 + 1] = bc - mu * scale;
    let keep = 1.0f32 - momentum;
    running_mean[c] = running_mean[c] * keep + mu * momentum;
    running_var[c] = running_var[c] * keep + v * momentum;
}

/// One cube per channel: [`finish_stats`] from the partial sums.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn stats_finalize(
    x: &[f32],
    partials: &[f32],
    a: &[f32],
    b: &[f32],
    factor: &[f32],
    running_mean: &mut [f32],
    running_var: &mut [f32],
    mean: &mut [f32],
    var: &mut [f32],
    coef: &mut [f32],
    plane: usize,
    channels: usize,
    splits: usize,
    count: usize,
    epsilon: f32,
    momentum: f32,
    #[comptime] units: u32,
    #[comptime] gated: bool,
    #[comptime] x_cl: bool,
) {
    let c = CUBE_POS;
    if c >= channels {
        terminate!();
    }
    let (s1, s2) = channel_totals(partials, c, splits, units);
    if UNIT_POS_X != 0 {
        terminate!();
    }
    finish_stats(
        c,
        s1,
        s2,
        x,
        a,
        b,
        factor,
        running_mean,
        running_var,
        mean,
        var,
        coef,
        plane,
        channels,
        count,
        epsilon,
        momentum,
        gated,
        x_cl,
    );
}

/// [`stats_partials`] and [`stats_finalize`] in one launch: the last cube of each group of
/// channels to store its partial sums finishes the group's channels.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn stats_folded(
    x: &[f32],
    partials: &mut [f32],
    arrivals: &mut [Atomic<u32>],
    a: &[f32],
    b: &[f32],
    factor: &[f32],
    running_mean: &mut [f32],
    running_var: &mut [f32],
    mean: &mut [f32],
    var: &mut [f32],
    coef: &mut [f32],
    plane: usize,
    channels: usize,
    count: usize,
    width: usize,
    epsilon: f32,
    momentum: f32,
    #[comptime] block: u32,
    #[comptime] gated: bool,
    #[comptime] x_cl: bool,
) {
    let (s1, s2, c) = stats_sums(x, plane, channels, count, width, block, x_cl);
    store_lane_sums(s1, s2, partials, c, channels, width, block);
    if last_to_arrive(arrivals, CUBE_POS_Y as usize) {
        let (t1, t2) = group_totals(partials, c, channels, width, block);
        if UNIT_POS_X as usize / width == 0 && c < channels {
            finish_stats(
                c,
                t1,
                t2,
                x,
                a,
                b,
                factor,
                running_mean,
                running_var,
                mean,
                var,
                coef,
                plane,
                channels,
                count,
                epsilon,
                momentum,
                gated,
                x_cl,
            );
        }
    }
}

/// `out = clamp(x * scale + shift (+ residual), lo, hi)` per element; `out` is laid out as
/// `x` is.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn normalize(
    x: &[f32],
    coef: &[f32],
    residual: &[f32],
    out: &mut [f32],
    plane: usize,
    channels: usize,
    lo: f32,
    hi: f32,
    #[comptime] has_residual: bool,
    #[comptime] x_cl: bool,
    #[comptime] r_cl: bool,
) {
    let i = ABSOLUTE_POS;
    if i >= out.len() {
        terminate!();
    }
    let (m, c) = position(i, plane, channels, x_cl);
    let mut v = x[i] * coef[c * 2] + coef[c * 2 + 1];
    if has_residual {
        v += residual[offset(m, c, plane, channels, r_cl)];
    }
    out[i] = f32::min(f32::max(v, lo), hi);
}

/// `out = clamp(stream + x * scale + shift, lo, hi)` per element of the stream, the BatchNorm
/// term only in the stream channels it is added into: `map[c]` is the BatchNorm channel added
/// into stream channel `c`, negative where none is. `out` has the stream's shape, laid out as
/// `out_cl` says.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn normalize_into(
    x: &[f32],
    coef: &[f32],
    stream: &[f32],
    map: &[f32],
    out: &mut [f32],
    plane: usize,
    channels: usize,
    stream_channels: usize,
    lo: f32,
    hi: f32,
    #[comptime] x_cl: bool,
    #[comptime] s_cl: bool,
    #[comptime] out_cl: bool,
) {
    let i = ABSOLUTE_POS;
    if i >= out.len() {
        terminate!();
    }
    let (m, c) = position(i, plane, stream_channels, out_cl);
    let mut v = stream[offset(m, c, plane, stream_channels, s_cl)];
    let k = map[c];
    if k >= 0.0 {
        let k = u32::cast_from(k) as usize;
        v += x[offset(m, k, plane, channels, x_cl)] * coef[k * 2] + coef[k * 2 + 1];
    }
    out[i] = f32::min(f32::max(v, lo), hi);
}

/// The gradients that [`normalize_into`]'s clamp passes on, per element of the stream: the
/// stream's (`ds`, laid out as `y` is) and, gathered from the channels BatchNorm added into,
/// BatchNorm's output's (`dn`, laid out as `dn_cl` says, `channels` wide).
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn grad_into(
    y: &[f32],
    dy: &[f32],
    map: &[f32],
    ds: &mut [f32],
    dn: &mut [f32],
    plane: usize,
    channels: usize,
    stream_channels: usize,
    lo: f32,
    hi: f32,
    #[comptime] y_cl: bool,
    #[comptime] dy_cl: bool,
    #[comptime] dn_cl: bool,
) {
    let i = ABSOLUTE_POS;
    if i >= ds.len() {
        terminate!();
    }
    let (m, c) = position(i, plane, stream_channels, y_cl);
    let mut g = 0.0f32;
    if y[i] > lo && y[i] < hi {
        g = dy[offset(m, c, plane, stream_channels, dy_cl)];
    }
    ds[i] = g;
    let k = map[c];
    if k >= 0.0 {
        let k = u32::cast_from(k) as usize;
        dn[offset(m, k, plane, channels, dn_cl)] = g;
    }
}

/// The backward's sums per unit, cubes and lanes as in [`stats_sums`]: of `dz` (the output
/// gradient where the clamp passes it, else 0) and of `dz * (x - mean)`, and the unit's
/// channel. `y` is laid out as `x` is.
#[cube]
#[allow(clippy::too_many_arguments)]
fn grad_sums(
    x: &[f32],
    y: &[f32],
    dy: &[f32],
    mean: &[f32],
    plane: usize,
    channels: usize,
    count: usize,
    width: usize,
    lo: f32,
    hi: f32,
    #[comptime] block: u32,
    #[comptime] x_cl: bool,
    #[comptime] dy_cl: bool,
) -> (f32, f32, usize) {
    let u = UNIT_POS_X as usize;
    let lanes = block as usize / width;
    let c = CUBE_POS_Y as usize * width + u % width;
    let mut s1 = 0.0f32;
    let mut s2 = 0.0f32;
    if c < channels {
        let mu = mean[c];
        let step = CUBE_COUNT_X as usize * lanes;
        let mut m = CUBE_POS_X as usize * lanes + u / width;
        while m < count {
            let i = offset(m, c, plane, channels, x_cl);
            if y[i] > lo && y[i] < hi {
                let g = dy[offset(m, c, plane, channels, dy_cl)];
                s1 += g;
                s2 += g * (x[i] - mu);
            }
            m += step;
        }
    }
    (s1, s2, c)
}

/// The cube's [`grad_sums`] per channel, stored as partial sums as in [`stats_partials`].
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn grad_partials(
    x: &[f32],
    y: &[f32],
    dy: &[f32],
    mean: &[f32],
    partials: &mut [f32],
    plane: usize,
    channels: usize,
    count: usize,
    width: usize,
    lo: f32,
    hi: f32,
    #[comptime] block: u32,
    #[comptime] x_cl: bool,
    #[comptime] dy_cl: bool,
) {
    let (s1, s2, c) = grad_sums(
        x, y, dy, mean, plane, channels, count, width, lo, hi, block, x_cl, dy_cl,
    );
    store_lane_sums(s1, s2, partials, c, channels, width, block);
}

/// From channel `c`'s totals of `dz` and `dz * (x - mean)`: the gradients of the transform
/// BatchNorm applied (`sum dz * xhat` for its scale, `sum dz` for its shift), and the
/// coefficients of the input gradient `dx = k1 * (dz - k2 - (x - mean) * k3)`, written to
/// `coef[c * 3 ..]`. Where `gated` the transform was `(a * f, b * f)` ([`gated_affine`]): `a`'s
/// and `b`'s gradients are then those times `f`, and `f`'s is `da' * a + db' * b`.
#[cube]
#[allow(clippy::too_many_arguments)]
fn finish_grads(
    c: usize,
    s1: f32,
    s2: f32,
    a: &[f32],
    b: &[f32],
    factor: &[f32],
    var: &[f32],
    da: &mut [f32],
    db: &mut [f32],
    df: &mut [f32],
    coef: &mut [f32],
    count: usize,
    epsilon: f32,
    #[comptime] gated: bool,
) {
    let inv_std = 1.0f32 / f32::sqrt(var[c] + epsilon);
    let inv_count = 1.0f32 / f32::cast_from(count);
    let grad_a = s2 * inv_std;
    let (ac, _bc) = gated_affine(c, a, b, factor, gated);
    if gated {
        let f = factor[c];
        da[c] = grad_a * f;
        db[c] = s1 * f;
        df[c] = grad_a * a[c] + s1 * b[c];
    } else {
        da[c] = grad_a;
        db[c] = s1;
    }
    coef[c * 3] = ac * inv_std;
    coef[c * 3 + 1] = s1 * inv_count;
    coef[c * 3 + 2] = grad_a * inv_std * inv_count;
}

/// One cube per channel: [`finish_grads`] from the partial sums.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn grad_finalize(
    partials: &[f32],
    a: &[f32],
    b: &[f32],
    factor: &[f32],
    var: &[f32],
    da: &mut [f32],
    db: &mut [f32],
    df: &mut [f32],
    coef: &mut [f32],
    channels: usize,
    splits: usize,
    count: usize,
    epsilon: f32,
    #[comptime] units: u32,
    #[comptime] gated: bool,
) {
    let c = CUBE_POS;
    if c >= channels {
        terminate!();
    }
    let (s1, s2) = channel_totals(partials, c, splits, units);
    if UNIT_POS_X != 0 {
        terminate!();
    }
    finish_grads(
        c, s1, s2, a, b, factor, var, da, db, df, coef, count, epsilon, gated,
    );
}

/// [`grad_partials`] and [`grad_finalize`] in one launch, as [`stats_folded`] folds the
/// forward's.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn grad_folded(
    x: &[f32],
    y: &[f32],
    dy: &[f32],
    mean: &[f32],
    partials: &mut [f32],
    arrivals: &mut [Atomic<u32>],
    a: &[f32],
    b: &[f32],
    factor: &[f32],
    var: &[f32],
    da: &mut [f32],
    db: &mut [f32],
    df: &mut [f32],
    coef: &mut [f32],
    plane: usize,
    channels: usize,
    count: usize,
    width: usize,
    lo: f32,
    hi: f32,
    epsilon: f32,
    #[comptime] block: u32,
    #[comptime] gated: bool,
    #[comptime] x_cl: bool,
    #[comptime] dy_cl: bool,
) {
    let (s1, s2, c) = grad_sums(
        x, y, dy, mean, plane, channels, count, width, lo, hi, block, x_cl, dy_cl,
    );
    store_lane_sums(s1, s2, partials, c, channels, width, block);
    if last_to_arrive(arrivals, CUBE_POS_Y as usize) {
        let (t1, t2) = group_totals(partials, c, channels, width, block);
        if UNIT_POS_X as usize / width == 0 && c < channels {
            finish_grads(
                c, t1, t2, a, b, factor, var, da, db, df, coef, count, epsilon, gated,
            );
        }
    }
}

/// The input gradient per element, and with `has_residual` the residual's (`dz` itself);
/// `y`, `dx` and `dr` are laid out as `x` is.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn grad_input(
    x: &[f32],
    y: &[f32],
    dy: &[f32],
    mean: &[f32],
    coef: &[f32],
    dx: &mut [f32],
    dr: &mut [f32],
    plane: usize,
    channels: usize,
    lo: f32,
    hi: f32,
    #[comptime] has_residual: bool,
    #[comptime] x_cl: bool,
    #[comptime] dy_cl: bool,
) {
    let i = ABSOLUTE_POS;
    if i >= dx.len() {
        terminate!();
    }
    let (m, c) = position(i, plane, channels, x_cl);
    let mut g = 0.0f32;
    if y[i] > lo && y[i] < hi {
        g = dy[offset(m, c, plane, channels, dy_cl)];
    }
    dx[i] = coef[c * 3] * (g - coef[c * 3 + 1] - (x[i] - mean[c]) * coef[c * 3 + 2]);
    if has_residual {
        dr[i] = g;
    }
}

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
