//! Cost of a channel gate on an activation of ResNet-56's first stage ([128, 16, 32, 32]):
//! forward + backward in each mode, against the bare activation.

use burn::prelude::*;
use criterion::{Criterion, criterion_group, criterion_main};
use dnal_benches::cpu_backends;
use dnal_core::{ChannelGateConfig, GateMode};

dnal_kernels::global_allocator!();

fn gate(c: &mut Criterion) {
    dnal_benches::set_up_as_the_trainer();
    for (backend, device) in cpu_backends() {
        let device = device.autodiff();
        let x = Tensor::<4>::random(
            [128, 16, 32, 32],
            burn::tensor::Distribution::Default,
            &device,
        );
        let mut group = c.benchmark_group(format!("gate/{backend}/[128,16,32,32]"));
        group.sample_size(10);
        group.bench_function("none", |b| {
            b.iter(|| {
                let x = x.clone().require_grad();
                let grads = x.clone().sum().backward();
                x.grad(&grads).unwrap().into_data()
            })
        });
        for mode in [GateMode::Bypass, GateMode::Search, GateMode::Masked] {
            let g = ChannelGateConfig::new(16)
                .init(&device)
                .with_temperature(100.0)
                .with_mode(mode);
            group.bench_function(format!("{mode:?}").to_lowercase(), |b| {
                b.iter(|| {
                    let x = x.clone().require_grad();
                    let grads = g.forward(x.clone()).sum().backward();
                    x.grad(&grads).unwrap().into_data()
                })
            });
        }
        group.finish();
    }
}

criterion_group!(benches, gate);
criterion_main!(benches);
