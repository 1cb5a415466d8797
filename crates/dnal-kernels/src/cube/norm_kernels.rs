//! BatchNorm's training passes as CubeCL kernels on `[N, C, H, W]` f32 tensors, in
//! channel-first or channel-last memory: per-channel sums by cubes of units with a
//! shared-memory reduction, their totals turned into per-channel coefficients, and one
//! element-wise pass with the residual and the clamp fused. The totals are made by one small
//! kernel after the sums, or, where the reduction folds (`Reduction::folds`), by the last cube
//! of the sums' own launch: three launches forward and three backward, or two and two, where
//! burn's `batch_norm_train` with the separate activation and residual add took several times
//! as many. The running statistics are moved with the coefficients: as tensor operations they
//! were six launches more per unit on cuda, where fusion left them unmerged. The host side,
//! which lays out the memory and launches them, is `norm_launch.rs`.

use burn_cubecl::cubecl;
use burn_cubecl::cubecl::prelude::*;

use super::layout::{offset, position};
use super::reduction::{cube_sum, last_to_arrive};

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
pub(super) fn stats_partials(
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
pub(super) fn stats_finalize(
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
pub(super) fn stats_folded(
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
pub(super) fn normalize(
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
pub(super) fn normalize_into(
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
pub(super) fn grad_into(
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
pub(super) fn grad_partials(
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
pub(super) fn grad_finalize(
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
pub(super) fn grad_folded(
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
pub(super) fn grad_input(
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
