//! The ProxylessNAS-style stochastic supernet searched with channel gates (`docs/METHOD.md` §1,
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

use burn::nn::{Linear, LinearConfig};
use burn::prelude::*;
use dnal_core::{
    Architecture, ChannelGate, CostModel, CostReport, GateKind, GatedModel, Width,
    derive_architecture,
};
use dnal_kernels::Activation;
use serde::{Deserialize, Serialize};

use crate::error::{Result, ZooError};
use crate::graph::{Graph, Place};
use crate::layers::{ConvBn, ConvBnGate, ConvBnGateConfig, prune_linear_inputs};
use crate::mbconv::{self, MbConv, MbConvConfig};
use crate::network::Network;
use crate::stream::{block_input, kept_positions, positions, union, widen};

/// The gates of the fixed first block: its depthwise channels (and the stem's), its outputs.
const FIRST_GATES: (&str, &str) = ("first.dw", "first.proj");

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
    /// Stem width (32): the depthwise channels of the fixed first block, which its depthwise
    /// gate governs.
    pub stem_width: usize,
    /// Output width of the fixed MBConv1 3x3 block at full size (16).
    pub first_width: usize,
    /// Positions (below `first_width`) of the fixed block's kept outputs: the entry of the
    /// first stage.
    pub first_out: Vec<usize>,
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
            first_out: (0..16).collect(),
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
        cfg.first_out = (0..8).collect();
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

    /// The names of the depthwise and projection gates of candidate `c` of block `i`.
    fn gate_names(&self, i: usize, c: &CandidateWidths) -> (String, String) {
        let (s, _) = self.layout()[i];
        let b = i - self.stage_blocks[..s].iter().sum::<usize>();
        let p = format!("s{s}.b{b}.{}", c.name());
        (format!("{p}.dw"), format!("{p}.proj"))
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
            let mut writers: Vec<&[usize]> = Vec::new();
            for (cands, &(bs, first)) in self.blocks.iter().zip(&self.layout()) {
                if bs != s {
                    continue;
                }
                if first && self.residual(s, true) {
                    writers.push(block_input((s, true), &self.first_out, &streams));
                }
                writers.extend(cands.iter().map(|c| c.out.as_slice()));
            }
            let stream = union(w, writers);
            streams.push(stream);
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
        if self.last_width == 0 || self.stem_width == 0 {
            return bad("the stem and the last conv keep at least one channel each".into());
        }
        if self.first_out.is_empty()
            || self.first_out.iter().any(|&p| p >= self.first_width)
            || !self.first_out.windows(2).all(|p| p[0] < p[1])
        {
            return bad(format!(
                "the first block's output positions must be non-empty, increasing and below {}",
                self.first_width
            ));
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
        let first_block = MbConvConfig {
            input: self.stem_width,
            expand: false,
            expanded: self.stem_width,
            kernel: 3,
            stride: 1,
            out: self.first_out.len(),
            kind: GateKind::Main,
        }
        .init(device);
        let blocks = self
            .blocks
            .iter()
            .zip(self.layout())
            .map(|(cands, (s, first))| {
                let input = block_input((s, first), &self.first_out, &streams).len();
                let stride = if first { self.stage_strides[s] } else { 1 };
                let candidates = cands
                    .iter()
                    .map(|c| {
                        (!c.out.is_empty()).then(|| {
                            MbConvConfig {
                                input,
                                expand: true,
                                expanded: c.expanded,
                                kernel: c.kernel,
                                stride,
                                out: c.out.len(),
                                kind: GateKind::Branch,
                            }
                            .init(device)
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
            classifier: LinearConfig::new(self.last_width, self.num_classes).init(device),
            config: self.clone(),
        })
    }
}

/// A mixed edge: the sum of its candidates (`None`: removed).
#[derive(Module, Debug)]
pub struct MixedBlock {
    /// The six candidates, MBConv units that always expand.
    pub candidates: Vec<Option<MbConv>>,
}

/// The supernet with channel gates.
#[derive(Module, Debug)]
pub struct SuperNet {
    /// 3x3 stem conv + BN (ungated).
    pub stem: ConvBn,
    /// The fixed first block: an MBConv without expansion whose depthwise gate also sets the
    /// stem's width (gates `first.dw` and `first.proj`, as in the released code).
    pub first_block: MbConv,
    /// The searchable blocks.
    pub blocks: Vec<MixedBlock>,
    /// Final 1x1 conv + BN + gate.
    pub last: ConvBnGate,
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
        let mut x = self.first_block.forward(x);
        for ((block, cands), (s, first)) in self.blocks.iter().zip(&cfg.blocks).zip(cfg.layout()) {
            let input = x.clone();
            let mut out = if cfg.residual(s, first) {
                if first {
                    let entry = block_input((s, true), &cfg.first_out, &streams);
                    widen(input.clone(), entry, &streams[s], 1)
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
                    let pos = positions(&streams[s], &widths.out);
                    out = c.forward_add_into(input.clone(), out, &pos);
                }
            }
            x = out;
        }
        let x = self.last.forward_act(x, Activation::Relu6);
        let x = dnal_kernels::global_avg_pool(x);
        self.classifier.forward(x)
    }

    /// The fixed block's widths, then, per block, the candidates that survive with their
    /// expanded and output channels (a markdown table).
    pub fn candidate_table(&self) -> String {
        let cfg = &self.config;
        let mut s = format!(
            "Fixed first block (k3e1): {} -> {} of {} channels.\n\n| block |",
            cfg.stem_width,
            cfg.first_out.len(),
            cfg.first_width
        );
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
    fn for_each_gate(&mut self, f: &mut dyn FnMut(&str, &mut ChannelGate)) {
        let (dw, proj) = FIRST_GATES;
        self.first_block.for_each_gate(dw, proj, f);
        for (i, block) in self.blocks.iter_mut().enumerate() {
            for (cand, widths) in block.candidates.iter_mut().zip(&self.config.blocks[i]) {
                if let Some(c) = cand {
                    let (dw, proj) = self.config.gate_names(i, widths);
                    c.for_each_gate(&dw, &proj, f);
                }
            }
        }
        f("last", &mut self.last.gate);
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

    fn inference_graph(&self) -> Result<Graph> {
        let cfg = &self.config;
        let streams = cfg.streams();
        let mut g = Graph::new(cfg.in_channels, cfg.image_size, cfg.num_classes);
        let x = g.conv_bn("stem", 0, &self.stem, Activation::Relu6)?;
        let mut x = self.first_block.graph(&mut g, "first_block", x, None)?;
        for (i, ((block, cands), (s, first))) in self
            .blocks
            .iter()
            .zip(&cfg.blocks)
            .zip(cfg.layout())
            .enumerate()
        {
            let name = format!("blocks.{i}");
            let input = x;
            let mut out = cfg.residual(s, first).then(|| {
                if first {
                    let entry = block_input((s, true), &cfg.first_out, &streams);
                    g.widen(&name, input, entry, &streams[s], 1)
                } else {
                    input
                }
            });
            for (j, (cand, widths)) in block.candidates.iter().zip(cands).enumerate() {
                if let Some(c) = cand {
                    let pos = positions(&streams[s], &widths.out);
                    let place = Place {
                        width: streams[s].len(),
                        positions: &pos,
                    };
                    let cname = format!("{name}.candidates.{j}");
                    let y = c.graph(&mut g, &cname, input, Some(place))?;
                    out = Some(match out {
                        Some(o) => g.add(&cname, o, y),
                        None => y,
                    });
                }
            }
            x = out.ok_or_else(|| {
                ZooError::Config(format!("block {i} has no shortcut and keeps no candidate"))
            })?;
        }
        let x = g.conv_bn_gate("last", x, &self.last, Activation::Relu6, None)?;
        let x = g.pool_flatten(x);
        g.linear("classifier", x, &self.classifier, None)?;
        Ok(g)
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
        let (first_dw, first_proj) = FIRST_GATES;
        self.stem.add_cost(
            &mut cost,
            "stem",
            fixed(cfg.in_channels),
            Width::gate(first_dw),
            [side, side],
        );
        self.first_block.add_cost(
            &mut cost,
            ["first.expand", first_dw, first_proj],
            fixed(cfg.stem_width),
            [side, side],
        );
        for (i, ((block, cands), (s, first))) in self
            .blocks
            .iter()
            .zip(&cfg.blocks)
            .zip(cfg.layout())
            .enumerate()
        {
            // The first stage's entry is the fixed block's gate unless a shortcut makes it a
            // stream (then its width is fixed, like every stream's).
            let input = if (s, first) == (0, true) && !cfg.residual(0, true) {
                Width::gate(first_proj)
            } else {
                fixed(block_input((s, first), &cfg.first_out, &streams).len())
            };
            let in_side = side;
            if first {
                side = side.div_ceil(cfg.stage_strides[s]);
            }
            for (cand, widths) in block.candidates.iter().zip(cands) {
                if let Some(c) = cand {
                    let (dw, proj) = self.config.gate_names(i, widths);
                    let expand = dw.replace(".dw", ".expand");
                    c.add_cost(
                        &mut cost,
                        [&expand, &dw, &proj],
                        input.clone(),
                        [in_side, side],
                    );
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
        let mut plans: Vec<Vec<Option<mbconv::Kept>>> = Vec::new();
        for (i, cands) in old.blocks.iter().enumerate() {
            let mut block_plan = Vec::new();
            for (j, c) in cands.iter().enumerate() {
                let (dw, proj) = old.gate_names(i, c);
                let plan = if c.out.is_empty() {
                    None
                } else {
                    mbconv::kept(arch, &dw, &proj)
                };
                let w = &mut cfg.blocks[i][j];
                (w.expanded, w.out) = match &plan {
                    None => (0, Vec::new()),
                    Some(keep) => (
                        keep.depthwise.len(),
                        keep.project.iter().map(|&k| c.out[k]).collect(),
                    ),
                };
                block_plan.push(plan);
            }
            plans.push(block_plan);
        }
        let (first_dw, first_proj) = FIRST_GATES;
        let first_keep = mbconv::kept(arch, first_dw, first_proj).ok_or_else(|| {
            ZooError::Config("the fixed first block must keep at least one output".into())
        })?;
        cfg.stem_width = first_keep.depthwise.len();
        cfg.first_out = first_keep
            .project
            .iter()
            .map(|&k| old.first_out[k])
            .collect();
        let last_keep = arch.gates["last"].kept.clone();
        cfg.last_width = last_keep.len();
        cfg.validate()?;
        let streams = cfg.streams();
        let keep_stream = kept_positions(&old_streams, &streams);
        self.stem = self.stem.prune(None, &first_keep.depthwise);
        self.first_block = self.first_block.prune(&first_keep.depthwise, &first_keep);
        let entry_keep = first_keep.project;
        self.blocks = std::mem::take(&mut self.blocks)
            .into_iter()
            .zip(plans)
            .zip(layout)
            .map(|((block, plan), (s, first))| {
                let input = block_input((s, first), &entry_keep, &keep_stream);
                MixedBlock {
                    candidates: block
                        .candidates
                        .into_iter()
                        .zip(plan)
                        .map(|(cand, p)| match (cand, p) {
                            (Some(c), Some(keep)) => Some(c.prune(input, &keep)),
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
                .map(|c| self.config.gate_names(i, c).1)
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
