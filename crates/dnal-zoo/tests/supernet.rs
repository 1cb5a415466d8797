//! The supernet: the paper's 16.0M parameters, derived == masked with whole candidates closed,
//! removing a candidate removes exactly its parameters.

use burn::prelude::*;
use dnal_core::{Architecture, GatedModel};
use dnal_zoo::*;

mod common;
use common::*;

#[test]
fn imagenet_supernet_has_the_papers_16_million_parameters() {
    let model = SuperNetConfig::imagenet(1000).init(&device()).unwrap();
    let cost = model.cost_model().cost(None);
    assert!(within(cost.params, 16.0e6, 0.005), "params {}", cost.params);
    assert_eq!(counted_params(&model) as u64, cost.params);
    // 21 searchable blocks x 6 candidates x (depthwise, projection) + the last conv.
    assert_eq!(model.gate_names().len(), 21 * 12 + 1);
}

fn randomised(cfg: &SuperNetConfig, device: &Device) -> SuperNet {
    let mut model = cfg.init(device).unwrap();
    let mut seed = 0;
    for block in model.blocks.iter_mut() {
        for c in block.candidates.iter_mut().flatten() {
            for unit in [&mut c.depthwise, &mut c.project] {
                seed += 1;
                randomise_unit(unit, seed, device);
            }
        }
    }
    randomise_unit(&mut model.last, 999, device);
    model
}

#[test]
fn derived_supernet_equals_masked_with_whole_candidates_closed() {
    let device = device();
    for (cfg, side) in [
        (SuperNetConfig::cifar(10), 32),
        (SuperNetConfig::tiny(16, 1, 10), 16),
    ] {
        let channels = cfg.in_channels;
        let model = randomised(&cfg, &device);
        let arch = random_architecture(&model, 12, |g| g % 3 == 1);
        let pruned = check_pruned(model, &arch, input([2, channels, side, side], 12, &device));
        let removed = pruned
            .blocks
            .iter()
            .flat_map(|b| &b.candidates)
            .filter(|c| c.is_none())
            .count();
        assert!(removed > 0, "no candidate removed");
        assert!(pruned.candidate_table().contains(" - |"));
    }
}

#[test]
fn removing_a_candidate_removes_exactly_its_parameters() {
    let device = device();
    let model = SuperNetConfig::tiny(16, 1, 10).init(&device).unwrap();
    let mut arch = Architecture::full(&model);
    let gate = "s0.b1.k5e6.proj";
    arch.gates.get_mut(gate).unwrap().kept.clear();
    let c = model.blocks[1].candidates[3].as_ref().unwrap();
    let own = counted_params(c) as u64;
    let pruned = prune(model.clone(), &arch).unwrap();
    assert!(pruned.blocks[1].candidates[3].is_none());
    assert_eq!(
        counted_params(&model) as u64 - counted_params(&pruned) as u64,
        own
    );
}

#[test]
fn a_block_without_shortcut_keeps_its_strongest_channel() {
    let device = device();
    let model = SuperNetConfig::tiny(16, 1, 10).init(&device).unwrap();
    // Every alpha negative: all gates close; the first block of each stage has no shortcut.
    let closed = model.clone().with_alpha(-1.0).with_temperature(1e4);
    let arch = closed.derive(0.9).unwrap();
    assert!(
        arch.gates["s0.b0.k3e3.proj"].kept.len() + arch.gates["s0.b0.k7e6.proj"].kept.len() <= 1
    );
    let pruned = prune(closed, &arch).unwrap();
    let y = pruned.forward(Tensor::zeros([1, 1, 16, 16], &device));
    assert_eq!(y.dims(), [1, 10]);
}
