//! The conv -> BN -> gate unit every gated network is built from, and the slicing that
//! physically removes channels from it.

use burn::module::{Param, RunningState};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{BatchNorm, BatchNormConfig, Linear, PaddingConfig2d};
use burn::prelude::*;
use dnal_core::{ChannelGate, ChannelGateConfig, CostModel, GateKind, GateMode, Groups, Width};
use dnal_kernels::Activation;

/// Configuration of a [`ConvBnGate`].
#[derive(Config, Debug)]
pub struct ConvBnGateConfig {
    /// Input channels.
    pub in_channels: usize,
    /// Output channels (the gate's width).
    pub out_channels: usize,
    /// Square kernel size.
    #[config(default = 3)]
    pub kernel: usize,
    /// Stride.
    #[config(default = 1)]
    pub stride: usize,
    /// Depthwise (one group per channel; `in_channels` must equal `out_channels`).
    #[config(default = false)]
    pub depthwise: bool,
    /// Main path or residual branch.
    #[config(default = "GateKind::Main")]
    pub kind: GateKind,
}

impl ConvBnGateConfig {
    /// Builds the unit: conv without bias ("same" padding), BN, gate in bypass.
    pub fn init(&self, device: &Device) -> ConvBnGate {
        let ConvBn { conv, bn } = self.init_ungated(device);
        ConvBnGate {
            conv,
            bn,
            gate: ChannelGateConfig::new(self.out_channels)
                .with_kind(self.kind)
                .init(device),
        }
    }

    /// Builds the same conv and BN without a gate (for layers whose width another gate sets,
    /// such as MobileNetV2's expansion conv, or that are not gated, such as shortcut convs).
    pub fn init_ungated(&self, device: &Device) -> ConvBn {
        let groups = if self.depthwise { self.out_channels } else { 1 };
        let pad = self.kernel / 2;
        ConvBn {
            conv: Conv2dConfig::new([self.in_channels, self.out_channels], [self.kernel; 2])
                .with_stride([self.stride; 2])
                .with_padding(PaddingConfig2d::Explicit(pad, pad, pad, pad))
                .with_groups(groups)
                .with_bias(false)
                .init(device),
            bn: BatchNormConfig::new(self.out_channels).init(device),
        }
    }
}

/// conv -> BatchNorm without a gate.
#[derive(Module, Debug)]
pub struct ConvBn {
    /// The convolution.
    pub conv: Conv2d,
    /// Its BatchNorm.
    pub bn: BatchNorm,
}

impl ConvBn {
    /// `bn(conv(x))`.
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        self.forward_act(x, Activation::Identity)
    }

    /// `act(bn(conv(x)))`, the activation applied by the unit (see [`dnal_kernels::conv_bn`]).
    pub fn forward_act(&self, x: Tensor<4>, act: Activation) -> Tensor<4> {
        dnal_kernels::conv_bn(&self.conv, &self.bn, None, act, x)
    }

    /// Declares this conv and BN in `cost`, with the given widths.
    pub fn add_cost(
        &self,
        cost: &mut CostModel,
        name: &str,
        input: Width,
        output: Width,
        out_hw: [usize; 2],
    ) {
        cost.conv(
            format!("{name}.conv"),
            input,
            output.clone(),
            self.conv.kernel_size,
            conv_groups(&self.conv),
            out_hw,
        )
        .batch_norm(format!("{name}.bn"), output);
    }

    /// Keeps input channels `keep_in` (`None`: all) and output channels `keep_out`.
    pub fn prune(mut self, keep_in: Option<&[usize]>, keep_out: &[usize]) -> Self {
        self.conv = prune_conv(self.conv, keep_in, keep_out);
        self.bn = prune_batch_norm(self.bn, keep_out);
        self
    }
}

fn conv_groups(conv: &Conv2d) -> Groups {
    let out = conv.weight.dims()[0];
    if conv.groups > 1 && conv.groups == out {
        Groups::Depthwise
    } else {
        Groups::Count(conv.groups)
    }
}

/// Keeps input channels `keep_in` (`None`: all) and filters `keep_out` of a convolution; a
/// depthwise convolution keeps one group per kept channel.
pub fn prune_conv(mut conv: Conv2d, keep_in: Option<&[usize]>, keep_out: &[usize]) -> Conv2d {
    let depthwise = conv_groups(&conv) == Groups::Depthwise;
    let device = conv.weight.device();
    let out_idx = indices(keep_out, &device);
    conv.weight = slice_param(conv.weight, |w| {
        let w = w.select(0, out_idx.clone());
        match keep_in {
            Some(keep) if !depthwise => w.select(1, indices(keep, &device)),
            _ => w,
        }
    });
    if depthwise {
        conv.groups = keep_out.len();
    }
    conv.bias = conv.bias.map(|b| select_param(b, &out_idx));
    conv
}

/// conv -> BatchNorm -> channel gate (the activation is the caller's).
#[derive(Module, Debug)]
pub struct ConvBnGate {
    /// The convolution.
    pub conv: Conv2d,
    /// Its BatchNorm.
    pub bn: BatchNorm,
    /// The gate on its output channels.
    pub gate: ChannelGate,
}

impl ConvBnGate {
    /// `gate(bn(conv(x)))`, the gate folded into BatchNorm's affine transform, and for
    /// inference on flex BatchNorm folded into the convolution (see [`dnal_kernels::conv_bn`]).
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        self.forward_act(x, Activation::Identity)
    }

    /// `act(gate(bn(conv(x))))`, the activation applied by the unit: fused with BatchNorm (in
    /// training) or the convolution (in inference) on flex.
    pub fn forward_act(&self, x: Tensor<4>, act: Activation) -> Tensor<4> {
        dnal_kernels::conv_bn(&self.conv, &self.bn, self.gate.factor(), act, x)
    }

    /// `act(gate(bn(conv(x))) + residual)`: a residual block's last unit, with the shortcut
    /// (shaped like the output) added before the activation, both fused on flex (see
    /// [`dnal_kernels::conv_bn_add`]).
    pub fn forward_add(&self, x: Tensor<4>, residual: Tensor<4>, act: Activation) -> Tensor<4> {
        dnal_kernels::conv_bn_add(&self.conv, &self.bn, self.gate.factor(), act, x, residual)
    }

    /// `act(stream + scatter(unit(x)))`: the unit's output added into the channels `pos` of a
    /// residual stream (every channel of the sum through `act`; `dnal_kernels::conv_bn_add_into`).
    pub fn forward_add_into(
        &self,
        x: Tensor<4>,
        stream: Tensor<4>,
        pos: &[usize],
        act: Activation,
    ) -> Tensor<4> {
        let factor = self.gate.factor();
        dnal_kernels::conv_bn_add_into(&self.conv, &self.bn, factor, act, x, stream, pos)
    }

    /// Output channels.
    pub fn out_channels(&self) -> usize {
        self.conv.weight.dims()[0]
    }

    /// Whether the convolution is depthwise.
    pub fn is_depthwise(&self) -> bool {
        conv_groups(&self.conv) == Groups::Depthwise
    }

    /// Declares this unit's conv and BN in `cost` (gate `name`, input `input`, output map `out_hw`).
    pub fn add_cost(&self, cost: &mut CostModel, name: &str, input: Width, out_hw: [usize; 2]) {
        cost.gate(name, self.out_channels());
        cost.conv(
            format!("{name}.conv"),
            input,
            Width::gate(name),
            self.conv.kernel_size,
            conv_groups(&self.conv),
            out_hw,
        )
        .batch_norm(format!("{name}.bn"), Width::gate(name));
    }

    /// Keeps input channels `keep_in` (`None`: all) and output channels `keep_out`; the gate
    /// keeps the matching alphas, its mask becomes all ones and its mode bypass.
    pub fn prune(mut self, keep_in: Option<&[usize]>, keep_out: &[usize]) -> Self {
        self.conv = prune_conv(self.conv, keep_in, keep_out);
        self.bn = prune_batch_norm(self.bn, keep_out);
        self.gate = prune_gate(self.gate, keep_out);
        self
    }
}

pub use dnal_kernels::channels::indices;

/// Replaces a parameter's tensor by a slice of it, keeping its id and trainability; the slice
/// is a new leaf, not a node of the old tensor's autodiff graph.
fn slice_param<const D: usize>(
    p: Param<Tensor<D>>,
    slice: impl FnOnce(Tensor<D>) -> Tensor<D>,
) -> Param<Tensor<D>> {
    p.map(|t| {
        let trainable = t.is_require_grad();
        slice(t).detach().set_require_grad(trainable)
    })
}

/// Keeps the entries `idx` along the first axis of a parameter (see [`slice_param`]).
fn select_param<const D: usize>(p: Param<Tensor<D>>, idx: &Tensor<1, Int>) -> Param<Tensor<D>> {
    slice_param(p, |t| t.select(0, idx.clone()))
}

/// Keeps channels `keep` of a BatchNorm: affine parameters and running statistics.
pub fn prune_batch_norm(mut bn: BatchNorm, keep: &[usize]) -> BatchNorm {
    let idx = indices(keep, &bn.gamma.device());
    bn.gamma = select_param(bn.gamma, &idx);
    bn.beta = select_param(bn.beta, &idx);
    bn.running_mean = RunningState::new(bn.running_mean.value_sync().select(0, idx.clone()));
    bn.running_var = RunningState::new(bn.running_var.value_sync().select(0, idx));
    bn
}

/// Keeps channels `keep` of a gate; the survivors are all open (mask 1) and the gate bypasses.
pub fn prune_gate(mut gate: ChannelGate, keep: &[usize]) -> ChannelGate {
    let idx = indices(keep, &gate.alpha.device());
    gate.alpha = select_param(gate.alpha, &idx);
    gate.with_mask(&vec![true; keep.len()])
        .with_mode(GateMode::Bypass)
}

/// Keeps input features `keep` of a linear layer (weight `[in, out]`).
pub fn prune_linear_inputs(mut linear: Linear, keep: &[usize]) -> Linear {
    let idx = indices(keep, &linear.weight.device());
    linear.weight = select_param(linear.weight, &idx);
    linear
}
