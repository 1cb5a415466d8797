//! Every family of the zoo in small networks, dense and pruned, with random BatchNorm
//! statistics and affine parameters and random gate alphas, so that every folding of an
//! eval-mode computation is exercised: what the tests of exporters and of frozen networks run
//! their checks on. Shared with `dnal-onnx`'s tests (included there by path).

use burn::module::{ModuleMapper, Param};
use burn::prelude::*;
use dnal_core::{Architecture, GateKind, GateMode, GatedModel};
use dnal_zoo::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// A check of one network in eval mode (its logits against burn's forward).
pub trait Check {
    /// Checks `net`; `what` names it in failures.
    fn check<N: Network>(&self, what: &str, net: &N);
}

/// Runs `c` on `net` with random parameters and on a pruned copy of it.
fn dense_and_pruned<N: Network>(c: &impl Check, what: &str, net: N, seed: u64) {
    let net = randomised(net, seed);
    c.check(&format!("{what} dense"), &net);
    let arch = random_architecture(&net, seed);
    let pruned = dnal_zoo::prune(net, &arch).unwrap();
    c.check(&format!("{what} pruned"), &pruned);
}

/// The MNIST CNN, a small VGG-style network with a flattened classifier and hidden layers with
/// BatchNorm (as VGG-16 on ImageNet), and the MNIST CNN with searching gates, whose sigmoid
/// factors fold into the convolutions.
pub fn plain_cnns(d: &Device, c: &impl Check) {
    dense_and_pruned(
        c,
        "MNIST CNN",
        PlainCnnConfig::mnist_cnn().init(d).unwrap(),
        1,
    );
    let cfg = PlainCnnConfig::new(3, 16, vec![8, 8, 16], vec![0, 2])
        .with_hidden(vec![12, 10])
        .with_hidden_bn(true)
        .with_num_classes(5);
    dense_and_pruned(c, "small VGG", cfg.init(d).unwrap(), 2);
    let searching = randomised(PlainCnnConfig::mnist_cnn().init(d).unwrap(), 3)
        .with_gate_mode(GateMode::Search)
        .with_temperature(3.0);
    c.check("MNIST CNN searching", &searching);
}

/// ResNet-20.
pub fn cifar_resnets(d: &Device, c: &impl Check) {
    let net = CifarResNetConfig::new(20, 10).unwrap().init(d).unwrap();
    dense_and_pruned(c, "ResNet-20", net, 4);
}

/// A ResNet-50-style network of 1-2 bottlenecks per stage on 64x64 images.
pub fn bottleneck_resnets(d: &Device, c: &impl Check) {
    let cfg = BottleneckResNetConfig::new(vec![1, 2, 1, 1], 10).unwrap();
    let cfg = BottleneckResNetConfig {
        image_size: 64,
        ..cfg
    };
    dense_and_pruned(c, "bottleneck ResNet", cfg.init(d).unwrap(), 5);
}

/// MobileNetV2 for CIFAR, and for ImageNet on 64x64 images.
pub fn mobilenets(d: &Device, c: &impl Check) {
    let cifar = MobileNetV2Config::cifar(10).init(d).unwrap();
    dense_and_pruned(c, "MobileNetV2 CIFAR", cifar, 6);
    let cfg = MobileNetV2Config {
        image_size: 64,
        ..MobileNetV2Config::imagenet(10)
    };
    dense_and_pruned(c, "MobileNetV2 ImageNet", cfg.init(d).unwrap(), 7);
}

/// A tiny supernet and the ImageNet supernet on 32x32 images.
pub fn supernets(d: &Device, c: &impl Check) {
    let tiny = SuperNetConfig::tiny(16, 3, 10).init(d).unwrap();
    dense_and_pruned(c, "tiny supernet", tiny, 8);
    let cfg = SuperNetConfig {
        image_size: 32,
        ..SuperNetConfig::imagenet(10)
    };
    dense_and_pruned(c, "ImageNet supernet at 32x32", cfg.init(d).unwrap(), 9);
}

/// Keeps a pseudo-random subset of every gate (at least one channel of a main gate); closes
/// every third branch gate.
fn random_architecture<N: Network>(net: &N, seed: u64) -> Architecture {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut arch = Architecture::full(net);
    for (g, (_, gate)) in arch.gates.iter_mut().enumerate() {
        gate.kept = (0..gate.width).filter(|_| rng.random_bool(0.5)).collect();
        if gate.kind == GateKind::Branch && g % 3 == 1 {
            gate.kept.clear();
        } else if gate.kept.is_empty() {
            gate.kept.push(g % gate.width);
        }
    }
    arch
}

/// Random images `[N, C, H, W]` in [-1, 1).
pub fn images(shape: [usize; 4], seed: u64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..shape.iter().product::<usize>())
        .map(|_| rng.random_range(-1.0..1.0))
        .collect()
}

/// Panics unless `got` equals `want` within 1e-4 of the logits' scale.
pub fn assert_logits_close(what: &str, batch: usize, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: logits shape");
    let scale = want.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
    let diff = got
        .iter()
        .zip(want)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(
        diff <= 1e-4 * scale.max(1.0),
        "{what}, batch {batch}: logits differ from burn's by {diff} (logits up to {scale})"
    );
}

/// Burn's eval-mode logits of `net` on `x` (`shape`).
pub fn burn_logits<N: Network>(net: &N, x: &[f32], shape: [usize; 4], d: &Device) -> Vec<f32> {
    net.valid()
        .forward(Tensor::from_data(TensorData::new(x.to_vec(), shape), d))
        .into_data()
        .try_to_vec()
        .unwrap()
}

/// Random BatchNorm statistics and affine parameters, random gate alphas.
pub struct Randomise {
    rng: StdRng,
    path: Vec<(String, String)>,
}

impl ModuleMapper for Randomise {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.path.push((name.into(), container_type.into()));
    }

    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.pop();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let Some((field, owner)) = self.path.last().cloned() else {
            return param;
        };
        let (lo, hi) = match (owner.as_str(), field.as_str()) {
            ("Struct:BatchNorm", "running_var") => (0.5, 2.0),
            ("Struct:BatchNorm", "gamma") => (0.5, 1.5),
            ("Struct:BatchNorm", _) => (-0.3, 0.3),
            ("Struct:ChannelGate", "alpha") => (-1.0, 1.0),
            _ => return param,
        };
        let rng = &mut self.rng;
        param.map(|t| {
            let shape = t.shape();
            let n = shape.num_elements();
            let v: Vec<f32> = (0..n).map(|_| rng.random_range(lo..hi)).collect();
            Tensor::from_data(TensorData::new(v, shape), &t.device())
        })
    }
}

pub fn randomised<N: Network>(net: N, seed: u64) -> N {
    let net = dnal_zoo::init::seeded(net, seed);
    net.map(&mut Randomise {
        rng: StdRng::seed_from_u64(seed + 1),
        path: Vec::new(),
    })
}
