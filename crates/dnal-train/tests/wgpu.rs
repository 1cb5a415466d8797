//! The whole pipeline on wgpu: every stage, derivation, pruning, evaluation and the report, on
//! a few hundred digits, following the same trajectory as on flex.
//!
//! Built only with `--features wgpu` (`cargo xtask test` runs it). Without a usable adapter the
//! test prints why it was skipped and passes, unless `DNAL_REQUIRE_WGPU=1` (set by CI, which
//! installs Mesa's software Vulkan) makes a missing adapter a failure.
#![cfg(feature = "wgpu")]

mod common;

use dnal_core::BackendKind;
use dnal_train::progress::paths;

use common::{demo, finished, history, opts};

/// The wgpu device, or `None` (the test skipped, saying why) where no usable adapter is found;
/// with `DNAL_REQUIRE_WGPU=1` (CI, which installs Mesa's software Vulkan) a missing adapter
/// fails the test instead.
fn wgpu_device() -> Option<burn::prelude::Device> {
    match BackendKind::Wgpu.probe() {
        Ok(device) => Some(device),
        Err(e) if std::env::var("DNAL_REQUIRE_WGPU").as_deref() == Ok("1") => {
            panic!("DNAL_REQUIRE_WGPU=1 but wgpu is unusable: {e}")
        }
        Err(e) => {
            eprintln!("skipped, no usable wgpu adapter: {e}");
            None
        }
    }
}

#[test]
fn the_pipeline_runs_on_wgpu_as_on_flex() {
    if wgpu_device().is_none() {
        return;
    }
    // Every batch of one size, so that each kernel is compiled once per network (on software
    // Vulkan compiling the kernels is most of the time): 256 + 128 images in batches of 32.
    let cfg = demo(&[
        "data.train_limit=256",
        "data.test_limit=128",
        "data.batch_size=32",
        "data.eval_batch_size=32",
        "report.latency_batch=32",
        "weights.epochs=1",
        "arch.epochs=2",
        "final.epochs=1",
    ]);
    let run = |backend: BackendKind| {
        let dir = tempfile::tempdir().unwrap();
        let mut o = opts(dir.path(), false, None);
        o.backend = backend;
        let report = finished(dnal_train::run(&cfg, &o).unwrap());
        assert!(dir.path().join(paths::PRUNED).join("model.bpk").is_file());
        (report, history(dir.path()))
    };
    let (gpu, gpu_log) = run(BackendKind::Wgpu);
    let (cpu, cpu_log) = run(BackendKind::Flex);
    assert!(gpu.pruned.is_some(), "the wgpu run derived and pruned");
    assert_eq!(gpu_log.len(), cpu_log.len());
    // Same seeded weights and data order; only the float rounding of the kernels differs.
    for (g, c) in gpu_log.iter().zip(&cpu_log) {
        let (g, c) = (g["loss"].as_f64().unwrap(), c["loss"].as_f64().unwrap());
        assert!(
            g.is_finite() && (g - c).abs() <= 0.02 * c.abs(),
            "loss {g} on wgpu, {c} on flex"
        );
    }
    let (g, c) = (gpu.baseline.top1, cpu.baseline.top1);
    assert!(
        (g - c).abs() <= 3.0,
        "dense top-1 {g} % on wgpu, {c} % on flex"
    );
}

/// Values `0.5 * sin(i * 0.37 + seed) + 0.3 * cos(i * 1.91 * seed)`: varied, deterministic.
fn wave(n: usize, seed: f32) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let i = i as f32;
            0.5 * (i * 0.37 + seed).sin() + 0.3 * (i * 1.91 * seed).cos()
        })
        .collect()
}

/// Training BatchNorm (with a residual, an activation) on `device`: output, batch mean and
/// variance, and the gradients of `sum(y * w)` for the input, `a`, `b` and the residual.
fn batch_norm_case(
    device: &burn::prelude::Device,
    [n, c, h, w]: [usize; 4],
    act: dnal_kernels::Activation,
    residual: bool,
    offset: f32,
    channel_last: bool,
) -> Vec<Vec<f32>> {
    use burn::prelude::*;
    let device = device.clone().autodiff();
    let len = n * c * h * w;
    let four = |v: Vec<f32>| Tensor::<4>::from_data(TensorData::new(v, [n, c, h, w]), &device);
    // The same values held channel-last in memory (what a convolution hands BatchNorm on wgpu).
    let last = |t: Tensor<4>| {
        let v = t
            .permute([0, 2, 3, 1])
            .into_data()
            .try_to_vec::<f32>()
            .unwrap();
        Tensor::<4>::from_data(TensorData::new(v, [n, h, w, c]), &device).permute([0, 3, 1, 2])
    };
    let one = |v: Vec<f32>| Tensor::<1>::from_data(TensorData::new(v, [c]), &device);
    // Channels of different means and spreads, on a common offset.
    let xv = wave(len, 1.0)
        .into_iter()
        .enumerate()
        .map(|(i, v)| offset + v * (1.0 + (i / (h * w) % c) as f32) + (i / (h * w) % c) as f32)
        .collect();
    let x = if channel_last {
        last(four(xv))
    } else {
        four(xv)
    };
    let x = x.detach().require_grad();
    let a = one(wave(c, 2.0).iter().map(|v| v + 1.0).collect()).require_grad();
    let b = one(wave(c, 3.0)).require_grad();
    let r = four(wave(len, 4.0)).require_grad();
    let (y, mean, var) = if residual {
        dnal_kernels::batch_norm_add_train(x.clone(), a.clone(), b.clone(), r.clone(), 1e-5, act)
    } else {
        dnal_kernels::batch_norm_train(x.clone(), a.clone(), b.clone(), 1e-5, act)
    };
    // Channel-last, the output's gradient arrives channel-last too.
    let weights = four(wave(len, 5.0));
    let grads = if channel_last {
        (y.clone().permute([0, 2, 3, 1]) * weights.permute([0, 2, 3, 1]))
            .sum()
            .backward()
    } else {
        (y.clone() * weights).sum().backward()
    };
    let values = |t: Tensor<1>| t.into_data().try_to_vec::<f32>().unwrap();
    let flat = |t: Tensor<4>| values(t.reshape([len]));
    let mut out = vec![
        flat(y),
        values(mean),
        values(var),
        flat(x.grad(&grads).unwrap()),
        values(a.grad(&grads).unwrap()),
        values(b.grad(&grads).unwrap()),
    ];
    if residual {
        out.push(flat(r.grad(&grads).unwrap()));
    }
    out
}

#[test]
fn batch_norm_kernels_on_wgpu_match_flex() {
    let Some(device) = wgpu_device() else {
        return;
    };
    let flex = BackendKind::Flex.probe().unwrap();
    close(
        &batch_norm_module_case(&device),
        &batch_norm_module_case(&flex),
        &["output 1", "output 2", "running mean", "running variance"],
        "a BatchNorm module",
    );
    use dnal_kernels::Activation::*;
    // A shape whose reductions take several cubes per channel and several rounds per unit,
    // short channels (one cube of 32 or 64 units), channel counts that are not powers of two
    // and more channels than a cube's units in channel-last memory, 625 cubes along each
    // channel (ResNet-50-like: 64 channel-last channels, four lanes each), odd planes, and a large
    // common offset (the variance must not cancel).
    for (shape, act, residual, offset, channel_last) in [
        ([4, 3, 40, 40], Relu, false, 0.0, false),
        ([4, 3, 40, 40], Relu6, true, 0.0, false),
        ([3, 5, 7, 7], Identity, true, 0.0, false),
        ([2, 4, 9, 11], Relu, true, 1000.0, false),
        ([4, 6, 20, 20], Relu, false, 0.0, true),
        ([3, 5, 9, 11], Relu6, true, 0.0, true),
        ([2, 9, 4, 4], Relu, true, 0.0, true),
        ([2, 300, 3, 3], Relu, true, 0.0, true),
        ([4, 64, 100, 100], Relu, false, 0.0, true),
    ] {
        let gpu = batch_norm_case(&device, shape, act, residual, offset, channel_last);
        let cpu = batch_norm_case(&flex, shape, act, residual, offset, channel_last);
        close(
            &gpu,
            &cpu,
            &["output", "mean", "variance", "dx", "da", "db", "dresidual"],
            &format!(
                "{shape:?} {act:?} residual {residual} offset {offset} channel-last {channel_last}"
            ),
        );
    }
}

/// A depthwise convolution on `device` through dnal's entry point (dnal's CubeCL kernels on
/// wgpu) and, on flex, through burn's grouped convolution: the output and the gradients of
/// `sum(y * weights)` for the input and (where `weight_grad`) the weight.
#[allow(clippy::too_many_arguments)]
fn depthwise_case(
    device: &burn::prelude::Device,
    [n, c, h, w]: [usize; 4],
    k: usize,
    stride: usize,
    padding: usize,
    channel_last: bool,
    weight_grad: bool,
    dnal: bool,
) -> Vec<Vec<f32>> {
    use burn::prelude::*;
    use burn::tensor::ops::ConvOptions;
    let device = device.clone().autodiff();
    let x = Tensor::<4>::from_data(
        TensorData::new(wave(n * c * h * w, 1.0), [n, c, h, w]),
        &device,
    );
    let x = if channel_last {
        let v = x.permute([0, 2, 3, 1]).into_data();
        Tensor::<4>::from_data(v, &device).permute([0, 3, 1, 2])
    } else {
        x
    };
    let x = x.detach().require_grad();
    let kernel =
        Tensor::<4>::from_data(TensorData::new(wave(c * k * k, 2.0), [c, 1, k, k]), &device);
    let kernel = if weight_grad {
        kernel.require_grad()
    } else {
        kernel
    };
    let y = if dnal {
        dnal_kernels::depthwise_conv2d(x.clone(), kernel.clone(), stride, padding)
    } else {
        let options = ConvOptions::new([stride; 2], [padding; 2], [1; 2], c);
        burn::tensor::module::conv2d(x.clone(), kernel.clone(), None, options)
    };
    let [_, _, oh, ow] = y.dims();
    let len = n * c * oh * ow;
    let weights = Tensor::<4>::from_data(TensorData::new(wave(len, 5.0), [n, c, oh, ow]), &device);
    let grads = (y.clone() * weights).sum().backward();
    let flat = |t: Tensor<4>| {
        let len = t.shape().num_elements();
        t.reshape([len]).into_data().try_to_vec::<f32>().unwrap()
    };
    let mut out = vec![flat(y), flat(x.grad(&grads).unwrap())];
    if weight_grad {
        out.push(flat(kernel.grad(&grads).unwrap()));
    }
    out
}

#[test]
fn depthwise_kernels_on_wgpu_match_burn_on_flex() {
    let Some(device) = wgpu_device() else {
        return;
    };
    let flex = BackendKind::Flex.probe().unwrap();
    // MobileNetV2's 3x3 at strides 1 and 2, the supernet's 5x5 and 7x7, odd and non-square
    // planes, channel-last inputs of more channels than a cube's units, a weight gradient
    // over many cubes per channel, and an input gradient alone (a frozen weight).
    for (shape, k, stride, padding, channel_last, weight_grad) in [
        ([2, 4, 8, 8], 3, 1, 1, false, true),
        ([2, 5, 9, 11], 3, 2, 1, false, true),
        ([3, 6, 10, 9], 5, 1, 2, true, true),
        ([2, 3, 13, 13], 7, 2, 3, true, true),
        ([2, 300, 4, 4], 3, 1, 1, true, true),
        ([8, 16, 40, 40], 3, 1, 1, true, true),
        ([3, 7, 6, 6], 3, 2, 0, false, true),
        ([2, 4, 7, 7], 3, 1, 1, true, false),
    ] {
        let run = |device, dnal| {
            depthwise_case(
                device,
                shape,
                k,
                stride,
                padding,
                channel_last,
                weight_grad,
                dnal,
            )
        };
        close(
            &run(&device, true),
            &run(&flex, false),
            &["output", "dx", "dweight"],
            &format!(
                "{shape:?} k {k} stride {stride} padding {padding} channel-last {channel_last}"
            ),
        );
    }
}

/// Each of `gpu`'s vectors within 2e-4 of the largest value of `cpu`'s (at least 1).
fn close(gpu: &[Vec<f32>], cpu: &[Vec<f32>], names: &[&str], case: &str) {
    assert_eq!(gpu.len(), cpu.len());
    for ((g, c), name) in gpu.iter().zip(cpu).zip(names) {
        assert_eq!(g.len(), c.len());
        let scale = c.iter().fold(1.0f32, |m, v| m.max(v.abs()));
        let worst = g
            .iter()
            .zip(c)
            .map(|(g, c)| (g - c).abs())
            .fold(0.0f32, f32::max);
        assert!(
            worst <= 2e-4 * scale,
            "{name} of {case}: differs by {worst} (largest value {scale})"
        );
    }
}

/// A BatchNorm module's output and running statistics after two training calls on `device`.
fn batch_norm_module_case(device: &burn::prelude::Device) -> Vec<Vec<f32>> {
    use burn::nn::BatchNormConfig;
    use burn::prelude::*;
    let device = device.clone().autodiff();
    let [n, c, h, w] = [3, 4, 6, 5];
    let bn = BatchNormConfig::new(c).with_momentum(0.3).init(&device);
    let factor = Tensor::<1>::from_data(TensorData::new(wave(c, 6.0), [c]), &device);
    let mut out = Vec::new();
    for seed in [7.0, 8.0] {
        let xv = wave(n * c * h * w, seed)
            .iter()
            .map(|v| 2.0 * v + 0.5)
            .collect();
        let x = Tensor::<4>::from_data(TensorData::new(xv, [n, c, h, w]), &device);
        let y =
            dnal_kernels::batch_norm(&bn, Some(factor.clone()), dnal_kernels::Activation::Relu, x);
        out.push(
            y.reshape([n * c * h * w])
                .into_data()
                .try_to_vec::<f32>()
                .unwrap(),
        );
    }
    for state in [&bn.running_mean, &bn.running_var] {
        out.push(state.value_sync().into_data().try_to_vec::<f32>().unwrap());
    }
    out
}
