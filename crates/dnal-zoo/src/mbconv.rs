//! The inverted-residual (MBConv) unit of MobileNetV2 and of the supernet's candidates: an
//! optional 1x1 expansion, a kxk depthwise convolution with a gate on its channels, and a 1x1
//! projection with a gate on its outputs. Closing a depthwise channel removes it from all three
//! convolutions; a unit whose projection gate closes completely is removed.

use burn::prelude::*;
use dnal_core::{Architecture, ChannelGate, CostModel, GateKind, Width};
use dnal_kernels::Activation;

use crate::error::Result;
use crate::graph::{Graph, Place, Value};
use crate::layers::{ConvBn, ConvBnGate, ConvBnGateConfig};

/// The shape of an [`MbConv`].
#[derive(Debug, Clone, Copy)]
pub struct MbConvConfig {
    /// Input channels.
    pub input: usize,
    /// Whether a 1x1 expansion makes the depthwise channels (otherwise the input holds them).
    pub expand: bool,
    /// Depthwise channels.
    pub expanded: usize,
    /// Depthwise kernel size.
    pub kernel: usize,
    /// Depthwise stride.
    pub stride: usize,
    /// Output channels.
    pub out: usize,
    /// The projection gate's kind: a residual branch's, or the main path's where the unit's
    /// output replaces its stream.
    pub kind: GateKind,
}

impl MbConvConfig {
    /// Builds the unit (gates in bypass).
    pub fn init(&self, device: &Device) -> MbConv {
        MbConv {
            expand: self.expand.then(|| {
                ConvBnGateConfig::new(self.input, self.expanded)
                    .with_kernel(1)
                    .init_ungated(device)
            }),
            depthwise: ConvBnGateConfig::new(self.expanded, self.expanded)
                .with_kernel(self.kernel)
                .with_stride(self.stride)
                .with_depthwise(true)
                .init(device),
            project: ConvBnGateConfig::new(self.expanded, self.out)
                .with_kernel(1)
                .with_kind(self.kind)
                .init(device),
        }
    }
}

/// One MBConv unit.
#[derive(Module, Debug)]
pub struct MbConv {
    /// 1x1 expansion conv + BN (absent without expansion); its width is the depthwise gate's.
    pub expand: Option<ConvBn>,
    /// kxk depthwise conv + BN + gate.
    pub depthwise: ConvBnGate,
    /// 1x1 projection conv + BN + gate.
    pub project: ConvBnGate,
}

impl MbConv {
    /// `project(relu6(depthwise(relu6(expand(x)))))`; without an expansion, `x` holds the
    /// depthwise channels.
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        self.project.forward(self.hidden(x))
    }

    /// `stream + scatter(unit(x))`: the unit's output added into the channels `pos` of a
    /// residual stream, the add fused with the projection (`ConvBnGate::forward_add_into`).
    pub fn forward_add_into(&self, x: Tensor<4>, stream: Tensor<4>, pos: &[usize]) -> Tensor<4> {
        self.project
            .forward_add_into(self.hidden(x), stream, pos, Activation::Identity)
    }

    /// The depthwise layer's output, the projection's input.
    fn hidden(&self, x: Tensor<4>) -> Tensor<4> {
        let h = match &self.expand {
            Some(e) => e.forward_act(x, Activation::Relu6),
            None => x,
        };
        self.depthwise.forward_act(h, Activation::Relu6)
    }

    /// Adds the unit's layers to `cost`: the expansion (named `expand`) reading `input`
    /// channels of `in_side` x `in_side` maps, the depthwise and projection layers (named after
    /// their gates `dw` and `proj`) on `side` x `side` maps.
    pub fn add_cost(
        &self,
        cost: &mut CostModel,
        [expand, dw, proj]: [&str; 3],
        input: Width,
        [in_side, side]: [usize; 2],
    ) {
        if let Some(e) = &self.expand {
            e.add_cost(cost, expand, input, Width::gate(dw), [in_side, in_side]);
        }
        self.depthwise
            .add_cost(cost, dw, Width::gate(dw), [side, side]);
        self.project
            .add_cost(cost, proj, Width::gate(dw), [side, side]);
    }

    /// Calls `f` on the depthwise gate (named `dw`), then on the projection gate (`proj`).
    pub fn for_each_gate(
        &mut self,
        dw: &str,
        proj: &str,
        f: &mut dyn FnMut(&str, &mut ChannelGate),
    ) {
        f(dw, &mut self.depthwise.gate);
        f(proj, &mut self.project.gate);
    }

    /// Adds the unit to `g` (nodes named `{name}.expand`, `.depthwise`, `.project`), its output
    /// placed into a stream if `place` says so.
    pub fn graph(
        &self,
        g: &mut Graph,
        name: &str,
        x: Value,
        place: Option<Place>,
    ) -> Result<Value> {
        let h = match &self.expand {
            Some(e) => g.conv_bn(&format!("{name}.expand"), x, e, Activation::Relu6)?,
            None => x,
        };
        let h = g.conv_bn_gate(
            &format!("{name}.depthwise"),
            h,
            &self.depthwise,
            Activation::Relu6,
            None,
        )?;
        g.conv_bn_gate(
            &format!("{name}.project"),
            h,
            &self.project,
            Activation::Identity,
            place,
        )
    }

    /// The unit reading the input channels `input`, with the depthwise channels and outputs of
    /// `keep` (see [`kept`]).
    pub fn prune(self, input: &[usize], keep: &Kept) -> Self {
        MbConv {
            expand: self.expand.map(|e| e.prune(Some(input), &keep.depthwise)),
            depthwise: self.depthwise.prune(None, &keep.depthwise),
            project: self.project.prune(Some(&keep.depthwise), &keep.project),
        }
    }
}

/// The channels an architecture keeps of one unit.
#[derive(Debug, Clone)]
pub struct Kept {
    /// Depthwise channels (indices into the unit's).
    pub depthwise: Vec<usize>,
    /// Output channels (indices into the unit's).
    pub project: Vec<usize>,
}

/// What `arch` keeps of the unit whose gates are `dw` and `proj`; `None` when its projection
/// keeps nothing, so that the unit is removed.
pub fn kept(arch: &Architecture, dw: &str, proj: &str) -> Option<Kept> {
    let project = arch.gates[proj].kept.clone();
    (!project.is_empty()).then(|| Kept {
        depthwise: arch.gates[dw].kept.clone(),
        project,
    })
}
