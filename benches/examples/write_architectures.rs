//! Writes the fixed architectures the inference benchmark and the PyTorch reference time:
//! `cargo run --release -p dnal-benches --example write_architectures` rewrites
//! `benches/architectures/{resnet56,resnet56-thin,vgg16,mobilenetv2}-cifar10.json`.
//!
//! Each keeps the first `ceil(r * width)` channels of every gate, with the one keep ratio `r`
//! whose MACs reduction is closest to the paper's lambda = 1e-4 rows (ResNet-56: 3.4x fewer
//! MACs, VGG-16: 1.9x, MobileNetV2: 2.5x), or, for the thin ResNet-56, to the 7.25x of a
//! high-lambda run (single digit widths in the first stage). They are synthetic (no CIFAR
//! training runs on this project's CI machines); a derived architecture from a real run can
//! replace any of them. `mnist-cnn.json` is not written here: it is the architecture that
//! `cargo xtask train` derives on the bundled digits (`runs/mnist-demo/architecture.json`).

use burn::prelude::*;
use dnal_zoo::compare::scaled_architecture;
use dnal_zoo::{CifarResNetConfig, MobileNetV2Config, Network, PlainCnnConfig};
use std::path::Path;

fn write<N: Network>(net: &N, target: f64, path: &Path) {
    let full = net.cost_model().cost(None).macs as f64;
    let reduction = |r: f64| {
        full / net
            .arch_cost(&scaled_architecture(net, r).unwrap())
            .unwrap()
            .macs as f64
    };
    let r = (20..=100)
        .map(|step| step as f64 / 100.0)
        .min_by(|a, b| {
            (reduction(*a) - target)
                .abs()
                .total_cmp(&(reduction(*b) - target).abs())
        })
        .expect("a ratio");
    scaled_architecture(net, r).unwrap().save(path).unwrap();
    println!(
        "{}: keep ratio {r:.2}, {:.2}x fewer MACs",
        path.display(),
        reduction(r)
    );
}

fn main() {
    let device = Device::flex();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("architectures");
    std::fs::create_dir_all(&dir).unwrap();
    let resnet = CifarResNetConfig::new(56, 10)
        .unwrap()
        .init(&device)
        .unwrap();
    write(&resnet, 3.4, &dir.join("resnet56-cifar10.json"));
    write(&resnet, 7.25, &dir.join("resnet56-thin-cifar10.json"));
    let vgg = PlainCnnConfig::vgg16_cifar(10).init(&device).unwrap();
    write(&vgg, 1.9, &dir.join("vgg16-cifar10.json"));
    let mobilenet = MobileNetV2Config::cifar(10).init(&device).unwrap();
    write(&mobilenet, 2.49, &dir.join("mobilenetv2-cifar10.json"));
}
