//! MobileNetV2 for ImageNet and for CIFAR, with gates after every depthwise BN (the expanded
//! channels: closing one also removes the matching output channel of the expansion conv, or of
//! the stem for the first, non-expanding block), after every projection BN, and after the final
//! 1x1 conv.
//!
//! The CIFAR variant is the one the paper's 91.17M MACs / 2.30M parameters describe: stem
//! stride 1, the second stage at stride 1, and a conv + BN shortcut on stride-1 blocks that
//! change the width (the widely used `pytorch-cifar` MobileNetV2). Residual adds are pruned as
//! in [`crate::resnet`]: each stage's stream keeps the union of what its blocks write, and
//! residual blocks add their kept projection channels into their stream positions; a residual
//! block whose projection gate closes is removed. ImageNet's dropout before the classifier is
//! omitted (it has no parameters and no MACs).

use burn::nn::{Linear, LinearConfig};
use burn::prelude::*;
use dnal_core::{Architecture, ChannelGate, CostModel, GateKind, GatedModel, Width};
use dnal_kernels::Activation;
use dnal_kernels::channels::place;
use serde::{Deserialize, Serialize};

use crate::error::{Result, ZooError};
use crate::graph::{Graph, Place};
use crate::layers::{ConvBn, ConvBnGate, ConvBnGateConfig, prune_linear_inputs};
use crate::mbconv::{self, MbConv, MbConvConfig};
use crate::network::{Counting, Network};
use crate::pretrained::{KeyRules, Rename};
use crate::stream::{block_input, kept_positions, positions, union, widen};

/// Widths of one inverted-residual block.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MbBlockWidths {
    /// Expanded (depthwise) channels.
    pub expanded: usize,
    /// For the first block when it does not expand (t = 1): the stem channels its depthwise
    /// conv reads (indices in the stem's full width); empty otherwise.
    #[serde(default)]
    pub taps: Vec<usize>,
    /// Stream positions (in the stage's full width) of the projection's output channels; empty:
    /// the block's branch is removed.
    pub out: Vec<usize>,
}

/// One stage: expansion factor, full width, number of blocks, stride of the first block.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MbStage {
    /// Expansion factor `t`.
    pub expansion: usize,
    /// Output width `c`.
    pub width: usize,
    /// Blocks `n`.
    pub blocks: usize,
    /// Stride `s` of the first block.
    pub stride: usize,
}

/// Configuration of a [`MobileNetV2`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MobileNetV2Config {
    /// Image channels.
    pub in_channels: usize,
    /// Image side.
    pub image_size: usize,
    /// Number of classes.
    pub num_classes: usize,
    /// Stride of the 3x3 stem.
    pub stem_stride: usize,
    /// Output channels of the stem (when the first block expands; otherwise the first block's
    /// expanded width is the stem's).
    pub stem_width: usize,
    /// The stages.
    pub stages: Vec<MbStage>,
    /// Conv + BN shortcut on stride-1 blocks that change the width (CIFAR variant).
    pub conv_shortcuts: bool,
    /// Channels of the final 1x1 conv.
    pub last_width: usize,
    /// Every block, stage by stage.
    pub blocks: Vec<MbBlockWidths>,
}

/// How a block joins the stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Join {
    /// No shortcut: the projection output is the new stream.
    Replace,
    /// Identity shortcut: the projection output is added to the stream.
    Identity,
    /// Conv + BN shortcut (full width) plus the projection output.
    Conv,
}

impl MobileNetV2Config {
    fn with_stages(
        num_classes: usize,
        image_size: usize,
        stem_stride: usize,
        stages: &[[usize; 4]],
        conv_shortcuts: bool,
    ) -> Self {
        Self::full_width(
            num_classes,
            image_size,
            stem_stride,
            [32, 1280],
            stages,
            conv_shortcuts,
        )
    }

    /// The ImageNet variant (stem stride 2, no conv shortcuts) at other widths: a stem of
    /// `stem_width` channels, stages given as torchvision's `[t, c, n, s]` rows with `c` already
    /// the channel count, and a last 1x1 conv of `last_width` channels.
    pub fn imagenet_widths(
        num_classes: usize,
        image_size: usize,
        stem_width: usize,
        stages: &[[usize; 4]],
        last_width: usize,
    ) -> Self {
        Self::full_width(
            num_classes,
            image_size,
            2,
            [stem_width, last_width],
            stages,
            false,
        )
    }

    fn full_width(
        num_classes: usize,
        image_size: usize,
        stem_stride: usize,
        [stem_width, last_width]: [usize; 2],
        stages: &[[usize; 4]],
        conv_shortcuts: bool,
    ) -> Self {
        let stages: Vec<MbStage> = stages
            .iter()
            .map(|&[expansion, width, blocks, stride]| MbStage {
                expansion,
                width,
                blocks,
                stride,
            })
            .collect();
        let mut in_w = stem_width;
        let mut blocks = Vec::new();
        for st in &stages {
            for _ in 0..st.blocks {
                blocks.push(MbBlockWidths {
                    expanded: in_w * st.expansion,
                    taps: if st.expansion == 1 {
                        (0..in_w).collect()
                    } else {
                        Vec::new()
                    },
                    out: (0..st.width).collect(),
                });
                in_w = st.width;
            }
        }
        Self {
            in_channels: 3,
            image_size,
            num_classes,
            stem_stride,
            stem_width,
            stages,
            conv_shortcuts,
            last_width,
            blocks,
        }
    }

    /// MobileNetV2 for ImageNet (224x224): 300.79M MACs, 3.50M parameters.
    pub fn imagenet(num_classes: usize) -> Self {
        Self::with_stages(
            num_classes,
            224,
            2,
            &[
                [1, 16, 1, 1],
                [6, 24, 2, 2],
                [6, 32, 3, 2],
                [6, 64, 4, 2],
                [6, 96, 3, 1],
                [6, 160, 3, 2],
                [6, 320, 1, 1],
            ],
            false,
        )
    }

    /// MobileNetV2 for CIFAR (32x32): stem stride 1, second stage stride 1, conv shortcuts on
    /// width changes at stride 1 — 91.17M MACs and 2.30M parameters, the paper's baseline.
    pub fn cifar(num_classes: usize) -> Self {
        Self::with_stages(
            num_classes,
            32,
            1,
            &[
                [1, 16, 1, 1],
                [6, 24, 2, 1],
                [6, 32, 3, 2],
                [6, 64, 4, 2],
                [6, 96, 3, 1],
                [6, 160, 3, 2],
                [6, 320, 1, 1],
            ],
            true,
        )
    }

    /// (stage, first block of its stage) of every block.
    fn layout(&self) -> Vec<(usize, bool)> {
        self.stages
            .iter()
            .enumerate()
            .flat_map(|(s, st)| (0..st.blocks).map(move |b| (s, b == 0)))
            .collect()
    }

    /// Full width of the stream entering stage `s`.
    fn in_width(&self, s: usize) -> usize {
        if s == 0 {
            self.stem_width
        } else {
            self.stages[s - 1].width
        }
    }

    fn join(&self, s: usize, first: bool) -> Join {
        let st = &self.stages[s];
        if !first || (st.stride == 1 && self.in_width(s) == st.width) {
            Join::Identity
        } else if st.stride == 1 && self.conv_shortcuts {
            Join::Conv
        } else {
            Join::Replace
        }
    }

    /// Whether the stem's width is set by the first block's depthwise gate: the first block does
    /// not expand and is the stem's only reader.
    fn stem_follows_first_block(&self) -> bool {
        self.stages[0].expansion == 1 && self.join(0, true) == Join::Replace
    }

    /// The stream positions of the stem output and of every stage.
    pub fn streams(&self) -> (Vec<usize>, Vec<Vec<usize>>) {
        let stem: Vec<usize> = if self.stem_follows_first_block() {
            self.blocks[0].taps.clone()
        } else {
            (0..self.stem_width).collect()
        };
        let layout = self.layout();
        let mut streams: Vec<Vec<usize>> = Vec::new();
        for (s, st) in self.stages.iter().enumerate() {
            let all: Vec<usize> = (0..st.width).collect();
            let mut writers: Vec<&[usize]> = Vec::new();
            for (i, &(bs, first)) in layout.iter().enumerate() {
                if bs != s {
                    continue;
                }
                match self.join(s, first) {
                    Join::Conv => writers.push(&all),
                    Join::Identity if first => {
                        writers.push(if s == 0 { &stem } else { &streams[s - 1] });
                    }
                    _ => {}
                }
                writers.push(&self.blocks[i].out);
            }
            let stream = union(st.width, writers);
            streams.push(stream);
        }
        (stem, streams)
    }

    /// Checks that the config describes a buildable network.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(ZooError::Config(m));
        let layout = self.layout();
        if self.stages.is_empty() || layout.len() != self.blocks.len() {
            return bad(format!(
                "{} blocks for stages {:?}",
                self.blocks.len(),
                self.stages
            ));
        }
        if self.last_width == 0 || self.stem_width == 0 {
            return bad("stem and last widths must be positive".into());
        }
        for (i, (&(s, first), b)) in layout.iter().zip(&self.blocks).enumerate() {
            let st = &self.stages[s];
            if st.expansion == 1 && i != 0 {
                return bad(format!(
                    "block {i}: only the first block may skip the expansion (t = 1)"
                ));
            }
            let taps_ok = if st.expansion == 1 {
                b.taps.len() == b.expanded
                    && b.taps.iter().all(|&c| c < self.stem_width)
                    && b.taps.windows(2).all(|p| p[0] < p[1])
            } else {
                b.taps.is_empty()
            };
            if !taps_ok {
                return bad(format!(
                    "block {i}: taps must list the expanded channels' stem positions (t = 1 only)"
                ));
            }
            if b.out.iter().any(|&c| c >= st.width) || !b.out.windows(2).all(|p| p[0] < p[1]) {
                return bad(format!(
                    "block {i}: output positions must be increasing and below {}",
                    st.width
                ));
            }
            let removable = self.join(s, first) != Join::Replace;
            if b.out.is_empty() && !removable {
                return bad(format!(
                    "block {i}: a block without a shortcut needs outputs"
                ));
            }
            if !b.out.is_empty() && b.expanded == 0 {
                return bad(format!("block {i}: a kept block needs expanded channels"));
            }
        }
        Ok(())
    }

    /// Builds the network (gates in bypass).
    pub fn init(&self, device: &Device) -> Result<MobileNetV2> {
        self.validate()?;
        let (stem_stream, streams) = self.streams();
        let stem = ConvBnGateConfig::new(self.in_channels, stem_stream.len())
            .with_stride(self.stem_stride)
            .init_ungated(device);
        let blocks = self
            .layout()
            .into_iter()
            .zip(&self.blocks)
            .map(|((s, first), b)| {
                let st = &self.stages[s];
                let input = block_input((s, first), &stem_stream, &streams).len();
                let join = self.join(s, first);
                let branch = (!b.out.is_empty()).then(|| {
                    MbConvConfig {
                        input,
                        expand: st.expansion != 1,
                        expanded: b.expanded,
                        kernel: 3,
                        stride: if first { st.stride } else { 1 },
                        out: b.out.len(),
                        kind: if join == Join::Replace {
                            GateKind::Main
                        } else {
                            GateKind::Branch
                        },
                    }
                    .init(device)
                });
                MbBlock {
                    branch,
                    shortcut: (join == Join::Conv).then(|| {
                        ConvBnGateConfig::new(input, st.width)
                            .with_kernel(1)
                            .init_ungated(device)
                    }),
                }
            })
            .collect();
        let last_in = streams.last().expect("validated").len();
        Ok(MobileNetV2 {
            stem,
            blocks,
            last: ConvBnGateConfig::new(last_in, self.last_width)
                .with_kernel(1)
                .init(device),
            classifier: LinearConfig::new(self.last_width, self.num_classes).init(device),
            config: self.clone(),
        })
    }
}

/// One inverted-residual block.
#[derive(Module, Debug)]
pub struct MbBlock {
    /// The branch, an MBConv unit with a 3x3 depthwise convolution (`None`: removed).
    pub branch: Option<MbConv>,
    /// Conv shortcut (CIFAR variant, stride-1 width changes).
    pub shortcut: Option<ConvBn>,
}

/// MobileNetV2 with channel gates.
#[derive(Module, Debug)]
pub struct MobileNetV2 {
    /// 3x3 stem conv + BN (ungated).
    pub stem: ConvBn,
    /// The inverted-residual blocks.
    pub blocks: Vec<MbBlock>,
    /// Final 1x1 conv + BN + gate.
    pub last: ConvBnGate,
    /// Final linear layer.
    pub classifier: Linear,
    #[module(skip)]
    config: MobileNetV2Config,
}

impl MobileNetV2 {
    /// Logits `[N, classes]` of images `[N, C, H, W]`.
    pub fn forward(&self, x: Tensor<4>) -> Tensor<2> {
        let cfg = &self.config;
        let (stem_stream, streams) = cfg.streams();
        let mut x = self.stem.forward_act(x, Activation::Relu6);
        for ((block, (s, first)), widths) in self.blocks.iter().zip(cfg.layout()).zip(&cfg.blocks) {
            let input = x.clone();
            // The branch and what it reads.
            let branch = block.branch.as_ref().map(|b| {
                if b.expand.is_some() {
                    return (b, input.clone());
                }
                let taps = positions(&stem_stream, &widths.taps);
                if taps.len() == stem_stream.len() {
                    (b, input.clone())
                } else {
                    let sources: Vec<Option<usize>> = taps.iter().map(|&t| Some(t)).collect();
                    (b, dnal_kernels::channels::select(input.clone(), &sources))
                }
            });
            let pos = positions(&streams[s], &widths.out);
            x = match cfg.join(s, first) {
                Join::Replace => {
                    let (b, h) = branch.expect("validated");
                    place(b.forward(h), &pos, streams[s].len(), 1)
                }
                Join::Identity => {
                    let base = if first && s > 0 {
                        // The stream widens to this stage's union.
                        widen(input, &streams[s - 1], &streams[s], 1)
                    } else {
                        input
                    };
                    match branch {
                        Some((b, h)) => b.forward_add_into(h, base, &pos),
                        None => base,
                    }
                }
                Join::Conv => {
                    let sc = block.shortcut.as_ref().expect("conv join").forward(input);
                    match branch {
                        Some((b, h)) => b.forward_add_into(h, sc, &pos),
                        None => sc,
                    }
                }
            };
        }
        let x = self.last.forward_act(x, Activation::Relu6);
        let x = dnal_kernels::global_avg_pool(x);
        self.classifier.forward(x)
    }

    /// The cost model, exact or as the released code counts (see
    /// [`Network::released_cost_model`]).
    fn costs(&self, counting: Counting) -> CostModel {
        let cfg = &self.config;
        let (stem_stream, streams) = cfg.streams();
        let mut cost = CostModel::new();
        let mut side = cfg.image_size.div_ceil(cfg.stem_stride);
        let stem_out = if cfg.stem_follows_first_block() {
            Width::gate(Self::names(0).0)
        } else {
            Width::Fixed(stem_stream.len())
        };
        self.stem.add_cost(
            &mut cost,
            "stem",
            Width::Fixed(cfg.in_channels),
            stem_out,
            [side, side],
        );
        for (i, (block, (s, first))) in self.blocks.iter().zip(cfg.layout()).enumerate() {
            let input = block_input((s, first), &stem_stream, &streams).len();
            let in_side = side;
            if first && cfg.stages[s].stride > 1 {
                side = side.div_ceil(cfg.stages[s].stride);
            }
            let (dw, proj) = Self::names(i);
            if let Some(b) = &block.branch {
                let expand = format!("b{i}.expand");
                let read = self
                    .released_input(counting, i)
                    .unwrap_or(Width::Fixed(input));
                b.add_cost(&mut cost, [&expand, &dw, &proj], read, [in_side, side]);
            }
            if let Some(sc) = &block.shortcut {
                let w = cfg.stages[s].width;
                sc.add_cost(
                    &mut cost,
                    &format!("b{i}.shortcut"),
                    Width::Fixed(input),
                    Width::Fixed(w),
                    [side, side],
                );
            }
        }
        let last_in = streams.last().expect("validated").len();
        let read = self
            .released_input(counting, self.blocks.len())
            .unwrap_or(Width::Fixed(last_in));
        self.last.add_cost(&mut cost, "last", read, [side, side]);
        cost.linear(
            "classifier",
            Width::gate("last"),
            Width::Fixed(cfg.num_classes),
        );
        cost
    }

    /// Under the released count, what the layer after block `i - 1` reads: the channels that
    /// block's projection gate keeps (if the block still has its branch).
    fn released_input(&self, counting: Counting, i: usize) -> Option<Width> {
        (counting == Counting::Released && i > 0 && self.blocks[i - 1].branch.is_some())
            .then(|| Width::gate(Self::names(i - 1).1))
    }

    fn names(i: usize) -> (String, String) {
        (format!("b{i}.dw"), format!("b{i}.proj"))
    }
}

impl GatedModel for MobileNetV2 {
    fn for_each_gate(&mut self, f: &mut dyn FnMut(&str, &mut ChannelGate)) {
        for (i, b) in self.blocks.iter_mut().enumerate() {
            if let Some(b) = &mut b.branch {
                let (dw, proj) = Self::names(i);
                b.for_each_gate(&dw, &proj, f);
            }
        }
        f("last", &mut self.last.gate);
    }
}

impl Network for MobileNetV2 {
    type Config = MobileNetV2Config;

    fn build(config: &MobileNetV2Config, device: &Device) -> Result<Self> {
        config.init(device)
    }

    fn forward(&self, images: Tensor<4>) -> Tensor<2> {
        MobileNetV2::forward(self, images)
    }

    fn config(&self) -> &MobileNetV2Config {
        &self.config
    }

    fn inference_graph(&self) -> Result<Graph> {
        let cfg = &self.config;
        let (stem_stream, streams) = cfg.streams();
        let mut g = Graph::new(cfg.in_channels, cfg.image_size, cfg.num_classes);
        let mut x = g.conv_bn("stem", 0, &self.stem, Activation::Relu6)?;
        for (i, ((block, (s, first)), widths)) in self
            .blocks
            .iter()
            .zip(cfg.layout())
            .zip(&cfg.blocks)
            .enumerate()
        {
            let name = format!("blocks.{i}");
            let input = x;
            let pos = positions(&streams[s], &widths.out);
            let place = Place {
                width: streams[s].len(),
                positions: &pos,
            };
            let branch = match &block.branch {
                Some(b) => {
                    let read = if b.expand.is_some() {
                        input
                    } else {
                        g.narrow(&format!("{name}.taps"), input, &stem_stream, &widths.taps)
                    };
                    Some(b.graph(&mut g, &format!("{name}.branch"), read, Some(place))?)
                }
                None => None,
            };
            x = match cfg.join(s, first) {
                Join::Replace => branch.ok_or_else(|| {
                    ZooError::Config(format!("block {i} has no shortcut and no branch"))
                })?,
                Join::Identity => {
                    let base = if first && s > 0 {
                        g.widen(&name, input, &streams[s - 1], &streams[s], 1)
                    } else {
                        input
                    };
                    match branch {
                        Some(o) => g.add(&name, base, o),
                        None => base,
                    }
                }
                Join::Conv => {
                    let sc = block.shortcut.as_ref().ok_or_else(|| {
                        ZooError::Config(format!("block {i} has no shortcut conv"))
                    })?;
                    let sc =
                        g.conv_bn(&format!("{name}.shortcut"), input, sc, Activation::Identity)?;
                    match branch {
                        Some(o) => g.add(&name, sc, o),
                        None => sc,
                    }
                }
            };
        }
        let x = g.conv_bn_gate("last", x, &self.last, Activation::Relu6, None)?;
        let x = g.pool_flatten(x);
        g.linear("classifier", x, &self.classifier, None)?;
        Ok(g)
    }

    /// Streams are unions of kept channels: the cost model treats them as fixed at their current
    /// width, and [`Network::arch_cost`] prices an architecture by pruning a copy.
    /// torchvision's MobileNetV2: `features.0` the stem, `features.{b+1}.conv` block b (its
    /// expansion, depthwise and projection units in order), the next feature the last 1x1 conv,
    /// `classifier.1` the classifier. The CIFAR variant's conv shortcuts have no counterpart.
    fn torchvision_keys(&self) -> Option<KeyRules> {
        let cfg = &self.config;
        if cfg.conv_shortcuts {
            return None;
        }
        // torchvision's Conv2dNormActivation: `.0` the conv, `.1` the BN.
        let unit = |torch: String, ours: String| {
            Rename::conv_bn(&format!("{torch}.0"), &format!("{torch}.1"), &ours)
        };
        let mut rename: Vec<Rename> = unit("features.0".into(), "stem".into()).into();
        for (b, (s, _)) in cfg.layout().into_iter().enumerate() {
            let torch = format!("features.{}.conv", b + 1);
            let ours = format!("blocks.{b}.branch");
            let mut k = 0;
            if cfg.stages[s].expansion != 1 {
                rename.extend(unit(format!("{torch}.0"), format!("{ours}.expand")));
                k = 1;
            }
            rename.extend(unit(format!("{torch}.{k}"), format!("{ours}.depthwise")));
            rename.extend(Rename::conv_bn(
                &format!("{torch}.{}", k + 1),
                &format!("{torch}.{}", k + 2),
                &format!("{ours}.project"),
            ));
        }
        rename.extend(unit(
            format!("features.{}", cfg.blocks.len() + 1),
            "last".into(),
        ));
        rename.push(Rename::prefix("classifier.1", "classifier"));
        Some(KeyRules {
            rename,
            ..KeyRules::default()
        })
    }

    fn cost_model(&self) -> CostModel {
        self.costs(Counting::Exact)
    }

    fn released_cost_model(&self) -> Option<CostModel> {
        Some(self.costs(Counting::Released))
    }

    fn prune(mut self, arch: &Architecture) -> Result<Self> {
        arch.check_matches(&self)?;
        let old = self.config.clone();
        let (old_stem, old_streams) = old.streams();
        let kept = |name: &str| arch.gates[name].kept.clone();
        let layout = old.layout();
        let mut cfg = old.clone();
        let mut plans = Vec::with_capacity(old.blocks.len());
        for (i, b) in old.blocks.iter().enumerate() {
            let (dw, proj) = Self::names(i);
            let plan = if b.out.is_empty() {
                None
            } else {
                mbconv::kept(arch, &dw, &proj)
            };
            cfg.blocks[i] = match &plan {
                None => MbBlockWidths {
                    expanded: 0,
                    taps: Vec::new(),
                    out: Vec::new(),
                },
                Some(keep) => MbBlockWidths {
                    expanded: keep.depthwise.len(),
                    taps: if b.taps.is_empty() {
                        Vec::new()
                    } else {
                        keep.depthwise.iter().map(|&k| b.taps[k]).collect()
                    },
                    out: keep.project.iter().map(|&k| b.out[k]).collect(),
                },
            };
            plans.push(plan);
        }
        let last_keep = kept("last");
        cfg.last_width = last_keep.len();
        cfg.validate()?;
        let (new_stem, streams) = cfg.streams();
        let keep_stream = kept_positions(&old_streams, &streams);
        let stem_keep = positions(&old_stem, &new_stem);
        self.stem = self.stem.prune(None, &stem_keep);
        self.blocks = std::mem::take(&mut self.blocks)
            .into_iter()
            .zip(plans)
            .zip(layout)
            .map(|((block, plan), (s, first))| {
                let input = block_input((s, first), &stem_keep, &keep_stream);
                let shortcut = block.shortcut.map(|sc| {
                    let all: Vec<usize> = (0..old.stages[s].width).collect();
                    sc.prune(Some(input), &all)
                });
                let branch = match (block.branch, plan) {
                    (Some(b), Some(keep)) => Some(b.prune(input, &keep)),
                    _ => None,
                };
                MbBlock { branch, shortcut }
            })
            .collect();
        self.last = self
            .last
            .prune(Some(keep_stream.last().expect("validated")), &last_keep);
        self.classifier = prune_linear_inputs(self.classifier, &last_keep);
        self.config = cfg;
        Ok(self)
    }
}
