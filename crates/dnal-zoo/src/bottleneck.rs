//! Bottleneck ResNets for ImageNet (ResNet-50/101/152, torchvision's v1.5 layout: stride on the
//! 3x3 conv), with gates after the stem and after bn1, bn2 and bn3 of every block (bn3 is on the
//! residual branch, before the add); the projection shortcut convs are not gated.
//!
//! Each stage begins with an ungated projection shortcut that writes every channel of the
//! stage's stream, so the streams stay at full width; a block's kept bn3 channels are added into
//! their stream positions (index add), and a block whose bn3 gate closes completely is removed.
//! The stem gate prunes the stem and the inputs of the first block's conv1 and shortcut.

use burn::nn::PaddingConfig2d;
use burn::nn::pool::{MaxPool2d, MaxPool2dConfig};
use burn::nn::{Linear, LinearConfig};
use burn::prelude::*;
use burn::tensor::activation::relu;
use dnal_core::{Architecture, ChannelGate, CostModel, GateKind, GatedModel, Width};
use dnal_kernels::Activation;
use serde::{Deserialize, Serialize};

use crate::error::{Result, ZooError};
use crate::graph::{Graph, Place};
use crate::layers::{ConvBn, ConvBnGate, ConvBnGateConfig};
use crate::network::{Counting, Network};
use crate::pretrained::{KeyRules, Rename};

/// Widths of one bottleneck block.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BottleneckWidths {
    /// Output channels of conv1 (bn1 gate).
    pub mid1: usize,
    /// Output channels of conv2 (bn2 gate).
    pub mid2: usize,
    /// Stream positions of conv3's output channels (bn3 gate); empty: the branch is removed.
    pub out: Vec<usize>,
}

/// Configuration of a [`BottleneckResNet`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BottleneckResNetConfig {
    /// Image channels.
    pub in_channels: usize,
    /// Image side.
    pub image_size: usize,
    /// Number of classes.
    pub num_classes: usize,
    /// Blocks per stage ([3, 4, 6, 3] for ResNet-50).
    pub layers: Vec<usize>,
    /// Channels kept by the stem gate (`planes[0]` at full width).
    pub stem: usize,
    /// Planes of each stage (the inner width of its blocks; the stream is 4x wider):
    /// `[64, 128, 256, 512]` in ResNet-50/101/152.
    #[serde(default = "default_planes")]
    pub planes: [usize; 4],
    /// Every block, stage by stage.
    pub blocks: Vec<BottleneckWidths>,
}

const PLANES: [usize; 4] = [64, 128, 256, 512];
const EXPANSION: usize = 4;

fn default_planes() -> [usize; 4] {
    PLANES
}

impl BottleneckResNetConfig {
    /// A full-width bottleneck ResNet with `layers` blocks per stage.
    pub fn new(layers: Vec<usize>, num_classes: usize) -> Result<Self> {
        Self::with_planes(layers, PLANES, num_classes)
    }

    /// A full-width bottleneck ResNet with `layers` blocks per stage of `planes` planes (the
    /// stem is `planes[0]` wide), as torchvision's `ResNet` builds it with other widths.
    pub fn with_planes(layers: Vec<usize>, planes: [usize; 4], num_classes: usize) -> Result<Self> {
        if layers.len() != 4 || layers.contains(&0) {
            return Err(ZooError::Config(format!(
                "a bottleneck ResNet has 4 stages of at least one block, not {layers:?}"
            )));
        }
        if planes.contains(&0) {
            return Err(ZooError::Config(format!(
                "every stage needs at least one plane, not {planes:?}"
            )));
        }
        let blocks = layers
            .iter()
            .zip(planes)
            .flat_map(|(&n, p)| {
                std::iter::repeat_n(
                    BottleneckWidths {
                        mid1: p,
                        mid2: p,
                        out: (0..p * EXPANSION).collect(),
                    },
                    n,
                )
            })
            .collect();
        Ok(Self {
            in_channels: 3,
            image_size: 224,
            num_classes,
            layers,
            stem: planes[0],
            planes,
            blocks,
        })
    }

    /// ResNet-50: 4.09G MACs, 25.55M parameters.
    pub fn resnet50(num_classes: usize) -> Self {
        Self::new(vec![3, 4, 6, 3], num_classes).expect("a valid layout")
    }

    /// Full width of stage `s`'s stream.
    fn stream_width(&self, s: usize) -> usize {
        self.planes[s] * EXPANSION
    }

    /// (stage, first block of the stage) of every block.
    fn layout(&self) -> Vec<(usize, bool)> {
        self.layers
            .iter()
            .enumerate()
            .flat_map(|(s, &n)| (0..n).map(move |b| (s, b == 0)))
            .collect()
    }

    /// Checks that the config describes a buildable network.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(ZooError::Config(m));
        if self.layers.len() != 4 || self.blocks.len() != self.layers.iter().sum::<usize>() {
            return bad(format!(
                "{} blocks for stages {:?}",
                self.blocks.len(),
                self.layers
            ));
        }
        if self.planes.contains(&0) {
            return bad(format!(
                "every stage needs at least one plane, not {:?}",
                self.planes
            ));
        }
        if self.stem == 0 || self.stem > self.planes[0] {
            return bad(format!(
                "the stem keeps 1 to {} channels, not {}",
                self.planes[0], self.stem
            ));
        }
        for (i, (b, (s, _))) in self.blocks.iter().zip(self.layout()).enumerate() {
            let w = self.stream_width(s);
            if b.out.iter().any(|&c| c >= w) || !b.out.windows(2).all(|p| p[0] < p[1]) {
                return bad(format!(
                    "block {i}: output positions must be increasing and below {w}"
                ));
            }
            if !b.out.is_empty() && (b.mid1 == 0 || b.mid2 == 0) {
                return bad(format!("block {i}: a kept block needs inner channels"));
            }
        }
        Ok(())
    }

    /// Builds the network (gates in bypass).
    pub fn init(&self, device: &Device) -> Result<BottleneckResNet> {
        self.validate()?;
        let blocks = self
            .layout()
            .into_iter()
            .zip(&self.blocks)
            .map(|((s, first), b)| {
                let width = self.stream_width(s);
                let input = match (first, s) {
                    (true, 0) => self.stem,
                    (true, _) => self.stream_width(s - 1),
                    (false, _) => width,
                };
                let stride = if first && s > 0 { 2 } else { 1 };
                Bottleneck {
                    branch: (!b.out.is_empty()).then(|| BottleneckBranch {
                        conv1: ConvBnGateConfig::new(input, b.mid1)
                            .with_kernel(1)
                            .init(device),
                        conv2: ConvBnGateConfig::new(b.mid1, b.mid2)
                            .with_stride(stride)
                            .init(device),
                        conv3: ConvBnGateConfig::new(b.mid2, b.out.len())
                            .with_kernel(1)
                            .with_kind(GateKind::Branch)
                            .init(device),
                    }),
                    shortcut: first.then(|| {
                        ConvBnGateConfig::new(input, width)
                            .with_kernel(1)
                            .with_stride(stride)
                            .init_ungated(device)
                    }),
                }
            })
            .collect();
        Ok(BottleneckResNet {
            stem: ConvBnGateConfig::new(self.in_channels, self.stem)
                .with_kernel(7)
                .with_stride(2)
                .init(device),
            pool: MaxPool2dConfig::new([3, 3])
                .with_strides([2, 2])
                .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                .init(),
            blocks,
            classifier: LinearConfig::new(self.stream_width(3), self.num_classes).init(device),
            config: self.clone(),
        })
    }
}

/// The three gated convs of a bottleneck's residual branch.
#[derive(Module, Debug)]
pub struct BottleneckBranch {
    /// 1x1 conv -> BN -> gate (bn1).
    pub conv1: ConvBnGate,
    /// 3x3 conv (stride) -> BN -> gate (bn2).
    pub conv2: ConvBnGate,
    /// 1x1 conv -> BN -> gate (bn3, before the add).
    pub conv3: ConvBnGate,
}

/// One bottleneck block.
#[derive(Module, Debug)]
pub struct Bottleneck {
    /// The residual branch (`None`: removed).
    pub branch: Option<BottleneckBranch>,
    /// The projection shortcut (first block of each stage; not gated).
    pub shortcut: Option<ConvBn>,
}

/// A bottleneck ResNet with channel gates.
#[derive(Module, Debug)]
pub struct BottleneckResNet {
    /// 7x7 stem conv -> BN -> gate.
    pub stem: ConvBnGate,
    pool: MaxPool2d,
    /// The blocks.
    pub blocks: Vec<Bottleneck>,
    /// Final linear layer.
    pub classifier: Linear,
    #[module(skip)]
    config: BottleneckResNetConfig,
}

impl BottleneckResNet {
    /// Logits `[N, classes]` of images `[N, C, H, W]`.
    pub fn forward(&self, x: Tensor<4>) -> Tensor<2> {
        let mut x = self
            .pool
            .forward(self.stem.forward_act(x, Activation::Relu));
        for (block, widths) in self.blocks.iter().zip(&self.config.blocks) {
            let base = match &block.shortcut {
                Some(sc) => sc.forward(x.clone()),
                None => x.clone(),
            };
            x = match &block.branch {
                Some(b) => {
                    let h = b.conv1.forward_act(x, Activation::Relu);
                    let h = b.conv2.forward_act(h, Activation::Relu);
                    b.conv3
                        .forward_add_into(h, base, &widths.out, Activation::Relu)
                }
                None => relu(base),
            };
        }
        let x = dnal_kernels::global_avg_pool(x);
        self.classifier.forward(x)
    }

    /// The cost model, exact or as the released code counts (see
    /// [`Network::released_cost_model`]).
    fn costs(&self, counting: Counting) -> CostModel {
        let cfg = &self.config;
        let mut cost = CostModel::new();
        let mut side = cfg.image_size.div_ceil(2);
        self.stem.add_cost(
            &mut cost,
            "stem",
            Width::Fixed(cfg.in_channels),
            [side, side],
        );
        side = side.div_ceil(2);
        for (i, (block, (s, first))) in self.blocks.iter().zip(cfg.layout()).enumerate() {
            let width = cfg.stream_width(s);
            let stream = match (first, s) {
                (true, 0) => Width::gate("stem"),
                (true, _) => Width::Fixed(cfg.stream_width(s - 1)),
                (false, _) => Width::Fixed(width),
            };
            let input = match self.released_input(counting, i) {
                Some(gate) => gate,
                None => stream.clone(),
            };
            let in_side = side;
            if first && s > 0 {
                side = side.div_ceil(2);
            }
            if let Some(b) = &block.branch {
                let [n1, n2, n3] = Self::names(i);
                b.conv1
                    .add_cost(&mut cost, &n1, input.clone(), [in_side, in_side]);
                b.conv2
                    .add_cost(&mut cost, &n2, Width::gate(&n1), [side, side]);
                b.conv3
                    .add_cost(&mut cost, &n3, Width::gate(&n2), [side, side]);
            }
            if let Some(sc) = &block.shortcut {
                let sc_input = match counting {
                    Counting::Exact => stream,
                    Counting::Released => Width::Fixed(if s == 0 {
                        cfg.stem
                    } else {
                        cfg.stream_width(s - 1)
                    }),
                };
                sc.add_cost(
                    &mut cost,
                    &format!("b{i}.shortcut"),
                    sc_input,
                    Width::Fixed(width),
                    [side, side],
                );
            }
        }
        let features = self
            .released_input(counting, self.blocks.len())
            .unwrap_or(Width::Fixed(cfg.stream_width(3)));
        cost.linear("classifier", features, Width::Fixed(cfg.num_classes));
        cost
    }

    /// Under the released count, what the layer after block `i - 1` reads: the channels that
    /// block's bn3 gate keeps (if the block still has its branch).
    fn released_input(&self, counting: Counting, i: usize) -> Option<Width> {
        (counting == Counting::Released && i > 0 && self.blocks[i - 1].branch.is_some())
            .then(|| Width::gate(Self::names(i - 1)[2].clone()))
    }

    fn names(i: usize) -> [String; 3] {
        [1, 2, 3].map(|k| format!("b{i}.bn{k}"))
    }
}

impl GatedModel for BottleneckResNet {
    fn for_each_gate(&mut self, f: &mut dyn FnMut(&str, &mut ChannelGate)) {
        f("stem", &mut self.stem.gate);
        for (i, b) in self.blocks.iter_mut().enumerate() {
            if let Some(b) = &mut b.branch {
                let [n1, n2, n3] = Self::names(i);
                f(&n1, &mut b.conv1.gate);
                f(&n2, &mut b.conv2.gate);
                f(&n3, &mut b.conv3.gate);
            }
        }
    }
}

impl Network for BottleneckResNet {
    type Config = BottleneckResNetConfig;

    fn build(config: &BottleneckResNetConfig, device: &Device) -> Result<Self> {
        config.init(device)
    }

    fn forward(&self, images: Tensor<4>) -> Tensor<2> {
        BottleneckResNet::forward(self, images)
    }

    fn config(&self) -> &BottleneckResNetConfig {
        &self.config
    }

    fn inference_graph(&self) -> Result<Graph> {
        let cfg = &self.config;
        let mut g = Graph::new(cfg.in_channels, cfg.image_size, cfg.num_classes);
        let stem = g.conv_bn_gate("stem", 0, &self.stem, Activation::Relu, None)?;
        let mut x = g.max_pool("pool", stem, &self.pool)?;
        for (i, ((block, widths), (s, _))) in self
            .blocks
            .iter()
            .zip(&cfg.blocks)
            .zip(cfg.layout())
            .enumerate()
        {
            let name = format!("blocks.{i}");
            let base = match &block.shortcut {
                Some(sc) => g.conv_bn(&format!("{name}.shortcut"), x, sc, Activation::Identity)?,
                None => x,
            };
            x = match &block.branch {
                Some(b) => {
                    let h = g.conv_bn_gate(
                        &format!("{name}.conv1"),
                        x,
                        &b.conv1,
                        Activation::Relu,
                        None,
                    )?;
                    let h = g.conv_bn_gate(
                        &format!("{name}.conv2"),
                        h,
                        &b.conv2,
                        Activation::Relu,
                        None,
                    )?;
                    let place = Place {
                        width: cfg.stream_width(s),
                        positions: &widths.out,
                    };
                    let y = g.conv_bn_gate(
                        &format!("{name}.conv3"),
                        h,
                        &b.conv3,
                        Activation::Identity,
                        Some(place),
                    )?;
                    let sum = g.add(&name, base, y);
                    g.act(&name, sum, Activation::Relu)
                }
                None => g.act(&name, base, Activation::Relu),
            };
        }
        let x = g.pool_flatten(x);
        g.linear("classifier", x, &self.classifier, None)?;
        Ok(g)
    }

    /// torchvision's ResNet: `conv1`/`bn1` the stem, `layer{s}.{j}.conv{k}`/`bn{k}` block j of
    /// stage s, `layer{s}.0.downsample.{0,1}` its projection shortcut, `fc` the classifier.
    fn torchvision_keys(&self) -> Option<KeyRules> {
        let mut rename: Vec<Rename> = Rename::conv_bn("conv1", "bn1", "stem").into();
        rename.push(Rename::prefix("fc", "classifier"));
        let mut j = 0;
        for (i, (s, first)) in self.config.layout().into_iter().enumerate() {
            j = if first { 0 } else { j + 1 };
            let torch = format!("layer{}.{j}", s + 1);
            for k in 1..=3 {
                rename.extend(Rename::conv_bn(
                    &format!("{torch}.conv{k}"),
                    &format!("{torch}.bn{k}"),
                    &format!("blocks.{i}.branch.conv{k}"),
                ));
            }
            rename.extend(Rename::conv_bn(
                &format!("{torch}.downsample.0"),
                &format!("{torch}.downsample.1"),
                &format!("blocks.{i}.shortcut"),
            ));
        }
        Some(KeyRules {
            rename,
            ..KeyRules::default()
        })
    }

    /// Exact under any architecture: the streams stay at full width, so every width is a gate's
    /// or fixed, except that a closed bn3 gate removes its whole block (see
    /// [`Network::arch_cost`]).
    fn cost_model(&self) -> CostModel {
        self.costs(Counting::Exact)
    }

    fn released_cost_model(&self) -> Option<CostModel> {
        Some(self.costs(Counting::Released))
    }

    fn prune(mut self, arch: &Architecture) -> Result<Self> {
        arch.check_matches(&self)?;
        let old = self.config.clone();
        let kept = |name: &str| arch.gates[name].kept.clone();
        let stem_keep = kept("stem");
        let mut cfg = old.clone();
        cfg.stem = stem_keep.len();
        let mut plans = Vec::with_capacity(old.blocks.len());
        for (i, b) in old.blocks.iter().enumerate() {
            if b.out.is_empty() {
                plans.push(None);
                continue;
            }
            let [n1, n2, n3] = Self::names(i);
            let keeps = [kept(&n1), kept(&n2), kept(&n3)];
            cfg.blocks[i] = BottleneckWidths {
                mid1: if keeps[2].is_empty() {
                    0
                } else {
                    keeps[0].len()
                },
                mid2: if keeps[2].is_empty() {
                    0
                } else {
                    keeps[1].len()
                },
                out: keeps[2].iter().map(|&k| b.out[k]).collect(),
            };
            plans.push((!keeps[2].is_empty()).then_some(keeps));
        }
        cfg.validate()?;
        self.stem = self.stem.prune(None, &stem_keep);
        self.blocks = std::mem::take(&mut self.blocks)
            .into_iter()
            .zip(plans)
            .zip(old.layout())
            .map(|((block, plan), (s, first))| {
                let input = (first && s == 0).then_some(stem_keep.as_slice());
                let width = old.stream_width(s);
                let all: Vec<usize> = (0..width).collect();
                Bottleneck {
                    shortcut: block.shortcut.map(|sc| sc.prune(input, &all)),
                    branch: match (block.branch, plan) {
                        (Some(b), Some([k1, k2, k3])) => Some(BottleneckBranch {
                            conv1: b.conv1.prune(input, &k1),
                            conv2: b.conv2.prune(Some(&k1), &k2),
                            conv3: b.conv3.prune(Some(&k2), &k3),
                        }),
                        _ => None,
                    },
                }
            })
            .collect();
        self.config = cfg;
        Ok(self)
    }
}
