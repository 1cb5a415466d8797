//! ResNet-50 (ImageNet): the paper's baseline cost, pruned == masked (stem, inner channels,
//! branch outputs added into the stream, removed blocks), parameters == cost model.

use dnal_core::{GateKind, GatedModel};
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
