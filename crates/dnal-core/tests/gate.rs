//! ChannelGate: forward values in every mode, gradients against finite differences, and
//! finiteness at the extreme temperatures of the continuation.

mod common;

use burn::module::Module;
use burn::optim::GradientsParams;
use burn::prelude::*;
use burn::tensor::DType;
use common::*;
use dnal_core::{ChannelGate, ChannelGateConfig, GateMode, GatedModel, stable_sigmoid};

fn flex() -> Device {
    Device::flex()
}

const N: usize = 2;
const C: usize = 3;
const HW: usize = 2;

fn gate_with(
    alpha: &[f32],
    beta: f64,
    mask: &[bool],
    mode: GateMode,
    device: &Device,
) -> ChannelGate {
    let gate = ChannelGateConfig::new(alpha.len()).init(device);
    set_alpha(gate, alpha)
        .with_temperature(beta)
        .with_mask(mask)
        .with_mode(mode)
}

fn expected_factor(alpha: &[f32], beta: f64, mask: &[bool], mode: GateMode) -> Vec<f32> {
    (0..alpha.len())
        .map(|c| {
            let m = if mask[c] { 1.0 } else { 0.0 };
            match mode {
                GateMode::Bypass => 1.0,
                GateMode::Masked => m,
                GateMode::Search => (stable_sigmoid(beta * alpha[c] as f64) * m as f64) as f32,
            }
        })
        .collect()
}

#[test]
fn forward_matches_definition_in_every_mode_rank_4_and_2() {
    let device = flex();
    let alpha = [0.3, -0.7, 1.2];
    let mask = [true, true, false];
    let x4 = pseudo_random(N * C * HW * HW, 1);
    let x2 = pseudo_random(N * C, 2);
    for mode in [GateMode::Bypass, GateMode::Search, GateMode::Masked] {
        let gate = gate_with(&alpha, 2.5, &mask, mode, &device);
        let factor = expected_factor(&alpha, 2.5, &mask, mode);

        let t4 = Tensor::<4>::from_data(TensorData::new(x4.clone(), [N, C, HW, HW]), &device);
        let y4 = values(gate.forward(t4));
        let want4: Vec<f32> = x4
            .iter()
            .enumerate()
            .map(|(i, v)| v * factor[(i / (HW * HW)) % C])
            .collect();
        assert_close(&y4, &want4, 1e-6, 1e-5, &format!("{mode:?} rank 4"));

        let t2 = Tensor::<2>::from_data(TensorData::new(x2.clone(), [N, C]), &device);
        let y2 = values(gate.forward(t2));
        let want2: Vec<f32> = x2
            .iter()
            .enumerate()
            .map(|(i, v)| v * factor[i % C])
            .collect();
        assert_close(&y2, &want2, 1e-6, 1e-5, &format!("{mode:?} rank 2"));
    }
}

/// loss(alpha, x) = sum(gate(x) * w) for a fixed random w.
fn loss(gate: &ChannelGate, x: Tensor<4>, w: &Tensor<4>) -> Tensor<1> {
    (gate.forward(x) * w.clone()).sum()
}

#[test]
fn gradients_match_finite_differences() {
    let device = flex().autodiff();
    let alpha = [0.21f32, -0.43, 0.05];
    let mask = [true, true, true];
    let beta = 3.0;
    let x_vals = pseudo_random(N * C * HW * HW, 3);
    let w_vals = pseudo_random(N * C * HW * HW, 4);
    let shape = [N, C, HW, HW];
    let w = Tensor::<4>::from_data(TensorData::new(w_vals.clone(), shape), &device);
    let gate = gate_with(&alpha, beta, &mask, GateMode::Search, &device);
    let x = Tensor::<4>::from_data(TensorData::new(x_vals.clone(), shape), &device).require_grad();

    let grads = loss(&gate, x.clone(), &w).backward();
    let g_alpha = values(gate.alpha.val().grad(&grads).expect("alpha has a gradient"));
    let g_x = values(x.grad(&grads).expect("x has a gradient"));
    assert!(
        gate.temperature.val().grad(&grads).is_none(),
        "beta must not get a gradient"
    );
    assert!(
        gate.mask.val().grad(&grads).is_none(),
        "the mask must not get a gradient"
    );

    let eps = 1e-2f32;
    let plain = flex();
    let w_plain = Tensor::<4>::from_data(TensorData::new(w_vals, shape), &plain);
    let eval = |alpha: &[f32], x: &[f32]| -> f32 {
        let g = gate_with(alpha, beta, &mask, GateMode::Search, &plain);
        let x = Tensor::<4>::from_data(TensorData::new(x.to_vec(), shape), &plain);
        values(loss(&g, x, &w_plain))[0]
    };
    let fd_alpha: Vec<f32> = (0..C)
        .map(|c| {
            let (mut up, mut down) = (alpha, alpha);
            up[c] += eps;
            down[c] -= eps;
            (eval(&up, &x_vals) - eval(&down, &x_vals)) / (2.0 * eps)
        })
        .collect();
    assert_close(&g_alpha, &fd_alpha, 2e-3, 1e-2, "d loss / d alpha");

    let fd_x: Vec<f32> = (0..x_vals.len())
        .map(|i| {
            let (mut up, mut down) = (x_vals.clone(), x_vals.clone());
            up[i] += eps;
            down[i] -= eps;
            (eval(&alpha, &up) - eval(&alpha, &down)) / (2.0 * eps)
        })
        .collect();
    assert_close(&g_x, &fd_x, 2e-3, 1e-2, "d loss / d x");
}

#[test]
fn forward_and_backward_stay_finite_at_extreme_temperatures() {
    let device = flex().autodiff();
    // beta * alpha spans -1e6 ... 1e6, including exactly 0.
    for (beta, alpha) in [
        (1e4, [-100.0f32, 0.0, 100.0]),
        (1e6, [-1.0, 1e-7, 1.0]),
        (1e4, [-1e-9, 3e-4, -5e-5]),
    ] {
        let gate = gate_with(&alpha, beta, &[true; 3], GateMode::Search, &device);
        let x = Tensor::<4>::ones([N, C, HW, HW], &device).require_grad();
        let y = gate.forward(x.clone());
        let grads = y.clone().sum().backward();
        let y = values(y);
        let ga = values(gate.alpha.val().grad(&grads).unwrap());
        let gx = values(x.grad(&grads).unwrap());
        for v in y.iter().chain(&ga).chain(&gx) {
            assert!(
                v.is_finite(),
                "beta {beta}, alpha {alpha:?}: non-finite value {v}"
            );
        }
        for (c, a) in alpha.iter().enumerate() {
            let want = stable_sigmoid(beta * *a as f64) as f32;
            assert!(
                (y[c * HW * HW] - want).abs() < 1e-5,
                "gate value at beta*alpha = {}",
                beta * *a as f64
            );
        }
    }
}

#[test]
fn half_precision_input_keeps_gate_math_in_f32() {
    let device = flex().autodiff();
    let gate = gate_with(
        &[-50.0, 0.0, 50.0],
        1e6,
        &[true; 3],
        GateMode::Search,
        &device,
    );
    let x = Tensor::<4>::ones([1, C, 1, 1], (&device, DType::F16)).require_grad();
    let y = gate.forward(x.clone());
    assert_eq!(y.dtype(), DType::F16);
    let grads = y.clone().sum().backward();
    let y = values(y);
    assert_eq!(y, vec![0.0, 0.5, 1.0]);
    for v in values(gate.alpha.val().grad(&grads).unwrap())
        .iter()
        .chain(&values(x.grad(&grads).unwrap()))
    {
        assert!(v.is_finite(), "non-finite gradient {v} in f16");
    }
}

#[test]
fn temperature_and_mask_are_frozen_and_recorded() {
    let device = flex().autodiff();
    let model = TwoGates::new(4, 2, &device)
        .with_temperature(631.0)
        .with_gate_mode(GateMode::Search);
    let ids_before = model.alpha_ids();
    let model = model.with_alpha(0.0);
    assert_eq!(
        model.alpha_ids(),
        ids_before,
        "resetting alpha keeps its ParamId"
    );

    let x = Tensor::<4>::ones([1, 4, 1, 1], &device);
    let grads = model.main.forward(x).sum().backward();
    let grads = GradientsParams::from_grads(grads, &model);
    assert_eq!(grads.len(), 1, "only alpha receives a gradient");
    assert!(grads.get::<1>(model.main.alpha.id).is_some());

    let dir = std::env::temp_dir().join(format!("dnal-core-gate-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("gates");
    let mut model = model;
    model.branch = model.branch.with_mask(&[true, false]);
    model.clone().save_file(&path).unwrap();
    let fresh = TwoGates::new(4, 2, &device);
    let loaded = fresh.load_file(&path);
    assert_eq!(loaded.main.temperature(), 631.0);
    assert_eq!(loaded.branch.state().mask, vec![true, false]);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn gates_move_with_the_model_between_plain_and_autodiff() {
    let device = flex().autodiff();
    let model = TwoGates::new(3, 3, &device)
        .with_gate_mode(GateMode::Search)
        .with_temperature(2.0);
    let valid = model.valid();
    assert_eq!(valid.main.mode, GateMode::Search, "mode survives valid()");
    assert_eq!(valid.main.temperature(), 2.0);
}
