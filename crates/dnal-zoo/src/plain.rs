//! Plain (non-residual) CNNs: a chain of gated conv units with max-pools, then a classifier.
//! VGG-16-BN for CIFAR and for ImageNet and the small MNIST CNN of the demo are presets of this
//! one network.

use burn::module::ParamGroup;
use burn::nn::pool::{MaxPool2d, MaxPool2dConfig};
use burn::nn::{BatchNorm, BatchNormConfig, Linear, LinearConfig};
use burn::prelude::*;
use burn::tensor::activation::relu;
use dnal_core::{Architecture, ChannelGate, CostModel, GatedModel, Groups, LayerKind, Width};
use dnal_kernels::Activation;

use crate::error::{Result, ZooError};
use crate::graph::Graph;
use crate::layers::{ConvBnGate, ConvBnGateConfig, prune_linear_inputs};
use crate::network::Network;
use crate::pretrained::{KeyRules, Rename};

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
    /// Global average pool before the classifier (otherwise the last map is flattened, channel
    /// by channel, as in VGG-16 for ImageNet).
    #[config(default = false)]
    pub global_pool: bool,
    /// Hidden classifier layers (linear -> optional BN -> ReLU) before the last linear.
    #[config(default = "Vec::new()")]
    pub hidden: Vec<usize>,
    /// Whether the hidden classifier layers have a BatchNorm.
    #[config(default = true)]
    pub hidden_bn: bool,
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
            .with_hidden(vec![512])
            .with_num_classes(num_classes)
    }

    /// VGG-16-BN for ImageNet (224x224): 13 gated convs, the 7x7x512 map flattened, classifier
    /// 4096 -> 4096 -> classes without BN (dropout omitted: no parameters, no MACs); 15.47G MACs,
    /// 138.37M parameters.
    pub fn vgg16_imagenet(num_classes: usize) -> Self {
        let widths = vec![
            64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512,
        ];
        Self::new(3, 224, widths, vec![1, 3, 6, 9, 12])
            .with_hidden(vec![4096, 4096])
            .with_hidden_bn(false)
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

    /// Classifier inputs per channel of the last conv: 1 after a global pool, else the
    /// positions of the flattened last feature map.
    fn flattened_positions(&self) -> usize {
        if self.global_pool {
            1
        } else {
            self.final_side() * self.final_side()
        }
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
        if self.final_side() == 0 {
            return bad(format!(
                "{} max-pools shrink a {1}x{1} image to nothing",
                self.pool_after.len(),
                self.image_size
            ));
        }
        if self.hidden.contains(&0) {
            return bad("hidden classifier widths must be positive".into());
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
        let mut features = last * self.flattened_positions();
        let hidden = self
            .hidden
            .iter()
            .map(|&h| {
                let layer = Hidden {
                    linear: LinearConfig::new(features, h).init(device),
                    bn: self.hidden_bn.then(|| BatchNormConfig::new(h).init(device)),
                };
                features = h;
                layer
            })
            .collect();
        Ok(PlainCnn {
            convs,
            pool: MaxPool2dConfig::new([2, 2]).init(),
            hidden,
            classifier: LinearConfig::new(features, self.num_classes).init(device),
            config: self.clone(),
        })
    }
}

/// A hidden classifier layer: linear -> BN (VGG-16 for CIFAR; none for ImageNet) -> ReLU (not
/// gated).
#[derive(Module, Debug)]
pub struct Hidden {
    /// Linear layer.
    pub linear: Linear,
    /// Its BatchNorm.
    pub bn: Option<BatchNorm>,
}

/// A plain CNN with a gate after every conv's BN.
#[derive(Module, Debug)]
pub struct PlainCnn {
    /// The gated conv units.
    pub convs: Vec<ConvBnGate>,
    pool: MaxPool2d,
    /// Hidden classifier layers.
    pub hidden: Vec<Hidden>,
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
            x = unit.forward_act(x, Activation::Relu);
            if self.config.pool_after.contains(&i) {
                x = dnal_kernels::max_pool2d(&self.pool, x);
            }
        }
        let mut x: Tensor<2> = if self.config.global_pool {
            dnal_kernels::global_avg_pool(x)
        } else {
            x.flatten(1, 3)
        };
        for h in &self.hidden {
            let y = h.linear.forward(x);
            x = match &h.bn {
                // dnal's BatchNorm with the ReLU in it, the batch's features as channels of
                // 1x1 planes: on cuda and wgpu one kernel each way where burn's BatchNorm and
                // ReLU launch about ten.
                Some(bn) => {
                    let [n, f] = y.dims();
                    let y = y.reshape([n, f, 1, 1]);
                    dnal_kernels::batch_norm(bn, None, Activation::Relu, y).reshape([n, f])
                }
                None => relu(y),
            };
        }
        self.classifier.forward(x)
    }

    fn gate_name(i: usize) -> String {
        format!("conv{i}")
    }
}

impl GatedModel for PlainCnn {
    fn for_each_gate(&mut self, f: &mut dyn FnMut(&str, &mut ChannelGate)) {
        for (i, unit) in self.convs.iter_mut().enumerate() {
            f(&Self::gate_name(i), &mut unit.gate);
        }
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

    fn inference_graph(&self) -> Result<Graph> {
        let cfg = &self.config;
        let mut g = Graph::new(cfg.in_channels, cfg.image_size, cfg.num_classes);
        let mut x = 0;
        for (i, unit) in self.convs.iter().enumerate() {
            let name = format!("convs.{i}");
            x = g.conv_bn_gate(&name, x, unit, Activation::Relu, None)?;
            if cfg.pool_after.contains(&i) {
                x = g.max_pool(&name, x, &self.pool)?;
            }
        }
        x = if cfg.global_pool {
            g.pool_flatten(x)
        } else {
            g.flatten(x)
        };
        for (i, h) in self.hidden.iter().enumerate() {
            let name = format!("hidden.{i}");
            x = g.linear(&name, x, &h.linear, h.bn.as_ref())?;
            x = g.act(&name, x, Activation::Relu);
        }
        g.linear("classifier", x, &self.classifier, None)?;
        Ok(g)
    }

    /// torchvision's VGG: `features.k` holds conv, BN, ReLU at three indices and a max-pool at
    /// one; `classifier.3i` is the i-th linear layer (a ReLU and a dropout follow each hidden
    /// one). Plain CNNs with BatchNorm in the classifier or a global pool have no counterpart.
    fn torchvision_keys(&self) -> Option<KeyRules> {
        let cfg = &self.config;
        if cfg.global_pool || (cfg.hidden_bn && !cfg.hidden.is_empty()) {
            return None;
        }
        let mut rename = Vec::new();
        let mut k = 0;
        for i in 0..cfg.widths.len() {
            rename.extend(Rename::conv_bn(
                &format!("features.{k}"),
                &format!("features.{}", k + 1),
                &format!("convs.{i}"),
            ));
            k += if cfg.pool_after.contains(&i) { 4 } else { 3 };
        }
        for i in 0..cfg.hidden.len() {
            rename.push(Rename::prefix(
                &format!("classifier.{}", 3 * i),
                &format!("hidden.{i}.linear"),
            ));
        }
        rename.push(Rename::prefix(
            &format!("classifier.{}", 3 * cfg.hidden.len()),
            "classifier",
        ));
        Some(KeyRules {
            rename,
            ..KeyRules::default()
        })
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
        let side = cfg.final_side();
        let mut flattened = !cfg.global_pool && side > 1;
        for (i, &h) in cfg.hidden.iter().chain([&cfg.num_classes]).enumerate() {
            let name = if i < cfg.hidden.len() {
                format!("hidden.{i}.linear")
            } else {
                "classifier".into()
            };
            if flattened {
                // A linear layer on the flattened s x s map is an s x s convolution to a 1x1 map.
                cost.push(
                    name,
                    LayerKind::Conv2d {
                        kernel: [side, side],
                        groups: Groups::Count(1),
                        bias: true,
                        out_hw: [1, 1],
                    },
                    input,
                    Width::Fixed(h),
                );
                flattened = false;
            } else {
                cost.linear(name, input, Width::Fixed(h));
            }
            if i < cfg.hidden.len() && cfg.hidden_bn {
                cost.batch_norm(format!("hidden.{i}.bn"), Width::Fixed(h));
            }
            input = Width::Fixed(h);
        }
        cost
    }

    /// Exact without pruning: every width is a gate's or fixed.
    fn arch_cost(&self, arch: &Architecture) -> Result<dnal_core::CostReport> {
        Ok(self.cost_model().cost(Some(arch)))
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
        let per_channel = self.config.flattened_positions();
        let rows: Vec<usize> = keep_last
            .iter()
            .flat_map(|&c| c * per_channel..(c + 1) * per_channel)
            .collect();
        match self.hidden.first_mut() {
            Some(h) => {
                let linear = h.linear.clone();
                h.linear = prune_linear_inputs(linear, &rows);
            }
            None => self.classifier = prune_linear_inputs(self.classifier, &rows),
        }
        self.config.widths = widths;
        Ok(self)
    }
}
