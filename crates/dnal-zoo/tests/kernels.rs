//! dnal's BatchNorm with the folded gate against burn's BatchNorm followed by the gate: equal
//! values, gradients and running statistics.

mod common;

use burn::nn::BatchNormConfig;
use burn::prelude::*;
use common::{input, noise, vec1};
use dnal_core::{ChannelGateConfig, GateMode};
use dnal_zoo::kernels;

fn train_device() -> Device {
    Device::flex().autodiff()
}

fn assert_close<const D: usize>(what: &str, actual: Tensor<D>, expected: Tensor<D>, tol: f32) {
    assert_eq!(actual.dims(), expected.dims(), "{what}: shapes");
    let a = actual.into_data().try_to_vec::<f32>().unwrap();
    let e = expected.into_data().try_to_vec::<f32>().unwrap();
    let scale = e.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
    let worst = a
        .iter()
        .zip(&e)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max);
    assert!(a.iter().all(|v| v.is_finite()), "{what}: non-finite values");
    assert!(
        worst <= tol * scale,
        "{what}: max abs difference {worst} exceeds {tol} x {scale}"
    );
}

fn gate(channels: usize, mode: GateMode, device: &Device) -> dnal_core::ChannelGate {
    let alpha: Vec<f32> = noise(channels, 9, -1.0, 1.0);
    let keep: Vec<bool> = (0..channels).map(|c| c % 4 != 1).collect();
    let g = ChannelGateConfig::new(channels)
        .init(device)
        .with_temperature(3.0)
        .with_mode(mode)
        .with_mask(&keep);
    let mut g = g;
    let trainable = device.is_autodiff();
    g.alpha = g
        .alpha
        .map(|_| vec1(alpha, device).set_require_grad(trainable));
    g
}

fn norm_case(mode: GateMode, shift: f32, tol: f32) {
    let device = train_device();
    let shape = [4, 6, 5, 5];
    let c = shape[1];
    let x = input(shape, 11, &device) * 2.0 + shift;
    let probe = input(shape, 12, &device);
    let make_bn = || {
        let mut bn = BatchNormConfig::new(c).init(&device);
        bn.gamma = bn
            .gamma
            .map(|_| vec1(noise(c, 13, 0.5, 1.5), &device).require_grad());
        bn.beta = bn
            .beta
            .map(|_| vec1(noise(c, 14, -0.5, 0.5), &device).require_grad());
        bn
    };
    let run = |fast: bool| {
        let bn = make_bn();
        let g = gate(c, mode, &device);
        let x = x.clone().detach().require_grad();
        let y = if fast {
            kernels::batch_norm(&bn, g.factor(), x.clone())
        } else {
            g.forward(bn.forward(x.clone()))
        };
        let grads = (y.clone() * probe.clone()).sum().backward();
        let alpha_grad = (mode == GateMode::Search).then(|| g.alpha.grad(&grads).unwrap());
        (
            y.inner(),
            x.grad(&grads).unwrap(),
            bn.gamma.grad(&grads).unwrap(),
            bn.beta.grad(&grads).unwrap(),
            alpha_grad,
            bn.running_mean.value().inner(),
            bn.running_var.value().inner(),
        )
    };
    let fast = run(true);
    let reference = run(false);
    let what = format!("{mode:?} shift {shift}");
    assert_close(&format!("bn {what} output"), fast.0, reference.0, tol);
    assert_close(
        &format!("bn {what} input grad"),
        fast.1,
        reference.1,
        10.0 * tol,
    );
    assert_close(&format!("bn {what} gamma grad"), fast.2, reference.2, tol);
    assert_close(&format!("bn {what} beta grad"), fast.3, reference.3, tol);
    if let (Some(a), Some(b)) = (fast.4, reference.4) {
        assert_close(&format!("bn {what} alpha grad"), a, b, tol);
    }
    assert_close(
        &format!("bn {what} running mean"),
        fast.5,
        reference.5,
        1e-5,
    );
    assert_close(&format!("bn {what} running var"), fast.6, reference.6, 1e-4);
}

#[test]
fn batch_norm_with_folded_gate_matches_burn_then_gate() {
    norm_case(GateMode::Bypass, 0.0, 1e-4);
    norm_case(GateMode::Search, 0.0, 1e-4);
    norm_case(GateMode::Masked, 0.0, 1e-4);
}

#[test]
fn batch_norm_statistics_stay_exact_far_from_zero() {
    // At |mean| = 1000, f32 inputs carry ~6e-5 absolute error: both sides agree to ~1e-3.
    norm_case(GateMode::Search, 1000.0, 1e-3);
}

#[test]
fn batch_norm_in_eval_matches_burn_then_gate() {
    let device = Device::flex();
    let c = 6;
    let mut bn = BatchNormConfig::new(c).init(&device);
    bn.gamma = bn.gamma.map(|_| vec1(noise(c, 13, 0.5, 1.5), &device));
    bn.beta = bn.beta.map(|_| vec1(noise(c, 14, -0.5, 0.5), &device));
    bn.running_mean = burn::module::RunningState::new(vec1(noise(c, 15, -1.0, 1.0), &device));
    bn.running_var = burn::module::RunningState::new(vec1(noise(c, 16, 0.5, 2.0), &device));
    let x = input([3, c, 4, 4], 17, &device);
    for mode in [GateMode::Bypass, GateMode::Search, GateMode::Masked] {
        let g = gate(c, mode, &device);
        assert_close(
            &format!("bn eval {mode:?}"),
            kernels::batch_norm(&bn, g.factor(), x.clone()),
            g.forward(bn.forward(x.clone())),
            1e-5,
        );
    }
}

#[test]
fn a_gate_at_beta_alpha_of_1e5_stays_finite_through_the_folded_norm() {
    let device = train_device();
    let c = 4;
    let bn = BatchNormConfig::new(c).init(&device);
    let mut g = gate(c, GateMode::Search, &device).with_temperature(1e5);
    g.alpha = g
        .alpha
        .map(|_| vec1(vec![1.0, -1.0, 0.5, -0.5], &device).require_grad());
    let x = input([2, c, 3, 3], 18, &device).require_grad();
    let y = kernels::batch_norm(&bn, g.factor(), x.clone());
    let grads = y.clone().sum().backward();
    for t in [
        y.inner().into_data(),
        x.grad(&grads).unwrap().into_data(),
        g.alpha.grad(&grads).unwrap().into_data(),
    ] {
        assert!(t.try_to_vec::<f32>().unwrap().iter().all(|v| v.is_finite()));
    }
}
