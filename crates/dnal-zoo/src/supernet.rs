//! The ProxylessNAS-style stochastic supernet searched with channel gates (dnal-method.md §1,
//! last item): every searchable block is a mixed edge of six candidate MBConv operations
//! ({3x3, 5x5, 7x7} depthwise kernels x expansion {3, 6}) whose outputs are summed, plus an
//! identity shortcut where the stride is 1 and the widths match. Each candidate has a gate after
//! its depthwise BN and one after its projection BN; a candidate whose projection gate closes is
//! removed with all its parameters, and survivors keep only their kept channels. A block may keep
//! several candidates.
//!
//! Candidate outputs are added into their positions of the stage's stream (the union of what the
//! stage's candidates keep), as in [`crate::resnet`]. A block without a shortcut must keep some
//! output: [`Network::derive`] reopens the strongest projection channel of such a block if all
//! of its candidates closed.

use burn::nn::pool::{AdaptiveAvgPool2d, AdaptiveAvgPool2dConfig};
use burn::nn::{Linear, LinearConfig};
use burn::prelude::*;
use dnal_core::{
    Architecture, ChannelGate, CostModel, CostReport, GateKind, GatedModel, Width,
    derive_architecture,
};
use dnal_kernels::Activation;
use serde::{Deserialize, Serialize};

use crate::error::{Result, ZooError};
use crate::layers::{
    ConvBn, ConvBnGate, ConvBnGateConfig, add_into, positions, prune_linear_inputs,
};
use crate::network::Network;

/// The depthwise and projection channels a surviving candidate keeps.
type KeepPlan = (Vec<usize>, Vec<usize>);

/// The six candidate operations: (depthwise kernel, expansion).
pub const CANDIDATES: [(usize, usize); 6] = [(3, 3), (3, 6), (5, 3), (5, 6), (7, 3), (7, 6)];

/// Widths of one candidate operation of a block.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CandidateWidths {
    /// Depthwise kernel size.
    pub kernel: usize,
    /// Expansion factor (its name; the expanded width is `expanded`).
    pub expansion: usize,
    /// Expanded (depthwise) channels.
    pub expanded: usize,
    /// Stream positions of its projection's channels; empty: the candidate is removed.
    pub out: Vec<usize>,
}

impl CandidateWidths {
    /// `k3e6`-style name.
    pub fn name(&self) -> String {
        format!("k{}e{}", self.kernel, self.expansion)
    }
}

/// Configuration of a [`SuperNet`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SuperNetConfig {
    /// Image channels.
    pub in_channels: usize,
    /// Image side.
    pub image_size: usize,
    /// Number of classes.
    pub num_classes: usize,
    /// Stride of the 3x3 stem (2 on ImageNet).
    pub stem_stride: usize,
    /// Stem width (32).
    pub stem_width: usize,
    /// Output width of the fixed MBConv1 3x3 block (16).
    pub first_width: usize,
    /// Width of each searchable stage.
    pub stage_widths: Vec<usize>,
    /// Blocks of each searchable stage.
    pub stage_blocks: Vec<usize>,
    /// Stride of each stage's first block.
    pub stage_strides: Vec<usize>,
    /// Channels of the final 1x1 conv (1280 at full width).
    pub last_width: usize,
    /// The candidates of every block, stage by stage.
    pub blocks: Vec<Vec<CandidateWidths>>,
}

impl SuperNetConfig {
    fn with(
        image_size: usize,
        num_classes: usize,
        stem_stride: usize,
        stage_widths: Vec<usize>,
        stage_blocks: Vec<usize>,
        stage_strides: Vec<usize>,
        last_width: usize,
    ) -> Self {
        let mut blocks = Vec::new();
        let mut in_w = 16;
        for (&w, &n) in stage_widths.iter().zip(&stage_blocks) {
            for _ in 0..n {
                blocks.push(
                    CANDIDATES
                        .iter()
                        .map(|&(kernel, expansion)| CandidateWidths {
                            kernel,
                            expansion,
                            expanded: in_w * expansion,
                            out: (0..w).collect(),
                        })
                        .collect(),
                );
                in_w = w;
            }
        }
        Self {
            in_channels: 3,
            image_size,
            num_classes,
            stem_stride,
            stem_width: 32,
            first_width: 16,
            stage_widths,
            stage_blocks,
            stage_strides,
            last_width,
            blocks,
        }
    }

    /// The paper's ImageNet supernet (224x224): stages [24, 40, 80, 96, 192, 320] x
    /// [4, 4, 4, 4, 4, 1] blocks, strides [2, 2, 2, 1, 2, 1]; 16.0M parameters.
    pub fn imagenet(num_classes: usize) -> Self {
        Self::with(
            224,
            num_classes,
            2,
            vec![24, 40, 80, 96, 192, 320],
            vec![4, 4, 4, 4, 4, 1],
            vec![2, 2, 2, 1, 2, 1],
            1280,
        )
    }

    /// The CIFAR variant (beyond the paper): 32x32 input, stem stride 1 and the first stage at
    /// stride 1.
    pub fn cifar(num_classes: usize) -> Self {
        Self::with(
            32,
            num_classes,
            1,
            vec![24, 40, 80, 96, 192, 320],
            vec![4, 4, 4, 4, 4, 1],
            vec![1, 2, 2, 1, 2, 1],
            1280,
        )
    }

    /// A reduced supernet for tests and small images: the given stage widths and blocks, strides
    /// 1 then 2, and a small last conv.
    pub fn tiny(image_size: usize, in_channels: usize, num_classes: usize) -> Self {
        let mut cfg = Self::with(
            image_size,
            num_classes,
            1,
            vec![8, 16],
            vec![2, 2],
            vec![1, 2],
            32,
        );
        cfg.in_channels = in_channels;
        cfg.stem_width = 8;
        cfg.first_width = 8;
        // The first searchable block reads the fixed block's 8 channels.
        for c in &mut cfg.blocks[0] {
            c.expanded = 8 * c.expansion;
        }
        cfg
    }

    /// (stage, first block of the stage) of every block.
    fn layout(&self) -> Vec<(usize, bool)> {
        self.stage_blocks
            .iter()
            .enumerate()
            .flat_map(|(s, &n)| (0..n).map(move |b| (s, b == 0)))
            .collect()
    }

    fn in_width(&self, s: usize) -> usize {
        if s == 0 {
            self.first_width
        } else {
            self.stage_widths[s - 1]
        }
    }

    /// Whether a block has an identity shortcut.
    fn residual(&self, s: usize, first: bool) -> bool {
        !first || (self.stage_strides[s] == 1 && self.in_width(s) == self.stage_widths[s])
    }

    /// The stream positions of every stage: the union of what its candidates (and, for a
    /// residual first block, the previous stage) keep.
    pub fn streams(&self) -> Vec<Vec<usize>> {
        let mut streams: Vec<Vec<usize>> = Vec::new();
        for (s, &w) in self.stage_widths.iter().enumerate() {
            let mut present = vec![false; w];
            for (cands, &(bs, first)) in self.blocks.iter().zip(&self.layout()) {
                if bs != s {
                    continue;
                }
                if first && self.residual(s, true) {
                    let prev: Vec<usize> = match s {
                        0 => (0..self.first_width).collect(),
                        _ => streams[s - 1].clone(),
                    };
                    prev.iter().for_each(|&c| present[c] = true);
                }
                cands
                    .iter()
                    .flat_map(|c| &c.out)
                    .for_each(|&c| present[c] = true);
            }
            streams.push((0..w).filter(|&c| present[c]).collect());
        }
        streams
    }

    /// Checks that the config describes a buildable network.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(ZooError::Config(m));
        let stages = self.stage_widths.len();
        if stages == 0 || self.stage_blocks.len() != stages || self.stage_strides.len() != stages {
            return bad("stage widths, blocks and strides must have one entry per stage".into());
        }
        if self.blocks.len() != self.stage_blocks.iter().sum::<usize>() {
            return bad(format!(
                "{} blocks for stages {:?}",
                self.blocks.len(),
                self.stage_blocks
            ));
        }
        if self.last_width == 0 {
            return bad("the last conv keeps at least one channel".into());
        }
        for (i, (cands, (s, first))) in self.blocks.iter().zip(self.layout()).enumerate() {
            let w = self.stage_widths[s];
            for c in cands {
                if c.out.iter().any(|&p| p >= w) || !c.out.windows(2).all(|p| p[0] < p[1]) {
                    return bad(format!(
                        "block {i} {}: output positions must be increasing and below {w}",
                        c.name()
                    ));
                }
                if !c.out.is_empty() && c.expanded == 0 {
                    return bad(format!(
                        "block {i} {}: a kept candidate needs expanded channels",
                        c.name()
                    ));
                }
            }
            if !self.residual(s, first) && cands.iter().all(|c| c.out.is_empty()) {
                return bad(format!("block {i} has no shortcut and keeps no candidate"));
            }
        }
        Ok(())
    }

    /// Builds the network (gates in bypass).
    pub fn init(&self, device: &Device) -> Result<SuperNet> {
        self.validate()?;
        let streams = self.streams();
        let first_block = FixedBlock {
            depthwise: ConvBnGateConfig::new(self.stem_width, self.stem_width)
                .with_depthwise(true)
                .init_ungated(device),
            project: ConvBnGateConfig::new(self.stem_width, self.first_width)
                .with_kernel(1)
                .init_ungated(device),
        };
        let blocks = self
            .blocks
            .iter()
            .zip(self.layout())
            .map(|(cands, (s, first))| {
                let input = match (first, s) {
                    (true, 0) => self.first_width,
                    (true, _) => streams[s - 1].len(),
                    (false, _) => streams[s].len(),
                };
                let stride = if first { self.stage_strides[s] } else { 1 };
                let candidates = cands
                    .iter()
                    .map(|c| {
                        (!c.out.is_empty()).then(|| Candidate {
                            expand: ConvBnGateConfig::new(input, c.expanded)
                                .with_kernel(1)
                                .init_ungated(device),
                            depthwise: ConvBnGateConfig::new(c.expanded, c.expanded)
                                .with_kernel(c.kernel)
                                .with_stride(stride)
                                .with_depthwise(true)
                                .init(device),
                            project: ConvBnGateConfig::new(c.expanded, c.out.len())
                                .with_kernel(1)
                                .with_kind(GateKind::Branch)
                                .init(device),
                        })
                    })
                    .collect();
                MixedBlock { candidates }
            })
            .collect();
        let last_in = streams.last().expect("validated").len();
        Ok(SuperNet {
            stem: ConvBnGateConfig::new(self.in_channels, self.stem_width)
                .with_stride(self.stem_stride)
                .init_ungated(device),
            first_block,
            blocks,
            last: ConvBnGateConfig::new(last_in, self.last_width)
                .with_kernel(1)
                .init(device),
            gap: AdaptiveAvgPool2dConfig::new([1, 1]).init(),
            classifier: LinearConfig::new(self.last_width, self.num_classes).init(device),
            config: self.clone(),
        })
    }
}

/// The fixed MBConv1 3x3 block after the stem (ungated).
#[derive(Module, Debug)]
pub struct FixedBlock {
    /// 3x3 depthwise conv + BN.
    pub depthwise: ConvBn,
    /// 1x1 projection + BN.
    pub project: ConvBn,
}

/// One candidate MBConv operation.
#[derive(Module, Debug)]
pub struct Candidate {
    /// 1x1 expansion conv + BN (its width is the depthwise gate's).
    pub expand: ConvBn,
    /// kxk depthwise conv + BN + gate.
    pub depthwise: ConvBnGate,
    /// 1x1 projection conv + BN + gate.
    pub project: ConvBnGate,
}

/// A mixed edge: the sum of its candidates (`None`: removed).
#[derive(Module, Debug)]
pub struct MixedBlock {
    /// The six candidates.
    pub candidates: Vec<Option<Candidate>>,
}

/// The supernet with channel gates.
#[derive(Module, Debug)]
pub struct SuperNet {
    /// 3x3 stem conv + BN (ungated).
    pub stem: ConvBn,
    /// The fixed first block.
    pub first_block: FixedBlock,
    /// The searchable blocks.
    pub blocks: Vec<MixedBlock>,
    /// Final 1x1 conv + BN + gate.
    pub last: ConvBnGate,
    gap: AdaptiveAvgPool2d,
    /// Final linear layer.
    pub classifier: Linear,
    #[module(skip)]
    config: SuperNetConfig,
}

impl SuperNet {
    /// Logits `[N, classes]` of images `[N, C, H, W]`.
    pub fn forward(&self, x: Tensor<4>) -> Tensor<2> {
        let cfg = &self.config;
        let streams = cfg.streams();
        let x = self.stem.forward_act(x, Activation::Relu6);
        let x = self.first_block.depthwise.forward_act(x, Activation::Relu6);
        let mut x = self.first_block.project.forward(x);
        for ((block, cands), (s, first)) in self.blocks.iter().zip(&cfg.blocks).zip(cfg.layout()) {
            let input = x.clone();
            let mut out = if cfg.residual(s, first) {
                if first && s > 0 {
                    crate::layers::scatter(
                        streams[s].len(),
                        &positions(&streams[s], &streams[s - 1]),
                        input.clone(),
                    )
                } else {
                    input.clone()
                }
            } else {
                let [n, _, h, w] = input.dims();
                let stride = cfg.stage_strides[s];
                Tensor::zeros(
                    [n, streams[s].len(), h.div_ceil(stride), w.div_ceil(stride)],
                    &input.device(),
                )
            };
            for (cand, widths) in block.candidates.iter().zip(cands) {
                if let Some(c) = cand {
                    let h = c.expand.forward_act(input.clone(), Activation::Relu6);
                    let h = c.depthwise.forward_act(h, Activation::Relu6);
                    out = add_into(
                        out,
                        &positions(&streams[s], &widths.out),
                        c.project.forward(h),
                    );
                }
            }
            x = out;
        }
        let x = self.last.forward_act(x, Activation::Relu6);
        let x: Tensor<2> = self.gap.forward(x).flatten(1, 3);
        self.classifier.forward(x)
    }

    fn names(&self, i: usize, c: &CandidateWidths) -> (String, String) {
        let (s, _) = self.config.layout()[i];
        let b = i - self.config.stage_blocks[..s].iter().sum::<usize>();
        let p = format!("s{s}.b{b}.{}", c.name());
        (format!("{p}.dw"), format!("{p}.proj"))
    }

    /// Per block, the candidates that survive with their expanded and output channels (a
    /// markdown table).
    pub fn candidate_table(&self) -> String {
        let mut s = String::from("| block |");
        for (k, e) in CANDIDATES {
            s += &format!(" k{k}e{e} |");
        }
        s += " shortcut |\n|---|";
        s += &"---|".repeat(CANDIDATES.len() + 1);
        s.push('\n');
        let layout = self.config.layout();
        for (i, cands) in self.config.blocks.iter().enumerate() {
            let (stage, first) = layout[i];
            let b = i - self.config.stage_blocks[..stage].iter().sum::<usize>();
            s += &format!("| s{stage}.b{b} |");
            for c in cands {
                s += &if c.out.is_empty() {
                    " - |".to_string()
                } else {
                    format!(" {}->{} |", c.expanded, c.out.len())
                };
            }
            s += if self.config.residual(stage, first) {
                " yes |\n"
            } else {
                " no |\n"
            };
        }
        s
    }
}

impl GatedModel for SuperNet {
    fn visit_gates(&self, f: &mut dyn FnMut(&str, &ChannelGate)) {
        for (i, (block, cands)) in self.blocks.iter().zip(&self.config.blocks).enumerate() {
            for (cand, widths) in block.candidates.iter().zip(cands) {
                if let Some(c) = cand {
                    let (dw, proj) = self.names(i, widths);
                    f(&dw, &c.depthwise.gate);
                    f(&proj, &c.project.gate);
                }
            }
        }
        f("last", &self.last.gate);
    }

    fn map_gates(mut self, f: &mut dyn FnMut(&str, ChannelGate) -> ChannelGate) -> Self {
        let blocks = std::mem::take(&mut self.blocks);
        self.blocks = blocks
            .into_iter()
            .enumerate()
            .map(|(i, mut block)| {
                let cands = self.config.blocks[i].clone();
                block.candidates = block
                    .candidates
                    .into_iter()
                    .zip(&cands)
                    .map(|(cand, widths)| {
                        cand.map(|mut c| {
                            let (dw, proj) = self.names(i, widths);
                            c.depthwise.gate = f(&dw, c.depthwise.gate);
                            c.project.gate = f(&proj, c.project.gate);
                            c
                        })
                    })
                    .collect();
                block
            })
            .collect();
        self.last.gate = f("last", self.last.gate);
        self
    }
}

impl Network for SuperNet {
    type Config = SuperNetConfig;

    fn build(config: &SuperNetConfig, device: &Device) -> Result<Self> {
        config.init(device)
    }

    fn forward(&self, images: Tensor<4>) -> Tensor<2> {
        SuperNet::forward(self, images)
    }

    fn config(&self) -> &SuperNetConfig {
        &self.config
    }

    fn describe(&self) -> Option<String> {
        Some(self.candidate_table())
    }

    fn structure_grid(&self) -> Option<crate::network::StructureGrid> {
        let layout = self.config.layout();
        let rows = (0..self.config.blocks.len())
            .map(|i| {
                let (s, _) = layout[i];
                format!(
                    "s{s}.b{}",
                    i - self.config.stage_blocks[..s].iter().sum::<usize>()
                )
            })
            .collect();
        let cells = self
            .config
            .blocks
            .iter()
            .zip(&layout)
            .map(|(cands, &(s, _))| {
                let w = self.config.stage_widths[s] as f64;
                cands.iter().map(|c| c.out.len() as f64 / w).collect()
            })
            .collect();
        Some(crate::network::StructureGrid {
            rows,
            columns: CANDIDATES
                .iter()
                .map(|(k, e)| format!("k{k}e{e}"))
                .collect(),
            cells,
        })
    }

    /// Streams are unions of kept channels: the cost model treats them as fixed at their current
    /// width, and [`Network::arch_cost`] prices an architecture by pruning a copy.
    fn cost_model(&self) -> CostModel {
        let cfg = &self.config;
        let streams = cfg.streams();
        let mut cost = CostModel::new();
        let mut side = cfg.image_size.div_ceil(cfg.stem_stride);
        let fixed = |w: usize| Width::Fixed(w);
        self.stem.add_cost(
            &mut cost,
            "stem",
            fixed(cfg.in_channels),
            fixed(cfg.stem_width),
            [side, side],
        );
        self.first_block.depthwise.add_cost(
            &mut cost,
            "first.dw",
            fixed(cfg.stem_width),
            fixed(cfg.stem_width),
            [side, side],
        );
        self.first_block.project.add_cost(
            &mut cost,
            "first.proj",
            fixed(cfg.stem_width),
            fixed(cfg.first_width),
            [side, side],
        );
        for (i, ((block, cands), (s, first))) in self
            .blocks
            .iter()
            .zip(&cfg.blocks)
            .zip(cfg.layout())
            .enumerate()
        {
            let input = match (first, s) {
                (true, 0) => cfg.first_width,
                (true, _) => streams[s - 1].len(),
                (false, _) => streams[s].len(),
            };
            let in_side = side;
            if first {
                side = side.div_ceil(cfg.stage_strides[s]);
            }
            for (cand, widths) in block.candidates.iter().zip(cands) {
                if let Some(c) = cand {
                    let (dw, proj) = self.names(i, widths);
                    let expand = dw.replace(".dw", ".expand");
                    c.expand.add_cost(
                        &mut cost,
                        &expand,
                        fixed(input),
                        Width::gate(&dw),
                        [in_side, in_side],
                    );
                    c.depthwise
                        .add_cost(&mut cost, &dw, Width::gate(&dw), [side, side]);
                    c.project
                        .add_cost(&mut cost, &proj, Width::gate(&dw), [side, side]);
                }
            }
        }
        let last_in = streams.last().expect("validated").len();
        self.last
            .add_cost(&mut cost, "last", fixed(last_in), [side, side]);
        cost.linear("classifier", Width::gate("last"), fixed(cfg.num_classes));
        cost
    }

    fn arch_cost(&self, arch: &Architecture) -> Result<CostReport> {
        let arch = self.repair(arch.clone());
        Ok(self.clone().prune(&arch)?.cost_model().cost(None))
    }

    /// Derivation, then, for every block without a shortcut whose candidates all closed, the
    /// strongest projection channel (largest alpha) reopened.
    fn derive(&self, threshold: f64) -> Result<Architecture> {
        Ok(self.repair(derive_architecture(self, threshold)?))
    }

    fn prune(mut self, arch: &Architecture) -> Result<Self> {
        arch.check_matches(&self)?;
        let old = self.config.clone();
        let old_streams = old.streams();
        let layout = old.layout();
        let mut cfg = old.clone();
        let mut plans: Vec<Vec<Option<KeepPlan>>> = Vec::new();
        for (i, cands) in old.blocks.iter().enumerate() {
            let mut block_plan = Vec::new();
            for (j, c) in cands.iter().enumerate() {
                if c.out.is_empty() {
                    block_plan.push(None);
                    continue;
                }
                let (dw, proj) = self.names(i, c);
                let (dw_keep, proj_keep) =
                    (arch.gates[&dw].kept.clone(), arch.gates[&proj].kept.clone());
                let w = &mut cfg.blocks[i][j];
                if proj_keep.is_empty() {
                    (w.expanded, w.out) = (0, Vec::new());
                    block_plan.push(None);
                } else {
                    w.expanded = dw_keep.len();
                    w.out = proj_keep.iter().map(|&k| c.out[k]).collect();
                    block_plan.push(Some((dw_keep, proj_keep)));
                }
            }
            plans.push(block_plan);
        }
        let last_keep = arch.gates["last"].kept.clone();
        cfg.last_width = last_keep.len();
        cfg.validate()?;
        let streams = cfg.streams();
        let keep_stream: Vec<Vec<usize>> = streams
            .iter()
            .zip(&old_streams)
            .map(|(new, old)| positions(old, new))
            .collect();
        let all_first: Vec<usize> = (0..old.first_width).collect();
        self.blocks = std::mem::take(&mut self.blocks)
            .into_iter()
            .zip(plans)
            .zip(layout)
            .map(|((block, plan), (s, first))| {
                let input: &[usize] = match (first, s) {
                    (true, 0) => &all_first,
                    (true, _) => &keep_stream[s - 1],
                    (false, _) => &keep_stream[s],
                };
                MixedBlock {
                    candidates: block
                        .candidates
                        .into_iter()
                        .zip(plan)
                        .map(|(cand, p)| match (cand, p) {
                            (Some(c), Some((dw_keep, proj_keep))) => Some(Candidate {
                                expand: c.expand.prune(Some(input), &dw_keep),
                                depthwise: c.depthwise.prune(None, &dw_keep),
                                project: c.project.prune(Some(&dw_keep), &proj_keep),
                            }),
                            _ => None,
                        })
                        .collect(),
                }
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

impl SuperNet {
    /// Reopens the strongest projection channel of every shortcut-less block that keeps nothing.
    fn repair(&self, mut arch: Architecture) -> Architecture {
        let states: std::collections::BTreeMap<String, dnal_core::GateState> =
            self.gate_states().into_iter().collect();
        for (i, (cands, (s, first))) in self
            .config
            .blocks
            .iter()
            .zip(self.config.layout())
            .enumerate()
        {
            if self.config.residual(s, first) {
                continue;
            }
            let live: Vec<String> = cands
                .iter()
                .filter(|c| !c.out.is_empty())
                .map(|c| self.names(i, c).1)
                .collect();
            if live
                .iter()
                .any(|g| arch.gates.get(g).is_some_and(|a| !a.kept.is_empty()))
            {
                continue;
            }
            let best = live
                .iter()
                .flat_map(|g| {
                    states[g]
                        .alpha
                        .iter()
                        .enumerate()
                        .map(move |(c, &a)| (a, g, c))
                })
                .max_by(|x, y| x.0.total_cmp(&y.0));
            if let Some((_, g, c)) = best
                && let Some(a) = arch.gates.get_mut(g)
            {
                a.kept = vec![c];
                a.forced_open = true;
            }
        }
        arch
    }
}
