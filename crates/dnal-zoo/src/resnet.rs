//! ResNet-20/32/56/110 for CIFAR (basic blocks, parameter-free shortcuts: stride-2 subsampling
//! and zero channel padding, as in the paper's baseline), with gates on the stem, inside every
//! block and on every block's output branch before the add.
//!
//! Pruning across the residual adds: the stream (the tensor the shortcuts carry) keeps the
//! union of the channels that any gate writing into it keeps — the stem's and those of every
//! block output of the stage, plus, through a stage's padded shortcut, the previous stage's.
//! Every other stream channel is zero in the masked network, so it is removed; each block adds
//! its kept output channels into their positions in the stream (an index add). A block whose
//! output gate closes completely is removed with both its convs. The pruned network is the same
//! type, built from a config that records the kept stream positions.

use burn::nn::{Linear, LinearConfig};
use burn::prelude::*;
use dnal_core::{Architecture, ChannelGate, CostModel, GateKind, GatedModel, Width};
use dnal_kernels::Activation;
use serde::{Deserialize, Serialize};

use crate::error::{Result, ZooError};
use crate::graph::{Graph, Place};
use crate::layers::{ConvBnGate, ConvBnGateConfig, prune_linear_inputs};
use crate::network::Network;
use crate::stream::{block_input, kept_positions, positions, union, widen};

/// Widths of one residual block.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockWidths {
    /// Channels between the two convs.
    pub inner: usize,
    /// Stream positions (in the stage's full width) the block's output channels are added to;
    /// empty: the block is removed.
    pub out: Vec<usize>,
}

/// Configuration of a [`CifarResNet`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CifarResNetConfig {
    /// Image channels.
    pub in_channels: usize,
    /// Image side.
    pub image_size: usize,
    /// Number of classes.
    pub num_classes: usize,
    /// Full stream width of each stage (16, 32, 64).
    pub stage_widths: Vec<usize>,
    /// Blocks per stage ((depth - 2) / 6).
    pub blocks_per_stage: usize,
    /// Stream positions (in stage 0's full width) of the stem's output channels.
    pub stem: Vec<usize>,
    /// Every block, stage by stage.
    pub blocks: Vec<BlockWidths>,
}

impl CifarResNetConfig {
    /// ResNet-`depth` (20, 32, 44, 56, 110, ...: depth = 6n + 2) at full width.
    pub fn new(depth: usize, num_classes: usize) -> Result<Self> {
        if depth < 8 || !(depth - 2).is_multiple_of(6) {
            return Err(ZooError::Config(format!(
                "a CIFAR ResNet has depth 6n + 2 (20, 32, 44, 56, 110), not {depth}"
            )));
        }
        let n = (depth - 2) / 6;
        let stage_widths = vec![16, 32, 64];
        let blocks = stage_widths
            .iter()
            .flat_map(|&w| {
                std::iter::repeat_n(
                    BlockWidths {
                        inner: w,
                        out: (0..w).collect(),
                    },
                    n,
                )
            })
            .collect();
        Ok(Self {
            in_channels: 3,
            image_size: 32,
            num_classes,
            stage_widths,
            blocks_per_stage: n,
            stem: (0..16).collect(),
            blocks,
        })
    }

    /// Network depth (weighted layers).
    pub fn depth(&self) -> usize {
        6 * self.blocks_per_stage + 2
    }

    /// Checks that the config describes a buildable network.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(ZooError::Config(m));
        let stages = self.stage_widths.len();
        if stages == 0 || self.blocks_per_stage == 0 {
            return bad("a ResNet needs at least one stage of at least one block".into());
        }
        if self.blocks.len() != stages * self.blocks_per_stage {
            return bad(format!(
                "{} blocks for {stages} stages of {}",
                self.blocks.len(),
                self.blocks_per_stage
            ));
        }
        if self.stem.is_empty() || self.stem.iter().any(|&c| c >= self.stage_widths[0]) {
            return bad(format!(
                "stem positions {:?} must be non-empty and below {}",
                self.stem, self.stage_widths[0]
            ));
        }
        for (i, b) in self.blocks.iter().enumerate() {
            let w = self.stage_widths[i / self.blocks_per_stage];
            if b.out.iter().any(|&c| c >= w) || !b.out.windows(2).all(|p| p[0] < p[1]) {
                return bad(format!(
                    "block {i}: output positions must be increasing and below {w}"
                ));
            }
            if !b.out.is_empty() && b.inner == 0 {
                return bad(format!("block {i}: a kept block needs inner channels"));
            }
        }
        for pair in self.stage_widths.windows(2) {
            if pair[1] < pair[0] || !(pair[1] - pair[0]).is_multiple_of(2) {
                return bad(format!(
                    "stage widths {:?}: each must grow by an even number (zero padding on both sides)",
                    self.stage_widths
                ));
            }
        }
        Ok(())
    }

    /// The stream positions of every stage: the union of what writes into it.
    pub fn streams(&self) -> Vec<Vec<usize>> {
        let mut streams: Vec<Vec<usize>> = Vec::new();
        for (s, &w) in self.stage_widths.iter().enumerate() {
            // The stage's entry: the stem, or the previous stream zero-padded on both sides.
            let entry: Vec<usize> = if s == 0 {
                self.stem.clone()
            } else {
                let pad = (w - self.stage_widths[s - 1]) / 2;
                streams[s - 1].iter().map(|&c| c + pad).collect()
            };
            let blocks = &self.blocks[s * self.blocks_per_stage..(s + 1) * self.blocks_per_stage];
            let writers =
                std::iter::once(entry.as_slice()).chain(blocks.iter().map(|b| &b.out[..]));
            streams.push(union(w, writers));
        }
        streams
    }

    /// Builds the network (gates in bypass).
    pub fn init(&self, device: &Device) -> Result<CifarResNet> {
        self.validate()?;
        let streams = self.streams();
        let stem = ConvBnGateConfig::new(self.in_channels, self.stem.len()).init(device);
        let blocks = self
            .blocks
            .iter()
            .enumerate()
            .map(|(i, b)| {
                let s = i / self.blocks_per_stage;
                let first = i % self.blocks_per_stage == 0;
                let input = if first && s > 0 {
                    streams[s - 1].len()
                } else {
                    streams[s].len()
                };
                let stride = if first && s > 0 { 2 } else { 1 };
                (!b.out.is_empty()).then(|| Branch {
                    conv1: ConvBnGateConfig::new(input, b.inner)
                        .with_stride(stride)
                        .init(device),
                    conv2: ConvBnGateConfig::new(b.inner, b.out.len())
                        .with_kind(GateKind::Branch)
                        .init(device),
                })
            })
            .collect();
        let last = streams.last().expect("validated").len();
        Ok(CifarResNet {
            stem,
            blocks,
            classifier: LinearConfig::new(last, self.num_classes).init(device),
            config: self.clone(),
        })
    }
}

/// The two gated convs of a block's residual branch.
#[derive(Module, Debug)]
pub struct Branch {
    /// conv -> BN -> gate (inner channels), then ReLU.
    pub conv1: ConvBnGate,
    /// conv -> BN -> gate (block output, before the add).
    pub conv2: ConvBnGate,
}

/// A CIFAR ResNet with channel gates.
#[derive(Module, Debug)]
pub struct CifarResNet {
    /// The stem.
    pub stem: ConvBnGate,
    /// Residual branches (`None`: a removed block).
    pub blocks: Vec<Option<Branch>>,
    /// Final linear layer.
    pub classifier: Linear,
    #[module(skip)]
    config: CifarResNetConfig,
}

impl CifarResNet {
    /// Logits `[N, classes]` of images `[N, C, H, W]`.
    pub fn forward(&self, x: Tensor<4>) -> Tensor<2> {
        let cfg = &self.config;
        let streams = cfg.streams();
        let stem = self.stem.forward_act(x, Activation::Relu);
        let mut x = widen(stem, &cfg.stem, &streams[0], 1);
        for (i, (block, widths)) in self.blocks.iter().zip(&cfg.blocks).enumerate() {
            let s = i / cfg.blocks_per_stage;
            let input = x.clone();
            if s > 0 && i % cfg.blocks_per_stage == 0 {
                // Parameter-free shortcut: subsample, then zero-pad the channels on both sides.
                let pad = (cfg.stage_widths[s] - cfg.stage_widths[s - 1]) / 2;
                let moved: Vec<usize> = streams[s - 1].iter().map(|c| c + pad).collect();
                x = widen(x, &moved, &streams[s], 2);
            }
            if let Some(b) = block {
                let h = b.conv1.forward_act(input, Activation::Relu);
                let pos = positions(&streams[s], &widths.out);
                x = b.conv2.forward_add_into(h, x, &pos, Activation::Relu);
            }
        }
        let x = dnal_kernels::global_avg_pool(x);
        self.classifier.forward(x)
    }

    fn block_names(i: usize, per_stage: usize) -> (String, String) {
        let prefix = format!("s{}.b{}", i / per_stage, i % per_stage);
        (format!("{prefix}.inner"), format!("{prefix}.out"))
    }
}

impl GatedModel for CifarResNet {
    fn for_each_gate(&mut self, f: &mut dyn FnMut(&str, &mut ChannelGate)) {
        f("stem", &mut self.stem.gate);
        let per = self.config.blocks_per_stage;
        for (i, b) in self.blocks.iter_mut().enumerate() {
            if let Some(b) = b {
                let (inner, out) = Self::block_names(i, per);
                f(&inner, &mut b.conv1.gate);
                f(&out, &mut b.conv2.gate);
            }
        }
    }
}

impl Network for CifarResNet {
    type Config = CifarResNetConfig;

    fn build(config: &CifarResNetConfig, device: &Device) -> Result<Self> {
        config.init(device)
    }

    fn forward(&self, images: Tensor<4>) -> Tensor<2> {
        CifarResNet::forward(self, images)
    }

    fn config(&self) -> &CifarResNetConfig {
        &self.config
    }

    fn inference_graph(&self) -> Result<Graph> {
        let cfg = &self.config;
        let streams = cfg.streams();
        let mut g = Graph::new(cfg.in_channels, cfg.image_size, cfg.num_classes);
        let stem = g.conv_bn_gate("stem", 0, &self.stem, Activation::Relu, None)?;
        let mut x = g.widen("stem", stem, &cfg.stem, &streams[0], 1);
        for (i, (block, widths)) in self.blocks.iter().zip(&cfg.blocks).enumerate() {
            let s = i / cfg.blocks_per_stage;
            let name = format!("blocks.{i}");
            let input = x;
            if s > 0 && i % cfg.blocks_per_stage == 0 {
                let pad = (cfg.stage_widths[s] - cfg.stage_widths[s - 1]) / 2;
                let moved: Vec<usize> = streams[s - 1].iter().map(|c| c + pad).collect();
                x = g.widen(&format!("{name}.shortcut"), x, &moved, &streams[s], 2);
            }
            if let Some(b) = block {
                let h = g.conv_bn_gate(
                    &format!("{name}.conv1"),
                    input,
                    &b.conv1,
                    Activation::Relu,
                    None,
                )?;
                let pos = positions(&streams[s], &widths.out);
                let place = Place {
                    width: streams[s].len(),
                    positions: &pos,
                };
                let y = g.conv_bn_gate(
                    &format!("{name}.conv2"),
                    h,
                    &b.conv2,
                    Activation::Identity,
                    Some(place),
                )?;
                let sum = g.add(&name, x, y);
                x = g.act(&name, sum, Activation::Relu);
            }
        }
        let x = g.pool_flatten(x);
        g.linear("classifier", x, &self.classifier, None)?;
        Ok(g)
    }

    /// Stream widths are the unions of kept channels, which a product of gate widths cannot
    /// express; the cost model treats each stream as fixed at its current width, and
    /// [`Network::arch_cost`] prices an architecture by pruning a copy.
    fn cost_model(&self) -> CostModel {
        let cfg = &self.config;
        let streams = cfg.streams();
        let mut cost = CostModel::new();
        let mut side = cfg.image_size;
        self.stem.add_cost(
            &mut cost,
            "stem",
            Width::Fixed(cfg.in_channels),
            [side, side],
        );
        for (i, b) in self.blocks.iter().enumerate() {
            let s = i / cfg.blocks_per_stage;
            let first = i % cfg.blocks_per_stage == 0;
            if first && s > 0 {
                side /= 2;
            }
            if let Some(b) = b {
                let input = if first && s > 0 {
                    &streams[s - 1]
                } else {
                    &streams[s]
                };
                let (inner, out) = Self::block_names(i, cfg.blocks_per_stage);
                b.conv1
                    .add_cost(&mut cost, &inner, Width::Fixed(input.len()), [side, side]);
                b.conv2
                    .add_cost(&mut cost, &out, Width::gate(&inner), [side, side]);
            }
        }
        let last = streams.last().expect("validated").len();
        cost.linear(
            "classifier",
            Width::Fixed(last),
            Width::Fixed(cfg.num_classes),
        );
        cost
    }

    fn prune(mut self, arch: &Architecture) -> Result<Self> {
        arch.check_matches(&self)?;
        let old = self.config.clone();
        let old_streams = old.streams();
        let kept = |name: &str| arch.gates[name].kept.clone();
        let mut cfg = old.clone();
        let stem_keep = kept("stem");
        cfg.stem = stem_keep.iter().map(|&k| old.stem[k]).collect();
        let mut plans = Vec::with_capacity(old.blocks.len());
        for (i, b) in old.blocks.iter().enumerate() {
            if b.out.is_empty() {
                plans.push(None);
                continue;
            }
            let (inner, out) = Self::block_names(i, old.blocks_per_stage);
            let (inner_keep, out_keep) = (kept(&inner), kept(&out));
            cfg.blocks[i] = if out_keep.is_empty() {
                BlockWidths {
                    inner: 0,
                    out: Vec::new(),
                }
            } else {
                BlockWidths {
                    inner: inner_keep.len(),
                    out: out_keep.iter().map(|&k| b.out[k]).collect(),
                }
            };
            plans.push((!out_keep.is_empty()).then_some((inner_keep, out_keep)));
        }
        cfg.validate()?;
        let streams = cfg.streams();
        // Which old stream channels each new stream keeps (as positions in the old stream).
        let keep_stream = kept_positions(&old_streams, &streams);
        self.stem = self.stem.prune(None, &stem_keep);
        self.blocks = std::mem::take(&mut self.blocks)
            .into_iter()
            .zip(plans)
            .enumerate()
            .map(|(i, (block, plan))| {
                let (b, (inner_keep, out_keep)) = (block?, plan?);
                let at = (i / old.blocks_per_stage, i % old.blocks_per_stage == 0);
                let input = block_input(at, &keep_stream[0], &keep_stream);
                Some(Branch {
                    conv1: b.conv1.prune(Some(input), &inner_keep),
                    conv2: b.conv2.prune(Some(&inner_keep), &out_keep),
                })
            })
            .collect();
        self.classifier =
            prune_linear_inputs(self.classifier, keep_stream.last().expect("validated"));
        self.config = cfg;
        Ok(self)
    }
}
