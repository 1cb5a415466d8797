//! CIFAR ResNets: the paper's baseline cost, pruned == masked across residual adds (including
//! removed blocks), parameters == cost model, save/load.

use burn::prelude::*;
use dnal_core::{GateKind, GateMode, GatedModel};
use dnal_zoo::*;

mod common;
use common::*;

fn randomised(depth: usize, device: &Device) -> CifarResNet {
    let mut model = CifarResNetConfig::new(depth, 10)
        .unwrap()
        .init(device)
        .unwrap();
    randomise_unit(&mut model.stem, 0, device);
    for (i, b) in model.blocks.iter_mut().enumerate() {
        let b = b.as_mut().unwrap();
        randomise_unit(&mut b.conv1, 2 * i as u64 + 1, device);
        randomise_unit(&mut b.conv2, 2 * i as u64 + 2, device);
    }
    model
}

#[test]
fn resnet56_reproduces_the_papers_baseline_cost() {
    let model = CifarResNetConfig::new(56, 10)
        .unwrap()
        .init(&device())
        .unwrap();
    let cost = model.cost_model().cost(None);
    assert!(within(cost.macs, 125.49e6, 0.005), "MACs {}", cost.macs);
    assert!(within(cost.params, 0.85e6, 0.005), "params {}", cost.params);
    assert_eq!(counted_params(&model) as u64, cost.params);
    // Stem + 27 blocks x (inner, out).
    assert_eq!(model.gate_names().len(), 55);
    let kinds: Vec<GateKind> = model
        .gate_states()
        .into_iter()
        .map(|(_, s)| s.kind)
        .collect();
    assert_eq!(kinds.iter().filter(|&&k| k == GateKind::Branch).count(), 27);
}

#[test]
fn every_cifar_depth_builds_and_classifies() {
    for (depth, macs) in [(20, 40.55e6), (32, 68.86e6), (110, 252.89e6)] {
        let model = CifarResNetConfig::new(depth, 100)
            .unwrap()
            .init(&device())
            .unwrap();
        let cost = model.cost_model().cost(None);
        assert!(
            within(cost.macs, macs, 0.005),
            "ResNet-{depth}: {} MACs",
            cost.macs
        );
        assert_eq!(counted_params(&model) as u64, cost.params);
    }
    let model = CifarResNetConfig::new(20, 10)
        .unwrap()
        .init(&device())
        .unwrap();
    assert_eq!(
        model
            .forward(Tensor::zeros([2, 3, 32, 32], &device()))
            .dims(),
        [2, 10]
    );
    let err = CifarResNetConfig::new(21, 10).unwrap_err().to_string();
    assert!(err.contains("6n + 2"), "{err}");
}

fn check(depth: usize, seed: u64, close: impl Fn(usize) -> bool) {
    let device = device();
    let model = randomised(depth, &device);
    let arch = random_architecture(&model, seed, close);
    let masked = arch.apply_masks(model.clone()).unwrap();
    assert_eq!(masked.stem.gate.mode, GateMode::Masked);
    check_pruned(model, &arch, input([2, 3, 32, 32], seed, &device));
}

#[test]
fn pruned_resnet_equals_masked_with_random_masks() {
    for seed in [1, 2] {
        check(20, seed, |_| false);
    }
}

#[test]
fn pruned_resnet_equals_masked_with_removed_blocks() {
    // Close every third branch completely: those blocks disappear from the pruned network.
    check(20, 7, |g| g % 3 == 0);
    let device = device();
    let model = randomised(20, &device);
    let arch = random_architecture(&model, 7, |g| g % 3 == 0);
    let pruned = prune(model, &arch).unwrap();
    let removed = pruned.blocks.iter().filter(|b| b.is_none()).count();
    assert!(removed >= 2, "{removed} blocks removed");
    assert_eq!(pruned.gate_names().len(), 1 + 2 * (9 - removed));
    // Pruning the pruned network again with its own full architecture changes nothing.
    let again = prune(pruned.clone(), &dnal_core::Architecture::full(&pruned)).unwrap();
    assert_eq!(again.config(), pruned.config());
}

#[test]
fn pruned_resnet56_equals_masked() {
    check(56, 11, |g| g % 5 == 0);
}

#[test]
fn pruned_resnet_saves_and_loads() {
    let device = device();
    let model = randomised(20, &device);
    let arch = random_architecture(&model, 3, |g| g == 4);
    let pruned = prune(model, &arch).unwrap();
    let dir = tempdir("resnet");
    save(&pruned, &dir).unwrap();
    let loaded: CifarResNet = load(&dir, |c: &CifarResNetConfig| c.init(&device)).unwrap();
    let x = input([1, 3, 32, 32], 4, &device);
    assert!(max_abs_diff(pruned.valid().forward(x.clone()), loaded.valid().forward(x)) < 1e-6);
    // The same through safetensors.
    save_safetensors(&pruned, &dir).unwrap();
    let from_st: CifarResNet =
        load_safetensors(&dir, |c: &CifarResNetConfig| c.init(&device)).unwrap();
    let x = input([1, 3, 32, 32], 5, &device);
    assert!(
        max_abs_diff(
            pruned.valid().forward(x.clone()),
            from_st.valid().forward(x)
        ) < 1e-6
    );
    // A truncated safetensors file: an error naming it, not a panic.
    let st = dir.join("model.safetensors");
    let whole = std::fs::read(&st).unwrap();
    std::fs::write(&st, &whole[..whole.len() / 2]).unwrap();
    let err = load_safetensors::<CifarResNet>(&dir, |c: &CifarResNetConfig| c.init(&device))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("model.safetensors") && err.contains("truncated or corrupt"),
        "{err}"
    );
    // Into a full-width network: a clear error.
    let full = CifarResNetConfig::new(20, 10).unwrap();
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string(&full).unwrap(),
    )
    .unwrap();
    let err = load::<CifarResNet>(&dir, |c: &CifarResNetConfig| c.init(&device))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("model.bpk") && err.contains("do not fit"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

fn tempdir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("dnal-zoo-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// `place` puts a run of channels between zeros and other positions where they belong, after
/// subsampling by the stride (5x5 planes: the last row and column are kept at stride 2); values
/// and gradients equal burn's strided slice and index add into zeros.
#[test]
fn place_puts_runs_and_scattered_channels_where_an_index_add_does() {
    let device = Device::flex().autodiff();
    let values = common::input([2, 3, 5, 5], 7, &device);
    for stride in [1, 2] {
        let side = 5usize.div_ceil(stride);
        let weights = common::input([2, 8, side, side], 8, &device);
        for pos in [vec![0, 1, 2], vec![2, 3, 4], vec![5, 6, 7], vec![1, 4, 6]] {
            let v = values.clone().require_grad();
            let placed = dnal_kernels::channels::place(v.clone(), &pos, 8, stride);
            let r = values.clone().require_grad();
            let expected = Tensor::<4>::zeros([2, 8, side, side], &device).select_assign(
                1,
                dnal_zoo::layers::indices(&pos, &device),
                r.clone()
                    .slice(burn::tensor::s![.., .., ..;stride, ..;stride]),
                burn::tensor::IndexingUpdateOp::Add,
            );
            let diff = (placed.clone() - expected.clone())
                .abs()
                .max()
                .into_scalar::<f32>();
            assert_eq!(diff, 0.0, "positions {pos:?}, stride {stride}: values");
            let grad = v
                .grad(&(placed * weights.clone()).sum().backward())
                .expect("gradient of the placed channels");
            let want = r
                .grad(&(expected * weights.clone()).sum().backward())
                .expect("gradient of the reference");
            let diff = (grad - want).abs().max().into_scalar::<f32>();
            assert_eq!(diff, 0.0, "positions {pos:?}, stride {stride}: gradient");
        }
    }
}
