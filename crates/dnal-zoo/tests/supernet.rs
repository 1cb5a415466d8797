//! The supernet: the paper's 16.0M parameters, derived == masked with whole candidates closed,
//! removing a candidate removes exactly its parameters, the gated fixed first block's cost.

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
    // The fixed block's two gates, 21 searchable blocks x 6 candidates x (depthwise,
    // projection), the last conv.
    assert_eq!(model.gate_names().len(), 2 + 21 * 12 + 1);
}

fn randomised(cfg: &SuperNetConfig, device: &Device) -> SuperNet {
    let mut model = cfg.init(device).unwrap();
    randomise_unit(&mut model.first_block.depthwise, 500, device);
    randomise_unit(&mut model.first_block.project, 501, device);
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

#[test]
fn the_fixed_first_block_is_gated_and_its_gates_price_the_stem_and_the_first_stage() {
    let device = device();
    let model = SuperNetConfig::cifar(10).init(&device).unwrap();
    let mut arch = Architecture::full(&model);
    assert_eq!(arch.gates["first.dw"].width, 32);
    assert_eq!(arch.gates["first.proj"].width, 16);
    arch.gates.get_mut("first.dw").unwrap().kept = vec![1, 4, 9, 10, 20, 30, 31, 2];
    arch.gates.get_mut("first.proj").unwrap().kept = vec![0, 5, 7, 15];
    arch.gates.get_mut("first.proj").unwrap().kept.sort();
    arch.gates.get_mut("first.dw").unwrap().kept.sort();
    let (k, m) = (8u64, 4u64);
    // CIFAR: 32x32 maps up to the first stage's six expansions (16 -> 16e channels).
    let hw = 32 * 32;
    let expand: u64 = [3u64, 6, 3, 6, 3, 6].iter().map(|e| 16 * e).sum();
    let full = (3 * 9 * 32 + 9 * 32 + 32 * 16 + 16 * expand) * hw;
    let kept = (3 * 9 * k + 9 * k + k * m + m * expand) * hw;
    let dense = model.cost_model().cost(None);
    let gated = model.cost_model().cost(Some(&arch));
    assert_eq!(dense.macs - gated.macs, full - kept);
    // Pruning prices the same and the stem follows the depthwise gate.
    let pruned = check_pruned(
        randomised(&SuperNetConfig::cifar(10), &device),
        &arch,
        input([2, 3, 32, 32], 5, &device),
    );
    assert_eq!(pruned.cost_model().cost(None).macs, gated.macs);
    assert_eq!(pruned.config().stem_width, 8);
    assert_eq!(pruned.config().first_out, vec![0, 5, 7, 15]);
    assert!(
        pruned
            .candidate_table()
            .starts_with("Fixed first block (k3e1): 8 -> 4 of 16")
    );
}

#[test]
fn a_pruned_fixed_block_narrows_the_residual_stream_it_enters() {
    // The tiny supernet's first stage has the fixed block's width and stride 1: the block's
    // outputs are the entry of a residual stream.
    let device = device();
    let cfg = SuperNetConfig::tiny(16, 1, 10);
    let model = randomised(&cfg, &device);
    let mut arch = Architecture::full(&model);
    arch.gates.get_mut("first.proj").unwrap().kept = vec![1, 6];
    for (name, gate) in arch.gates.iter_mut() {
        if name.starts_with("s0.") && name.ends_with(".proj") {
            gate.kept = vec![6];
        }
    }
    let pruned = check_pruned(model, &arch, input([3, 1, 16, 16], 8, &device));
    assert_eq!(pruned.config().streams()[0], vec![1, 6]);
}
