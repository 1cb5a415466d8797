//! Runs a few training steps of gated ResNet-56 (or VGG-16 / MobileNetV2-CIFAR: second argument
//! `vgg16` / `mobilenetv2`), batch 128, or of ResNet-50 (`resnet50`: 224x224, 1000 classes,
//! batch 64), for a profiler:
//! `cargo build --release -p dnal-benches --example profile_step && perf record --call-graph dwarf target/release/examples/profile_step 1`.
//! Prints the forward, backward and total time of each step; `DNAL_BURN_OPS=1` uses burn's own
//! convolution and BatchNorm instead of dnal's, `DNAL_GATES=bypass` turns the gates off. A third
//! argument `pruned` trains the network pruned to its architecture under
//! `benches/architectures/` instead (`resnet56-thin`: the thin one), gates bypassed, as the
//! final stage does.
use burn::optim::{GradientsParams, SgdConfig};
use burn::prelude::*;
use dnal_core::{Architecture, GateMode};
use dnal_zoo::{
    BottleneckResNetConfig, CifarResNetConfig, MobileNetV2Config, Network, PlainCnnConfig,
};

dnal_kernels::global_allocator!();

fn main() {
    dnal_benches::set_up_as_the_trainer();
    let mut args = std::env::args().skip(1);
    let steps: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(3);
    let device = Device::flex().autodiff();
    dnal_kernels::set_enabled(std::env::var("DNAL_BURN_OPS").is_err());
    let which = args.next().unwrap_or_else(|| "resnet56".into());
    let pruned = match args.next().as_deref() {
        None | Some("dense") => false,
        Some("pruned") => true,
        Some(other) => panic!("dense or pruned, not {other}"),
    };
    let arch = |json: &str| {
        pruned.then(|| Architecture::from_json(json).expect("a checked-in architecture"))
    };
    let resnet56 = || {
        CifarResNetConfig::new(56, 10)
            .unwrap()
            .init(&device)
            .unwrap()
    };
    let cifar = dnal_benches::cifar_batch(128, &device);
    match which.as_str() {
        "resnet50" => {
            assert!(!pruned, "no pruned ResNet-50 architecture is checked in");
            let x = dnal_benches::image_batch(64, [3, 224, 224], &device);
            let labels = (0..64i64).map(|i| (i * 37) % 1000).collect();
            let y = Tensor::<1, Int>::from_data(TensorData::new(labels, [64]), &device);
            run(
                BottleneckResNetConfig::resnet50(1000)
                    .init(&device)
                    .unwrap(),
                None,
                (x, y),
                steps,
                &device,
            )
        }
        "vgg16" => run(
            PlainCnnConfig::vgg16_cifar(10).init(&device).unwrap(),
            arch(include_str!("../architectures/vgg16-cifar10.json")),
            cifar,
            steps,
            &device,
        ),
        "mobilenetv2" => run(
            MobileNetV2Config::cifar(10).init(&device).unwrap(),
            arch(include_str!("../architectures/mobilenetv2-cifar10.json")),
            cifar,
            steps,
            &device,
        ),
        "resnet56" => run(
            resnet56(),
            arch(include_str!("../architectures/resnet56-cifar10.json")),
            cifar,
            steps,
            &device,
        ),
        "resnet56-thin" => run(
            resnet56(),
            arch(include_str!("../architectures/resnet56-thin-cifar10.json")),
            cifar,
            steps,
            &device,
        ),
        other => panic!("unknown network {other}"),
    }
}

fn run<N: Network>(
    net: N,
    arch: Option<Architecture>,
    (x, y): (Tensor<4>, Tensor<1, Int>),
    steps: usize,
    device: &Device,
) {
    let mode = match std::env::var("DNAL_GATES").as_deref() {
        Ok("bypass") => GateMode::Bypass,
        _ if arch.is_some() => GateMode::Bypass,
        _ => GateMode::Search,
    };
    let mut net = match arch {
        Some(arch) => net.prune(&arch).unwrap(),
        None => net,
    };
    let mut sgd = SgdConfig::new().init();
    for _ in 0..steps {
        let t = std::time::Instant::now();
        let step = net.clone().with_gate_mode(mode).with_temperature(100.0);
        let loss = burn::nn::loss::CrossEntropyLossConfig::new()
            .init(device)
            .forward(step.forward(x.clone()), y.clone());
        let t_fwd = t.elapsed();
        let grads = GradientsParams::from_grads(loss.backward(), &step);
        let t_bwd = t.elapsed();
        net = sgd.step(0.01, step, grads);
        let _ = device.sync();
        println!(
            "forward {:?} backward {:?} total {:?}",
            t_fwd,
            t_bwd - t_fwd,
            t.elapsed()
        );
    }
}
