//! A network's eval-mode computation as a small graph of plain operations, for exporters
//! (`dnal-onnx` writes it as ONNX). BatchNorm and the gates are folded into the convolutions
//! and linear layers. Residual streams need no index operations: a branch that writes some
//! positions of a stream becomes a convolution with zero filters at the other positions, and a
//! stream that is widened, subsampled or tapped becomes a 1x1 convolution whose weights are 0 or
//! 1. Both are exact: every output is a sum of one product by 1 and zeros, or of zeros.

use burn::module::Param;
use burn::nn::conv::Conv2d;
use burn::nn::pool::MaxPool2d;
use burn::nn::{BatchNorm, Linear, PaddingConfig2d};
use burn::prelude::*;
use dnal_core::ChannelGate;
use dnal_kernels::Activation;

use crate::error::{Result, ZooError};
use crate::layers::{ConvBn, ConvBnGate};

/// A value of the graph: 0 is the input images `[N, C, H, W]`, `i + 1` the output of node `i`.
pub type Value = usize;

/// A 2-d convolution with its bias, BatchNorm and gate folded in.
#[derive(Clone, Debug, PartialEq)]
pub struct ConvSpec {
    /// Weights, row-major `[out, in / groups, kh, kw]`.
    pub weight: Vec<f32>,
    /// `[out, in / groups, kh, kw]`.
    pub shape: [usize; 4],
    /// One per output channel.
    pub bias: Vec<f32>,
    /// Stride (both axes).
    pub stride: usize,
    /// Zero padding on every side.
    pub padding: usize,
    /// Groups (the output channels for a depthwise convolution).
    pub groups: usize,
}

/// One operation.
#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    /// A convolution.
    Conv {
        /// Its input.
        input: Value,
        /// Its weights and shape.
        conv: ConvSpec,
    },
    /// `max(x, 0)`.
    Relu(Value),
    /// `min(max(x, 0), 6)`.
    Relu6(Value),
    /// Max pooling (square window).
    MaxPool {
        /// Its input.
        input: Value,
        /// Window side.
        kernel: usize,
        /// Stride.
        stride: usize,
        /// Padding on every side.
        padding: usize,
    },
    /// Mean over height and width, keeping `[N, C, 1, 1]`.
    GlobalAvgPool(Value),
    /// `[N, C, H, W]` to `[N, C * H * W]`.
    Flatten(Value),
    /// Elementwise sum of two values of the same shape.
    Add(Value, Value),
    /// `x W + b` with `W` row-major `[inputs, outputs]`.
    Linear {
        /// Its input `[N, inputs]`.
        input: Value,
        /// Weights.
        weight: Vec<f32>,
        /// `[inputs, outputs]`.
        shape: [usize; 2],
        /// One per output.
        bias: Vec<f32>,
    },
}

/// A named operation.
#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    /// A name unique in the graph (the network's module path where there is one).
    pub name: String,
    /// What it computes.
    pub op: Op,
}

/// The graph: its input shape, its nodes in execution order; the last node gives the logits.
#[derive(Clone, Debug, PartialEq)]
pub struct Graph {
    /// `[C, H, W]` of one image.
    pub input: [usize; 3],
    /// The nodes.
    pub nodes: Vec<Node>,
    /// Classes (the logits' width).
    pub classes: usize,
}

/// How an exporter writes a value that feeds a residual stream: at `positions` of a stream of
/// `width` channels.
#[derive(Clone, Copy, Debug)]
pub struct Place<'a> {
    /// Channels of the stream.
    pub width: usize,
    /// Where each of the unit's channels goes.
    pub positions: &'a [usize],
}

impl Graph {
    /// An empty graph for square images of `channels` x `size` x `size`, with `classes`
    /// logits.
    pub fn new(channels: usize, size: usize, classes: usize) -> Self {
        Self {
            input: [channels, size, size],
            nodes: Vec::new(),
            classes,
        }
    }

    /// The graph's output (its last node).
    pub fn output(&self) -> Value {
        self.nodes.len()
    }

    fn push(&mut self, name: impl Into<String>, op: Op) -> Value {
        self.nodes.push(Node {
            name: name.into(),
            op,
        });
        self.nodes.len()
    }

    /// `act(x)`.
    pub fn act(&mut self, name: &str, x: Value, act: Activation) -> Value {
        match act {
            Activation::Identity => x,
            Activation::Relu => self.push(format!("{name}.relu"), Op::Relu(x)),
            Activation::Relu6 => self.push(format!("{name}.relu6"), Op::Relu6(x)),
        }
    }

    /// `a + b`.
    pub fn add(&mut self, name: &str, a: Value, b: Value) -> Value {
        self.push(format!("{name}.add"), Op::Add(a, b))
    }

    /// Conv + BN (+ gate) + activation, optionally placed into a stream.
    fn unit(
        &mut self,
        name: &str,
        x: Value,
        (conv, bn, gate): (&Conv2d, &BatchNorm, Option<&ChannelGate>),
        act: Activation,
        place: Option<Place>,
    ) -> Result<Value> {
        let mut spec = fold(name, conv, bn, gate)?;
        if let Some(p) = place {
            spec = spread(name, spec, p)?;
        }
        let y = self.push(
            format!("{name}.conv"),
            Op::Conv {
                input: x,
                conv: spec,
            },
        );
        Ok(self.act(name, y, act))
    }

    /// An ungated conv + BN + activation.
    pub fn conv_bn(
        &mut self,
        name: &str,
        x: Value,
        unit: &ConvBn,
        act: Activation,
    ) -> Result<Value> {
        self.unit(name, x, (&unit.conv, &unit.bn, None), act, None)
    }

    /// A gated conv + BN + activation, optionally placed into a stream.
    pub fn conv_bn_gate(
        &mut self,
        name: &str,
        x: Value,
        unit: &ConvBnGate,
        act: Activation,
        place: Option<Place>,
    ) -> Result<Value> {
        self.unit(
            name,
            x,
            (&unit.conv, &unit.bn, Some(&unit.gate)),
            act,
            place,
        )
    }

    /// A 1x1 convolution of weights 0 and 1 with the given stride: output channel `to` copies
    /// input channel `from` for every `(from, to)` of `map`; the other outputs are zero.
    pub fn select(
        &mut self,
        name: &str,
        x: Value,
        [inputs, outputs]: [usize; 2],
        map: &[(usize, usize)],
        stride: usize,
    ) -> Value {
        let mut weight = vec![0.0; outputs * inputs];
        for &(from, to) in map {
            weight[to * inputs + from] = 1.0;
        }
        let conv = ConvSpec {
            weight,
            shape: [outputs, inputs, 1, 1],
            bias: vec![0.0; outputs],
            stride,
            padding: 0,
            groups: 1,
        };
        self.push(format!("{name}.select"), Op::Conv { input: x, conv })
    }

    /// `x`, whose channels are the stream `from`, as the stream `to` that holds them (the
    /// graph form of [`crate::stream::widen`]), subsampled by `stride`.
    pub fn widen(
        &mut self,
        name: &str,
        x: Value,
        from: &[usize],
        to: &[usize],
        stride: usize,
    ) -> Value {
        if from == to && stride == 1 {
            return x;
        }
        let map: Vec<(usize, usize)> = crate::stream::positions(to, from)
            .into_iter()
            .enumerate()
            .collect();
        self.select(name, x, [from.len(), to.len()], &map, stride)
    }

    /// `x`, whose channels are the stream `from`, reduced to its channels `to`.
    pub fn narrow(&mut self, name: &str, x: Value, from: &[usize], to: &[usize]) -> Value {
        if from == to {
            return x;
        }
        let map: Vec<(usize, usize)> = crate::stream::positions(from, to)
            .into_iter()
            .enumerate()
            .map(|(k, p)| (p, k))
            .collect();
        self.select(name, x, [from.len(), to.len()], &map, 1)
    }

    /// Max pooling with burn's module settings.
    pub fn max_pool(&mut self, name: &str, x: Value, pool: &MaxPool2d) -> Result<Value> {
        let padding = symmetric(name, &pool.padding)?;
        if pool.kernel_size[0] != pool.kernel_size[1]
            || pool.stride[0] != pool.stride[1]
            || pool.dilation != [1, 1]
            || pool.ceil_mode
        {
            return Err(unsupported(
                name,
                "a non-square, dilated or ceil-mode max pool",
            ));
        }
        Ok(self.push(
            format!("{name}.maxpool"),
            Op::MaxPool {
                input: x,
                kernel: pool.kernel_size[0],
                stride: pool.stride[0],
                padding,
            },
        ))
    }

    /// Global average pooling, then flattening to `[N, C]`.
    pub fn pool_flatten(&mut self, x: Value) -> Value {
        let p = self.push("gap", Op::GlobalAvgPool(x));
        self.flatten(p)
    }

    /// `[N, C, H, W]` to `[N, C * H * W]`.
    pub fn flatten(&mut self, x: Value) -> Value {
        self.push("flatten", Op::Flatten(x))
    }

    /// A linear layer, with an eval-mode BatchNorm after it folded in.
    pub fn linear(
        &mut self,
        name: &str,
        x: Value,
        linear: &Linear,
        bn: Option<&BatchNorm>,
    ) -> Result<Value> {
        let [inputs, outputs] = linear.weight.dims();
        let mut weight = values(&linear.weight);
        let mut bias = match &linear.bias {
            Some(b) => values(b),
            None => vec![0.0; outputs],
        };
        if let Some(bn) = bn {
            let (scale, shift) = batch_norm_affine(bn);
            check_len(name, outputs, scale.len())?;
            for row in weight.chunks_mut(outputs) {
                row.iter_mut().zip(&scale).for_each(|(w, s)| *w *= s);
            }
            for ((b, s), t) in bias.iter_mut().zip(&scale).zip(&shift) {
                *b = *b * s + t;
            }
        }
        Ok(self.push(
            format!("{name}.linear"),
            Op::Linear {
                input: x,
                weight,
                shape: [inputs, outputs],
                bias,
            },
        ))
    }
}

/// The values of a parameter as f32.
fn values<const D: usize>(p: &Param<Tensor<D>>) -> Vec<f32> {
    tensor_values(p.val())
}

fn tensor_values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .expect("converted to f32")
}

/// Eval-mode BatchNorm as `x * scale + shift`, in f64 then rounded.
fn batch_norm_affine(bn: &BatchNorm) -> (Vec<f32>, Vec<f32>) {
    let gamma = values(&bn.gamma);
    let beta = values(&bn.beta);
    let mean = tensor_values(bn.running_mean.value());
    let var = tensor_values(bn.running_var.value());
    let mut scale = Vec::with_capacity(gamma.len());
    let mut shift = Vec::with_capacity(gamma.len());
    for i in 0..gamma.len() {
        let s = gamma[i] as f64 / (var[i] as f64 + bn.epsilon).sqrt();
        scale.push(s as f32);
        shift.push((beta[i] as f64 - mean[i] as f64 * s) as f32);
    }
    (scale, shift)
}

/// `gate(bn(conv(x)))` as one convolution.
fn fold(name: &str, conv: &Conv2d, bn: &BatchNorm, gate: Option<&ChannelGate>) -> Result<ConvSpec> {
    let shape = conv.weight.dims();
    let out = shape[0];
    let (mut scale, mut shift) = batch_norm_affine(bn);
    check_len(name, out, scale.len())?;
    if let Some(f) = gate.and_then(|g| g.factor()) {
        let f = tensor_values(f);
        check_len(name, out, f.len())?;
        for ((s, t), g) in scale.iter_mut().zip(shift.iter_mut()).zip(&f) {
            *s *= g;
            *t *= g;
        }
    }
    if conv.dilation != [1, 1]
        || conv.kernel_size[0] != conv.kernel_size[1]
        || conv.stride[0] != conv.stride[1]
    {
        return Err(unsupported(
            name,
            "a dilated, non-square or unevenly strided convolution",
        ));
    }
    let mut weight = values(&conv.weight);
    let per = weight.len() / out.max(1);
    for (o, filter) in weight.chunks_mut(per.max(1)).enumerate() {
        filter.iter_mut().for_each(|w| *w *= scale[o]);
    }
    let mut bias = shift;
    if let Some(b) = &conv.bias {
        for ((t, b), s) in bias.iter_mut().zip(values(b)).zip(&scale) {
            *t += b * s;
        }
    }
    Ok(ConvSpec {
        weight,
        shape,
        bias,
        stride: conv.stride[0],
        padding: symmetric(name, &conv.padding)?,
        groups: conv.groups,
    })
}

/// `spec` with its outputs moved to `place.positions` of `place.width` channels (zero filters
/// and biases elsewhere).
fn spread(name: &str, spec: ConvSpec, place: Place) -> Result<ConvSpec> {
    let [out, per_in, kh, kw] = spec.shape;
    check_len(name, out, place.positions.len())?;
    if place.width == out {
        return Ok(spec);
    }
    if spec.groups != 1 || place.positions.iter().any(|&p| p >= place.width) {
        return Err(unsupported(
            name,
            "placing a grouped convolution into a stream",
        ));
    }
    let filter = per_in * kh * kw;
    let mut weight = vec![0.0; place.width * filter];
    let mut bias = vec![0.0; place.width];
    for (o, &p) in place.positions.iter().enumerate() {
        weight[p * filter..(p + 1) * filter]
            .copy_from_slice(&spec.weight[o * filter..(o + 1) * filter]);
        bias[p] = spec.bias[o];
    }
    Ok(ConvSpec {
        weight,
        shape: [place.width, per_in, kh, kw],
        bias,
        ..spec
    })
}

fn symmetric(name: &str, padding: &PaddingConfig2d) -> Result<usize> {
    match padding {
        PaddingConfig2d::Valid => Ok(0),
        PaddingConfig2d::Explicit(t, l, b, r) if t == l && l == b && b == r => Ok(*t),
        _ => Err(unsupported(name, "asymmetric or `Same` padding")),
    }
}

fn check_len(name: &str, want: usize, got: usize) -> Result<()> {
    if want == got {
        Ok(())
    } else {
        Err(ZooError::Config(format!(
            "layer {name}: {got} values for {want} channels; the network is inconsistent"
        )))
    }
}

fn unsupported(name: &str, what: &str) -> ZooError {
    ZooError::Config(format!("layer {name}: {what} cannot be exported"))
}
