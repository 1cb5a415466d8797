//! Every network a recipe can name, in one place: its name in `[model] name`, its network type
//! and how its config is built for a data set's image shape. Adding a model is one family file
//! in dnal-zoo, one line here and one recipe in `configs/` (a test checks that every model has
//! a recipe and every recipe a model).

use dnal_zoo::{
    BottleneckResNet, BottleneckResNetConfig, CifarResNet, CifarResNetConfig, MobileNetV2,
    MobileNetV2Config, Network, PlainCnn, PlainCnnConfig, SuperNet, SuperNetConfig,
};
use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};

/// The images a network is built for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImageShape {
    /// Input channels.
    pub channels: usize,
    /// Height and width.
    pub size: usize,
    /// Classes.
    pub classes: usize,
}

/// Code that runs on the network type a recipe names, with no config of its own (a saved
/// network brings its config; see [`ModelName::with_type`]).
pub trait WithType {
    /// What it returns.
    type Output;
    /// Runs on the network type `N`.
    fn run<N: Network>(self) -> Result<Self::Output>;
}

/// Code that runs on the network type a recipe names (see [`ModelName::with`]).
pub trait WithNetwork {
    /// What it returns.
    type Output;
    /// Runs on the network type `N`, built from `config`.
    fn run<N: Network>(self, config: N::Config) -> Result<Self::Output>;
}

macro_rules! registry {
    ($($(#[doc = $doc:literal])* $name:ident => $ty:ty = |$shape:ident| $config:expr;)*) => {
        /// The network to train.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
        #[serde(rename_all = "kebab-case")]
        pub enum ModelName {
            $($(#[doc = $doc])* $name,)*
        }

        impl ModelName {
            /// Every registered network.
            pub const ALL: &[ModelName] = &[$(ModelName::$name),*];

            /// Runs `f` on this network's type with its config for images of `shape`.
            pub fn with<F: WithNetwork>(self, shape: ImageShape, f: F) -> Result<F::Output> {
                match self {
                    $(ModelName::$name => {
                        let $shape = shape;
                        let mut config: <$ty as Network>::Config = $config;
                        (config.in_channels, config.image_size) = (shape.channels, shape.size);
                        f.run::<$ty>(config)
                    })*
                }
            }

            /// The name a recipe gives it (`[model] name`).
            pub fn name(self) -> String {
                serde_json::to_value(self)
                    .ok()
                    .and_then(|v| v.as_str().map(String::from))
                    .expect("a unit variant serialises as its name")
            }

            /// The model called `name`, or an error listing every name.
            pub fn parse(name: &str) -> Result<Self> {
                serde_json::from_value(serde_json::Value::String(name.into())).map_err(|_| {
                    let all: Vec<String> = Self::ALL.iter().map(|m| m.name()).collect();
                    TrainError::from(dnal_core::CoreError::invalid(
                        "model",
                        format!("`{name}` is not a network; one of {}", all.join(", ")),
                    ))
                })
            }

            /// Runs `f` on this model's network type.
            pub fn with_type<F: WithType>(self, f: F) -> Result<F::Output> {
                match self {
                    $(ModelName::$name => f.run::<$ty>(),)*
                }
            }
        }
    };
}

registry! {
    /// The MNIST demo CNN: gated convs 32-32-64-64, global pool, linear.
    MnistCnn => PlainCnn = |s| PlainCnnConfig::mnist_cnn().with_num_classes(s.classes);
    /// VGG-16-BN for CIFAR (13 gated convs, classifier 512-512-classes).
    Vgg16Cifar => PlainCnn = |s| {
        check_size(s.size, 32)?;
        PlainCnnConfig::vgg16_cifar(s.classes)
    };
    /// ResNet-20 for CIFAR (basic blocks, parameter-free shortcuts).
    Resnet20Cifar => CifarResNet = |s| CifarResNetConfig::new(20, s.classes)?;
    /// ResNet-32 for CIFAR.
    Resnet32Cifar => CifarResNet = |s| CifarResNetConfig::new(32, s.classes)?;
    /// ResNet-56 for CIFAR.
    Resnet56Cifar => CifarResNet = |s| CifarResNetConfig::new(56, s.classes)?;
    /// ResNet-110 for CIFAR.
    Resnet110Cifar => CifarResNet = |s| CifarResNetConfig::new(110, s.classes)?;
    /// MobileNetV2 for CIFAR (32x32).
    Mobilenetv2Cifar => MobileNetV2 = |s| MobileNetV2Config::cifar(s.classes);
    /// MobileNetV2 for ImageNet (224x224).
    Mobilenetv2Imagenet => MobileNetV2 = |s| MobileNetV2Config::imagenet(s.classes);
    /// VGG-16-BN for ImageNet (224x224, flattened classifier 4096-4096-classes).
    Vgg16Imagenet => PlainCnn = |s| PlainCnnConfig::vgg16_imagenet(s.classes);
    /// ResNet-50 for ImageNet (bottleneck blocks, projection shortcuts).
    Resnet50Imagenet => BottleneckResNet = |s| BottleneckResNetConfig::resnet50(s.classes);
    /// The ProxylessNAS supernet for ImageNet (6 candidate MBConv ops per block).
    SupernetImagenet => SuperNet = |s| SuperNetConfig::imagenet(s.classes);
    /// The supernet for 32x32 images (stem and first stage at stride 1; beyond the paper).
    SupernetCifar => SuperNet = |s| SuperNetConfig::cifar(s.classes);
    /// A reduced supernet (stages 8-16, 2 blocks each, last conv 32) for small images and tests.
    SupernetTiny => SuperNet = |s| SuperNetConfig::tiny(s.size, s.channels, s.classes);
}

fn check_size(size: usize, want: usize) -> Result<()> {
    if size != want {
        return Err(TrainError::from(dnal_core::CoreError::invalid(
            "model.name",
            format!(
                "this network is built for {want}x{want} images, the data set gives {size}x{size}"
            ),
        )));
    }
    Ok(())
}
