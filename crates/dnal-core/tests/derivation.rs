//! Architecture derivation, masks, JSON, and the sparsity penalties on a small gated model.

mod common;

use burn::prelude::*;
use common::*;
use dnal_core::*;

fn device() -> Device {
    Device::flex()
}

fn state(kind: GateKind, alpha: &[f64], beta: f64) -> GateState {
    GateState {
        kind,
        alpha: alpha.to_vec(),
        mask: vec![true; alpha.len()],
        temperature: beta,
    }
}

#[test]
fn threshold_keeps_channels_above_it() {
    let s = state(GateKind::Main, &[0.5, -0.5, 1e-3, -1e-9, 0.0], 1e4);
    let arch = derive_from_states([("g", &s)], 0.9).unwrap();
    // sigmoid(1e4 * 1e-3) = sigmoid(10) > 0.9; sigmoid(0) = 0.5 is not kept.
    assert_eq!(arch.gates["g"].kept, vec![0, 2]);
    assert!(!arch.gates["g"].forced_open);
    // With a low beta the same alphas keep less.
    let s = state(GateKind::Main, &[0.5, -0.5, 1e-3], 1.0);
    let arch = derive_from_states([("g", &s)], 0.9).unwrap();
    assert_eq!(arch.gates["g"].kept, vec![0]);
    assert!(
        arch.gates["g"].forced_open,
        "sigmoid(0.5) < 0.9 everywhere: forced open"
    );
}

#[test]
fn closed_main_gate_keeps_its_strongest_channel_and_branch_may_close() {
    let alpha = [-0.3, -0.01, -2.0];
    let main = state(GateKind::Main, &alpha, 1e4);
    let branch = state(GateKind::Branch, &alpha, 1e4);
    let arch = derive_from_states([("m", &main), ("b", &branch)], 0.9).unwrap();
    assert_eq!(arch.gates["m"].kept, vec![1], "strongest alpha is -0.01");
    assert!(arch.gates["m"].forced_open);
    assert!(arch.gates["b"].is_closed());
    let summary = arch.summary();
    assert!(summary.contains("strongest kept"), "{summary}");
    assert!(summary.contains("identity"), "{summary}");
}

#[test]
fn masked_channels_stay_removed() {
    let mut s = state(GateKind::Main, &[5.0, 5.0, -1.0], 1e4);
    s.mask[0] = false;
    let arch = derive_from_states([("g", &s)], 0.9).unwrap();
    assert_eq!(arch.gates["g"].kept, vec![1]);
    // Forced-open picks among existing channels only.
    // Channel 0 has the largest alpha but is masked: the strongest existing one is 2.
    let mut s = state(GateKind::Main, &[9.0, -3.0, -2.0], 1e4);
    s.mask = vec![false, true, true];
    let arch = derive_from_states([("g", &s)], 0.9).unwrap();
    assert_eq!(arch.gates["g"].kept, vec![2]);
}

#[test]
fn bad_threshold_is_rejected() {
    let s = state(GateKind::Main, &[1.0], 1.0);
    for t in [0.0, 1.0, -0.5, f64::NAN] {
        let err = derive_from_states([("g", &s)], t).unwrap_err().to_string();
        assert!(err.contains("threshold"), "{err}");
    }
}

#[test]
fn derive_apply_and_json_round_trip_on_a_model() {
    let device = device();
    let mut model = TwoGates::new(4, 3, &device).with_temperature(1e4);
    model.main = set_alpha(model.main, &[0.2, -0.1, 0.3, -0.4]);
    model.branch = set_alpha(model.branch, &[-0.2, -0.1, -0.3]);
    let arch = derive_architecture(&model, DEFAULT_THRESHOLD).unwrap();
    assert_eq!(arch.gates["main"].kept, vec![0, 2]);
    assert!(arch.gates["branch"].is_closed());
    assert_eq!(arch.kept_channels(), 2);
    assert_eq!(arch.total_channels(), 7);

    let masked = arch.apply_masks(model).unwrap();
    assert_eq!(masked.main.mode, GateMode::Masked);
    let y = values(masked.main.forward(Tensor::<2>::ones([1, 4], &device)));
    assert_eq!(y, vec![1.0, 0.0, 1.0, 0.0]);

    let dir = std::env::temp_dir().join(format!("dnal-core-arch-{}", std::process::id()));
    let path = dir.join("architecture.json");
    arch.save(&path).unwrap();
    let back = Architecture::load(&path).unwrap();
    assert_eq!(back, arch);
    // No temp file is left behind.
    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(leftovers.len(), 1, "{leftovers:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn wrong_architecture_files_give_clear_errors() {
    let device = device();
    let model = TwoGates::new(4, 3, &device);
    let mut arch = Architecture::full(&model);
    arch.gates.get_mut("main").unwrap().width = 5;
    arch.gates.get_mut("main").unwrap().kept = vec![0, 1, 2, 3, 4];
    let err = arch.apply_masks(model.clone()).unwrap_err().to_string();
    assert!(
        err.contains("`main`") && err.contains("width 5") && err.contains("4"),
        "{err}"
    );

    let mut arch = Architecture::full(&model);
    arch.gates.remove("branch");
    let err = arch.check_matches(&model).unwrap_err().to_string();
    assert!(err.contains("`branch` is missing"), "{err}");

    let mut arch = Architecture::full(&model);
    arch.gates
        .insert("ghost".into(), GateArchitecture::full(GateKind::Main, 2));
    let err = arch.check_matches(&model).unwrap_err().to_string();
    assert!(err.contains("no gate(s) `ghost`"), "{err}");

    let err = Architecture::from_json(
        r#"{"threshold":0.9,"gates":{"g":{"kind":"main","width":2,"kept":[1,0]}}}"#,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("gates.g.kept") && err.contains("increasing"),
        "{err}"
    );
    let err = Architecture::from_json("{\"threshold\":")
        .unwrap_err()
        .to_string();
    assert!(err.contains("architecture JSON"), "{err}");

    let missing = std::env::temp_dir().join("dnal-no-such-dir/architecture.json");
    let err = Architecture::load(&missing).unwrap_err().to_string();
    assert!(err.contains("dnal-no-such-dir/architecture.json"), "{err}");
}

fn cost_for_two_gates() -> CostModel {
    let mut cost = CostModel::new();
    cost.gate("main", 4).gate("branch", 3);
    cost.conv(
        "c1",
        Width::Fixed(3),
        Width::gate("main"),
        [3, 3],
        Groups::Count(1),
        [8, 8],
    )
    .conv(
        "c2",
        Width::gate("main"),
        Width::gate("branch"),
        [3, 3],
        Groups::Count(1),
        [8, 8],
    )
    .linear("fc", Width::gate("branch"), Width::Fixed(10));
    cost
}

fn grads_of(penalty: &SparsityPenalty, model: &TwoGates) -> (f32, Vec<f32>, Vec<f32>) {
    let loss = penalty.loss(model);
    let value = values(loss.clone())[0];
    let grads = loss.backward();
    (
        value,
        values(model.main.alpha.val().grad(&grads).unwrap()),
        values(model.branch.alpha.val().grad(&grads).unwrap()),
    )
}

#[test]
fn paper_penalty_value_and_gradient() {
    let device = device().autodiff();
    let mut model = TwoGates::new(4, 3, &device).with_temperature(100.0);
    model.main = set_alpha(model.main, &[0.0, 1.0, -1.0, 0.5]);
    let lambda = 1e-2;
    let penalty = SparsityPenalty::new(PenaltyConfig::paper(lambda), None).unwrap();
    let (value, g_main, g_branch) = grads_of(&penalty, &model);
    let s: Vec<f64> = [0.0, 1.0, -1.0, 0.5]
        .iter()
        .map(|&a| stable_sigmoid(a))
        .collect();
    let want = lambda * (s.iter().sum::<f64>() + 3.0 * 0.5);
    assert!((value as f64 - want).abs() < 1e-6, "{value} vs {want}");
    let want_g: Vec<f32> = s.iter().map(|s| (lambda * s * (1.0 - s)) as f32).collect();
    assert_close(&g_main, &want_g, 1e-7, 1e-4, "d penalty / d alpha");
    assert_close(
        &g_branch,
        &[(lambda * 0.25) as f32; 3],
        1e-7,
        1e-4,
        "branch",
    );

    // Tempered: uses beta.
    let cfg = PenaltyConfig {
        relaxation: Relaxation::Tempered,
        ..PenaltyConfig::paper(lambda)
    };
    let (value, ..) = grads_of(&SparsityPenalty::new(cfg, None).unwrap(), &model);
    let want: f64 = [0.0, 1.0, -1.0, 0.5]
        .iter()
        .map(|&a| stable_sigmoid(100.0 * a))
        .sum::<f64>()
        + 1.5;
    assert!((value as f64 - lambda * want).abs() < 1e-6);
}

#[test]
fn macs_weighted_penalty_weights_have_mean_one() {
    let device = device().autodiff();
    let model = TwoGates::new(4, 3, &device);
    let cost = cost_for_two_gates();
    let cfg = PenaltyConfig {
        weighting: Weighting::Macs,
        ..PenaltyConfig::paper(1.0)
    };
    assert!(
        SparsityPenalty::new(cfg, None)
            .unwrap_err()
            .to_string()
            .contains("cost model")
    );
    let penalty = SparsityPenalty::new(cfg, Some(&cost)).unwrap();
    let (wm, wb) = (penalty.weight("main"), penalty.weight("branch"));
    assert!(
        ((4.0 * wm + 3.0 * wb) / 7.0 - 1.0).abs() < 1e-12,
        "mean weight is 1"
    );
    // main: 64*27 + 64*9*3 per channel; branch: 64*9*4 + 10.
    let (m, b) = (64.0 * 27.0 + 64.0 * 27.0, 64.0 * 36.0 + 10.0);
    assert!((wm / wb - m / b).abs() < 1e-9);
    let (value, g_main, _) = grads_of(&penalty, &model);
    assert!((value as f64 - 0.5 * (4.0 * wm + 3.0 * wb)).abs() < 1e-4);
    assert_close(
        &g_main,
        &[(0.25 * wm) as f32; 4],
        1e-6,
        1e-4,
        "weighted gradient",
    );
}

#[test]
fn excess_target_is_zero_below_target_and_matches_weights_at_full_width() {
    let device = device().autodiff();
    let cost = cost_for_two_gates();
    let open = TwoGates::new(4, 3, &device)
        .with_temperature(1e4)
        .with_alpha(1.0);
    let cfg = |fraction| PenaltyConfig {
        lambda: 1.0,
        relaxation: Relaxation::Tempered,
        weighting: Weighting::Uniform,
        target: Some(MacsTarget::Excess { fraction }),
    };
    // All gates open (sigmoid(1e4) = 1): soft MACs = full MACs, excess = 50 % of full.
    let penalty = SparsityPenalty::new(cfg(0.5), Some(&cost)).unwrap();
    let full = cost.cost(None).macs as f64;
    let loss = values(penalty.loss(&open))[0] as f64;
    let marginal = cost.marginal_macs();
    let mean = (marginal["main"] * 4.0 + marginal["branch"] * 3.0) / 7.0;
    assert!((loss - 0.5 * full / mean).abs() / loss < 1e-5, "{loss}");
    // Far below target: zero penalty and zero gradient.
    let closed = TwoGates::new(4, 3, &device)
        .with_temperature(1e4)
        .with_alpha(-1.0);
    let (value, g, _) = grads_of(&penalty, &closed);
    assert_eq!(value, 0.0);
    assert!(g.iter().all(|&v| v == 0.0));
    // At beta = 1, alpha = 0 the gradient per channel is lambda * w_c * sigma'(0) / ... check sign and finiteness.
    let mid = TwoGates::new(4, 3, &device).with_temperature(1.0);
    let penalty = SparsityPenalty::new(cfg(0.01), Some(&cost)).unwrap();
    let (_, g, gb) = grads_of(&penalty, &mid);
    assert!(g.iter().chain(&gb).all(|v| v.is_finite() && *v > 0.0));
}

#[test]
fn adaptive_target_moves_lambda_toward_the_target() {
    let cfg = PenaltyConfig {
        target: Some(MacsTarget::Adaptive {
            fraction: 0.5,
            rate: 1.0,
        }),
        ..PenaltyConfig::paper(1e-4)
    };
    let mut p = SparsityPenalty::new(cfg, None).unwrap();
    let up = p.adapt(0.9);
    assert!(up > 1e-4, "over budget: lambda grows");
    p.set_lambda(1e-4);
    assert!(p.adapt(0.2) < 1e-4, "under budget: lambda shrinks");
    assert!(p.adapt(f64::NAN).is_finite());
    for _ in 0..100 {
        p.adapt(1.0);
    }
    assert!(p.lambda() <= 1e-4 * 1e3 * (1.0 + 1e-12), "bounded");
}

#[test]
fn penalty_config_validation() {
    for (cfg, key) in [
        (PenaltyConfig::paper(-1.0), "penalty.lambda"),
        (PenaltyConfig::paper(f64::INFINITY), "penalty.lambda"),
        (
            PenaltyConfig {
                target: Some(MacsTarget::Excess { fraction: 1.5 }),
                ..PenaltyConfig::paper(1.0)
            },
            "penalty.target.fraction",
        ),
        (
            PenaltyConfig {
                target: Some(MacsTarget::Adaptive {
                    fraction: 0.5,
                    rate: 0.0,
                }),
                ..PenaltyConfig::paper(1.0)
            },
            "penalty.target.rate",
        ),
    ] {
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains(key), "{err}");
    }
    let json = r#"{"lambda":1e-4,"weighting":"macs","target":{"mode":"excess","fraction":0.3}}"#;
    let cfg: PenaltyConfig = serde_json::from_str(json).unwrap();
    assert_eq!(cfg.relaxation, Relaxation::Sigmoid);
    assert_eq!(cfg.target, Some(MacsTarget::Excess { fraction: 0.3 }));
}

#[test]
fn backend_names_and_missing_backends() {
    assert_eq!("flex".parse::<BackendKind>().unwrap(), BackendKind::Flex);
    assert_eq!("CUDA".parse::<BackendKind>().unwrap(), BackendKind::Cuda);
    let err = "tpu".parse::<BackendKind>().unwrap_err().to_string();
    assert!(
        err.contains("tpu") && err.contains("flex, ndarray, wgpu, cuda"),
        "{err}"
    );
    assert!(BackendKind::Flex.probe().is_ok());
    assert_eq!(BackendKind::default(), BackendKind::Flex);
    if !BackendKind::Cuda.is_compiled() {
        let err = BackendKind::Cuda.device().unwrap_err().to_string();
        assert!(err.contains("--features cuda"), "{err}");
    }
}

/// `round_widths`: a gate's kept count goes up to the next multiple with its strongest closed
/// channels, never past its width or into removed channels; a closed gate stays closed.
#[test]
fn rounding_adds_the_strongest_closed_channels_up_to_a_multiple() {
    let alpha = [0.5, -0.1, -0.9, 0.4, -0.05, -0.3, 0.2, -0.2, -0.6, -0.7];
    let a = state(GateKind::Main, &alpha, 1e4);
    let mut narrow = state(GateKind::Main, &[0.3, -0.2, -0.1], 1e4);
    narrow.mask[1] = false;
    let closed = state(GateKind::Branch, &[-0.3, -0.2, -0.1, -0.4], 1e4);
    let states = [("a", &a), ("narrow", &narrow), ("closed", &closed)];
    let derived = derive_from_states(states, 0.9).unwrap();
    assert_eq!(derived.gates["a"].kept, vec![0, 3, 6]);

    let mut four = derived.clone();
    let added = four.round_widths(states, 4).unwrap();
    // Channel 4 (alpha -0.05) is the strongest closed one.
    assert_eq!(four.gates["a"].kept, vec![0, 3, 4, 6]);
    // `narrow` keeps 1 of 3, one of which is removed: it can only reach 2.
    assert_eq!(four.gates["narrow"].kept, vec![0, 2]);
    assert!(four.gates["closed"].kept.is_empty());
    assert_eq!(added, 2);

    let mut eight = derived.clone();
    eight.round_widths(states, 8).unwrap();
    assert_eq!(eight.gates["a"].kept, vec![0, 1, 3, 4, 5, 6, 7, 8]);
    let mut same = derived.clone();
    assert_eq!(same.round_widths(states, 1).unwrap(), 0);
    assert_eq!(same, derived);
    let err = derived
        .clone()
        .round_widths(states, 0)
        .unwrap_err()
        .to_string();
    assert!(err.contains("arch.round_to"), "{err}");
}
