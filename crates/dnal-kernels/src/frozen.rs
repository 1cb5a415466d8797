//! Layers whose weights never change, for a network frozen for inference: a convolution with
//! its BatchNorm, gate and bias already folded into weights and one bias per channel, its
//! weights packed for the direct kernels once, and a linear layer; both run on host slices in
//! NCHW order, without burn's tensors, modules or caches.

use crate::cpu::{self, Clamp, ConvGeometry, DepthwiseGeometry, Epilogue};
use crate::direct::{self, PackedWeights};
use crate::flex::conv::{Packing, conv_forward_slices};
use crate::gemm::{MatMut, MatRef, matmul};

/// A convolution with fixed weights and a bias.
pub struct FrozenConv {
    engine: Engine,
    weight: Vec<f32>,
    ones: Vec<f32>,
    bias: Vec<f32>,
    in_chw: [usize; 3],
    out_chw: [usize; 3],
}

enum Engine {
    /// One group: the direct kernels (with their packing, where they take the geometry) or
    /// im2col and `gemm`.
    Dense {
        geometry: ConvGeometry,
        packed: Option<PackedWeights>,
    },
    /// One filter per channel.
    Depthwise(DepthwiseGeometry),
}

impl FrozenConv {
    /// `[C, OH, OW]` of the convolution of weights `shape` (`[out, in / groups, k, k]`) with
    /// `[stride, padding, groups]` on images of `in_chw`, or why `FrozenConv` cannot run it:
    /// one group or one filter per channel (depthwise), square kernels, a window that fits.
    pub fn out_chw_of(
        shape: [usize; 4],
        [stride, padding, groups]: [usize; 3],
        in_chw: [usize; 3],
    ) -> Result<[usize; 3], String> {
        let [out, per_group, kh, kw] = shape;
        let [c, h, w] = in_chw;
        if kh != kw || kh == 0 || stride == 0 {
            return Err(format!(
                "a {kh}x{kw} kernel with stride {stride}: only square kernels and strides of at \
                 least 1"
            ));
        }
        if per_group * groups != c {
            return Err(format!(
                "{groups} group(s) of {per_group} input channel(s) on an input of {c} channels"
            ));
        }
        if groups != 1 && (per_group != 1 || out != groups) {
            return Err(format!(
                "{groups} groups of {per_group} channels: only one group or one filter per \
                 channel (depthwise) are supported"
            ));
        }
        if h + 2 * padding < kh || w + 2 * padding < kw {
            return Err(format!(
                "a {kh}x{kw} kernel on {h}x{w} images padded by {padding}"
            ));
        }
        let [oh, ow] = Self::geometry(out, [stride, padding], in_chw, kh).out_hw();
        Ok([out, oh, ow])
    }

    fn geometry(
        out: usize,
        [stride, padding]: [usize; 2],
        [c, h, w]: [usize; 3],
        kernel: usize,
    ) -> ConvGeometry {
        ConvGeometry {
            in_channels: c,
            out_channels: out,
            in_hw: [h, w],
            kernel,
            stride,
            padding,
        }
    }

    /// The convolution of weights `[out, in / groups, k, k]` (`shape`, row-major) and one bias
    /// per output channel, with `[stride, padding, groups]`, on images of `in_chw`; an error
    /// says what does not fit ([`FrozenConv::out_chw_of`]).
    pub fn new(
        weight: Vec<f32>,
        bias: Vec<f32>,
        shape: [usize; 4],
        [stride, padding, groups]: [usize; 3],
        in_chw: [usize; 3],
    ) -> Result<Self, String> {
        let out_chw = Self::out_chw_of(shape, [stride, padding, groups], in_chw)?;
        let [out, _, kernel, _] = shape;
        if weight.len() != shape.iter().product::<usize>() || bias.len() != out {
            return Err(format!(
                "{} weights and {} biases for a {shape:?} convolution",
                weight.len(),
                bias.len()
            ));
        }
        let geometry = Self::geometry(out, [stride, padding], in_chw, kernel);
        let engine = if groups == 1 {
            let packed = (direct::available() && direct::takes_forward_image(&geometry))
                .then(|| PackedWeights::new(&weight, &geometry));
            Engine::Dense { geometry, packed }
        } else {
            Engine::Depthwise(DepthwiseGeometry {
                channels: in_chw[0],
                in_hw: geometry.in_hw,
                kernel,
                stride,
                padding,
            })
        };
        Ok(Self {
            engine,
            weight,
            ones: vec![1.0; out],
            bias,
            in_chw,
            out_chw,
        })
    }

    /// Whether the forward of one image shares its work among rayon's threads: a convolution
    /// whose channel blocks are spread over them, or a depthwise one whose planes are. A
    /// network of such layers runs its forward inside rayon's pool, so that the calling
    /// thread takes part (`dnal_zoo::FrozenNetwork::forward`).
    pub fn shares_one_image(&self) -> bool {
        match &self.engine {
            Engine::Dense { geometry, packed } => packed
                .as_ref()
                .is_some_and(|w| direct::splits_image(w, geometry)),
            Engine::Depthwise(_) => {
                self.out_chw.iter().product::<usize>() >= crate::planes::SERIAL_BELOW
            }
        }
    }

    /// `[C, H, W]` of one input image.
    pub fn in_chw(&self) -> [usize; 3] {
        self.in_chw
    }

    /// `[C, OH, OW]` of one output image.
    pub fn out_chw(&self) -> [usize; 3] {
        self.out_chw
    }

    /// `clamp(conv(x) + bias + residual)` for a batch `x` (`[N, C, H, W]`); `residual`, if
    /// any, is laid out like the output. Panics if `x` is not a whole number of images.
    pub fn forward(&self, x: &[f32], clamp: Clamp, residual: Option<&[f32]>) -> Vec<f32> {
        let image: usize = self.in_chw.iter().product();
        assert!(
            image > 0 && x.len().is_multiple_of(image),
            "a whole number of images"
        );
        match &self.engine {
            Engine::Dense { geometry, packed } => {
                let epilogue = Epilogue {
                    scale: &self.ones,
                    shift: &self.bias,
                    residual,
                    clamp,
                };
                let weights = (&self.weight[..], Packing::<()>::Ready(packed.as_ref()));
                conv_forward_slices(x, weights, geometry, Some(epilogue))
            }
            Engine::Depthwise(g) => {
                let first = if residual.is_some() {
                    Clamp::NONE
                } else {
                    clamp
                };
                let mut y = cpu::depthwise_forward_affine(
                    x,
                    &self.weight,
                    &self.ones,
                    &self.bias,
                    first,
                    g,
                );
                if let Some(r) = residual {
                    assert_eq!(r.len(), y.len(), "a residual laid out like the output");
                    crate::simd::widest_simd!({
                        let bounds = clamp;
                        for (v, &r) in y.iter_mut().zip(r) {
                            *v = bounds.apply(*v + r);
                        }
                    });
                }
                y
            }
        }
    }
}

/// A linear layer `x W + b` with fixed `W` (`[inputs, outputs]`, row-major) and `b`.
pub struct FrozenLinear {
    weight: Vec<f32>,
    bias: Vec<f32>,
    inputs: usize,
}

impl FrozenLinear {
    /// The layer of `weight` (`[inputs, outputs]`) and `bias` (`[outputs]`).
    pub fn new(weight: Vec<f32>, bias: Vec<f32>, inputs: usize) -> Result<Self, String> {
        if inputs == 0 || weight.len() != inputs * bias.len() {
            return Err(format!(
                "{} weights for {inputs} inputs and {} outputs",
                weight.len(),
                bias.len()
            ));
        }
        Ok(Self {
            weight,
            bias,
            inputs,
        })
    }

    /// Outputs per example.
    pub fn outputs(&self) -> usize {
        self.bias.len()
    }

    /// `x W + b` for `x` `[N, inputs]`: `[N, outputs]`.
    pub fn forward(&self, x: &[f32]) -> Vec<f32> {
        let (k, m) = (self.inputs, self.outputs());
        assert!(x.len().is_multiple_of(k), "a whole number of examples");
        let n = x.len() / k;
        let mut out = vec![0.0f32; n * m];
        if n * m > 0 {
            matmul(
                MatMut::row_major(&mut out, n, m),
                MatRef::row_major(x, n, k),
                MatRef::row_major(&self.weight, k, m),
                false,
                false,
            );
        }
        for row in out.chunks_mut(m.max(1)) {
            row.iter_mut().zip(&self.bias).for_each(|(v, b)| *v += b);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Plain loops: `[N, Co, OH, OW]` of a grouped convolution with bias.
    fn reference(
        x: &[f32],
        w: &[f32],
        b: &[f32],
        [co, per, k]: [usize; 3],
        [stride, pad, groups]: [usize; 3],
        [c, h, wd]: [usize; 3],
    ) -> Vec<f32> {
        let out = |n: usize| (n + 2 * pad - k) / stride + 1;
        let (oh, ow) = (out(h), out(wd));
        let n = x.len() / (c * h * wd);
        let mut y = vec![0.0f32; n * co * oh * ow];
        for i in 0..n {
            for o in 0..co {
                let group = o / (co / groups);
                for (oy, ox) in (0..oh).flat_map(|a| (0..ow).map(move |b| (a, b))) {
                    let mut s = b[o] as f64;
                    for ci in 0..per {
                        let ch = group * per + ci;
                        for (ky, kx) in (0..k).flat_map(|a| (0..k).map(move |b| (a, b))) {
                            let (iy, ix) = (oy * stride + ky, ox * stride + kx);
                            if iy < pad || ix < pad || iy - pad >= h || ix - pad >= wd {
                                continue;
                            }
                            let v = x[((i * c + ch) * h + iy - pad) * wd + ix - pad];
                            s += v as f64 * w[((o * per + ci) * k + ky) * k + kx] as f64;
                        }
                    }
                    y[((i * co + o) * oh + oy) * ow + ox] = s as f32;
                }
            }
        }
        y
    }

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| (((i as u32).wrapping_mul(2654435761) ^ seed) % 1000) as f32 / 500.0 - 1.0)
            .collect()
    }

    fn close(a: &[f32], b: &[f32]) {
        assert_eq!(a.len(), b.len());
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!((x - y).abs() <= 1e-4 * (1.0 + y.abs()), "{i}: {x} vs {y}");
        }
    }

    #[test]
    fn dense_and_depthwise_equal_plain_loops_at_batch_1_and_3() {
        let relu = Clamp {
            lo: 0.0,
            hi: f32::INFINITY,
        };
        // (co, per-group input channels, k, stride, padding, groups, [c, h, w]): direct
        // kernels, im2col at stride 2, a 1x1, depthwise at strides 1 and 2.
        let cases = [
            (8, 5, 3, 1, 1, 1, [5, 9, 9]),
            (6, 4, 3, 2, 1, 1, [4, 8, 8]),
            (7, 3, 1, 1, 0, 1, [3, 5, 5]),
            (6, 1, 3, 1, 1, 6, [6, 7, 7]),
            (6, 1, 3, 2, 1, 6, [6, 8, 8]),
        ];
        for (co, per, k, stride, pad, groups, chw) in cases {
            let w = values(co * per * k * k, 1);
            let b = values(co, 2);
            let conv = FrozenConv::new(
                w.clone(),
                b.clone(),
                [co, per, k, k],
                [stride, pad, groups],
                chw,
            )
            .unwrap();
            for n in [1, 3] {
                let x = values(n * chw.iter().product::<usize>(), 3);
                let want = reference(&x, &w, &b, [co, per, k], [stride, pad, groups], chw);
                close(&conv.forward(&x, Clamp::NONE, None), &want);
                // With a residual and a ReLU.
                let r = values(want.len(), 4);
                let fused = conv.forward(&x, relu, Some(&r));
                let sum: Vec<f32> = want.iter().zip(&r).map(|(a, b)| (a + b).max(0.0)).collect();
                close(&fused, &sum);
            }
        }
    }

    #[test]
    fn other_groupings_and_sizes_are_refused_with_a_reason() {
        let grouped = FrozenConv::new(
            vec![0.0; 4 * 2 * 9],
            vec![0.0; 4],
            [4, 2, 3, 3],
            [1, 1, 2],
            [4, 5, 5],
        );
        assert!(grouped.err().unwrap().contains("depthwise"));
        let short = FrozenConv::new(
            vec![0.0; 3],
            vec![0.0; 1],
            [1, 1, 2, 2],
            [1, 0, 1],
            [1, 3, 3],
        );
        assert!(short.err().unwrap().contains("weights"));
        let channels = FrozenConv::new(
            vec![0.0; 4],
            vec![0.0; 1],
            [1, 1, 2, 2],
            [1, 0, 1],
            [2, 3, 3],
        );
        assert!(channels.err().unwrap().contains("input of 2 channels"));
    }

    #[test]
    fn linear_is_x_w_plus_b() {
        let layer =
            FrozenLinear::new(vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0], vec![0.5, -0.5], 3).unwrap();
        // x [2, 3] x W [3, 2].
        let y = layer.forward(&[1.0, 0.0, -1.0, 2.0, 1.0, 0.0]);
        assert_eq!(
            y,
            [
                1.0 - 5.0 + 0.5,
                2.0 - 6.0 - 0.5,
                2.0 + 3.0 + 0.5,
                4.0 + 4.0 - 0.5
            ]
        );
        assert!(FrozenLinear::new(vec![0.0; 5], vec![0.0; 2], 3).is_err());
    }
}
