//! ResNet-50 (ImageNet): the paper's baseline cost, pruned == masked (stem, inner channels,
//! branch outputs added into the stream, removed blocks), parameters == cost model, and the
//! released code's count of residual outputs.

use dnal_core::{Architecture, GateKind, GatedModel};
use dnal_zoo::*;

mod common;
use common::*;

#[test]
fn resnet50_reproduces_the_papers_baseline_cost() {
    let model = BottleneckResNetConfig::resnet50(1000)
        .init(&device())
        .unwrap();
    let cost = model.cost_model().cost(None);
    assert!(within(cost.macs, 4.09e9, 0.005), "MACs {}", cost.macs);
    assert!(
        within(cost.params, 25.55e6, 0.005),
        "params {}",
        cost.params
    );
    assert_eq!(counted_params(&model) as u64, cost.params);
    // The stem and three gates in each of the 16 blocks; bn3 gates are branch gates.
    assert_eq!(model.gate_names().len(), 49);
    let branch = model
        .gate_states()
        .into_iter()
        .filter(|(_, s)| s.kind == GateKind::Branch)
        .count();
    assert_eq!(branch, 16);
}

#[test]
fn pruned_resnet50_equals_masked() {
    let device = device();
    let mut cfg = BottleneckResNetConfig::resnet50(10);
    cfg.image_size = 64;
    let mut model = cfg.init(&device).unwrap();
    randomise_unit(&mut model.stem, 0, &device);
    for (i, b) in model.blocks.iter_mut().enumerate() {
        let b = b.branch.as_mut().unwrap();
        randomise_unit(&mut b.conv1, 3 * i as u64 + 1, &device);
        randomise_unit(&mut b.conv2, 3 * i as u64 + 2, &device);
        randomise_unit(&mut b.conv3, 3 * i as u64 + 3, &device);
    }
    // Close every fifth branch gate: those blocks keep only their shortcut or identity.
    let arch = random_architecture(&model, 6, |g| g % 5 == 0);
    let pruned = check_pruned(model, &arch, input([2, 3, 64, 64], 6, &device));
    assert!(
        pruned.blocks.iter().any(|b| b.branch.is_none()),
        "no block removed"
    );
}

/// Closing channels of a block's output (bn3) removes them from its conv3 only: the shortcut
/// still carries them into the next block. The released code's count also drops them from the
/// next block's conv1 (and the last block's from the classifier); ungated shortcut convs count
/// in full.
#[test]
fn the_released_count_drops_a_residual_outputs_channels_from_the_next_conv() {
    let model = BottleneckResNetConfig::resnet50(1000)
        .init(&device())
        .unwrap();
    let exact = model.cost_model();
    let released = model
        .released_cost_model()
        .expect("ResNet-50 has a released count");
    assert_eq!(exact.cost(None), released.cost(None));
    let mut arch = Architecture::full(&model);
    // Block 0 (56x56, 64 -> 256) keeps 100 outputs; the last block (7x7, 512 -> 2048) keeps 48.
    arch.gates.get_mut("b0.bn3").unwrap().kept = (0..100).collect();
    arch.gates.get_mut("b15.bn3").unwrap().kept = (0..48).collect();
    let full = exact.cost(None).macs;
    let conv3 = 156 * 64 * 56 * 56 + 2000 * 512 * 7 * 7;
    assert_eq!(full - model.arch_cost(&arch).unwrap().macs, conv3);
    let next = 156 * 64 * 56 * 56 + 2000 * 1000;
    assert_eq!(full - released.cost(Some(&arch)).macs, conv3 + next);
    // Stem gate: both counts drop its channels from the first conv1; only the exact one from
    // the first shortcut.
    let mut arch = Architecture::full(&model);
    arch.gates.get_mut("stem").unwrap().kept = (0..32).collect();
    let stem = 32 * 3 * 49 * 112 * 112 + 32 * 64 * 56 * 56;
    assert_eq!(
        full - model.arch_cost(&arch).unwrap().macs,
        stem + 32 * 256 * 56 * 56
    );
    assert_eq!(full - released.cost(Some(&arch)).macs, stem);
}
