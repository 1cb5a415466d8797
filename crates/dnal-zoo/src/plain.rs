//! Plain (non-residual) CNNs: a chain of gated conv units with max-pools, then a classifier.
//! VGG-16 for CIFAR and the small MNIST CNN of the demo are presets of this one network.

use burn::module::ParamGroup;
use burn::nn::pool::{AdaptiveAvgPool2d, AdaptiveAvgPool2dConfig, MaxPool2d, MaxPool2dConfig};
use burn::nn::{BatchNorm, BatchNormConfig, Linear, LinearConfig};
use burn::prelude::*;
use burn::tensor::activation::relu;
use dnal_core::{Architecture, ChannelGate, CostModel, GatedModel, Width};

use crate::error::{Result, ZooError};
use crate::layers::{ConvBnGate, ConvBnGateConfig, prune_linear_inputs};
use crate::network::Network;

/// Configuration of a [`PlainCnn`]: the width of every gated conv is in `widths`, so a pruned
/// network is described by the same config with smaller widths.
#[derive(Config, Debug, PartialEq)]
pub struct PlainCnnConfig {
    /// Channels of the input image.
    pub in_channels: usize,
    /// Side of the (square) input image.
    pub image_size: usize,
    /// Output channels of every gated 3x3 conv, in order.
    pub widths: Vec<usize>,
    /// Indices of the convs followed by a 2x2 max-pool.
    pub pool_after: Vec<usize>,
    /// Global average pool before the classifier (otherwise the last map must be 1x1).
    #[config(default = false)]
    pub global_pool: bool,
    /// Hidden classifier layer (linear -> BN -> ReLU) before the last linear, if any.
    #[config(default = "None")]
    pub hidden: Option<usize>,
    /// Number of classes.
    #[config(default = 10)]
    pub num_classes: usize,
}

impl PlainCnnConfig {
    /// VGG-16-BN for CIFAR: 13 gated convs, classifier 512 -> 512 (BN, ReLU) -> classes.
    pub fn vgg16_cifar(num_classes: usize) -> Self {
        let widths = vec![
            64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512,
        ];
        Self::new(3, 32, widths, vec![1, 3, 6, 9, 12])
            .with_hidden(Some(512))
            .with_num_classes(num_classes)
    }

    /// The MNIST demo's CNN: gated convs 32-32 (pool) 64-64 (pool), global average pool, linear.
    pub fn mnist_cnn() -> Self {
        Self::new(1, 28, vec![32, 32, 64, 64], vec![1, 3]).with_global_pool(true)
    }

    /// Spatial side of each conv's output.
    fn sides(&self) -> Vec<usize> {
        let mut side = self.image_size;
        let mut out = Vec::with_capacity(self.widths.len());
        for i in 0..self.widths.len() {
            out.push(side);
            if self.pool_after.contains(&i) {
                side /= 2;
            }
        }
        out
    }

    fn final_side(&self) -> usize {
        self.image_size >> self.pool_after.len()
    }

    /// Checks that the config describes a buildable network.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(ZooError::Config(m));
        if self.widths.is_empty() || self.widths.contains(&0) {
            return bad(format!(
                "widths must be non-empty and positive, got {:?}",
                self.widths
            ));
        }
        if let Some(&i) = self.pool_after.iter().find(|&&i| i >= self.widths.len()) {
            return bad(format!(
                "pool_after index {i} is past the last conv ({})",
                self.widths.len() - 1
            ));
        }
        if !self.global_pool && self.final_side() != 1 {
            return bad(format!(
                "without global_pool the last feature map must be 1x1, but it is {0}x{0}",
                self.final_side()
            ));
        }
        Ok(())
    }

    /// Builds the network (gates in bypass).
    pub fn init(&self, device: &Device) -> Result<PlainCnn> {
        self.validate()?;
        let mut in_ch = self.in_channels;
        let convs = self
            .widths
            .iter()
            .map(|&w| {
                let unit = ConvBnGateConfig::new(in_ch, w).init(device);
                in_ch = w;
                unit
            })
            .collect();
        let last = *self.widths.last().expect("validated non-empty");
        let (head_in, hidden) = match self.hidden {
            Some(h) => (
                h,
                Some(Hidden {
                    linear: LinearConfig::new(last, h).init(device),
                    bn: BatchNormConfig::new(h).init(device),
                }),
            ),
            None => (last, None),
        };
        Ok(PlainCnn {
            convs,
            pool: MaxPool2dConfig::new([2, 2]).init(),
            gap: AdaptiveAvgPool2dConfig::new([1, 1]).init(),
            hidden,
            classifier: LinearConfig::new(head_in, self.num_classes).init(device),
            config: self.clone(),
        })
    }
}

/// The hidden classifier layer of VGG-16 for CIFAR: linear -> BN -> ReLU (not gated).
#[derive(Module, Debug)]
pub struct Hidden {
    /// Linear layer.
    pub linear: Linear,
    /// Its BatchNorm.
    pub bn: BatchNorm,
}

/// A plain CNN with a gate after every conv's BN.
#[derive(Module, Debug)]
pub struct PlainCnn {
    /// The gated conv units.
    pub convs: Vec<ConvBnGate>,
    pool: MaxPool2d,
    gap: AdaptiveAvgPool2d,
    /// Optional hidden classifier layer.
    pub hidden: Option<Hidden>,
    /// Final linear layer.
    pub classifier: Linear,
    #[module(skip)]
    config: PlainCnnConfig,
}

impl PlainCnn {
    /// Logits `[N, classes]` of images `[N, C, H, W]`.
    pub fn forward(&self, x: Tensor<4>) -> Tensor<2> {
        let mut x = x;
        for (i, unit) in self.convs.iter().enumerate() {
            x = relu(unit.forward(x));
            if self.config.pool_after.contains(&i) {
                x = self.pool.forward(x);
            }
        }
        if self.config.global_pool {
            x = self.gap.forward(x);
        }
        let mut x: Tensor<2> = x.flatten(1, 3);
        if let Some(h) = &self.hidden {
            x = relu(h.bn.forward(h.linear.forward(x)));
        }
        self.classifier.forward(x)
    }

    fn gate_name(i: usize) -> String {
        format!("conv{i}")
    }
}

impl GatedModel for PlainCnn {
    fn visit_gates(&self, f: &mut dyn FnMut(&str, &ChannelGate)) {
        for (i, unit) in self.convs.iter().enumerate() {
            f(&Self::gate_name(i), &unit.gate);
        }
    }

    fn map_gates(mut self, f: &mut dyn FnMut(&str, ChannelGate) -> ChannelGate) -> Self {
        self.convs = self
            .convs
            .into_iter()
            .enumerate()
            .map(|(i, mut unit)| {
                unit.gate = f(&Self::gate_name(i), unit.gate);
                unit
            })
            .collect();
        self
    }
}

impl Network for PlainCnn {
    type Config = PlainCnnConfig;

    fn build(config: &PlainCnnConfig, device: &Device) -> Result<Self> {
        config.init(device)
    }

    fn forward(&self, images: Tensor<4>) -> Tensor<2> {
        PlainCnn::forward(self, images)
    }

    fn classifier_group(&self) -> ParamGroup {
        ParamGroup::from_regex(r"^(hidden|classifier)\.").expect("a valid pattern")
    }

    fn config(&self) -> &PlainCnnConfig {
        &self.config
    }

    fn cost_model(&self) -> CostModel {
        let cfg = &self.config;
        let mut cost = CostModel::new();
        let mut input = Width::Fixed(cfg.in_channels);
        for (i, (unit, side)) in self.convs.iter().zip(cfg.sides()).enumerate() {
            let name = Self::gate_name(i);
            unit.add_cost(&mut cost, &name, input, [side, side]);
            input = Width::gate(name);
        }
        if let Some(h) = cfg.hidden {
            cost.linear("hidden.linear", input, Width::Fixed(h))
                .batch_norm("hidden.bn", Width::Fixed(h));
            input = Width::Fixed(h);
        }
        cost.linear("classifier", input, Width::Fixed(cfg.num_classes));
        cost
    }

    fn prune(mut self, arch: &Architecture) -> Result<Self> {
        arch.check_matches(&self)?;
        let mut keep_in: Option<Vec<usize>> = None;
        let mut widths = Vec::with_capacity(self.convs.len());
        let convs = std::mem::take(&mut self.convs);
        for (i, unit) in convs.into_iter().enumerate() {
            let keep = arch.gates[&Self::gate_name(i)].kept.clone();
            widths.push(keep.len());
            self.convs.push(unit.prune(keep_in.as_deref(), &keep));
            keep_in = Some(keep);
        }
        let keep_last = keep_in.expect("a plain CNN has at least one conv");
        match self.hidden.take() {
            Some(h) => {
                self.hidden = Some(Hidden {
                    linear: prune_linear_inputs(h.linear, &keep_last),
                    bn: h.bn,
                });
            }
            None => self.classifier = prune_linear_inputs(self.classifier, &keep_last),
        }
        self.config.widths = widths;
        Ok(self)
    }
}
