//! VGG-16 (CIFAR) and the MNIST CNN: the paper's baseline cost, pruned == masked, save/load.

use burn::prelude::*;
use dnal_core::{GateMode, GatedModel};
use dnal_zoo::*;

mod common;
use common::*;

#[test]
fn vgg16_cifar_reproduces_the_papers_baseline_cost() {
    let model = PlainCnnConfig::vgg16_cifar(10).init(&device()).unwrap();
    let cost = model.cost_model().cost(None);
    assert!(within(cost.macs, 313.47e6, 0.005), "MACs {}", cost.macs);
    assert!(
        within(cost.params, 14.99e6, 0.005),
        "params {}",
        cost.params
    );
    assert_eq!(
        counted_params(&model) as u64,
        cost.params,
        "cost model counts the real tensors"
    );
    assert_eq!(model.gate_names().len(), 13);
}

#[test]
fn mnist_cnn_has_192_gates_and_classifies_28x28() {
    let model = PlainCnnConfig::mnist_cnn().init(&device()).unwrap();
    assert_eq!(model.gated_channels(), 192);
    let y = model.forward(Tensor::zeros([3, 1, 28, 28], &device()));
    assert_eq!(y.dims(), [3, 10]);
    assert_eq!(
        counted_params(&model) as u64,
        model.cost_model().cost(None).params
    );
}

#[test]
fn bad_configs_are_rejected() {
    let err = PlainCnnConfig::new(3, 32, vec![8, 8], vec![5])
        .init(&device())
        .unwrap_err();
    assert!(err.to_string().contains("pool_after index 5"), "{err}");
    let err = PlainCnnConfig::new(3, 4, vec![8, 8, 8], vec![0, 1, 2])
        .init(&device())
        .unwrap_err();
    assert!(err.to_string().contains("to nothing"), "{err}");
    let err = PlainCnnConfig::new(3, 32, vec![8], vec![0])
        .with_hidden(vec![0])
        .init(&device())
        .unwrap_err();
    assert!(err.to_string().contains("hidden"), "{err}");
    // Without a global pool the last map is flattened: 16x16x8 inputs to the classifier.
    let model = PlainCnnConfig::new(3, 32, vec![8], vec![0])
        .init(&device())
        .unwrap();
    assert_eq!(model.classifier.weight.dims(), [16 * 16 * 8, 10]);
}

/// Gives every BN non-trivial statistics and affine parameters.
fn randomise_bn(mut model: PlainCnn, device: &Device) -> PlainCnn {
    for (i, unit) in model.convs.iter_mut().enumerate() {
        randomise_unit(unit, i as u64, device);
    }
    model
}

fn check_pruned_equals_masked(config: PlainCnnConfig, input: [usize; 4], seed: u64) {
    let device = device();
    let model = randomise_bn(config.init(&device).unwrap(), &device);
    let arch = random_architecture(&model, seed, |_| false);
    let x = common::input(input, seed, &device);
    let masked = arch.apply_masks(model.clone()).unwrap();
    assert_eq!(masked.convs[0].gate.mode, GateMode::Masked);
    let pruned = prune(model, &arch).unwrap();
    let diff = max_abs_diff(masked.valid().forward(x.clone()), pruned.valid().forward(x));
    assert!(diff < 1e-4, "pruned vs masked logits differ by {diff}");

    let widths: Vec<usize> = pruned.convs.iter().map(|u| u.out_channels()).collect();
    assert_eq!(&widths, &pruned.config().widths);
    let cost = masked.cost_model().cost(Some(&arch));
    assert_eq!(
        counted_params(&pruned) as u64,
        cost.params,
        "pruned params = cost model"
    );
    assert_eq!(pruned.cost_model().cost(None), {
        let mut c = cost.clone();
        for l in &mut c.layers {
            l.input = (l.input.1, l.input.1);
            l.output = (l.output.1, l.output.1);
        }
        c
    });
}

#[test]
fn pruned_mnist_cnn_equals_masked() {
    for seed in [1, 2, 3] {
        check_pruned_equals_masked(PlainCnnConfig::mnist_cnn(), [2, 1, 28, 28], seed);
    }
}

#[test]
fn pruned_vgg16_equals_masked() {
    check_pruned_equals_masked(PlainCnnConfig::vgg16_cifar(10), [2, 3, 32, 32], 9);
}

#[test]
fn pruned_model_saves_and_loads_without_the_original() {
    let device = device();
    let model = randomise_bn(PlainCnnConfig::mnist_cnn().init(&device).unwrap(), &device);
    let arch = random_architecture(&model, 5, |_| false);
    let pruned = prune(model, &arch).unwrap();
    let dir = std::env::temp_dir().join(format!("dnal-zoo-save-{}", std::process::id()));
    save(&pruned, &dir).unwrap();
    let build = |c: &PlainCnnConfig| c.init(&device);
    let loaded: PlainCnn = load(&dir, build).unwrap();
    let x = Tensor::<4>::from_data(
        TensorData::new(noise(784, 3, 0.0, 1.0), [1, 1, 28, 28]),
        &device,
    );
    assert!(max_abs_diff(pruned.valid().forward(x.clone()), loaded.valid().forward(x)) < 1e-6);

    // Weights of another architecture: a clear error naming the file.
    let other = PlainCnnConfig::mnist_cnn().init(&device).unwrap();
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string(other.config()).unwrap(),
    )
    .unwrap();
    let err = load::<PlainCnn>(&dir, build).unwrap_err().to_string();
    assert!(
        err.contains("model.bpk") && err.contains("do not fit"),
        "{err}"
    );

    // A truncated weights file (of the network config.json describes) and a corrupt one:
    // said to be unreadable, not to be another network's.
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string(pruned.config()).unwrap(),
    )
    .unwrap();
    let whole = std::fs::read(dir.join("model.bpk")).unwrap();
    std::fs::write(dir.join("model.bpk"), &whole[..whole.len() / 2]).unwrap();
    let err = load::<PlainCnn>(&dir, build).unwrap_err().to_string();
    assert!(
        err.contains("model.bpk") && err.contains("truncated or corrupt"),
        "{err}"
    );
    std::fs::write(dir.join("model.bpk"), b"not a burnpack").unwrap();
    let err = load::<PlainCnn>(&dir, build).unwrap_err().to_string();
    assert!(
        err.contains("model.bpk") && err.contains("truncated or corrupt"),
        "{err}"
    );

    // A missing folder.
    let err = load::<PlainCnn>(&dir.join("nope"), build)
        .unwrap_err()
        .to_string();
    assert!(err.contains("config.json"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn vgg16_imagenet_reproduces_the_papers_baseline_cost() {
    let model = PlainCnnConfig::vgg16_imagenet(1000)
        .init(&device())
        .unwrap();
    let cost = model.cost_model().cost(None);
    assert!(within(cost.macs, 15.47e9, 0.005), "MACs {}", cost.macs);
    assert!(
        within(cost.params, 138.37e6, 0.005),
        "params {}",
        cost.params
    );
    assert_eq!(counted_params(&model) as u64, cost.params);
}

#[test]
fn pruned_vgg16_imagenet_with_a_flattened_classifier_equals_masked() {
    // At 64x64 the last map is 2x2: the first classifier layer reads 4 inputs per channel.
    let mut cfg = PlainCnnConfig::vgg16_imagenet(10).with_hidden(vec![64, 32]);
    cfg.image_size = 64;
    check_pruned_equals_masked(cfg, [2, 3, 64, 64], 4);
}
