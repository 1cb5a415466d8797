//! Training steps and inference of the paper's CIFAR networks.
//!
//! * `train-step/<backend>/<net>/<gates>`: forward + backward + SGD step, batch 128, CIFAR
//!   shapes; `search` is the architecture stage's gated network (every gate computing
//!   sigmoid(beta * alpha)), `bypass` the same network with its gates off (the plain network).
//!   On flex, `search-burn-ops` and `bypass-burn-ops` time the same steps with dnal's flex
//!   convolution and BatchNorm turned off (burn's own; the gate still folded into BatchNorm).
//! * `inference/<backend>/<net>-<r>x-fewer-macs/<dense|pruned>/batch-<n>`: eval-mode forward of
//!   the dense network and of the network pruned to the fixed architecture checked in under
//!   `benches/architectures/` (ResNet-56: 3.39x fewer MACs, a thin ResNet-56: 7.23x, VGG-16:
//!   1.90x, MobileNetV2: 2.50x, see `examples/write_architectures.rs`; the MNIST demo's CNN:
//!   4.28x, the architecture `cargo xtask train` derives). `benches/reference/pytorch_reference.py`
//!   times the same networks and widths in PyTorch.
//!   `frozen-dense` and `frozen-pruned` (flex only) time the same networks frozen for
//!   inference (`dnal_zoo::FrozenNetwork`: BatchNorm folded, weights packed once, no burn
//!   tensors), as `dnal-train predict` runs them.
//! * `inference-rounded/<backend>/<net>/round-<k>/batch-<n>`: eval-mode forward of ResNet-56
//!   and MobileNetV2 (CIFAR) pruned to an irregular searched-like architecture
//!   (`dnal_benches::searched_states`), its widths rounded up to multiples of `k`
//!   (`arch.round_to`; 1: as derived).

use burn::optim::momentum::MomentumConfig;
use burn::optim::{GradientsParams, SgdConfig};
use burn::prelude::*;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use dnal_benches::cpu_backends;
use dnal_core::GateMode;
use dnal_core::{Architecture, BackendKind};
use dnal_zoo::{CifarResNetConfig, FrozenNetwork, MobileNetV2Config, Network, PlainCnnConfig};

dnal_kernels::global_allocator!();

/// A network of the benchmark: its name, a builder of fresh instances, the architecture to
/// prune it to, the shape of one input image, and whether the training step is timed too.
struct NetCase {
    name: &'static str,
    build: Box<dyn Fn() -> Box<dyn BenchNet>>,
    arch: &'static str,
    image: [usize; 3],
    train: bool,
}

fn nets(device: &Device) -> Vec<NetCase> {
    let case = |name, build: fn(&Device) -> Box<dyn BenchNet>, arch, image, train| {
        let d = device.clone();
        NetCase {
            name,
            build: Box::new(move || build(&d)),
            arch,
            image,
            train,
        }
    };
    let resnet56 = |d: &Device| -> Box<dyn BenchNet> {
        Box::new(CifarResNetConfig::new(56, 10).unwrap().init(d).unwrap())
    };
    const CIFAR: [usize; 3] = [3, 32, 32];
    vec![
        case(
            "resnet56",
            resnet56,
            include_str!("../architectures/resnet56-cifar10.json"),
            CIFAR,
            true,
        ),
        // 7.2x fewer MACs, 6 channels per block in the first stage: a high-lambda result.
        case(
            "resnet56-thin",
            resnet56,
            include_str!("../architectures/resnet56-thin-cifar10.json"),
            CIFAR,
            false,
        ),
        case(
            "vgg16",
            |d| Box::new(PlainCnnConfig::vgg16_cifar(10).init(d).unwrap()),
            include_str!("../architectures/vgg16-cifar10.json"),
            CIFAR,
            true,
        ),
        // The training step is `profile_step mobilenetv2` (one step takes seconds).
        case(
            "mobilenetv2",
            |d| Box::new(MobileNetV2Config::cifar(10).init(d).unwrap()),
            include_str!("../architectures/mobilenetv2-cifar10.json"),
            CIFAR,
            false,
        ),
        // The architecture `cargo xtask train` derives on the bundled digits.
        case(
            "mnist-cnn",
            |d| Box::new(PlainCnnConfig::mnist_cnn().init(d).unwrap()),
            include_str!("../architectures/mnist-cnn.json"),
            [1, 28, 28],
            false,
        ),
    ]
}

/// What the benchmark does with a network, object-safe.
trait BenchNet {
    fn train_step(&mut self, mode: GateMode, x: Tensor<4>, y: Tensor<1, Int>);
    /// The eval-mode forward of a network already in eval mode (see `valid`).
    fn infer(&self, x: Tensor<4>);
    /// The network in eval mode, made once, as inference code does (`latency_ms`, `predict`).
    fn valid(&self) -> Box<dyn BenchNet>;
    /// The network pruned to `arch`, in eval mode, and its MACs reduction.
    fn pruned(&self, arch: &Architecture) -> (Box<dyn BenchNet>, f64);
    /// The network frozen for inference.
    fn frozen(&self) -> FrozenNetwork;
}

impl<N: Network + 'static> BenchNet for N {
    fn train_step(&mut self, mode: GateMode, x: Tensor<4>, y: Tensor<1, Int>) {
        let net = self.clone().with_gate_mode(mode).with_temperature(100.0);
        let loss = burn::nn::loss::CrossEntropyLossConfig::new()
            .init(&x.device())
            .forward(net.forward(x), y);
        let grads = GradientsParams::from_grads(loss.backward(), &net);
        let mut sgd = SgdConfig::new()
            .with_momentum(Some(MomentumConfig::new().with_dampening(0.0)))
            .init();
        *self = sgd.step(0.01, net, grads);
    }

    fn infer(&self, x: Tensor<4>) {
        let _ = self.forward(x).into_data();
    }

    fn valid(&self) -> Box<dyn BenchNet> {
        Box::new(Module::valid(self))
    }

    fn pruned(&self, arch: &Architecture) -> (Box<dyn BenchNet>, f64) {
        let full = self.cost_model().cost(None).macs as f64;
        let pruned = self.clone().prune(arch).unwrap();
        let achieved = full / pruned.cost_model().cost(None).macs as f64;
        (Box::new(pruned.valid()), achieved)
    }

    fn frozen(&self) -> FrozenNetwork {
        FrozenNetwork::new(self).unwrap()
    }
}

fn train_step(c: &mut Criterion) {
    dnal_benches::set_up_as_the_trainer();
    for (backend, device) in cpu_backends() {
        let device = device.autodiff();
        let (x, y) = dnal_benches::cifar_batch(128, &device);
        for NetCase { name, build, .. } in nets(&device).into_iter().filter(|n| n.train) {
            let mut group = c.benchmark_group(format!("train-step/{backend}/{name}"));
            group.sample_size(10);
            group.throughput(Throughput::Elements(128));
            // dnal's flex operations (the default), then burn's own convolution and BatchNorm
            // (flex only: other backends always use burn's).
            let variants: &[bool] = if backend == BackendKind::Flex {
                &[true, false]
            } else {
                &[true]
            };
            for &kernels in variants {
                dnal_kernels::set_enabled(kernels);
                let suffix = if kernels { "" } else { "-burn-ops" };
                for mode in [GateMode::Search, GateMode::Bypass] {
                    let mut net = build();
                    let name = format!("{mode:?}{suffix}").to_lowercase();
                    group.bench_function(name, |b| {
                        b.iter(|| net.train_step(mode, x.clone(), y.clone()))
                    });
                }
            }
            dnal_kernels::set_enabled(true);
            group.finish();
        }
    }
}

fn inference(c: &mut Criterion) {
    dnal_benches::set_up_as_the_trainer();
    for (backend, device) in cpu_backends() {
        for NetCase {
            name,
            build,
            arch,
            image,
            ..
        } in nets(&device)
        {
            let arch = Architecture::from_json(arch).expect("a checked-in architecture");
            let dense = build();
            let (pruned, achieved) = dense.pruned(&arch);
            let dense = dense.valid();
            let mut group = c.benchmark_group(format!(
                "inference/{backend}/{name}-{achieved:.2}x-fewer-macs"
            ));
            group.sample_size(10);
            for batch in [1, 64] {
                let x = dnal_benches::image_batch(batch, image, &device);
                group.throughput(Throughput::Elements(batch as u64));
                group.bench_function(format!("dense/batch-{batch}"), |b| {
                    b.iter(|| dense.infer(x.clone()))
                });
                group.bench_function(format!("pruned/batch-{batch}"), |b| {
                    b.iter(|| pruned.infer(x.clone()))
                });
                if backend != BackendKind::Flex {
                    continue;
                }
                let values: Vec<f32> = x.into_data().try_to_vec().unwrap();
                for (kind, net) in [("dense", &dense), ("pruned", &pruned)] {
                    let frozen = net.frozen();
                    group.bench_function(format!("frozen-{kind}/batch-{batch}"), |b| {
                        b.iter(|| frozen.forward(&values).unwrap())
                    });
                }
            }
            group.finish();
        }
    }
}

/// A network's name, the network, and searched-like gate states to derive its widths from.
type RoundedCase = (
    &'static str,
    Box<dyn BenchNet>,
    Vec<(String, dnal_core::GateState)>,
);

fn inference_rounded(c: &mut Criterion) {
    dnal_benches::set_up_as_the_trainer();
    let device = Device::flex();
    let nets: Vec<RoundedCase> = {
        let resnet = CifarResNetConfig::new(56, 10)
            .unwrap()
            .init(&device)
            .unwrap();
        let mobilenet = MobileNetV2Config::cifar(10).init(&device).unwrap();
        let (rs, ms) = (
            dnal_benches::searched_states(&resnet, 1),
            dnal_benches::searched_states(&mobilenet, 2),
        );
        vec![
            ("resnet56", Box::new(resnet), rs),
            ("mobilenetv2", Box::new(mobilenet), ms),
        ]
    };
    for (name, dense, states) in nets {
        let derived = dnal_core::derive_from_states(
            states.iter().map(|(n, s)| (n.as_str(), s)),
            dnal_core::DEFAULT_THRESHOLD,
        )
        .unwrap();
        let mut group = c.benchmark_group(format!("inference-rounded/flex/{name}"));
        group.sample_size(10);
        for k in [1, 8, 16] {
            let mut arch = derived.clone();
            let added = arch
                .round_widths(states.iter().map(|(n, s)| (n.as_str(), s)), k)
                .unwrap();
            let (pruned, fewer) = dense.pruned(&arch);
            eprintln!("{name} round-{k}: {added} channels added, {fewer:.2}x fewer MACs");
            for batch in [1, 64] {
                let (x, _) = dnal_benches::cifar_batch(batch, &device);
                group.throughput(Throughput::Elements(batch as u64));
                group.bench_function(format!("round-{k}/batch-{batch}"), |b| {
                    b.iter(|| pruned.infer(x.clone()))
                });
            }
        }
        group.finish();
    }
}

criterion_group!(benches, inference, inference_rounded, train_step);
criterion_main!(benches);
