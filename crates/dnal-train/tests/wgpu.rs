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

/// Which convolution a case runs and what it differentiates.
#[derive(Clone, Copy)]
struct ConvCase {
    /// `[N, C, H, W]` of the input.
    shape: [usize; 4],
    /// Output channels of a one-group convolution; `None` for a depthwise one.
    out_channels: Option<usize>,
    kernel: usize,
    stride: usize,
    padding: usize,
    /// The input laid out channel-last in memory.
    channel_last: bool,
    /// Whether the input and the weight are tracked.
    input_grad: bool,
    weight_grad: bool,
}

impl ConvCase {
    fn name(&self) -> String {
        let Self {
            shape,
            out_channels,
            kernel,
            stride,
            padding,
            channel_last,
            input_grad,
            weight_grad,
        } = self;
        format!(
            "{shape:?} -> {out_channels:?} k {kernel} stride {stride} padding {padding} \
             channel-last {channel_last} dx {input_grad} dw {weight_grad}"
        )
    }
}

/// A convolution on `device`, through dnal's entry point (`dnal`: on wgpu dnal's CubeCL
/// depthwise kernels, or burn's convolution with dnal's backward) or through burn's conv2d
/// (the reference, on flex): the output and the gradients of `sum(y * weights)` for the input
/// and the weight where they are tracked.
fn conv_case(device: &burn::prelude::Device, case: ConvCase, dnal: bool) -> Vec<Vec<f32>> {
    use burn::prelude::*;
    use burn::tensor::ops::ConvOptions;
    let ConvCase {
        shape: [n, c, h, w],
        out_channels,
        kernel: k,
        stride,
        padding,
        channel_last,
        input_grad,
        weight_grad,
    } = case;
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
    let x = if input_grad { x.require_grad() } else { x };
    let (co, ci, groups) = match out_channels {
        Some(co) => (co, c, 1),
        None => (c, 1, c),
    };
    let len = co * ci * k * k;
    let kernel = Tensor::<4>::from_data(TensorData::new(wave(len, 2.0), [co, ci, k, k]), &device);
    let kernel = if weight_grad {
        kernel.require_grad()
    } else {
        kernel
    };
    let y = match (dnal, out_channels) {
        (true, None) => dnal_kernels::depthwise_conv2d(x.clone(), kernel.clone(), stride, padding),
        (true, Some(_)) => dnal_kernels::conv2d(x.clone(), kernel.clone(), stride, padding),
        (false, _) => {
            let options = ConvOptions::new([stride; 2], [padding; 2], [1; 2], groups);
            burn::tensor::module::conv2d(x.clone(), kernel.clone(), None, options)
        }
    };
    let [_, _, oh, ow] = y.dims();
    let len = n * co * oh * ow;
    let weights = Tensor::<4>::from_data(TensorData::new(wave(len, 5.0), [n, co, oh, ow]), &device);
    let grads = (y.clone() * weights).sum().backward();
    let flat = |t: Tensor<4>| {
        let len = t.shape().num_elements();
        t.reshape([len]).into_data().try_to_vec::<f32>().unwrap()
    };
    let mut out = vec![flat(y)];
    if input_grad {
        out.push(flat(x.grad(&grads).unwrap()));
    }
    if weight_grad {
        out.push(flat(kernel.grad(&grads).unwrap()));
    }
    out
}

/// Runs each case through dnal on wgpu and through burn on flex, and compares.
fn convolutions_match(cases: &[ConvCase]) {
    let Some(device) = wgpu_device() else {
        return;
    };
    let flex = BackendKind::Flex.probe().unwrap();
    for case in cases {
        let names: Vec<&str> = ["output"]
            .into_iter()
            .chain(case.input_grad.then_some("dx"))
            .chain(case.weight_grad.then_some("dweight"))
            .collect();
        close(
            &conv_case(&device, *case, true),
            &conv_case(&flex, *case, false),
            &names,
            &case.name(),
        );
    }
}

/// A case differentiating input and weight.
fn both(
    shape: [usize; 4],
    out_channels: Option<usize>,
    kernel: usize,
    stride: usize,
    padding: usize,
    channel_last: bool,
) -> ConvCase {
    ConvCase {
        shape,
        out_channels,
        kernel,
        stride,
        padding,
        channel_last,
        input_grad: true,
        weight_grad: true,
    }
}

#[test]
fn depthwise_kernels_on_wgpu_match_burn_on_flex() {
    // MobileNetV2's 3x3 at strides 1 and 2, the supernet's 5x5 and 7x7, odd and non-square
    // planes, channel-last inputs of more channels than a cube's units, a weight gradient
    // over many cubes per channel, and an input gradient alone (a frozen weight).
    convolutions_match(&[
        both([2, 4, 8, 8], None, 3, 1, 1, false),
        both([2, 5, 9, 11], None, 3, 2, 1, false),
        both([3, 6, 10, 9], None, 5, 1, 2, true),
        both([2, 3, 13, 13], None, 7, 2, 3, true),
        both([2, 300, 4, 4], None, 3, 1, 1, true),
        both([8, 16, 40, 40], None, 3, 1, 1, true),
        both([3, 7, 6, 6], None, 3, 2, 0, false),
        ConvCase {
            weight_grad: false,
            ..both([2, 4, 7, 7], None, 3, 1, 1, true)
        },
    ]);
}

#[test]
fn convolution_backward_on_wgpu_matches_burn_on_flex() {
    // The stride-1 input gradient as a forward convolution: "same" 3x3, 5x5 and 7x7, "valid"
    // and over-padded ones (the gradient's padding k - 1 - p from 2 down to 0), non-square
    // planes, fewer and more output than input channels, channel-last input; a frozen weight
    // and an untracked input (a network's first layer); a strided and a 1x1 convolution, which
    // keep burn's backward.
    convolutions_match(&[
        both([2, 3, 8, 8], Some(5), 3, 1, 1, false),
        both([2, 6, 9, 7], Some(4), 3, 1, 0, true),
        both([3, 4, 6, 5], Some(6), 3, 1, 2, false),
        both([2, 5, 11, 10], Some(3), 5, 1, 2, true),
        both([1, 2, 9, 9], Some(2), 7, 1, 3, false),
        both([4, 16, 8, 8], Some(32), 3, 1, 1, true),
        ConvCase {
            weight_grad: false,
            ..both([2, 4, 7, 7], Some(4), 3, 1, 1, false)
        },
        ConvCase {
            input_grad: false,
            ..both([2, 3, 8, 8], Some(4), 3, 1, 1, false)
        },
        both([2, 4, 9, 9], Some(8), 3, 2, 1, false),
        both([2, 4, 6, 6], Some(8), 1, 1, 0, true),
    ]);
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
