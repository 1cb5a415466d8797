//! Every family of the zoo, dense and pruned, exported to ONNX and run by tract (an independent
//! runtime): its logits equal burn's eval-mode forward on random images, at batch 1 and 3.
//! BatchNorm statistics, affine parameters and (in one case) searching gates are random, so
//! that every folding is exercised.

use burn::prelude::*;
use dnal_core::{Architecture, GateMode, GatedModel};
use dnal_onnx::ExportOptions;
use dnal_zoo::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tract_onnx::prelude::{
    Framework, InferenceModelExt, IntoRunnable, IntoTValue, tract_ndarray, tvec,
};

#[path = "../../dnal-zoo/tests/common/random.rs"]
mod random;
use random::randomised;

fn device() -> Device {
    Device::flex()
}

fn images(shape: [usize; 4], seed: u64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..shape.iter().product::<usize>())
        .map(|_| rng.random_range(-1.0..1.0))
        .collect()
}

/// Exports `net`, runs the file in tract at batch 1 and 3, and compares with burn.
fn check<N: Network>(what: &str, net: &N) {
    let [c, h, w] = net.inference_graph().unwrap().input;
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("model.onnx");
    dnal_onnx::export(net, &path, &ExportOptions::default()).unwrap();
    let runnable = tract_onnx::onnx()
        .model_for_path(&path)
        .unwrap()
        .into_optimized()
        .unwrap()
        .into_runnable()
        .unwrap();
    for batch in [1, 3] {
        let shape = [batch, c, h, w];
        let x = images(shape, batch as u64);
        let want: Vec<f32> = net
            .valid()
            .forward(Tensor::from_data(
                TensorData::new(x.clone(), shape),
                &device(),
            ))
            .into_data()
            .try_to_vec()
            .unwrap();
        let input = tract_ndarray::Array4::from_shape_vec((batch, c, h, w), x).unwrap();
        let out = runnable
            .run(tvec!(
                tract_onnx::prelude::Tensor::from(input).into_tvalue()
            ))
            .unwrap();
        let got: Vec<f32> = out[0]
            .to_plain_array_view::<f32>()
            .unwrap()
            .iter()
            .copied()
            .collect();
        assert_eq!(got.len(), want.len(), "{what}: logits shape");
        let scale = want.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
        let diff = got
            .iter()
            .zip(&want)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(
            diff <= 1e-4 * scale.max(1.0),
            "{what}, batch {batch}: tract and burn differ by {diff} (logits up to {scale})"
        );
    }
}

/// Keeps a pseudo-random subset of every gate (at least one channel of a main gate); closes
/// every third branch gate.
fn random_architecture<N: Network>(net: &N, seed: u64) -> Architecture {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut arch = Architecture::full(net);
    for (g, (_, gate)) in arch.gates.iter_mut().enumerate() {
        gate.kept = (0..gate.width).filter(|_| rng.random_bool(0.5)).collect();
        if gate.kind == dnal_core::GateKind::Branch && g % 3 == 1 {
            gate.kept.clear();
        } else if gate.kept.is_empty() {
            gate.kept.push(g % gate.width);
        }
    }
    arch
}

fn dense_and_pruned<N: Network>(what: &str, net: N, seed: u64) {
    let net = randomised(net, seed);
    check(&format!("{what} dense"), &net);
    let arch = random_architecture(&net, seed);
    let pruned = dnal_zoo::prune(net, &arch).unwrap();
    check(&format!("{what} pruned"), &pruned);
}

#[test]
fn plain_cnns_round_trip() {
    let d = device();
    dense_and_pruned(
        "MNIST CNN",
        PlainCnnConfig::mnist_cnn().init(&d).unwrap(),
        1,
    );
    // A flattened classifier with hidden layers and their BatchNorm, as VGG-16 on ImageNet.
    let cfg = PlainCnnConfig::new(3, 16, vec![8, 8, 16], vec![0, 2])
        .with_hidden(vec![12, 10])
        .with_hidden_bn(true)
        .with_num_classes(5);
    dense_and_pruned("small VGG", cfg.init(&d).unwrap(), 2);
    // Gates in search mode fold their sigmoid factors into the convolutions.
    let searching = randomised(PlainCnnConfig::mnist_cnn().init(&d).unwrap(), 3)
        .with_gate_mode(GateMode::Search)
        .with_temperature(3.0);
    check("MNIST CNN searching", &searching);
}

#[test]
fn cifar_resnets_round_trip() {
    let d = device();
    dense_and_pruned(
        "ResNet-20",
        CifarResNetConfig::new(20, 10).unwrap().init(&d).unwrap(),
        4,
    );
}

#[test]
fn resnet50_round_trips() {
    let d = device();
    let cfg = BottleneckResNetConfig::new(vec![1, 2, 1, 1], 10).unwrap();
    let cfg = BottleneckResNetConfig {
        image_size: 64,
        ..cfg
    };
    dense_and_pruned("bottleneck ResNet", cfg.init(&d).unwrap(), 5);
}

#[test]
fn mobilenets_round_trip() {
    let d = device();
    dense_and_pruned(
        "MobileNetV2 CIFAR",
        MobileNetV2Config::cifar(10).init(&d).unwrap(),
        6,
    );
    let cfg = MobileNetV2Config {
        image_size: 64,
        ..MobileNetV2Config::imagenet(10)
    };
    dense_and_pruned("MobileNetV2 ImageNet", cfg.init(&d).unwrap(), 7);
}

#[test]
fn supernets_round_trip() {
    let d = device();
    dense_and_pruned(
        "tiny supernet",
        SuperNetConfig::tiny(16, 3, 10).init(&d).unwrap(),
        8,
    );
    let cfg = SuperNetConfig {
        image_size: 32,
        ..SuperNetConfig::imagenet(10)
    };
    dense_and_pruned("ImageNet supernet at 32x32", cfg.init(&d).unwrap(), 9);
}

#[test]
fn a_bad_opset_is_refused_and_nothing_written() {
    let net = PlainCnnConfig::mnist_cnn().init(&device()).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("model.onnx");
    let opts = ExportOptions {
        opset: 9,
        ..Default::default()
    };
    let err = dnal_onnx::export(&net, &path, &opts)
        .unwrap_err()
        .to_string();
    assert!(err.contains("opset") && err.contains("11"), "{err}");
    assert!(!path.exists());
}
