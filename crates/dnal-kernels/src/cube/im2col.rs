//! The column matrix of a convolution's input on the CubeCL backends, in one launch: row
//! `m = (n, oy, ox)` of `[N * OH * OW, k * k * C]` holds the `k x k` taps' inputs at output
//! position `(oy, ox)` of image `n`, tap-major and channel-minor (`(ky * k + kx) * C + c`, the
//! order of a channel-last kernel), zero where a tap falls in the padding.

use burn::tensor::Shape;
use burn_cubecl::cubecl::prelude::*;
use burn_cubecl::cubecl::{self, calculate_cube_count_elemwise};
use burn_cubecl::tensor::CubeTensor;

use super::layout::{Geometry, at, empty, laid_out};

/// One unit per output position and channel, `(m, c)` with `c` fastest, writing that
/// channel's `k x k` taps of row `m`: neighbouring units read neighbouring channels of a
/// channel-last input and write neighbouring columns, and the position's division is paid once
/// per `k * k` values instead of once per value (integer division dominated a unit per value).
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn im2col_kernel(
    x: &[f32],
    cols: &mut [f32],
    channels: usize,
    height: usize,
    width: usize,
    out_height: usize,
    out_width: usize,
    stride: usize,
    padding: usize,
    #[comptime] k: usize,
    #[comptime] x_cl: bool,
) {
    let i = ABSOLUTE_POS;
    let plane = out_height * out_width;
    let units = cols.len() / (k * k);
    if i >= units {
        terminate!();
    }
    let m = i / channels;
    let c = i % channels;
    let n = m / plane;
    let p = m % plane;
    let oy = p / out_width;
    let ox = p % out_width;
    let row = m * k * k * channels + c;
    #[unroll]
    for ky in 0..k {
        let y = oy * stride + ky;
        let y_in = y >= padding && y < height + padding;
        #[unroll]
        for kx in 0..k {
            let x_pos = ox * stride + kx;
            let mut v = 0.0f32;
            if y_in && x_pos >= padding && x_pos < width + padding {
                v = x[at(
                    n,
                    c,
                    y - padding,
                    x_pos - padding,
                    channels,
                    height,
                    width,
                    x_cl,
                )];
            }
            cols[row + (ky * k + kx) * channels] = v;
        }
    }
}

/// The column matrix of `x` (`[N, C, H, W]`, f32, channel-first or channel-last memory).
pub(super) fn im2col(x: CubeTensor, kernel: usize, stride: usize, padding: usize) -> CubeTensor {
    let (x, cl) = laid_out(x);
    let g = Geometry::new(x.meta.shape(), kernel, stride, padding);
    let rows = g.batch * g.out_height * g.out_width;
    let units = rows * g.channels;
    let cols = empty(&x, Shape::new([rows, kernel * kernel * g.channels]));
    let client = x.client.clone();
    let dim = CubeDim::new(&client, units);
    im2col_kernel::launch(
        &client,
        calculate_cube_count_elemwise(&client, units, dim),
        dim,
        x.into_buffer_arg(),
        cols.clone().into_buffer_arg(),
        g.channels,
        g.height,
        g.width,
        g.out_height,
        g.out_width,
        stride,
        padding,
        kernel,
        cl,
    );
    cols
}
