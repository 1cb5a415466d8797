//! dnal's operations on one device compared with a reference device: the training BatchNorm
//! (output, batch and running statistics, gradients), the depthwise convolution, the
//! one-group convolution with its gradients, SGD's momentum step, the sparsity penalty's
//! gradient, the training loss and the placement of channels into a wider stream, each over a set of shapes, layouts and activations
//! chosen to reach every branch of the kernels (several cubes per channel, more channels than
//! a cube's units, channel-last memory, odd planes, a large common offset).
//!
//! The CubeCL kernels are written once for every CubeCL runtime, but compiled by a different
//! compiler on each (SPIR-V for wgpu, PTX for cuda); `dnal-train check --backend cuda` runs
//! these comparisons against flex on the machine at hand, and the wgpu tests run them on
//! Mesa's software Vulkan. On the reference the BatchNorm runs through dnal's flex kernels and
//! the convolutions through burn's own convolution.

use std::fmt;

use burn::nn::BatchNormConfig;
use burn::prelude::*;
use burn::tensor::ops::ConvOptions;

use crate::Activation;

/// The largest difference allowed, relative to the largest magnitude of the reference's values
/// (at least 1), for dnal's own f32 kernels.
pub const TOLERANCE: f32 = 2e-4;

/// The same for the one-group convolutions, whose products are burn's on the CubeCL backends
/// (the weight gradient's too): on cuda burn's convolution and matrix-product kernels stage
/// f32 through TF32 tensor cores (10-bit mantissa), and on an H200 their outputs and gradients
/// differed from flex by up to 2.5e-3 of the largest value. A wrong tap, flip, stride or layout
/// differs by the order of the values themselves.
pub const CONVOLUTION_TOLERANCE: f32 = 1e-2;

/// One quantity of one case on the checked device against the reference.
#[derive(Debug, Clone)]
pub struct Comparison {
    /// The operation and its shapes.
    pub case: String,
    /// What was compared: `output`, `dx`, `running mean`, ...
    pub quantity: &'static str,
    /// The largest absolute difference.
    pub worst: f32,
    /// The reference's largest magnitude (at least 1): the difference's scale.
    pub scale: f32,
    /// Why there is no value to compare, where the operation failed on either device.
    pub error: Option<String>,
    /// The difference allowed, relative to `scale`.
    pub tolerance: f32,
}

impl Comparison {
    /// Whether the difference is within [`TOLERANCE`] of the scale (and finite).
    pub fn ok(&self) -> bool {
        self.error.is_none() && self.worst <= self.tolerance * self.scale
    }
}

impl fmt::Display for Comparison {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let status = if self.ok() { "ok  " } else { "FAIL" };
        let (quantity, case) = (self.quantity, &self.case);
        match &self.error {
            Some(e) => write!(f, "{status} {quantity} of {case}: {e}"),
            None => write!(
                f,
                "{status} {quantity} of {case}: differs by {:.3e} (largest value {:.3e}, \
                 allowed {:.0e} of it)",
                self.worst, self.scale, self.tolerance
            ),
        }
    }
}

fn compare(
    tolerance: f32,
    case: &str,
    names: &[&'static str],
    got: Result<Vec<Vec<f32>>, String>,
    want: Result<Vec<Vec<f32>>, String>,
) -> Vec<Comparison> {
    let empty = Vec::new();
    let error = match (&got, &want) {
        (Err(e), _) => Some(format!("failed on the checked device: {e}")),
        (_, Err(e)) => Some(format!("failed on the reference: {e}")),
        _ => None,
    };
    let (got, want) = (got.unwrap_or_default(), want.unwrap_or_default());
    names
        .iter()
        .enumerate()
        .map(|(i, quantity)| {
            let (g, w) = (got.get(i).unwrap_or(&empty), want.get(i).unwrap_or(&empty));
            let scale = w.iter().fold(1.0f32, |m, v| m.max(v.abs()));
            // A missing or misshapen result, or a non-finite value, is an infinite difference.
            let worst = if g.len() == w.len() && !w.is_empty() {
                g.iter()
                    .zip(w)
                    .map(|(g, w)| {
                        if g.is_finite() {
                            (g - w).abs()
                        } else {
                            f32::INFINITY
                        }
                    })
                    .fold(0.0f32, f32::max)
            } else {
                f32::INFINITY
            };
            Comparison {
                case: case.to_string(),
                quantity,
                worst,
                scale,
                error: error.clone(),
                tolerance,
            }
        })
        .collect()
}

/// Values `0.5 * sin(i * 0.37 + seed) + 0.3 * cos(i * 1.91 * seed)`: varied, deterministic.
fn wave(n: usize, seed: f32) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let i = i as f32;
            0.5 * (i * 0.37 + seed).sin() + 0.3 * (i * 1.91 * seed).cos()
        })
        .collect()
}

/// A tensor's values, or why they could not be read (a kernel failed to compile or run).
fn values<const D: usize>(t: Tensor<D>) -> Result<Vec<f32>, String> {
    let len = t.shape().num_elements();
    let data = t
        .reshape([len])
        .try_into_data()
        .map_err(|e| e.to_string())?;
    data.try_to_vec::<f32>().map_err(|e| format!("{e:?}"))
}

/// The gradient of `t`, or why there is none.
fn grad_of<const D: usize>(
    t: &Tensor<D>,
    grads: &burn::tensor::Gradients,
) -> Result<Vec<f32>, String> {
    values(t.grad(grads).ok_or("no gradient was computed")?)
}

/// The BatchNorm comparisons: a module's output and running statistics over two training
/// calls, then the bare operation's output, statistics and gradients over shapes whose
/// reductions take several cubes per channel and several rounds per unit, short channels
/// (one cube of 32 or 64 units), channel counts that are not powers of two and more channels
/// than a cube's units in channel-last memory, 625 cubes along each channel (ResNet-50-like:
/// 64 channel-last channels, four lanes each), odd planes, a large common offset (the
/// variance must not cancel), and gated: a gate's factor (some of it zero) multiplying the
/// transform, with its gradient.
pub fn batch_norm(device: &Device, reference: &Device) -> Vec<Comparison> {
    let mut out = compare(
        TOLERANCE,
        "a BatchNorm module, two training calls",
        &["output 1", "output 2", "running mean", "running variance"],
        batch_norm_module(device),
        batch_norm_module(reference),
    );
    use Activation::*;
    for (shape, act, residual, offset, channel_last, gated) in [
        ([4, 3, 40, 40], Relu, false, 0.0, false, false),
        ([4, 3, 40, 40], Relu6, true, 0.0, false, true),
        ([3, 5, 7, 7], Identity, true, 0.0, false, false),
        ([2, 4, 9, 11], Relu, true, 1000.0, false, true),
        ([4, 6, 20, 20], Relu, false, 0.0, true, true),
        ([3, 5, 9, 11], Relu6, true, 0.0, true, false),
        ([2, 9, 4, 4], Relu, true, 0.0, true, false),
        ([2, 300, 3, 3], Relu, true, 0.0, true, true),
        // A gated BatchNorm of one channel (a layer a high penalty thinned to one).
        ([8, 1, 5, 5], Relu, false, 0.0, true, true),
        // A ResNet-56 first-stage unit: 64 cubes along each channel, 16 lanes per channel,
        // whose last cube finishes the reduction where it folds (cuda by default).
        ([16, 16, 32, 32], Relu, true, 0.0, true, false),
        ([16, 16, 32, 32], Relu, false, 0.0, true, true),
        ([4, 64, 100, 100], Relu, false, 0.0, true, false),
        // VGG-16's hidden classifier layer: a batch of 512 features as 1x1 planes.
        ([128, 512, 1, 1], Relu, false, 0.0, false, true),
    ] {
        let run =
            |d: &Device| batch_norm_case(d, shape, act, residual, offset, channel_last, gated);
        let mut names = vec!["output", "mean", "variance", "dx", "da", "db"];
        names.extend(residual.then_some("dresidual"));
        names.extend(gated.then_some("dfactor"));
        out.extend(compare(
            TOLERANCE,
            &format!(
                "BatchNorm {shape:?} {act:?} residual {residual} offset {offset} \
                 channel-last {channel_last} gated {gated}"
            ),
            &names,
            run(device),
            run(reference),
        ));
    }
    // Added into some channels of a wider stream (a pruned residual block's last unit):
    // scattered and consecutive positions, either memory layout for each of the two inputs.
    const INTO: [&str; 8] = [
        "output", "mean", "variance", "dx", "da", "db", "dstream", "dfactor",
    ];
    for (shape, width, pos, act, x_cl, s_cl, gated) in [
        ([3, 4, 6, 5], 7, &[0, 2, 3, 6][..], Relu, false, false, true),
        ([2, 3, 9, 11], 8, &[2, 3, 4][..], Relu6, false, true, false),
        (
            [4, 5, 7, 7],
            9,
            &[8, 1, 4, 5, 0][..],
            Identity,
            true,
            false,
            false,
        ),
        (
            [16, 6, 8, 8],
            10,
            &[1, 3, 5, 7, 8, 9][..],
            Relu,
            true,
            true,
            true,
        ),
    ] {
        let run = |d: &Device| batch_norm_into_case(d, shape, width, pos, act, [x_cl, s_cl], gated);
        out.extend(compare(
            TOLERANCE,
            &format!(
                "BatchNorm {shape:?} into {pos:?} of {width} {act:?} channel-last {x_cl}, \
                 stream channel-last {s_cl}, gated {gated}"
            ),
            &INTO[..if gated { 8 } else { 7 }],
            run(device),
            run(reference),
        ));
    }
    out
}

/// Training BatchNorm added into the channels `pos` of a `width`-channel stream, then the
/// activation, on `device`: output, batch statistics, and the gradients of `sum(y * w)` for
/// the input, `a`, `b`, the stream and, `gated`, the gate's factor; `[x, stream]` held
/// channel-last where `cl` says.
fn batch_norm_into_case(
    device: &Device,
    [n, c, h, w]: [usize; 4],
    width: usize,
    pos: &[usize],
    act: Activation,
    cl: [bool; 2],
    gated: bool,
) -> Result<Vec<Vec<f32>>, String> {
    let device = device.clone().autodiff();
    let (len, stream_len) = (n * c * h * w, n * width * h * w);
    let x = Tensor::<4>::from_data(TensorData::new(wave(len, 1.5), [n, c, h, w]), &device);
    let s = Tensor::<4>::from_data(
        TensorData::new(wave(stream_len, 2.5), [n, width, h, w]),
        &device,
    );
    let x = laid_out(x.mul_scalar(3.0).add_scalar(0.25), cl[0]).require_grad();
    let s = laid_out(s, cl[1]).require_grad();
    let one = |v: Vec<f32>| Tensor::<1>::from_data(TensorData::new(v, [c]), &device);
    let a = one(wave(c, 2.0).iter().map(|v| v + 1.0).collect()).require_grad();
    let b = one(wave(c, 3.0)).require_grad();
    let f = one(gate_factor(c)).require_grad();
    let affine = crate::norm::Affine {
        a: a.clone(),
        b: b.clone(),
        factor: gated.then(|| f.clone()),
    };
    let t = crate::norm::batch_norm_train_residual(
        x.clone(),
        affine,
        1e-5,
        act,
        crate::norm::Residual::Into(s.clone(), pos),
        None,
    );
    let weights = Tensor::<4>::from_data(
        TensorData::new(wave(stream_len, 5.0), [n, width, h, w]),
        &device,
    );
    let grads = (t.output.clone() * weights).sum().backward();
    let mut out = vec![
        values(t.output)?,
        values(t.mean)?,
        values(t.variance)?,
        grad_of(&x, &grads)?,
        grad_of(&a, &grads)?,
        grad_of(&b, &grads)?,
        grad_of(&s, &grads)?,
    ];
    if gated {
        out.push(grad_of(&f, &grads)?);
    }
    Ok(out)
}

/// A gate's factor over `c` channels: values in `[0, 1]`, every fourth channel closed (zero).
fn gate_factor(c: usize) -> Vec<f32> {
    wave(c, 6.0)
        .iter()
        .enumerate()
        .map(|(i, v)| if i % 4 == 1 { 0.0 } else { 0.5 + 0.5 * v })
        .collect()
}

/// A BatchNorm module's output and running statistics after two training calls on `device`.
fn batch_norm_module(device: &Device) -> Result<Vec<Vec<f32>>, String> {
    let device = device.clone().autodiff();
    let [n, c, h, w] = [3, 4, 6, 5];
    let bn = BatchNormConfig::new(c).with_momentum(0.3).init(&device);
    let factor = Tensor::<1>::from_data(TensorData::new(wave(c, 6.0), [c]), &device);
    let mut out = Vec::new();
    for seed in [7.0, 8.0] {
        let xv = wave(n * c * h * w, seed)
            .iter()
            .map(|v| 2.0 * v + 0.5)
            .collect();
        let x = Tensor::<4>::from_data(TensorData::new(xv, [n, c, h, w]), &device);
        out.push(values(crate::batch_norm(
            &bn,
            Some(factor.clone()),
            Activation::Relu,
            x,
        ))?);
    }
    for state in [&bn.running_mean, &bn.running_var] {
        out.push(values(state.value_sync())?);
    }
    Ok(out)
}

/// Training BatchNorm (with a residual, an activation, a gate's factor) on `device`: output,
/// batch mean and variance, and the gradients of `sum(y * w)` for the input, `a`, `b`, the
/// residual and the factor.
fn batch_norm_case(
    device: &Device,
    [n, c, h, w]: [usize; 4],
    act: Activation,
    residual: bool,
    offset: f32,
    channel_last: bool,
    gated: bool,
) -> Result<Vec<Vec<f32>>, String> {
    let device = device.clone().autodiff();
    let len = n * c * h * w;
    let four = |v: Vec<f32>| Tensor::<4>::from_data(TensorData::new(v, [n, c, h, w]), &device);
    let one = |v: Vec<f32>| Tensor::<1>::from_data(TensorData::new(v, [c]), &device);
    // Channels of different means and spreads, on a common offset.
    let xv = wave(len, 1.0)
        .into_iter()
        .enumerate()
        .map(|(i, v)| offset + v * (1.0 + (i / (h * w) % c) as f32) + (i / (h * w) % c) as f32)
        .collect();
    let x = laid_out(four(xv), channel_last).require_grad();
    let a = one(wave(c, 2.0).iter().map(|v| v + 1.0).collect()).require_grad();
    let b = one(wave(c, 3.0)).require_grad();
    let r = four(wave(len, 4.0)).require_grad();
    let f = one(gate_factor(c)).require_grad();
    let (y, mean, var) = if gated {
        let affine = crate::norm::Affine {
            a: a.clone(),
            b: b.clone(),
            factor: Some(f.clone()),
        };
        let residual = match residual {
            true => crate::norm::Residual::Whole(r.clone()),
            false => crate::norm::Residual::None,
        };
        crate::norm::batch_norm_train_residual(x.clone(), affine, 1e-5, act, residual, None)
            .statistics()
    } else if residual {
        crate::batch_norm_add_train(x.clone(), a.clone(), b.clone(), r.clone(), 1e-5, act)
    } else {
        crate::batch_norm_train(x.clone(), a.clone(), b.clone(), 1e-5, act)
    };
    // Channel-last, the output's gradient arrives channel-last too.
    let weights = four(wave(len, 5.0));
    let grads = if channel_last {
        (y.clone().permute([0, 2, 3, 1]) * weights.permute([0, 2, 3, 1]))
            .sum()
            .backward()
    } else {
        (y.clone() * weights).sum().backward()
    };
    let mut out = vec![
        values(y)?,
        values(mean)?,
        values(var)?,
        grad_of(&x, &grads)?,
        grad_of(&a, &grads)?,
        grad_of(&b, &grads)?,
    ];
    if residual {
        out.push(grad_of(&r, &grads)?);
    }
    if gated {
        out.push(grad_of(&f, &grads)?);
    }
    Ok(out)
}

/// `x`'s values held channel-last in memory (what a convolution hands on on the CubeCL
/// backends) where `channel_last`, as a fresh leaf tensor either way.
fn laid_out(x: Tensor<4>, channel_last: bool) -> Tensor<4> {
    let x = if channel_last {
        crate::sgd::channel_last(x)
    } else {
        x
    };
    x.detach()
}

/// Which convolution a case runs and what it differentiates.
#[derive(Debug, Clone, Copy)]
pub struct ConvCase {
    /// `[N, C, H, W]` of the input.
    pub shape: [usize; 4],
    /// Output channels of a one-group convolution; `None` for a depthwise one.
    pub out_channels: Option<usize>,
    /// The kernel's side.
    pub kernel: usize,
    /// Stride on both axes.
    pub stride: usize,
    /// Padding on every side.
    pub padding: usize,
    /// The input laid out channel-last in memory.
    pub channel_last: bool,
    /// Whether the input is tracked.
    pub input_grad: bool,
    /// Whether the weight is tracked. With neither tracked the case runs on the device
    /// without autodiff, as inference does.
    pub weight_grad: bool,
}

impl ConvCase {
    /// A case differentiating input and weight.
    pub fn both(
        shape: [usize; 4],
        out_channels: Option<usize>,
        kernel: usize,
        stride: usize,
        padding: usize,
        channel_last: bool,
    ) -> Self {
        Self {
            shape,
            out_channels,
            kernel,
            stride,
            padding,
            channel_last,
            input_grad: true,
            weight_grad: true,
        }
    }

    fn name(&self) -> String {
        let kind = match self.out_channels {
            Some(co) => format!("conv -> {co}"),
            None => "depthwise conv".to_string(),
        };
        format!(
            "{kind} {:?} k {} stride {} padding {} channel-last {} dx {} dw {}",
            self.shape,
            self.kernel,
            self.stride,
            self.padding,
            self.channel_last,
            self.input_grad,
            self.weight_grad
        )
    }

    /// The convolution on `device`, through dnal's entry point (`dnal`) or burn's conv2d: the
    /// output and the gradients of `sum(y * weights)` for the input and the weight where they
    /// are tracked.
    fn run(&self, device: &Device, dnal: bool) -> Result<Vec<Vec<f32>>, String> {
        let [n, c, h, w] = self.shape;
        let (k, stride, padding) = (self.kernel, self.stride, self.padding);
        // Nothing tracked: inference, on the device without autodiff.
        let training = self.input_grad || self.weight_grad;
        let device = if training {
            device.clone().autodiff()
        } else {
            device.clone()
        };
        let x = Tensor::<4>::from_data(
            TensorData::new(wave(n * c * h * w, 1.0), [n, c, h, w]),
            &device,
        );
        let x = laid_out(x, self.channel_last);
        let x = if self.input_grad { x.require_grad() } else { x };
        let (co, ci, groups) = match self.out_channels {
            Some(co) => (co, c, 1),
            None => (c, 1, c),
        };
        let len = co * ci * k * k;
        let kernel =
            Tensor::<4>::from_data(TensorData::new(wave(len, 2.0), [co, ci, k, k]), &device);
        let kernel = if self.weight_grad {
            kernel.require_grad()
        } else {
            kernel
        };
        let y = match (dnal, self.out_channels) {
            (true, None) => crate::depthwise_conv2d(x.clone(), kernel.clone(), stride, padding),
            (true, Some(_)) => crate::conv2d(x.clone(), kernel.clone(), stride, padding),
            (false, _) => {
                let options = ConvOptions::new([stride; 2], [padding; 2], [1; 2], groups);
                burn::tensor::module::conv2d(x.clone(), kernel.clone(), None, options)
            }
        };
        if !training {
            return Ok(vec![values(y)?]);
        }
        let [_, _, oh, ow] = y.dims();
        let len = n * co * oh * ow;
        // The output's gradient in the input's memory layout, as a network's BatchNorm leaves
        // it.
        let weights = laid_out(
            Tensor::<4>::from_data(TensorData::new(wave(len, 5.0), [n, co, oh, ow]), &device),
            self.channel_last,
        );
        let grads = (y.clone() * weights).sum().backward();
        let mut out = vec![values(y)?];
        if self.input_grad {
            out.push(grad_of(&x, &grads)?);
        }
        if self.weight_grad {
            out.push(grad_of(&kernel, &grads)?);
        }
        Ok(out)
    }

    /// dnal's convolution on `device` against burn's on `reference`.
    pub fn compare(&self, device: &Device, reference: &Device) -> Vec<Comparison> {
        let names: Vec<&'static str> = ["output"]
            .into_iter()
            .chain(self.input_grad.then_some("dx"))
            .chain(self.weight_grad.then_some("dweight"))
            .collect();
        let tolerance = match self.out_channels {
            Some(_) => CONVOLUTION_TOLERANCE,
            None => TOLERANCE,
        };
        compare(
            tolerance,
            &self.name(),
            &names,
            self.run(device, true),
            self.run(reference, false),
        )
    }
}

fn compare_all(cases: &[ConvCase], device: &Device, reference: &Device) -> Vec<Comparison> {
    cases
        .iter()
        .flat_map(|case| case.compare(device, reference))
        .collect()
}

/// The depthwise comparisons: MobileNetV2's 3x3 at strides 1 and 2, the supernet's 5x5 and
/// 7x7, odd and non-square planes, channel-last inputs of more channels than a cube's units, a
/// weight gradient over many cubes per channel, and an input gradient alone (a frozen weight).
pub fn depthwise(device: &Device, reference: &Device) -> Vec<Comparison> {
    let both = ConvCase::both;
    compare_all(
        &[
            both([2, 4, 8, 8], None, 3, 1, 1, false),
            both([2, 5, 9, 11], None, 3, 2, 1, false),
            both([3, 6, 10, 9], None, 5, 1, 2, true),
            both([2, 3, 13, 13], None, 7, 2, 3, true),
            both([2, 300, 4, 4], None, 3, 1, 1, true),
            both([8, 16, 40, 40], None, 3, 1, 1, true),
            both([3, 7, 6, 6], None, 3, 2, 0, false),
            ConvCase {
                weight_grad: false,
                ..both([2, 4, 7, 7], None, 3, 1, 1, true)
            },
        ],
        device,
        reference,
    )
}

/// The one-group convolution's comparisons (every network's convolutions run through
/// `conv2d`): "same" 3x3, 5x5 and 7x7, "valid" and over-padded ones, non-square planes, fewer
/// and more output than input channels, channel-last input; a frozen weight and an untracked
/// input (a network's first layer); a strided convolution; 1x1 convolutions (on cuda and wgpu
/// a matrix product at stride 1) with either layout, one image, one side tracked, nothing
/// tracked (inference, without autodiff), and a 1x1 at stride 2 (burn's convolution there);
/// and batches deep enough (at least 4,096 output positions) for the CubeCL weight gradient
/// to cut its product.
pub fn convolution(device: &Device, reference: &Device) -> Vec<Comparison> {
    let both = ConvCase::both;
    compare_all(
        &[
            both([2, 3, 8, 8], Some(5), 3, 1, 1, false),
            both([2, 6, 9, 7], Some(4), 3, 1, 0, true),
            both([3, 4, 6, 5], Some(6), 3, 1, 2, false),
            both([2, 5, 11, 10], Some(3), 5, 1, 2, true),
            both([1, 2, 9, 9], Some(2), 7, 1, 3, false),
            both([4, 16, 8, 8], Some(32), 3, 1, 1, true),
            ConvCase {
                weight_grad: false,
                ..both([2, 4, 7, 7], Some(4), 3, 1, 1, false)
            },
            ConvCase {
                input_grad: false,
                ..both([2, 3, 8, 8], Some(4), 3, 1, 1, false)
            },
            both([2, 4, 9, 9], Some(8), 3, 2, 1, false),
            both([2, 4, 6, 6], Some(8), 1, 1, 0, true),
            both([3, 24, 5, 7], Some(40), 1, 1, 0, false),
            both([1, 6, 4, 4], Some(3), 1, 1, 0, true),
            ConvCase {
                input_grad: false,
                ..both([2, 9, 5, 5], Some(12), 1, 1, 0, true)
            },
            ConvCase {
                weight_grad: false,
                ..both([2, 12, 3, 5], Some(9), 1, 1, 0, false)
            },
            both([2, 8, 7, 7], Some(16), 1, 2, 0, true),
            ConvCase {
                input_grad: false,
                weight_grad: false,
                ..both([2, 10, 4, 6], Some(7), 1, 1, 0, true)
            },
            both([8, 3, 32, 32], Some(8), 3, 1, 1, true),
            both([4, 5, 64, 64], Some(6), 3, 2, 1, false),
        ],
        device,
        reference,
    )
}

/// SGD's momentum step ([`crate::sgd_momentum_step`]) over three steps, each output the next
/// step's input: lengths of one, an odd few, and more than a cube's units; a gradient that is
/// a transposed view (not contiguous) and one that is a slice; copies of the parameter and
/// velocity kept before the last step, which must keep their values (on the CubeCL backends
/// the velocity is written in place only where nothing else holds it); 45 parameters
/// stepped together ([`crate::sgd_momentum_steps`]), more than one launch takes; and a rate
/// held in a tensor.
pub fn sgd(device: &Device, reference: &Device) -> Vec<Comparison> {
    let steps = ["param", "velocity"];
    let kept = ["param", "velocity", "kept param", "kept velocity"];
    let held = ["param", "velocity", "held copies"];
    type Run<'a> = &'a dyn Fn(&Device) -> Result<Vec<Vec<f32>>, String>;
    let mut out = Vec::new();
    let mut add = |case: &str, names: &[&'static str], run: Run| {
        out.extend(compare(TOLERANCE, case, names, run(device), run(reference)));
    };
    for n in [1, 7, 4099] {
        let case = format!("SGD step of [{n}]");
        add(&case, &steps, &|d| sgd_case([n], false, false, d));
    }
    add(
        "SGD step of [16, 27] with a transposed gradient",
        &steps,
        &|d| sgd_case([16, 27], true, false, d),
    );
    add(
        "SGD step of [16, 27] with a sliced gradient",
        &steps,
        &sliced_grad_sgd_case,
    );
    add("SGD step of [16, 27] with copies kept", &kept, &|d| {
        sgd_case([16, 27], false, true, d)
    });
    add(
        "SGD step of 45 parameters together (ranks 1, 2, 4; permuted gradients)",
        &held,
        &sgd_group_case,
    );
    add(
        "SGD step of [16, 27] at a rate held in a tensor, rewritten before each step",
        &steps,
        &held_rate_sgd_case,
    );
    out
}

/// The sparsity penalty's gradient added to alpha's ([`crate::penalty_gradients`]) for 40
/// gates of 1 to 79 channels (more gates than one CubeCL launch takes), some channels masked:
/// with `sigmoid(alpha)`, and with `sigmoid(beta * alpha)` at temperatures from 1 to 10^4
/// (gates saturated both ways); and with every fifth gradient also held outside, which must
/// keep its values.
pub fn penalty(device: &Device, reference: &Device) -> Vec<Comparison> {
    let names = ["gradients", "penalty", "held gradients"];
    let mut out = Vec::new();
    for (case, tempered) in [
        ("sigmoid(alpha)", false),
        ("sigmoid(beta * alpha), beta 1 to 1e4", true),
    ] {
        let case = format!("sparsity penalty's gradient of 40 gates, {case}");
        let run = |d: &Device| penalty_case(tempered, d);
        out.extend(compare(
            TOLERANCE,
            &case,
            &names,
            run(device),
            run(reference),
        ));
    }
    out
}

/// One [`penalty`] case: the gradients and the held ones concatenated, and the penalty.
fn penalty_case(tempered: bool, device: &Device) -> Result<Vec<Vec<f32>>, String> {
    let mut terms = Vec::new();
    let mut held = Vec::new();
    for (g, gate) in test_gates(device).into_iter().enumerate() {
        let grad = wave_tensor(gate.alpha.dims()[0], 0.7 + g as f32, 0.1, device);
        if g % 5 == 0 {
            held.push(grad.clone());
        }
        terms.push(crate::PenaltyTerm {
            alpha: gate.alpha,
            grad,
            mask: gate.mask,
            coefficient: 0.5 * (1 + g % 3) as f64,
            temperature: tempered.then_some(gate.temperature),
        });
    }
    let (grads, value) = crate::penalty_gradients(terms);
    Ok(vec![concat(grads)?, values(value)?, concat(held)?])
}

/// The searching gates' factors `mask * sigmoid(beta * alpha)` and alpha's gradients through
/// them ([`crate::gate_factors`], [`crate::factor_gradients`]): 40 gates of 1 to 79 channels
/// (several launches where a launch binds few gates), masked channels, temperatures 1 to 1e4
/// (saturated gates, whose gradient is 0).
pub fn gates(device: &Device, reference: &Device) -> Vec<Comparison> {
    compare(
        TOLERANCE,
        "40 searching gates, temperatures 1 to 1e4",
        &["factors", "alpha's gradients through the factors"],
        gates_case(device),
        gates_case(reference),
    )
}

/// The [`gates`] case: every gate's factor, then every gate's alpha gradient, concatenated.
fn gates_case(device: &Device) -> Result<Vec<Vec<f32>>, String> {
    let chains = test_gates(device);
    let dfactors = (0..chains.len())
        .map(|g| wave_tensor(chains[g].alpha.dims()[0], 0.9 + g as f32, 2.0, device))
        .collect();
    let factors = crate::gate_factors(&chains);
    let grads = crate::factor_gradients(&chains, dfactors);
    Ok(vec![concat(factors)?, concat(grads)?])
}

/// 40 gates of 1 to 79 channels (more than one CubeCL launch takes), every fourth channel
/// masked at a shifting place, alphas up to +-4 and temperatures 1, 3, 37 and 10^4 in turn.
fn test_gates(device: &Device) -> Vec<crate::GateChain> {
    (0..40)
        .map(|g| {
            let n = 1 + (g * 37) % 79;
            let mask: Vec<f32> = (0..n)
                .map(|c| if (c + g) % 4 == 3 { 0.0 } else { 1.0 })
                .collect();
            let beta = [1.0, 3.0, 37.0, 1e4][g % 4];
            crate::GateChain {
                alpha: wave_tensor(n, 0.3 + g as f32, 4.0, device),
                mask: Tensor::from_data(TensorData::new(mask, [n]), device),
                temperature: Tensor::<1>::from_floats([beta], device),
            }
        })
        .collect()
}

/// `[n]` values of [`wave`] times `scale`.
fn wave_tensor(n: usize, seed: f32, scale: f32, device: &Device) -> Tensor<1> {
    let v: Vec<f32> = wave(n, seed).into_iter().map(|x| x * scale).collect();
    Tensor::<1>::from_data(TensorData::new(v, [n]), device)
}

/// Tensors' values one after another.
fn concat(ts: Vec<Tensor<1>>) -> Result<Vec<f32>, String> {
    Ok(ts
        .into_iter()
        .map(values)
        .collect::<Result<Vec<_>, _>>()?
        .concat())
}

/// Three steps of a `[16, 27]` parameter at rates 0.1, 0.05 and 0.2, each written into one
/// `[1]` tensor ([`crate::overwrite`]) that the step reads ([`crate::Rate::Held`]), as a step
/// recorded as a graph reads its rate.
fn held_rate_sgd_case(device: &Device) -> Result<Vec<Vec<f32>>, String> {
    let tensor =
        |seed: f32| Tensor::<2>::from_data(TensorData::new(wave(16 * 27, seed), [16, 27]), device);
    let (mut param, mut velocity) = (tensor(0.3), tensor(1.7));
    let rate_of = |lr: f32| Tensor::<1>::from_data(TensorData::new(vec![lr], [1]), device);
    let mut rate = rate_of(1.0);
    for (step, lr) in [0.1, 0.05, 0.2].into_iter().enumerate() {
        rate = crate::overwrite(rate, rate_of(lr));
        let grad = tensor(2.9 + step as f32);
        let held = crate::Rate::Held(rate.clone());
        (param, velocity) = crate::sgd_momentum_step(param, grad, velocity, held, 0.9, 5e-4);
    }
    Ok(vec![values(param)?, values(velocity)?])
}

/// Three steps of a `[16, 27]` parameter whose gradient is a slice of a wider tensor (its
/// memory has gaps, so no layout of the parameter matches it).
fn sliced_grad_sgd_case(device: &Device) -> Result<Vec<Vec<f32>>, String> {
    let tensor = |shape: [usize; 2], seed: f32| {
        Tensor::<2>::from_data(
            TensorData::new(wave(shape[0] * shape[1], seed), shape),
            device,
        )
    };
    let (mut param, mut velocity) = (tensor([16, 27], 0.3), tensor([16, 27], 1.7));
    for step in 0..3 {
        let grad = tensor([16, 30], 2.9 + step as f32).slice([0..16, 2..29]);
        (param, velocity) = crate::sgd_momentum_step(param, grad, velocity, 0.1, 0.9, 5e-4);
    }
    Ok(vec![values(param)?, values(velocity)?])
}

/// Three steps of [`crate::sgd_momentum_steps`] over 45 parameters at once (more than one
/// launch takes on a CubeCL device), of ranks 1, 2 and 4, every third gradient a permuted
/// view as the convolutions' are, every fifth parameter and every seventh velocity also held
/// outside; the parameters', velocities' and held copies' values, each concatenated in order.
fn sgd_group_case(device: &Device) -> Result<Vec<Vec<f32>>, String> {
    use burn::backend::DispatchTensor;
    let tensor = |shape: &[usize], seed: f32| -> DispatchTensor {
        let n = shape.iter().product();
        let data = TensorData::new(wave(n, seed), shape.to_vec());
        match shape.len() {
            1 => Tensor::<1>::from_data(data, device).into_dispatch(),
            2 => Tensor::<2>::from_data(data, device).into_dispatch(),
            _ => Tensor::<4>::from_data(data, device).into_dispatch(),
        }
    };
    let shape = |k: usize| -> Vec<usize> {
        match k % 3 {
            0 => vec![3 + k, 2, 3, 3],
            1 => vec![5 + 2 * k],
            _ => vec![k + 1, 7],
        }
    };
    // A gradient of `shape` whose memory is laid out with its first axis last.
    let grad = |shape: &[usize], seed: f32| -> DispatchTensor {
        if shape.len() != 4 {
            return tensor(shape, seed);
        }
        let t = Tensor::<4>::from_dispatch(tensor(&[shape[1], shape[2], shape[3], shape[0]], seed));
        t.permute([3, 0, 1, 2]).into_dispatch()
    };
    let count = 45;
    let mut params: Vec<DispatchTensor> = (0..count)
        .map(|k| tensor(&shape(k), 0.3 + k as f32))
        .collect();
    let mut velocities: Vec<DispatchTensor> = (0..count)
        .map(|k| tensor(&shape(k), 1.7 + k as f32))
        .collect();
    let mut held = Vec::new();
    for step in 0..3 {
        let slots = params
            .into_iter()
            .zip(velocities)
            .enumerate()
            .map(|(k, (p, v))| {
                let seed = 2.9 + (step * count + k) as f32;
                let g = if k % 3 == 0 {
                    grad(&shape(k), seed)
                } else {
                    tensor(&shape(k), seed)
                };
                if k % 5 == 0 {
                    held.push(p.clone());
                }
                if k % 7 == 0 {
                    held.push(v.clone());
                }
                [p, g, v]
            })
            .collect();
        (params, velocities) = (Vec::new(), Vec::new());
        for [p, v] in crate::sgd_momentum_steps(slots, 0.1, 0.9, 5e-4) {
            params.push(p);
            velocities.push(v);
        }
    }
    let flat = |ts: Vec<DispatchTensor>| -> Result<Vec<f32>, String> {
        let mut out = Vec::new();
        for t in ts {
            out.extend(values(Tensor::<1>::from_dispatch(t))?);
        }
        Ok(out)
    };
    Ok(vec![flat(params)?, flat(velocities)?, flat(held)?])
}

fn sgd_case<const D: usize>(
    shape: [usize; D],
    transposed_grad: bool,
    keep: bool,
    device: &Device,
) -> Result<Vec<Vec<f32>>, String> {
    let n = shape.iter().product();
    let tensor = |shape: [usize; D], seed: f32| {
        Tensor::<D>::from_data(TensorData::new(wave(n, seed), shape), device)
    };
    let (mut param, mut velocity) = (tensor(shape, 0.3), tensor(shape, 1.7));
    let mut kept = None;
    for step in 0..3 {
        let seed = 2.9 + step as f32;
        let grad = if transposed_grad {
            let mut swapped = shape;
            swapped.swap(0, D - 1);
            tensor(swapped, seed).swap_dims(0, D - 1)
        } else {
            tensor(shape, seed)
        };
        if keep && step == 2 {
            kept = Some((param.clone(), velocity.clone()));
        }
        (param, velocity) = crate::sgd_momentum_step(param, grad, velocity, 0.1, 0.9, 5e-4);
    }
    let mut out = vec![values(param)?, values(velocity)?];
    if let Some((param, velocity)) = kept {
        out.extend([values(param)?, values(velocity)?]);
    }
    Ok(out)
}

/// The training loss ([`crate::cross_entropy`]) and its tally ([`crate::write_values`]): the
/// mean cross-entropy, the correct
/// predictions and the logits' gradient (the loss scaled by half the rows first: the gradient
/// coming in is not 1, and the logits' gradient is of the order of 1, as the comparison's
/// scale is), for CIFAR's and ImageNet's batches and classes, a batch of more rows
/// than the CubeCL kernel's cube has units (several rows per unit), one row, and logits up to
/// +-60 (log-sum-exp must not overflow).
pub fn loss(device: &Device, reference: &Device) -> Vec<Comparison> {
    let names = ["loss", "hits", "dlogits"];
    let mut out = Vec::new();
    for (rows, classes, scale) in [
        (128, 10, 3.0),
        (64, 1000, 4.0),
        (300, 7, 2.0),
        (1, 5, 1.0),
        (33, 10, 60.0),
    ] {
        let case = format!("cross-entropy of [{rows}, {classes}] logits up to {scale}");
        let run = |d: &Device| loss_case(rows, classes, scale, d);
        out.extend(compare(
            TOLERANCE,
            &case,
            &names,
            run(device),
            run(reference),
        ));
    }
    out.extend(compare(
        TOLERANCE,
        "a batch's loss and hits written into the tally's buffer, twice",
        &["buffer"],
        tally_case(device),
        tally_case(reference),
    ));
    out
}

/// The values of [`crate::write_values`] writing two rows' loss and hit count into a 4 x 3
/// buffer, then a penalty into the first row.
fn tally_case(device: &Device) -> Result<Vec<Vec<f32>>, String> {
    let one = |v: f32| Tensor::<1>::from_data(TensorData::new(vec![v], [1]), device);
    let buffer = Tensor::<1>::from_data(TensorData::new(wave(12, 0.4), [12]), device);
    let written = vec![one(2.5), one(17.0), one(0.75), one(3.0)];
    let buffer = crate::write_values(buffer, &[0, 2, 6, 8], written);
    let buffer = crate::write_values(buffer, &[1], vec![one(0.125)]);
    Ok(vec![values(buffer)?])
}

/// Loss, hits and the logits' gradient of `[rows, classes]` logits `scale * wave` and labels
/// that hit the largest logit in about a third of the rows.
fn loss_case(
    rows: usize,
    classes: usize,
    scale: f32,
    device: &Device,
) -> Result<Vec<Vec<f32>>, String> {
    let device = &device.clone().autodiff();
    let raw: Vec<f32> = wave(rows * classes, 0.9)
        .into_iter()
        .map(|v| v * scale)
        .collect();
    let labels: Vec<i64> = (0..rows)
        .map(|r| {
            let row = &raw[r * classes..(r + 1) * classes];
            let top = (0..classes).fold(0, |b, k| if row[k] > row[b] { k } else { b });
            if r % 3 == 0 {
                top as i64
            } else {
                ((r * 7 + 3) % classes) as i64
            }
        })
        .collect();
    let logits =
        Tensor::<2>::from_data(TensorData::new(raw, [rows, classes]), device).require_grad();
    let labels = Tensor::<1, Int>::from_data(TensorData::new(labels, [rows]), device);
    let (loss, hits) = crate::cross_entropy(logits.clone(), labels);
    let grads = (loss.clone() * (rows as f32 / 2.0)).backward();
    Ok(vec![
        values(loss)?,
        values(hits)?,
        grad_of(&logits, &grads)?,
    ])
}

/// The placement of a tensor's channels into a wider stream ([`crate::channels::place`]):
/// output and input gradient, subsampled by 2 (a CIFAR ResNet's shortcut, odd planes whose
/// last row and column are kept) or not, positions in one run or scattered, in either memory
/// layout.
pub fn channels(device: &Device, reference: &Device) -> Vec<Comparison> {
    let mut out = Vec::new();
    for (shape, width, pos, stride, channel_last) in [
        ([2, 3, 5, 5], 8, &[2, 3, 4][..], 2, false),
        ([2, 3, 5, 5], 8, &[1, 4, 6][..], 1, true),
        ([2, 5, 6, 6], 7, &[0, 1, 2, 3, 4][..], 2, false),
        ([3, 6, 7, 9], 10, &[9, 0, 3, 5, 7, 2][..], 2, true),
        // A ResNet-56 stage entry: 16 channels into the middle of 32, 32x32 to 16x16.
        (
            [4, 16, 32, 32],
            32,
            &(8..24).collect::<Vec<_>>()[..],
            2,
            true,
        ),
    ] {
        let run = |d: &Device| place_case(d, shape, width, pos, stride, channel_last);
        out.extend(compare(
            TOLERANCE,
            &format!(
                "{shape:?} placed at {pos:?} of {width}, stride {stride}, \
                 channel-last {channel_last}"
            ),
            &["output", "dx"],
            run(device),
            run(reference),
        ));
    }
    out
}

/// [`crate::channels::place`] on `device`: the output and the gradient of `sum(y * w)` for
/// the input, held channel-last where `channel_last` says.
fn place_case(
    device: &Device,
    [n, c, h, w]: [usize; 4],
    width: usize,
    pos: &[usize],
    stride: usize,
    channel_last: bool,
) -> Result<Vec<Vec<f32>>, String> {
    let device = device.clone().autodiff();
    let x = Tensor::<4>::from_data(
        TensorData::new(wave(n * c * h * w, 1.7), [n, c, h, w]),
        &device,
    );
    let x = laid_out(x, channel_last).require_grad();
    let y = crate::channels::place(x.clone(), pos, width, stride);
    let len = y.shape().num_elements();
    let weights = Tensor::<4>::from_data(TensorData::new(wave(len, 4.5), y.dims()), &device);
    let grads = (y.clone() * weights).sum().backward();
    Ok(vec![values(y)?, grad_of(&x, &grads)?])
}
