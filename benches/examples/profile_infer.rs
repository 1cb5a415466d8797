//! Runs eval-mode forwards of a benchmarked network, dense or pruned to the architecture checked
//! in under `benches/architectures/`, for a profiler:
//! `profile_infer [resnet56|resnet56-thin|vgg16|mobilenetv2|mnist-cnn|resnet50] [dense|pruned]
//! [batch] [iterations] [burn|frozen]` (defaults: resnet56 pruned 64 20 burn; ResNet-50, on
//! 224 x 224 images, has no checked-in architecture and runs dense only). `frozen` runs the
//! network frozen for inference (`dnal_zoo::FrozenNetwork`) instead of burn's forward. Prints
//! the time of each forward.
use burn::prelude::*;
use dnal_core::Architecture;
use dnal_zoo::{CifarResNetConfig, MobileNetV2Config, Network, PlainCnnConfig};

dnal_kernels::global_allocator!();

fn main() {
    dnal_benches::set_up_as_the_trainer();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize, default: &str| args.get(i).cloned().unwrap_or_else(|| default.into());
    let pruned = arg(1, "pruned") == "pruned";
    let batch: usize = arg(2, "64").parse().expect("batch: a number");
    let iterations: usize = arg(3, "20").parse().expect("iterations: a number");
    let frozen = match arg(4, "burn").as_str() {
        "burn" => false,
        "frozen" => true,
        other => panic!("engine: burn or frozen, not {other}"),
    };
    let d = Device::flex();
    let cifar = [3, 32, 32];
    let resnet56 = || CifarResNetConfig::new(56, 10).unwrap().init(&d).unwrap();
    let run = |arch, image| Run {
        pruned,
        batch,
        iterations,
        image,
        arch,
        frozen,
    };
    match arg(0, "resnet56").as_str() {
        "resnet56" => run(
            include_str!("../architectures/resnet56-cifar10.json"),
            cifar,
        )
        .go(resnet56(), &d),
        "resnet56-thin" => run(
            include_str!("../architectures/resnet56-thin-cifar10.json"),
            cifar,
        )
        .go(resnet56(), &d),
        "vgg16" => run(include_str!("../architectures/vgg16-cifar10.json"), cifar)
            .go(PlainCnnConfig::vgg16_cifar(10).init(&d).unwrap(), &d),
        "mobilenetv2" => run(
            include_str!("../architectures/mobilenetv2-cifar10.json"),
            cifar,
        )
        .go(MobileNetV2Config::cifar(10).init(&d).unwrap(), &d),
        "mnist-cnn" => run(include_str!("../architectures/mnist-cnn.json"), [1, 28, 28])
            .go(PlainCnnConfig::mnist_cnn().init(&d).unwrap(), &d),
        "resnet50" => {
            assert!(
                !pruned,
                "ResNet-50 runs dense only (no checked-in architecture)"
            );
            run("", [3, 224, 224]).go(
                dnal_zoo::BottleneckResNetConfig::resnet50(1000)
                    .init(&d)
                    .unwrap(),
                &d,
            )
        }
        other => panic!("unknown network {other}"),
    }
}

struct Run {
    pruned: bool,
    batch: usize,
    iterations: usize,
    image: [usize; 3],
    arch: &'static str,
    frozen: bool,
}

impl Run {
    fn go<N: Network>(&self, net: N, device: &Device) {
        let net = if self.pruned {
            let arch = Architecture::from_json(self.arch).expect("a checked-in architecture");
            net.prune(&arch).unwrap()
        } else {
            net
        };
        let net = net.valid();
        let x = dnal_benches::image_batch(self.batch, self.image, device);
        if self.frozen {
            let frozen = dnal_zoo::FrozenNetwork::new(&net).unwrap();
            let x: Vec<f32> = x.into_data().try_to_vec().unwrap();
            for _ in 0..self.iterations {
                let t = std::time::Instant::now();
                std::hint::black_box(frozen.forward(&x).unwrap());
                println!("forward {:?}", t.elapsed());
            }
            return;
        }
        for _ in 0..self.iterations {
            let t = std::time::Instant::now();
            let _ = net.forward(x.clone()).into_data();
            println!("forward {:?}", t.elapsed());
        }
    }
}
