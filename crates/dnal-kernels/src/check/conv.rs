//! The depthwise and the one-group convolutions, with their gradients.

use super::*;

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
