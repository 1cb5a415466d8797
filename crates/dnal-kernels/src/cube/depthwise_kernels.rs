//! The depthwise convolution (`[N, C, H, W]` input, `[C, 1, k, k]` weight, square kernel,
//! stride and padding on both axes, no bias) as CubeCL kernels: the output and the input
//! gradient one unit per element, each a gather over the `k * k` taps (no atomics, no column
//! matrix), and the weight gradient as a reduction over the batch's positions with every
//! unit holding all `k * k` tap sums, its cubes' partial sums added up by the last cube to
//! store them where the reduction folds ([`Reduction::folds`], cuda), else by one small kernel
//! more.
//! Input, output and gradients are read and written in channel-first or channel-last memory,
//! the output laid out as the input is. burn's grouped convolution autotunes, per shape, among
//! its general convolution kernels (direct and implicit-GEMM, forward and transposed), and
//! copies between layouts around them.

use burn::tensor::Shape;
use burn_cubecl::cubecl::prelude::*;
use burn_cubecl::cubecl::{self, calculate_cube_count_elemwise};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;

use super::layout::{Geometry, at, coordinates, empties, empty_shaped, laid_out};
use super::reduction::{Reduction, arrivals, cube_sum, finishing, last_to_arrive};

/// The output of a depthwise convolution's `[N, C, H, W]` input `x` and `[C, 1, k, k]` weight
/// (`k` at least `padding + 1`, `H + 2 * padding` and `W + 2 * padding` at least `k`).
pub(crate) fn output_shape(x: &Shape, weight: &Shape, stride: usize, padding: usize) -> Shape {
    Geometry::new(x, weight[2], stride, padding).output_shape()
}

/// `out[n, c, oy, ox] = sum over taps of x[n, c, oy * s + ky - p, ox * s + kx - p] * w[c, ky,
/// kx]`, taps outside the input skipped; `out` is laid out as `x` is.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn depthwise_forward(
    x: &[f32],
    w: &[f32],
    out: &mut [f32],
    channels: usize,
    height: usize,
    width: usize,
    out_height: usize,
    out_width: usize,
    stride: usize,
    padding: usize,
    #[comptime] k: usize,
    #[comptime] cl: bool,
) {
    let i = ABSOLUTE_POS;
    if i >= out.len() {
        terminate!();
    }
    let (n, c, oy, ox) = coordinates(i, channels, out_height, out_width, cl);
    let mut acc = 0.0f32;
    #[unroll]
    for ky in 0..k {
        // The row `oy * s + ky - p`, kept unsigned: in the input when `p <= row < H + p`.
        let row = oy * stride + ky;
        if row >= padding && row < height + padding {
            #[unroll]
            for kx in 0..k {
                let col = ox * stride + kx;
                if col >= padding && col < width + padding {
                    let xi = at(
                        n,
                        c,
                        row - padding,
                        col - padding,
                        channels,
                        height,
                        width,
                        cl,
                    );
                    acc += x[xi] * w[(c * k + ky) * k + kx];
                }
            }
        }
    }
    out[i] = acc;
}

/// `dx[n, c, iy, ix] = sum over the taps that read it of dy[n, c, oy, ox] * w[c, ky, kx]`,
/// with `oy * s = iy + p - ky`; `dx` is laid out as `cl` says, `dy` as `dy_cl`.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn depthwise_grad_input(
    dy: &[f32],
    w: &[f32],
    dx: &mut [f32],
    channels: usize,
    height: usize,
    width: usize,
    out_height: usize,
    out_width: usize,
    stride: usize,
    padding: usize,
    #[comptime] k: usize,
    #[comptime] cl: bool,
    #[comptime] dy_cl: bool,
) {
    let i = ABSOLUTE_POS;
    if i >= dx.len() {
        terminate!();
    }
    let (n, c, iy, ix) = coordinates(i, channels, height, width, cl);
    let mut acc = 0.0f32;
    #[unroll]
    for ky in 0..k {
        // `oy * s = iy + p - ky`: a tap reads this element when that is a whole output row.
        let ty = iy + padding;
        let oy = (ty - ky) / stride;
        if ty >= ky && oy * stride == ty - ky && oy < out_height {
            #[unroll]
            for kx in 0..k {
                let tx = ix + padding;
                let ox = (tx - kx) / stride;
                if tx >= kx && ox * stride == tx - kx && ox < out_width {
                    let g = dy[at(n, c, oy, ox, channels, out_height, out_width, dy_cl)];
                    acc += g * w[(c * k + ky) * k + kx];
                }
            }
        }
    }
    dx[i] = acc;
}

/// The weight gradient's partial sums: cubes and lanes as in the BatchNorm reductions
/// ([`Reduction`]), lane `l` of channel `c` going over the output positions `m = s * lanes +
/// l + j * splits * lanes` (`m` counts images, then rows, then columns) and adding `dy[m] *
/// x[tap]` for each of the `k * k` taps; the channel's sums go to `partials[(c * k * k + t) *
/// splits + s]`.
#[cube]
#[allow(clippy::too_many_arguments)]
fn weight_partials(
    x: &[f32],
    dy: &[f32],
    partials: &mut [f32],
    channels: usize,
    height: usize,
    width: usize,
    out_height: usize,
    out_width: usize,
    stride: usize,
    padding: usize,
    count: usize,
    lane_width: usize,
    #[comptime] k: usize,
    #[comptime] block: u32,
    #[comptime] x_cl: bool,
    #[comptime] dy_cl: bool,
) {
    let taps = comptime!(k * k);
    let u = UNIT_POS_X as usize;
    let lanes = block as usize / lane_width;
    let lane = u / lane_width;
    let c = CUBE_POS_Y as usize * lane_width + u % lane_width;
    let mut acc = Array::<f32>::new(taps);
    #[unroll]
    for t in 0..taps {
        acc[t] = 0.0f32;
    }
    if c < channels {
        let plane = out_height * out_width;
        let step = CUBE_COUNT_X as usize * lanes;
        let mut m = CUBE_POS_X as usize * lanes + lane;
        while m < count {
            let n = m / plane;
            let oy = (m % plane) / out_width;
            let ox = m % out_width;
            let g = dy[at(n, c, oy, ox, channels, out_height, out_width, dy_cl)];
            #[unroll]
            for ky in 0..k {
                let row = oy * stride + ky;
                if row >= padding && row < height + padding {
                    #[unroll]
                    for kx in 0..k {
                        let col = ox * stride + kx;
                        if col >= padding && col < width + padding {
                            let xi = at(
                                n,
                                c,
                                row - padding,
                                col - padding,
                                channels,
                                height,
                                width,
                                x_cl,
                            );
                            acc[ky * k + kx] += g * x[xi];
                        }
                    }
                }
            }
            m += step;
        }
    }
    // Each tap's sums over the lanes of each channel (shared memory, halving); every unit
    // writes and reads only its own slot between the barriers that separate the taps.
    let mut shared = Shared::<[f32]>::new_slice(block as usize);
    #[unroll]
    for t in 0..taps {
        shared[u] = acc[t];
        sync_cube();
        let mut half = lanes / 2;
        while half > 0 {
            if lane < half {
                let v = shared[u] + shared[u + half * lane_width];
                shared[u] = v;
            }
            sync_cube();
            half /= 2;
        }
        if lane == 0 && c < channels {
            let splits = CUBE_COUNT_X as usize;
            partials[(c * taps + t) * splits + CUBE_POS_X as usize] = shared[u];
        }
    }
}

/// [`weight_partials`] as a launch of its own, finished by [`depthwise_weight_finalize`].
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn depthwise_weight_partials(
    x: &[f32],
    dy: &[f32],
    partials: &mut [f32],
    channels: usize,
    height: usize,
    width: usize,
    out_height: usize,
    out_width: usize,
    stride: usize,
    padding: usize,
    count: usize,
    lane_width: usize,
    #[comptime] k: usize,
    #[comptime] block: u32,
    #[comptime] x_cl: bool,
    #[comptime] dy_cl: bool,
) {
    weight_partials(
        x, dy, partials, channels, height, width, out_height, out_width, stride, padding, count,
        lane_width, k, block, x_cl, dy_cl,
    );
}

/// [`weight_partials`] and [`depthwise_weight_finalize`] in one launch: the last cube of each
/// group of channels to store its partial sums adds up the group's, each channel's by its
/// lanes (as the positions were), tap by tap.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn depthwise_weight_folded(
    x: &[f32],
    dy: &[f32],
    partials: &mut [f32],
    arrivals: &mut [Atomic<u32>],
    dw: &mut [f32],
    channels: usize,
    height: usize,
    width: usize,
    out_height: usize,
    out_width: usize,
    stride: usize,
    padding: usize,
    count: usize,
    lane_width: usize,
    #[comptime] k: usize,
    #[comptime] block: u32,
    #[comptime] x_cl: bool,
    #[comptime] dy_cl: bool,
) {
    weight_partials(
        x, dy, partials, channels, height, width, out_height, out_width, stride, padding, count,
        lane_width, k, block, x_cl, dy_cl,
    );
    if last_to_arrive(arrivals, CUBE_POS_Y as usize) {
        let taps = comptime!(k * k);
        let u = UNIT_POS_X as usize;
        let lanes = block as usize / lane_width;
        let lane = u / lane_width;
        let c = CUBE_POS_Y as usize * lane_width + u % lane_width;
        let splits = CUBE_COUNT_X as usize;
        let mut shared = Shared::<[f32]>::new_slice(block as usize);
        #[unroll]
        for t in 0..taps {
            let mut sum = 0.0f32;
            if c < channels {
                let mut s = lane;
                while s < splits {
                    sum += partials[(c * taps + t) * splits + s];
                    s += lanes;
                }
            }
            shared[u] = sum;
            sync_cube();
            let mut half = lanes / 2;
            while half > 0 {
                if lane < half {
                    let v = shared[u] + shared[u + half * lane_width];
                    shared[u] = v;
                }
                sync_cube();
                half /= 2;
            }
            if lane == 0 && c < channels {
                dw[c * taps + t] = shared[u];
            }
        }
    }
}

/// One cube per weight element: the sum of its `splits` partial sums.
#[cube(launch)]
fn depthwise_weight_finalize(
    partials: &[f32],
    dw: &mut [f32],
    splits: usize,
    #[comptime] units: u32,
) {
    let i = CUBE_POS;
    if i >= dw.len() {
        terminate!();
    }
    let sum = cube_sum(partials, i * splits, 1, splits, units);
    if UNIT_POS_X == 0 {
        dw[i] = sum;
    }
}

/// The depthwise convolution of `x` (`[N, C, H, W]`) with `weight` (`[C, 1, k, k]`).
pub(super) fn forward(
    x: CubeTensor,
    weight: CubeTensor,
    stride: usize,
    padding: usize,
) -> CubeTensor {
    let ((x, cl), w) = (laid_out(x), into_contiguous(weight));
    let g = Geometry::new(x.meta.shape(), w.meta.shape()[2], stride, padding);
    let out = empty_shaped(&x, g.output_shape(), cl);
    let client = x.client.clone();
    let elements = out.meta.num_elements();
    let dim = CubeDim::new(&client, elements);
    depthwise_forward::launch(
        &client,
        calculate_cube_count_elemwise(&client, elements, dim),
        dim,
        x.into_buffer_arg(),
        w.into_buffer_arg(),
        out.clone().into_buffer_arg(),
        g.channels,
        g.height,
        g.width,
        g.out_height,
        g.out_width,
        g.stride,
        g.padding,
        g.kernel,
        cl,
    );
    out
}

/// The gradient of [`forward`]'s input (`[N, C, height, width]`) from its output's gradient
/// `dy`.
pub(super) fn grad_input(
    dy: CubeTensor,
    weight: CubeTensor,
    height: usize,
    width: usize,
    stride: usize,
    padding: usize,
) -> CubeTensor {
    let ((dy, dy_cl), w) = (laid_out(dy), into_contiguous(weight));
    let [n, c, _, _] = dy.meta.shape().dims();
    let input = Shape::new([n, c, height, width]);
    let g = Geometry::new(&input, w.meta.shape()[2], stride, padding);
    let dx = empty_shaped(&dy, g.input_shape(), dy_cl);
    let client = dy.client.clone();
    let elements = dx.meta.num_elements();
    let dim = CubeDim::new(&client, elements);
    depthwise_grad_input::launch(
        &client,
        calculate_cube_count_elemwise(&client, elements, dim),
        dim,
        dy.into_buffer_arg(),
        w.into_buffer_arg(),
        dx.clone().into_buffer_arg(),
        g.channels,
        g.height,
        g.width,
        g.out_height,
        g.out_width,
        g.stride,
        g.padding,
        g.kernel,
        dy_cl,
        dy_cl,
    );
    dx
}

/// The gradient of [`forward`]'s `[C, 1, kernel, kernel]` weight from its input `x` and its
/// output's gradient `dy`.
pub(super) fn grad_weight(
    x: CubeTensor,
    dy: CubeTensor,
    kernel: usize,
    stride: usize,
    padding: usize,
) -> CubeTensor {
    let ((x, x_cl), (dy, dy_cl)) = (laid_out(x), laid_out(dy));
    let g = Geometry::new(x.meta.shape(), kernel, stride, padding);
    let count = g.batch * g.out_height * g.out_width;
    let r = Reduction::new(g.channels, count, x_cl);
    let taps = kernel * kernel;
    let client = x.client.clone();
    let [partials, dw] = empties(
        &x,
        [
            Shape::new([g.channels * taps * r.splits]),
            Shape::new([g.channels, 1, kernel, kernel]),
        ],
    );
    if r.folds(&client, taps) {
        depthwise_weight_folded::launch(
            &client,
            r.cubes(),
            CubeDim::new_1d(r.block),
            x.clone().into_buffer_arg(),
            dy.into_buffer_arg(),
            partials.into_buffer_arg(),
            arrivals(&x, r.groups),
            dw.clone().into_buffer_arg(),
            g.channels,
            g.height,
            g.width,
            g.out_height,
            g.out_width,
            g.stride,
            g.padding,
            count,
            r.width,
            kernel,
            r.block,
            x_cl,
            dy_cl,
        );
        return dw;
    }
    depthwise_weight_partials::launch(
        &client,
        r.cubes(),
        CubeDim::new_1d(r.block),
        x.clone().into_buffer_arg(),
        dy.into_buffer_arg(),
        partials.clone().into_buffer_arg(),
        g.channels,
        g.height,
        g.width,
        g.out_height,
        g.out_width,
        g.stride,
        g.padding,
        count,
        r.width,
        kernel,
        r.block,
        x_cl,
        dy_cl,
    );
    let (cubes, dim, units) = finishing(&client, g.channels * taps, r.splits);
    depthwise_weight_finalize::launch(
        &client,
        cubes,
        dim,
        partials.into_buffer_arg(),
        dw.clone().into_buffer_arg(),
        r.splits,
        units,
    );
    dw
}
