//! The same gate code on wgpu: values and gradients equal flex's.
//!
//! Built only with `--features wgpu`. Without a Vulkan/Metal/DX12 adapter the tests print why
//! they were skipped and pass, unless `DNAL_REQUIRE_WGPU=1` (set by CI, which installs Mesa's
//! software Vulkan) makes a missing adapter a failure.
#![cfg(feature = "wgpu")]

mod common;

use burn::prelude::*;
use common::*;
use dnal_core::*;

fn wgpu_device(test: &str) -> Option<Device> {
    match BackendKind::Wgpu.probe() {
        Ok(device) => Some(device),
        Err(e) if std::env::var("DNAL_REQUIRE_WGPU").as_deref() == Ok("1") => {
            panic!("{test}: DNAL_REQUIRE_WGPU=1 but wgpu is unusable: {e}")
        }
        Err(e) => {
            eprintln!("{test}: skipped, no usable wgpu adapter: {e}");
            None
        }
    }
}

/// Gate output, d/d alpha and d/d x of sum(gate(x) * w) on `device`.
fn run_gate(device: &Device, alpha: &[f32], beta: f64, rank4: bool) -> [Vec<f32>; 3] {
    let device = device.clone().autodiff();
    let c = alpha.len();
    let gate = set_alpha(ChannelGateConfig::new(c).init(&device), alpha)
        .with_temperature(beta)
        .with_mask(&(0..c).map(|i| i != 1).collect::<Vec<_>>())
        .with_mode(GateMode::Search);
    let (shape4, shape2) = ([2, c, 3, 3], [4, c]);
    let n = if rank4 { 2 * c * 9 } else { 4 * c };
    let (xv, wv) = (pseudo_random(n, 11), pseudo_random(n, 12));
    let (y, x) = if rank4 {
        let x = Tensor::<4>::from_data(TensorData::new(xv, shape4), &device).require_grad();
        let w = Tensor::<4>::from_data(TensorData::new(wv, shape4), &device);
        (gate.forward(x.clone()) * w, XGrad::Four(x))
    } else {
        let x = Tensor::<2>::from_data(TensorData::new(xv, shape2), &device).require_grad();
        let w = Tensor::<2>::from_data(TensorData::new(wv, shape2), &device);
        let y = gate.forward(x.clone()) * w;
        (y.reshape([4, c, 1, 1]), XGrad::Two(x))
    };
    let grads = y.clone().sum().backward();
    let gx = match x {
        XGrad::Four(x) => values(x.grad(&grads).unwrap()),
        XGrad::Two(x) => values(x.grad(&grads).unwrap()),
    };
    [
        values(y),
        values(gate.alpha.val().grad(&grads).unwrap()),
        gx,
    ]
}

enum XGrad {
    Four(Tensor<4>),
    Two(Tensor<2>),
}

#[test]
fn gate_values_and_gradients_equal_flex() {
    let Some(gpu) = wgpu_device("gate_values_and_gradients_equal_flex") else {
        return;
    };
    let cpu = Device::flex();
    for (beta, alpha) in [
        (1.0, [0.3f32, -0.2, 0.8, -1.1]),
        (39.8, [0.01, -0.02, 0.05, -0.005]),
    ] {
        for rank4 in [true, false] {
            let want = run_gate(&cpu, &alpha, beta, rank4);
            let got = run_gate(&gpu, &alpha, beta, rank4);
            for (what, (g, w)) in ["output", "d/d alpha", "d/d x"]
                .iter()
                .zip(got.iter().zip(&want))
            {
                assert_close(
                    g,
                    w,
                    1e-5,
                    1e-4,
                    &format!("{what}, beta {beta}, rank4 {rank4}"),
                );
            }
        }
    }
}

#[test]
fn extreme_temperatures_stay_finite_on_wgpu() {
    let Some(gpu) = wgpu_device("extreme_temperatures_stay_finite_on_wgpu") else {
        return;
    };
    for (beta, alpha) in [(1e4, [-100.0f32, 0.0, 100.0]), (1e6, [-1.0, 1e-7, 1.0])] {
        let [y, ga, gx] = run_gate(&gpu, &alpha, beta, true);
        for v in y.iter().chain(&ga).chain(&gx) {
            assert!(v.is_finite(), "beta {beta}: non-finite {v} on wgpu");
        }
        let want = run_gate(&Device::flex(), &alpha, beta, true);
        assert_close(&y, &want[0], 1e-6, 1e-5, "output at extreme beta");
    }
}

#[test]
fn penalty_equals_flex() {
    let Some(gpu) = wgpu_device("penalty_equals_flex") else {
        return;
    };
    let eval = |device: &Device| {
        let device = device.clone().autodiff();
        let mut model = TwoGates::new(4, 3, &device).with_temperature(15.8);
        model.main = set_alpha(model.main, &[0.1, -0.3, 0.7, 0.0]);
        let penalty = SparsityPenalty::new(
            PenaltyConfig {
                relaxation: Relaxation::Tempered,
                ..PenaltyConfig::paper(1e-2)
            },
            None,
        )
        .unwrap();
        let loss = penalty.loss(&model);
        let grads = loss.clone().backward();
        (
            values(loss),
            values(model.main.alpha.val().grad(&grads).unwrap()),
        )
    };
    let (want_l, want_g) = eval(&Device::flex());
    let (got_l, got_g) = eval(&gpu);
    assert_close(&got_l, &want_l, 1e-6, 1e-5, "penalty");
    assert_close(&got_g, &want_g, 1e-7, 1e-4, "penalty gradient");
}
