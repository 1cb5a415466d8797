//! Runs eval-mode forwards of ResNet-56 or VGG-16, dense or pruned to the architecture checked in
//! under `benches/architectures/`, for a profiler:
//! `profile_infer [resnet56|vgg16] [dense|pruned] [batch] [iterations]` (defaults: resnet56
//! pruned 64 20). Prints the time of each forward.
use burn::prelude::*;
use dnal_core::Architecture;
use dnal_zoo::{CifarResNetConfig, Network, PlainCnnConfig};

dnal_kernels::global_allocator!();

fn main() {
    dnal_benches::keep_freed_memory();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize, default: &str| args.get(i).cloned().unwrap_or_else(|| default.into());
    let pruned = arg(1, "pruned") == "pruned";
    let batch: usize = arg(2, "64").parse().expect("batch: a number");
    let iterations: usize = arg(3, "20").parse().expect("iterations: a number");
    let device = Device::flex();
    match arg(0, "resnet56").as_str() {
        "vgg16" => run(
            PlainCnnConfig::vgg16_cifar(10).init(&device).unwrap(),
            include_str!("../architectures/vgg16-cifar10.json"),
            pruned,
            batch,
            iterations,
            &device,
        ),
        _ => run(
            CifarResNetConfig::new(56, 10)
                .unwrap()
                .init(&device)
                .unwrap(),
            include_str!("../architectures/resnet56-cifar10.json"),
            pruned,
            batch,
            iterations,
            &device,
        ),
    }
}

fn run<N: Network>(
    net: N,
    arch: &str,
    pruned: bool,
    batch: usize,
    iterations: usize,
    device: &Device,
) {
    let net = if pruned {
        let arch = Architecture::from_json(arch).expect("a checked-in architecture");
        net.prune(&arch).unwrap()
    } else {
        net
    };
    let net = net.valid();
    let (x, _) = dnal_benches::cifar_batch(batch, device);
    for _ in 0..iterations {
        let t = std::time::Instant::now();
        let _ = net.forward(x.clone()).into_data();
        println!("forward {:?}", t.elapsed());
    }
}
