//! From a recipe's model name to a network type, so that the generic pipeline runs on it.

use dnal_zoo::{
    BottleneckResNet, BottleneckResNetConfig, CifarResNet, CifarResNetConfig, MobileNetV2,
    MobileNetV2Config, Network, PlainCnn, PlainCnnConfig, SuperNet, SuperNetConfig,
};

use crate::config::{ModelName, TrainConfig};
use crate::data;
use crate::error::{Result, TrainError};
use crate::pipeline::{Outcome, RunOptions, Runner};

/// Calls `$body` with `$N` bound to the network type of `$cfg` and `$net` to its config.
macro_rules! with_network {
    ($cfg:expr, |$net:ident: $N:ident| $body:expr) => {{
        let (channels, size, classes) = data::shape_of(&$cfg.data, $cfg.model.num_classes)?;
        match $cfg.model.name {
            ModelName::MnistCnn => {
                type $N = PlainCnn;
                let mut $net = PlainCnnConfig::mnist_cnn().with_num_classes(classes);
                ($net.in_channels, $net.image_size) = (channels, size);
                $body
            }
            ModelName::Vgg16Cifar => {
                type $N = PlainCnn;
                let mut $net = PlainCnnConfig::vgg16_cifar(classes);
                ($net.in_channels, $net.image_size) = (channels, size);
                check_size(size, 32)?;
                $body
            }
            ModelName::Resnet20Cifar
            | ModelName::Resnet32Cifar
            | ModelName::Resnet56Cifar
            | ModelName::Resnet110Cifar => {
                type $N = CifarResNet;
                let depth = match $cfg.model.name {
                    ModelName::Resnet20Cifar => 20,
                    ModelName::Resnet32Cifar => 32,
                    ModelName::Resnet56Cifar => 56,
                    _ => 110,
                };
                let mut $net = CifarResNetConfig::new(depth, classes)?;
                ($net.in_channels, $net.image_size) = (channels, size);
                $body
            }
            ModelName::Mobilenetv2Cifar | ModelName::Mobilenetv2Imagenet => {
                type $N = MobileNetV2;
                let mut $net = if $cfg.model.name == ModelName::Mobilenetv2Cifar {
                    MobileNetV2Config::cifar(classes)
                } else {
                    MobileNetV2Config::imagenet(classes)
                };
                ($net.in_channels, $net.image_size) = (channels, size);
                $body
            }
            ModelName::Resnet50Imagenet => {
                type $N = BottleneckResNet;
                let mut $net = BottleneckResNetConfig::resnet50(classes);
                ($net.in_channels, $net.image_size) = (channels, size);
                $body
            }
            ModelName::SupernetImagenet | ModelName::SupernetCifar | ModelName::SupernetTiny => {
                type $N = SuperNet;
                let mut $net = match $cfg.model.name {
                    ModelName::SupernetImagenet => SuperNetConfig::imagenet(classes),
                    ModelName::SupernetCifar => SuperNetConfig::cifar(classes),
                    _ => SuperNetConfig::tiny(size, channels, classes),
                };
                ($net.in_channels, $net.image_size) = (channels, size);
                $body
            }
            ModelName::Vgg16Imagenet => {
                type $N = PlainCnn;
                let mut $net = PlainCnnConfig::vgg16_imagenet(classes);
                ($net.in_channels, $net.image_size) = (channels, size);
                $body
            }
        }
    }};
}

fn check_size(size: usize, want: usize) -> Result<()> {
    if size != want {
        return Err(TrainError::InvalidValue {
            key: "model.name".into(),
            message: format!(
                "this network is built for {want}x{want} images, the data set gives {size}x{size}"
            ),
        });
    }
    Ok(())
}

/// The resolved config and a summary of the network (gates, widths, MACs, parameters), without
/// reading any data (except the class folders of an image-folder data set).
pub fn dry_run(cfg: &TrainConfig) -> Result<String> {
    with_network!(cfg, |net: N| summary::<N>(cfg, &net))
}

fn summary<N: Network>(cfg: &TrainConfig, net_cfg: &N::Config) -> Result<String> {
    let device = burn::tensor::Device::default();
    let model = N::build(net_cfg, &device)?;
    let cost = model.cost_model().cost(None);
    let mut s = format!(
        "# resolved config\n{}\n# network: {:?}\n",
        cfg.to_toml(),
        cfg.model.name
    );
    s += &format!(
        "{} gated layers, {} gated channels; {} MACs, {} parameters per image\n\n",
        model.gate_names().len(),
        model.gated_channels(),
        cost.macs,
        cost.params
    );
    s += &cost.to_string();
    Ok(s)
}

/// Runs the pipeline of `cfg` (loading its data set).
pub fn run(cfg: &TrainConfig, opts: &RunOptions) -> Result<Outcome> {
    with_network!(cfg, |net: N| {
        let data = data::load(&cfg.data, cfg.seed)?;
        Runner::<N>::new(cfg, net, &data, opts)?.run()
    })
}
