//! Every family, dense and pruned, frozen for inference: the frozen network's logits equal
//! burn's eval-mode forward on random images at batch 1 and 3, with random BatchNorm
//! statistics and affine parameters (and, in one case, searching gates), so that every
//! folding and every fused step is exercised.

mod common;

use burn::prelude::*;
use common::random::randomised;
use common::{device, noise, random_architecture};
use dnal_core::{GateMode, GatedModel};
use dnal_zoo::*;

/// The frozen network's logits against burn's at batch 1 and 3; returns the frozen network.
fn check<N: Network>(what: &str, net: &N) -> FrozenNetwork {
    let frozen = FrozenNetwork::new(net).unwrap();
    let [c, h, w] = frozen.input_shape();
    for batch in [1, 3] {
        let shape = [batch, c, h, w];
        let x = noise(shape.iter().product(), batch as u64, -1.0, 1.0);
        let images = Tensor::from_data(TensorData::new(x.clone(), shape), &device());
        let want: Vec<f32> = net
            .valid()
            .forward(images)
            .into_data()
            .try_to_vec()
            .unwrap();
        let got = frozen.forward(&x).unwrap();
        assert_eq!(got.len(), want.len(), "{what}: logits shape");
        let scale = want.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
        let diff = got
            .iter()
            .zip(&want)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(
            diff <= 1e-4 * scale.max(1.0),
            "{what}, batch {batch}: frozen and burn differ by {diff} (logits up to {scale})"
        );
    }
    frozen
}

/// Checks `net` and a pruned copy (every third branch gate closed); returns both frozen forms.
fn dense_and_pruned<N: Network>(what: &str, net: N, seed: u64) -> (FrozenNetwork, FrozenNetwork) {
    let net = randomised(net, seed);
    let dense = check(&format!("{what} dense"), &net);
    let arch = random_architecture(&net, seed, |g| g % 3 == 1);
    let pruned = dnal_zoo::prune(net, &arch).unwrap();
    (dense, check(&format!("{what} pruned"), &pruned))
}

#[test]
fn plain_cnns_freeze() {
    let d = device();
    dense_and_pruned(
        "MNIST CNN",
        PlainCnnConfig::mnist_cnn().init(&d).unwrap(),
        1,
    );
    let cfg = PlainCnnConfig::new(3, 16, vec![8, 8, 16], vec![0, 2])
        .with_hidden(vec![12, 10])
        .with_hidden_bn(true)
        .with_num_classes(5);
    dense_and_pruned("small VGG", cfg.init(&d).unwrap(), 2);
    let searching = randomised(PlainCnnConfig::mnist_cnn().init(&d).unwrap(), 3)
        .with_gate_mode(GateMode::Search)
        .with_temperature(3.0);
    check("MNIST CNN searching", &searching);
}

#[test]
fn cifar_resnets_freeze_with_fused_steps() {
    let net = CifarResNetConfig::new(20, 10)
        .unwrap()
        .init(&device())
        .unwrap();
    let nodes = net.inference_graph().unwrap().nodes.len();
    let (dense, pruned) = dense_and_pruned("ResNet-20", net, 4);
    // Each block's add and ReLUs run inside its convolutions: a stem, two convolutions per
    // block (9), the shortcuts' two channel copies, the pool, flatten and classifier.
    assert_eq!(dense.steps(), 1 + 2 * 9 + 2 + 3, "{nodes} graph nodes");
    assert!(pruned.steps() <= dense.steps());
}

#[test]
fn resnet50_freezes() {
    let cfg = BottleneckResNetConfig::new(vec![1, 2, 1, 1], 10).unwrap();
    let cfg = BottleneckResNetConfig {
        image_size: 64,
        ..cfg
    };
    dense_and_pruned("bottleneck ResNet", cfg.init(&device()).unwrap(), 5);
}

#[test]
fn mobilenets_freeze() {
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
fn supernets_freeze() {
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
fn bad_inputs_are_errors_that_name_the_shape() {
    let d = device();
    let frozen = FrozenNetwork::new(&PlainCnnConfig::mnist_cnn().init(&d).unwrap()).unwrap();
    let err = frozen.forward(&[0.0; 100]).unwrap_err().to_string();
    assert!(err.contains("100") && err.contains("[1, 28, 28]"), "{err}");
    assert!(frozen.forward(&[]).is_err());
    let wrong = Tensor::<4>::zeros([2, 3, 28, 28], &d);
    let err = frozen.forward_tensor(wrong).unwrap_err().to_string();
    assert!(err.contains("[3, 28, 28]"), "{err}");
    let right = Tensor::<4>::zeros([2, 1, 28, 28], &d);
    assert_eq!(frozen.forward_tensor(right).unwrap().dims(), [2, 10]);
}
