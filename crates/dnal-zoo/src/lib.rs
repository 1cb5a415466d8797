//! # dnal-zoo
//!
//! The networks of the DNAL paper with channel gates where DNAL puts them, built from configs
//! of widths so that a pruned network is the same type as the full one. Each implements
//! [`dnal_core::GatedModel`] (so the trainer can drive its gates) and [`Network`] (config,
//! cost model, physical pruning).
//!
//! The families: plain CNNs ([`PlainCnn`]: VGG-16 for CIFAR and ImageNet, the MNIST demo CNN),
//! CIFAR ResNets ([`CifarResNet`]: ResNet-20/32/44/56/110), bottleneck ResNets
//! ([`BottleneckResNet`]: ResNet-50), [`MobileNetV2`] (CIFAR and ImageNet) and the ProxylessNAS
//! supernet ([`SuperNet`]). They share the gated unit ([`ConvBnGate`]), the MBConv unit
//! ([`mbconv::MbConv`]) and the residual-stream code ([`stream`]); their convolutions and
//! BatchNorms run through `dnal-kernels`.

pub mod bottleneck;
pub mod compare;
pub mod error;
#[cfg(feature = "flex")]
pub mod frozen;
pub mod graph;
pub mod inference;
pub mod init;
pub mod layers;
pub mod mbconv;
pub mod mobilenet;
pub mod network;
pub mod plain;
pub mod pretrained;
pub mod resnet;
pub mod stream;
pub mod supernet;

pub use bottleneck::{BottleneckResNet, BottleneckResNetConfig, BottleneckWidths};
pub use error::{Result, ZooError};
#[cfg(feature = "flex")]
pub use frozen::FrozenNetwork;
pub use graph::{ConvSpec, Graph, Node, Op, Place, Value};
pub use inference::Inference;
pub use layers::{ConvBnGate, ConvBnGateConfig};
pub use mobilenet::{MbBlockWidths, MbStage, MobileNetV2, MobileNetV2Config};
pub use network::{
    Network, StructureGrid, counted_params, load, load_safetensors, prune, save, save_safetensors,
};
pub use plain::{PlainCnn, PlainCnnConfig};
pub use pretrained::{
    Base, KeyMap, KeyMapper, KeyRules, Layout, Loaded, Rename, check_pretrained, load_pretrained,
};
pub use resnet::{BlockWidths, CifarResNet, CifarResNetConfig};
pub use supernet::{CandidateWidths, SuperNet, SuperNetConfig};
