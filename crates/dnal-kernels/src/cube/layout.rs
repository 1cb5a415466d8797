//! How dnal's CubeCL kernels take and give `[N, C, H, W]` tensors: channel-first memory
//! (burn's default) or channel-last memory (what the cubecl convolutions compute in and return
//! as a permuted view), kept as they come so that no copy is launched between a convolution
//! and the kernel after it; and a convolution's sizes ([`Geometry`]).

use burn::tensor::{DType, Shape};
use burn_cubecl::cubecl;
use burn_cubecl::cubecl::prelude::*;
use burn_cubecl::cubecl::server::MemoryLayoutDescriptor;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::ops::{permute_nchw_to_nhwc, permute_nchw_to_nhwc_shape, permute_nhwc_to_nchw};
use burn_cubecl::tensor::CubeTensor;

/// A new contiguous f32 tensor of `shape` on `like`'s device.
pub(super) fn empty(like: &CubeTensor, shape: Shape) -> CubeTensor {
    empty_device_contiguous_dtype(like.client.clone(), like.device.clone(), shape, DType::F32)
}

/// New contiguous f32 tensors of `shapes` on `like`'s device, in one reservation: each
/// reservation is a request to the device's server thread, as a launch is, so a kernel's small
/// outputs (per-channel statistics, coefficients) are reserved together. Their memory is freed
/// when the last of them is dropped, so only tensors that go at about the same time belong in
/// one call; each starts at the device's memory alignment, so they never overlap (on wgpu no
/// two bindings of one launch may).
pub(super) fn empties<const K: usize>(like: &CubeTensor, shapes: [Shape; K]) -> [CubeTensor; K] {
    let mut tensors = empties_vec(like, shapes.to_vec()).into_iter();
    [(); K].map(|_| tensors.next().expect("one tensor per shape"))
}

/// [`empties`] for a number of shapes known at run time.
fn empties_vec(like: &CubeTensor, shapes: Vec<Shape>) -> Vec<CubeTensor> {
    let f32_size = DType::F32.size();
    let descriptors = shapes
        .iter()
        .map(|shape| MemoryLayoutDescriptor::contiguous(shape.clone(), f32_size))
        .collect();
    let layouts = like.client.empty_tensors(descriptors);
    shapes
        .into_iter()
        .zip(layouts)
        .map(|(shape, layout)| {
            CubeTensor::new_contiguous(
                like.client.clone(),
                like.device.clone(),
                shape,
                layout.memory,
                DType::F32,
            )
        })
        .collect()
}

/// A `[N, C, H, W]` tensor in memory the kernels read, and whether that memory is
/// channel-last: as it is where it is contiguous channel-first or channel-last, else copied
/// channel-first.
pub(super) fn laid_out(t: CubeTensor) -> (CubeTensor, bool) {
    if t.is_contiguous() {
        (t, false)
    } else if t.meta.num_dims() > 2 && permute_nchw_to_nhwc(t.clone()).is_contiguous() {
        (t, true)
    } else {
        (into_contiguous(t), false)
    }
}

/// A new tensor of `shape` (`[N, C, H, W]`) on `like`'s device, channel-last in memory where
/// `cl`.
pub(super) fn empty_shaped(like: &CubeTensor, shape: Shape, cl: bool) -> CubeTensor {
    if cl {
        permute_nhwc_to_nchw(empty(like, permute_nchw_to_nhwc_shape(shape)))
    } else {
        empty(like, shape)
    }
}

/// A new tensor shaped like `x`, channel-last in memory where `cl`.
pub(super) fn empty_like(x: &CubeTensor, cl: bool) -> CubeTensor {
    empty_shaped(x, x.meta.shape().clone(), cl)
}

/// Where element `(n, c, y, x)` of a `[N, C, H, W]` tensor lies in channel-first (`cl`
/// false) or channel-last (`cl` true) memory.
#[cube]
#[allow(clippy::too_many_arguments)]
pub(super) fn at(
    n: usize,
    c: usize,
    y: usize,
    x: usize,
    channels: usize,
    height: usize,
    width: usize,
    #[comptime] cl: bool,
) -> usize {
    if cl {
        ((n * height + y) * width + x) * channels + c
    } else {
        ((n * channels + c) * height + y) * width + x
    }
}

/// `(n, c, y, x)` of the element at memory index `i` of a `[N, C, H, W]` tensor laid out as
/// `cl` says.
#[cube]
pub(super) fn coordinates(
    i: usize,
    channels: usize,
    height: usize,
    width: usize,
    #[comptime] cl: bool,
) -> (usize, usize, usize, usize) {
    if cl {
        let c = i % channels;
        let p = i / channels;
        let x = p % width;
        let p = p / width;
        (p / height, c, p % height, x)
    } else {
        let x = i % width;
        let p = i / width;
        let y = p % height;
        let p = p / height;
        (p / channels, p % channels, y, x)
    }
}

/// A square-kernel convolution's sizes, `[N, C, H, W]` in (`C` the input's channels).
#[derive(Debug, Clone, Copy)]
pub(super) struct Geometry {
    pub(super) batch: usize,
    pub(super) channels: usize,
    pub(super) height: usize,
    pub(super) width: usize,
    pub(super) out_height: usize,
    pub(super) out_width: usize,
    pub(super) kernel: usize,
    pub(super) stride: usize,
    pub(super) padding: usize,
}

impl Geometry {
    pub(super) fn new(input: &Shape, kernel: usize, stride: usize, padding: usize) -> Self {
        let out = |size: usize| (size + 2 * padding - kernel) / stride + 1;
        Geometry {
            batch: input[0],
            channels: input[1],
            height: input[2],
            width: input[3],
            out_height: out(input[2]),
            out_width: out(input[3]),
            kernel,
            stride,
            padding,
        }
    }

    pub(super) fn input_shape(&self) -> Shape {
        Shape::new([self.batch, self.channels, self.height, self.width])
    }

    /// The output of a depthwise convolution (as many channels as the input).
    pub(super) fn output_shape(&self) -> Shape {
        Shape::new([self.batch, self.channels, self.out_height, self.out_width])
    }
}

/// `t` itself where nothing else holds its memory, else a copy of it: a tensor a kernel may
/// write in place.
pub(super) fn writable(t: CubeTensor) -> CubeTensor {
    if t.can_mut() { t } else { t.copy() }
}

/// Where element `(m, c)` of a `[N, C, H, W]` tensor lies, `m = n * H * W + position`: in
/// channel-first memory (`cl` false, burn's default) or channel-last memory (`cl` true, what
/// the cubecl convolutions compute in and return as a permuted view).
#[cube]
pub(super) fn offset(
    m: usize,
    c: usize,
    plane: usize,
    channels: usize,
    #[comptime] cl: bool,
) -> usize {
    if cl {
        m * channels + c
    } else {
        let n = m / plane;
        (n * channels + c) * plane + (m - n * plane)
    }
}

/// `(m, c)` of the element at memory index `i` of a tensor laid out as `cl` says.
#[cube]
pub(super) fn position(
    i: usize,
    plane: usize,
    channels: usize,
    #[comptime] cl: bool,
) -> (usize, usize) {
    if cl {
        (i / channels, i % channels)
    } else {
        let n = i / (plane * channels);
        let c = (i / plane) % channels;
        (n * plane + i % plane, c)
    }
}
