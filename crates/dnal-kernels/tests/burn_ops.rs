//! With dnal's own operations turned off (`set_enabled(false)`, process-wide: this file is its
//! own test process), the units fall back to burn's operations, as they do on the backends
//! dnal's kernels do not cover. A pruned block's last unit added into some channels of a
//! stream, and a selection of channels, must still train as the operations one by one do.

mod common;

use burn::nn::BatchNormConfig;
use burn::prelude::*;
use common::{input, noise, picked_by_slices, selections, value_and_grad, vec1};
use dnal_core::{ChannelGateConfig, GateMode};
use dnal_kernels::Activation;

fn max_difference<const D: usize>(a: Tensor<D>, b: Tensor<D>) -> f32 {
    assert_eq!(a.dims(), b.dims());
    let a = a.into_data().try_to_vec::<f32>().unwrap();
    let b = b.into_data().try_to_vec::<f32>().unwrap();
    a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max)
}

#[test]
fn conv_bn_add_into_trains_on_burn_operations_as_the_index_add_does() {
    dnal_kernels::set_enabled(false);
    let device = Device::flex().autodiff();
    let (ci, width, hw, batch) = (3, 8, 8, 4);
    let pos = [0, 3, 5, 6];
    let k = pos.len();
    let conv = burn::nn::conv::Conv2dConfig::new([ci, k], [3, 3])
        .with_padding(burn::nn::PaddingConfig2d::Explicit(1, 1, 1, 1))
        .with_bias(false)
        .init(&device);
    let x = input([batch, ci, hw, hw], 51, &device);
    let stream = input([batch, width, hw, hw], 52, &device);
    let probe = input([batch, width, hw, hw], 53, &device);
    for act in [Activation::Relu, Activation::Identity] {
        let run = |unit: bool| {
            let bn = BatchNormConfig::new(k).init(&device);
            let mut gate = ChannelGateConfig::new(k)
                .init(&device)
                .with_mode(GateMode::Search)
                .with_temperature(3.0);
            let alpha = vec1(noise(k, 9, -1.0, 1.0), &device);
            gate.alpha = gate.alpha.map(|_| alpha.set_require_grad(true));
            let (x, s) = (
                x.clone().detach().require_grad(),
                stream.clone().detach().require_grad(),
            );
            let y = if unit {
                let f = gate.factor();
                dnal_kernels::conv_bn_add_into(&conv, &bn, f, act, x.clone(), s.clone(), &pos)
            } else {
                let y = gate.forward(bn.forward(conv.forward(x.clone())));
                let at = dnal_kernels::channels::indices(&pos, &device);
                act.apply(
                    s.clone()
                        .select_assign(1, at, y, burn::tensor::IndexingUpdateOp::Add),
                )
            };
            let grads = (y.clone() * probe.clone()).sum().backward();
            (
                y.inner(),
                x.grad(&grads).unwrap(),
                s.grad(&grads).unwrap(),
                bn.gamma.grad(&grads).unwrap(),
                bn.running_mean.value_sync().inner(),
            )
        };
        let (u, r) = (run(true), run(false));
        for (what, d) in [
            ("output", max_difference(u.0, r.0)),
            ("input grad", max_difference(u.1, r.1)),
            ("stream grad", max_difference(u.2, r.2)),
            ("gamma grad", max_difference(u.3, r.3)),
            ("running mean", max_difference(u.4, r.4)),
        ] {
            assert!(d <= 1e-4, "{act:?} {what}: max abs difference {d}");
        }
    }
}

#[test]
fn channel_selection_on_burn_operations_matches_slices() {
    dnal_kernels::set_enabled(false);
    let device = Device::flex().autodiff();
    for sources in &selections() {
        let x = input([2, 6, 4, 4], 71, &device);
        let probe = input([2, sources.len(), 4, 4], 72, &device);
        let (y, dx) = value_and_grad(&x, &probe, |x| dnal_kernels::channels::select(x, sources));
        let (ry, rdx) = value_and_grad(&x, &probe, |x| picked_by_slices(x, sources));
        assert_eq!(max_difference(y, ry), 0.0, "{sources:?}");
        assert_eq!(max_difference(dx, rdx), 0.0, "{sources:?} input grad");
    }
}
