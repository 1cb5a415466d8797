//! dnal's flex operations against burn's, forward + backward, on the activation shapes of
//! ResNet-56's three stages (batch 128):
//!
//! * `conv/flex/<shape>/{burn,dnal-gemm,dnal}`: a 3x3 stride-1 convolution, input and weight
//!   gradients: burn's; dnal's with im2col and `gemm` only (`dnal_kernels::set_direct(false)`);
//!   dnal's default, which takes its direct AVX-512 kernels where they are faster (ResNet-56's
//!   shapes) and `gemm` for wide layers (256 channels);
//! * `bn-gate/flex/<shape>/burn-bn-then-gate`: burn's BatchNorm followed by the channel gate in
//!   search mode; `dnal-folded`: dnal's BatchNorm with the gate folded into its affine transform.
//!
//! `cargo bench -p dnal-benches --bench kernels`

use burn::prelude::*;
use burn::tensor::Distribution;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use dnal_core::{ChannelGateConfig, GateMode};
use dnal_kernels::Activation;

dnal_kernels::global_allocator!();

fn batch_norm_gate(c: &mut Criterion) {
    dnal_kernels::allocator::keep_freed_memory();
    dnal_kernels::subnormals::flush_subnormals();
    let device = Device::flex().autodiff();
    for (channels, hw) in [(16, 32), (32, 16), (64, 8)] {
        let x = Tensor::<4>::random([128, channels, hw, hw], Distribution::Default, &device);
        let bn = burn::nn::BatchNormConfig::new(channels).init(&device);
        let gate = ChannelGateConfig::new(channels)
            .init(&device)
            .with_mode(GateMode::Search)
            .with_temperature(100.0);
        let mut group = c.benchmark_group(format!("bn-gate/flex/128x{channels}x{hw}x{hw}"));
        group.sample_size(20);
        group.throughput(Throughput::Elements(128));
        let step = |folded: bool, act: Activation| {
            let x = x.clone().require_grad();
            let y = if folded {
                dnal_kernels::batch_norm(&bn, gate.factor(), act, x.clone())
            } else {
                act.apply(gate.forward(bn.forward(x.clone())))
            };
            let grads = y.sum().backward();
            let _ = x.grad(&grads).expect("input gradient").into_data();
        };
        group.bench_function("burn-bn-then-gate", |b| {
            b.iter(|| step(false, Activation::Identity))
        });
        group.bench_function("dnal-folded", |b| {
            b.iter(|| step(true, Activation::Identity))
        });
        group.bench_function("burn-bn-then-gate-relu", |b| {
            b.iter(|| step(false, Activation::Relu))
        });
        group.bench_function("dnal-folded-relu", |b| {
            b.iter(|| step(true, Activation::Relu))
        });
        group.finish();
    }
}

fn conv(c: &mut Criterion) {
    dnal_kernels::allocator::keep_freed_memory();
    dnal_kernels::subnormals::flush_subnormals();
    let device = Device::flex().autodiff();
    for (channels, hw) in [(16, 32), (32, 16), (64, 8), (256, 8)] {
        let x = Tensor::<4>::random([128, channels, hw, hw], Distribution::Default, &device);
        let w = Tensor::<4>::random([channels, channels, 3, 3], Distribution::Default, &device);
        let mut group = c.benchmark_group(format!("conv/flex/128x{channels}x{hw}x{hw}"));
        group.sample_size(20);
        group.throughput(Throughput::Elements(128));
        for (name, dnal, direct) in [
            ("burn", false, false),
            ("dnal-gemm", true, false),
            ("dnal", true, true),
        ] {
            dnal_kernels::set_enabled(dnal);
            dnal_kernels::set_direct(direct);
            group.bench_function(name, |b| {
                b.iter(|| {
                    let (x, w) = (x.clone().require_grad(), w.clone().require_grad());
                    let y = dnal_kernels::conv2d(x.clone(), w.clone(), 1, 1);
                    let grads = y.sum().backward();
                    let _ = x.grad(&grads).expect("input gradient").into_data();
                    let _ = w.grad(&grads).expect("weight gradient").into_data();
                })
            });
        }
        dnal_kernels::set_enabled(true);
        dnal_kernels::set_direct(true);
        group.finish();
    }
}

criterion_group!(benches, conv, batch_norm_gate);
criterion_main!(benches);
