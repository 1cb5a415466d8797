//! The gate overhead of a gated ResNet-56 training step (batch 128, SGD with momentum, as the
//! `network` bench), measured with search-mode and bypass-mode steps alternating in one
//! process, so that the machine's drift between two benchmark groups does not enter the ratio:
//! `cargo run --release -p dnal-benches --example gate_overhead [steps per mode]`.
use burn::optim::momentum::MomentumConfig;
use burn::optim::{GradientsParams, SgdConfig};
use burn::prelude::*;
use dnal_core::{GateMode, GatedModel};
use dnal_zoo::CifarResNetConfig;

dnal_kernels::global_allocator!();

fn main() {
    dnal_benches::set_up_as_the_trainer();
    let per_mode: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let device = Device::flex().autodiff();
    let mut net = CifarResNetConfig::new(56, 10)
        .unwrap()
        .init(&device)
        .unwrap();
    let (x, y) = dnal_benches::cifar_batch(128, &device);
    let (mut search, mut bypass) = (Vec::new(), Vec::new());
    // Two warm-up steps per mode, then `per_mode` timed steps each, alternating.
    for i in 0..2 * (per_mode + 2) {
        let mode = [GateMode::Search, GateMode::Bypass][i % 2];
        let t = std::time::Instant::now();
        let step = net.clone().with_gate_mode(mode).with_temperature(100.0);
        let loss = burn::nn::loss::CrossEntropyLossConfig::new()
            .init(&device)
            .forward(step.forward(x.clone()), y.clone());
        let grads = GradientsParams::from_grads(loss.backward(), &step);
        let mut sgd = SgdConfig::new()
            .with_momentum(Some(MomentumConfig::new().with_dampening(0.0)))
            .init();
        net = sgd.step(0.01, step, grads);
        let seconds = t.elapsed().as_secs_f64();
        if i >= 4 {
            [&mut search, &mut bypass][i % 2].push(seconds);
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (s, b) = (median(&mut search), median(&mut bypass));
    println!(
        "search {s:.3} s, bypass {b:.3} s (medians of {per_mode}): gate overhead {:+.1} %",
        (s / b - 1.0) * 100.0
    );
}
