//! dnal's kernels against burn's own operations: the convolution (values and gradients), and
//! BatchNorm with the folded gate against burn's BatchNorm followed by the gate (values,
//! gradients and running statistics).

mod common;

use burn::nn::BatchNormConfig;
use burn::prelude::*;
use burn::tensor::ops::ConvOptions;
use common::{input, noise, picked_by_slices, selections, value_and_grad, vec1};
use dnal_core::{ChannelGateConfig, GateMode};
use dnal_kernels::cpu::Clamp;
use dnal_kernels::{Activation, cpu};

const ACTIVATIONS: [Activation; 3] = [Activation::Identity, Activation::Relu, Activation::Relu6];

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

/// `dnal`'s convolution against burn's `reference` on `x` and `w`: the value and the gradients
/// of `sum(out * probe)` with respect to input and weight.
fn compare_conv(
    case: &str,
    x: Tensor<4>,
    w: Tensor<4>,
    dnal: impl Fn(Tensor<4>, Tensor<4>) -> Tensor<4>,
    reference: impl Fn(Tensor<4>, Tensor<4>) -> Tensor<4>,
) {
    let run = |conv: &dyn Fn(Tensor<4>, Tensor<4>) -> Tensor<4>| {
        let x = x.clone().detach().require_grad();
        let w = w.clone().detach().require_grad();
        let y = conv(x.clone(), w.clone());
        let probe = input(y.dims(), 3, &y.device());
        let grads = (y.clone() * probe).sum().backward();
        (
            y.inner(),
            x.grad(&grads).expect("input gradient"),
            w.grad(&grads).expect("weight gradient"),
        )
    };
    let (y, dx, dw) = run(&dnal);
    let (ry, rdx, rdw) = run(&reference);
    assert_close(&format!("{case} output"), y, ry, 1e-5);
    assert_close(&format!("{case} input grad"), dx, rdx, 1e-5);
    assert_close(&format!("{case} weight grad"), dw, rdw, 1e-5);
}

fn conv_case(shape: [usize; 4], out_channels: usize, kernel: usize, stride: usize, padding: usize) {
    let device = train_device();
    let [_, c, _, _] = shape;
    let weight_shape = [out_channels, c, kernel, kernel];
    let x = input(shape, 1, &device);
    let w = Tensor::<4>::from_data(
        TensorData::new(
            noise(weight_shape.iter().product(), 2, -0.5, 0.5),
            weight_shape,
        ),
        &device,
    );
    compare_conv(
        &format!("conv {shape:?} -> {out_channels}, k{kernel} s{stride} p{padding}"),
        x,
        w,
        |x, w| dnal_kernels::conv2d(x, w, stride, padding),
        |x, w| {
            let options = ConvOptions::new([stride; 2], [padding; 2], [1; 2], 1);
            burn::tensor::module::conv2d(x, w, None, options)
        },
    );
}

#[test]
fn conv_matches_burn_in_value_and_gradient() {
    conv_case([2, 3, 8, 8], 4, 3, 1, 1);
    conv_case([3, 5, 9, 7], 6, 3, 2, 1);
    conv_case([2, 4, 6, 6], 8, 1, 1, 0);
    conv_case([2, 4, 7, 7], 3, 1, 2, 0);
    conv_case([1, 3, 15, 15], 4, 7, 2, 3);
    conv_case([2, 2, 5, 5], 2, 3, 1, 0);
}

#[test]
fn conv_matches_burn_on_a_larger_batch() {
    conv_case([9, 16, 32, 32], 8, 3, 1, 1);
    conv_case([9, 16, 32, 32], 32, 3, 2, 1);
    // A 1x1 convolution on 2^16 input values per image, whose batch goes to `gemm` with each
    // image as its own column matrix (forward, input and weight gradients).
    conv_case([3, 64, 32, 32], 8, 1, 1, 0);
}

/// Shapes that take the direct kernels where the CPU has AVX2 or AVX-512 (stride 1, "same"
/// padding, batches of several groups): odd filter counts (channel blocks 6 + 6 + 5), odd
/// patch sizes, 4x4 maps whose vectors span images, an odd number of vectors, 1x1 and 5x5
/// kernels, and maps whose last vector is partial (14x14: 12 vectors and 4 lanes; 13x13:
/// 10 and 9), whose forward takes the kernels and weight gradient `gemm`.
#[test]
fn conv_matches_burn_on_the_direct_kernel_shapes() {
    conv_case([41, 3, 4, 4], 17, 3, 1, 1);
    conv_case([6, 5, 8, 8], 9, 5, 1, 2);
    conv_case([5, 4, 16, 16], 8, 1, 1, 0);
    conv_case([4, 7, 16, 16], 34, 3, 1, 1);
    conv_case([5, 6, 14, 14], 17, 3, 1, 1);
    conv_case([4, 3, 13, 13], 7, 5, 1, 2);
    conv_case([3, 5, 14, 14], 9, 1, 1, 0);
    conv_case([1, 7, 14, 14], 35, 3, 1, 1);
    // 32x32 maps, whose channels lie 4 KiB apart (the AVX2 forward takes them a few at a
    // time), 9 images of 16x16 or larger (the weight gradient takes the kernels: on AVX2 in
    // blocks of 1 and 2 filters, each tap's 7 or 10 channels padded to whole tiles), and
    // blocks of 1 and 2 filters (AVX2 forward: two vectors per step).
    conv_case([9, 10, 32, 32], 13, 3, 1, 1);
    conv_case([9, 7, 16, 16], 5, 3, 1, 1);
    conv_case([2, 6, 32, 32], 2, 3, 1, 1);
    conv_case([3, 5, 8, 8], 1, 3, 1, 1);
    // 40 images of 8x8 with 16 channels (4 KiB apart): the weight gradient's runs of
    // images go in chunks of at most 8 images.
    conv_case([40, 16, 8, 8], 16, 3, 1, 1);
    // One image: the direct kernels take it when `gemm` would not split its product.
    conv_case([1, 16, 8, 8], 16, 3, 1, 1);
    conv_case([1, 5, 16, 16], 9, 5, 1, 2);
}

/// The depthwise convolution against burn's grouped conv2d.
fn depthwise_case(shape: [usize; 4], kernel: usize, stride: usize, padding: usize) {
    let device = train_device();
    let [_, c, _, _] = shape;
    compare_conv(
        &format!("depthwise {shape:?} k{kernel} s{stride} p{padding}"),
        input(shape, 4, &device),
        input([c, 1, kernel, kernel], 5, &device),
        |x, w| dnal_kernels::depthwise_conv2d(x, w, stride, padding),
        |x, w| {
            let options = ConvOptions::new([stride; 2], [padding; 2], [1; 2], c);
            burn::tensor::module::conv2d(x, w, None, options)
        },
    );
}

#[test]
fn depthwise_matches_burn_in_value_and_gradient() {
    // MobileNetV2's 3x3 at CIFAR sizes (rows longer than the 16 summing lanes, and shorter),
    // its stride-2 blocks, the supernet's 5x5 and 7x7, no padding, odd and tiny maps.
    depthwise_case([3, 5, 32, 32], 3, 1, 1);
    // More outputs than `planes::SERIAL_BELOW`: planes in parallel.
    depthwise_case([4, 6, 32, 32], 3, 1, 1);
    depthwise_case([4, 6, 4, 4], 3, 1, 1);
    depthwise_case([2, 7, 16, 16], 3, 2, 1);
    depthwise_case([2, 3, 9, 7], 3, 2, 1);
    depthwise_case([2, 4, 14, 14], 5, 1, 2);
    // Stride 1 on maps that are not whole vectors of 16 positions.
    depthwise_case([2, 3, 7, 9], 3, 1, 1);
    depthwise_case([1, 5, 13, 11], 3, 1, 1);
    depthwise_case([1, 3, 9, 11], 7, 1, 3);
    depthwise_case([2, 3, 10, 9], 5, 2, 2);
    depthwise_case([2, 4, 15, 13], 7, 2, 3);
    depthwise_case([3, 2, 6, 6], 3, 1, 0);
    depthwise_case([2, 3, 2, 2], 3, 1, 1);
    depthwise_case([1, 2, 1, 1], 3, 2, 1);
    // Rows of whole 8-lane vectors (AVX2 goes row by row): 8x8 maps (8 rows a step), 16 wide
    // with rows left after the 4-row steps, 24 wide with taps 3 lanes sideways, 64 wide.
    depthwise_case([2, 3, 8, 8], 3, 1, 1);
    depthwise_case([2, 3, 19, 16], 3, 1, 1);
    depthwise_case([1, 2, 5, 24], 7, 1, 3);
    depthwise_case([1, 2, 3, 64], 5, 1, 2);
    // Stride-2 rows split 16 values at a time, with odd and even tails.
    depthwise_case([2, 3, 6, 35], 3, 2, 1);
    depthwise_case([1, 2, 5, 34], 5, 2, 2);
}

/// The gradients of `sum(conv(x, w)^2)` on a pool of 1 and of 3 threads are bitwise equal.
fn assert_thread_count_independent(
    x: Tensor<4>,
    w: Tensor<4>,
    conv: impl Fn(Tensor<4>, Tensor<4>) -> Tensor<4> + Sync,
) {
    let grads_with = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let (x, w) = (x.clone().require_grad(), w.clone().require_grad());
            let y = conv(x.clone(), w.clone());
            let grads = (y.clone() * y).sum().backward();
            (
                x.grad(&grads).unwrap().into_data(),
                w.grad(&grads).unwrap().into_data(),
            )
        })
    };
    let one = grads_with(1);
    let three = grads_with(3);
    assert_eq!(one.0, three.0, "input gradient");
    assert_eq!(one.1, three.1, "weight gradient");
}

#[test]
fn depthwise_gradients_do_not_depend_on_the_thread_count() {
    let device = train_device();
    let (x, w) = (
        input([19, 24, 12, 12], 23, &device),
        input([24, 1, 3, 3], 24, &device),
    );
    assert_thread_count_independent(x, w, |x, w| dnal_kernels::depthwise_conv2d(x, w, 1, 1));
}

#[test]
fn conv_gradients_do_not_depend_on_the_thread_count() {
    let device = train_device();
    let (x, w) = (
        input([19, 8, 12, 12], 21, &device),
        input([16, 8, 3, 3], 22, &device),
    );
    assert_thread_count_independent(x, w, |x, w| dnal_kernels::conv2d(x, w, 1, 1));
    // 8x8 maps: the direct weight gradient on AVX-512, `gemm` elsewhere.
    let (x, w) = (
        input([37, 8, 8, 8], 23, &device),
        input([12, 8, 3, 3], 24, &device),
    );
    assert_thread_count_independent(x, w, |x, w| dnal_kernels::conv2d(x, w, 1, 1));
}

#[test]
fn col2im_is_the_adjoint_of_im2col() {
    // <im2col(x), c> == <x, col2im(c)> for every geometry.
    for (k, s, p) in [
        (3, 1, 1),
        (3, 2, 1),
        (1, 2, 0),
        (5, 1, 2),
        (3, 3, 0),
        (1, 1, 0),
        (3, 1, 0),
    ] {
        let g = cpu::ConvGeometry {
            in_channels: 2,
            out_channels: 1,
            in_hw: [7, 6],
            kernel: k,
            stride: s,
            padding: p,
        };
        let x = noise(g.image(), 5, -1.0, 1.0);
        let mut cols = vec![9.0];
        cpu::im2col(&[&x], &g, &mut cols);
        assert_eq!(cols.remove(0), 9.0, "im2col appends");
        assert_eq!(cols.len(), g.patch() * g.positions());
        let c = noise(cols.len(), 6, -1.0, 1.0);
        let mut back = vec![0.0; g.image()];
        cpu::col2im(&c, &g, 1, 0, &mut back);
        let lhs: f64 = cols.iter().zip(&c).map(|(a, b)| f64::from(a * b)).sum();
        let rhs: f64 = x.iter().zip(&back).map(|(a, b)| f64::from(a * b)).sum();
        assert!(
            (lhs - rhs).abs() < 1e-4 * lhs.abs().max(1.0),
            "k{k} s{s} p{p}: {lhs} vs {rhs}"
        );
    }
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

fn norm_case(mode: GateMode, shift: f32, tol: f32, act: Activation) {
    // A large gamma puts part of ReLU6's output against its upper bound.
    let gain = if act == Activation::Relu6 { 4.0 } else { 1.0 };
    let device = train_device();
    let shape = [4, 6, 5, 5];
    let c = shape[1];
    let x = input(shape, 11, &device) * 2.0 + shift;
    let probe = input(shape, 12, &device);
    let make_bn = || {
        let mut bn = BatchNormConfig::new(c).init(&device);
        bn.gamma = bn
            .gamma
            .map(|_| vec1(noise(c, 13, 0.5 * gain, 1.5 * gain), &device).require_grad());
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
            dnal_kernels::batch_norm(&bn, g.factor(), act, x.clone())
        } else {
            act.apply(g.forward(bn.forward(x.clone())))
        };
        let grads = (y.clone() * probe.clone()).sum().backward();
        let alpha_grad = (mode == GateMode::Search).then(|| g.alpha.grad(&grads).unwrap());
        (
            y.inner(),
            x.grad(&grads).unwrap(),
            bn.gamma.grad(&grads).unwrap(),
            bn.beta.grad(&grads).unwrap(),
            alpha_grad,
            bn.running_mean.value_sync().inner(),
            bn.running_var.value_sync().inner(),
        )
    };
    let fast = run(true);
    let reference = run(false);
    let what = format!("{mode:?} {act:?} shift {shift}");
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
    norm_case(GateMode::Bypass, 0.0, 1e-4, Activation::Identity);
    norm_case(GateMode::Search, 0.0, 1e-4, Activation::Identity);
    norm_case(GateMode::Masked, 0.0, 1e-4, Activation::Identity);
}

#[test]
fn batch_norm_with_a_fused_activation_matches_burn_then_the_activation() {
    for act in [Activation::Relu, Activation::Relu6] {
        norm_case(GateMode::Search, 0.0, 1e-4, act);
        norm_case(GateMode::Bypass, 0.0, 1e-4, act);
    }
}

/// The backward recomputes the activation's gradient mask from BatchNorm's input: it must
/// agree exactly with the forward output. With a unit output gradient, the gradient of `b` is
/// the number of outputs strictly inside the clamp's bounds.
#[test]
fn batch_norm_backward_masks_exactly_the_outputs_the_activation_let_through() {
    let device = train_device();
    let (n, c, hw) = (4, 5, 6);
    let x = input([n, c, hw, hw], 41, &device);
    for act in [Activation::Relu, Activation::Relu6] {
        let a = vec1(noise(c, 42, 2.0, 4.0), &device).require_grad();
        let b = vec1(noise(c, 43, -1.0, 5.0), &device).require_grad();
        let (y, _, _) = dnal_kernels::batch_norm_train(x.clone(), a, b.clone(), 1e-5, act);
        let grads = y.clone().sum().backward();
        let db = b.grad(&grads).expect("gradient of b").into_data();
        let Clamp { lo, hi } = act.clamp();
        let y = y.inner().into_data().try_to_vec::<f32>().unwrap();
        let expected: Vec<f32> = (0..c)
            .map(|ch| {
                (0..n)
                    .flat_map(|i| &y[(i * c + ch) * hw * hw..][..hw * hw])
                    .filter(|&&v| v > lo && v < hi)
                    .count() as f32
            })
            .collect();
        assert_eq!(db.try_to_vec::<f32>().unwrap(), expected, "{act:?}");
        assert!(
            expected
                .iter()
                .any(|&k| k > 0.0 && k < (n * hw * hw) as f32)
        );
    }
}

/// A batch of feature vectors (`[N, F]`, VGG-16's hidden classifier layer) as `F` channels of
/// `N` 1x1 planes: dnal's BatchNorm with the ReLU in it gives burn's BatchNorm on `[N, F]`
/// followed by a ReLU, in training (output, gradients, running statistics) and in inference.
#[test]
fn batch_norm_of_features_as_1x1_planes_matches_burns_on_the_features() {
    let device = train_device();
    let (n, f) = (16, 12);
    let x = input([n, f, 1, 1], 44, &device).reshape([n, f]) * 3.0 + 0.5;
    let probe = input([n, f, 1, 1], 45, &device).reshape([n, f]);
    let make_bn = || {
        let mut bn = BatchNormConfig::new(f).with_momentum(0.2).init(&device);
        bn.gamma = bn
            .gamma
            .map(|_| vec1(noise(f, 46, 0.5, 1.5), &device).require_grad());
        bn.beta = bn
            .beta
            .map(|_| vec1(noise(f, 47, -0.5, 0.5), &device).require_grad());
        bn
    };
    let relu = Activation::Relu;
    let run = |fast: bool| {
        let bn = make_bn();
        let x = x.clone().detach().require_grad();
        let y = if fast {
            dnal_kernels::batch_norm(&bn, None, relu, x.clone().reshape([n, f, 1, 1]))
                .reshape([n, f])
        } else {
            burn::tensor::activation::relu(bn.forward(x.clone()))
        };
        let grads = (y.clone() * probe.clone()).sum().backward();
        let eval = bn.valid();
        let x_eval = x.clone().inner();
        let y_eval = if fast {
            dnal_kernels::batch_norm(&eval, None, relu, x_eval.reshape([n, f, 1, 1]))
                .reshape([n, f])
        } else {
            burn::tensor::activation::relu(eval.forward(x_eval))
        };
        [
            y.inner(),
            x.grad(&grads).unwrap(),
            bn.gamma.grad(&grads).unwrap().reshape([1, f]),
            bn.beta.grad(&grads).unwrap().reshape([1, f]),
            bn.running_mean.value_sync().inner().reshape([1, f]),
            bn.running_var.value_sync().inner().reshape([1, f]),
            y_eval,
        ]
    };
    let names = [
        "output",
        "input grad",
        "gamma grad",
        "beta grad",
        "running mean",
        "running var",
        "inference output",
    ];
    for ((fast, reference), name) in run(true).into_iter().zip(run(false)).zip(names) {
        assert_close(&format!("1x1-plane bn {name}"), fast, reference, 1e-4);
    }
}

#[test]
fn batch_norm_statistics_stay_exact_far_from_zero() {
    // At |mean| = 1000, f32 inputs carry ~6e-5 absolute error: both sides agree to ~1e-3.
    norm_case(GateMode::Search, 1000.0, 1e-3, Activation::Identity);
}

/// A BatchNorm with random affine parameters and running statistics.
fn eval_batch_norm(c: usize, device: &Device) -> burn::nn::BatchNorm {
    let mut bn = BatchNormConfig::new(c).init(device);
    bn.gamma = bn.gamma.map(|_| vec1(noise(c, 13, 0.5, 1.5), device));
    bn.beta = bn.beta.map(|_| vec1(noise(c, 14, -0.5, 0.5), device));
    bn.running_mean = burn::module::RunningState::new(vec1(noise(c, 15, -1.0, 1.0), device));
    bn.running_var = burn::module::RunningState::new(vec1(noise(c, 16, 0.5, 2.0), device));
    bn
}

#[test]
fn batch_norm_in_eval_matches_burn_then_gate() {
    let device = Device::flex();
    let c = 6;
    let bn = eval_batch_norm(c, &device);
    let x = input([3, c, 4, 4], 17, &device);
    for mode in [GateMode::Bypass, GateMode::Search, GateMode::Masked] {
        for act in ACTIVATIONS {
            let g = gate(c, mode, &device);
            assert_close(
                &format!("bn eval {mode:?} {act:?}"),
                dnal_kernels::batch_norm(&bn, g.factor(), act, x.clone()),
                act.apply(g.forward(bn.forward(x.clone()))),
                1e-5,
            );
        }
    }
}

#[test]
fn conv_bn_folded_for_inference_matches_conv_then_bn_then_gate() {
    let device = Device::flex();
    let c = 6;
    let bn = eval_batch_norm(c, &device);
    // Strided convolutions and 2x2 maps take im2col and gemm; 16x16 maps of a batch of 9 the
    // direct kernels, with the epilogue applied in the micro-kernel; 14x14 and 9x9 maps the
    // direct kernels with a partial last vector.
    // (1, 1, 16, 1): one image, which the direct kernels take when its product is small.
    for (stride, padding, hw, batch) in [
        (1, 1, 9, 3),
        (2, 1, 9, 3),
        (1, 1, 2, 3),
        (1, 1, 16, 9),
        (1, 1, 16, 1),
        (1, 1, 14, 5),
        (1, 1, 14, 1),
    ] {
        let conv = burn::nn::conv::Conv2dConfig::new([4, c], [3, 3])
            .with_stride([stride; 2])
            .with_padding(burn::nn::PaddingConfig2d::Explicit(
                padding, padding, padding, padding,
            ))
            .with_bias(false)
            .init(&device);
        let x = input([batch, 4, hw, hw], 19, &device);
        for mode in [GateMode::Bypass, GateMode::Search, GateMode::Masked] {
            for act in ACTIVATIONS {
                let g = gate(c, mode, &device);
                // x3: part of ReLU6's output reaches its upper bound.
                let x = x.clone() * 3.0;
                assert_close(
                    &format!("conv-bn eval {hw}x{hw} s{stride} {mode:?} {act:?}"),
                    dnal_kernels::conv_bn(&conv, &bn, g.factor(), act, x.clone()),
                    act.apply(g.forward(bn.forward(conv.forward(x)))),
                    1e-5,
                );
            }
        }
    }
}

#[test]
fn depthwise_conv_bn_folded_for_inference_matches_conv_then_bn_then_gate() {
    let device = Device::flex();
    let c = 5;
    let bn = eval_batch_norm(c, &device);
    // Maps from 1x1 to 32x32 (odd and non-square sides), strides 1 and 2, kernels 3 to 7,
    // paddings 0 to 3: the phase planes, the flat runs across rows and the dropped columns.
    let cases = [
        (3, 1, 1, [32, 32], 2),
        (3, 2, 1, [32, 32], 2),
        (3, 1, 1, [4, 4], 3),
        (3, 2, 1, [4, 4], 1),
        (3, 2, 1, [9, 7], 2),
        (3, 1, 0, [6, 5], 2),
        (5, 1, 2, [14, 14], 1),
        (7, 2, 3, [15, 13], 2),
        (3, 1, 1, [1, 1], 2),
        (3, 2, 1, [1, 1], 1),
        (3, 1, 1, [19, 24], 1),
        (3, 2, 1, [8, 35], 1),
    ];
    for (kernel, stride, padding, [h, w], batch) in cases {
        let conv = burn::nn::conv::Conv2dConfig::new([c, c], [kernel, kernel])
            .with_stride([stride; 2])
            .with_groups(c)
            .with_padding(burn::nn::PaddingConfig2d::Explicit(
                padding, padding, padding, padding,
            ))
            .with_bias(false)
            .init(&device);
        let x = input([batch, c, h, w], 23, &device) * 3.0;
        for mode in [GateMode::Bypass, GateMode::Search, GateMode::Masked] {
            for act in ACTIVATIONS {
                let g = gate(c, mode, &device);
                assert_close(
                    &format!(
                        "depthwise conv-bn eval k{kernel} s{stride} p{padding} {h}x{w} {mode:?} {act:?}"
                    ),
                    dnal_kernels::conv_bn(&conv, &bn, g.factor(), act, x.clone()),
                    act.apply(g.forward(bn.forward(conv.forward(x.clone())))),
                    1e-5,
                );
            }
        }
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
    let y = dnal_kernels::batch_norm(&bn, g.factor(), Activation::Relu, x.clone());
    let grads = y.clone().sum().backward();
    for t in [
        y.inner().into_data(),
        x.grad(&grads).unwrap().into_data(),
        g.alpha.grad(&grads).unwrap().into_data(),
    ] {
        assert!(t.try_to_vec::<f32>().unwrap().iter().all(|v| v.is_finite()));
    }
}

/// A residual block's last unit, `relu(gate(bn(conv(x))) + shortcut)`, fused (BatchNorm in
/// training, the convolution's output in inference) against burn's operations one by one:
/// values, and in training the gradients of the input, the shortcut, gamma, beta and alpha.
#[test]
fn conv_bn_add_matches_burn_then_the_shortcut_then_relu() {
    let c = 8;
    // 16x16 maps, batch 9: the direct kernels where the CPU has them; 14x14 the same with a
    // partial last vector (and gemm for the weight gradient); 2x2: im2col and gemm.
    for (hw, batch) in [(16, 9), (14, 5), (2, 6)] {
        let conv = |device: &Device| {
            burn::nn::conv::Conv2dConfig::new([4, c], [3, 3])
                .with_padding(burn::nn::PaddingConfig2d::Explicit(1, 1, 1, 1))
                .with_bias(false)
                .init(device)
        };
        // Inference.
        let device = Device::flex();
        let (conv_eval, bn) = (conv(&device), eval_batch_norm(c, &device));
        let x = input([batch, 4, hw, hw], 31, &device);
        let shortcut = input([batch, c, hw, hw], 32, &device);
        for mode in [GateMode::Bypass, GateMode::Search] {
            let g = gate(c, mode, &device);
            let fused = dnal_kernels::conv_bn_add(
                &conv_eval,
                &bn,
                g.factor(),
                Activation::Relu,
                x.clone(),
                shortcut.clone(),
            );
            let reference = Activation::Relu
                .apply(g.forward(bn.forward(conv_eval.forward(x.clone()))) + shortcut.clone());
            assert_close(
                &format!("conv-bn-add eval {hw}x{hw} {mode:?}"),
                fused,
                reference,
                1e-5,
            );
        }
        // Training.
        let device = train_device();
        let conv_train = conv(&device);
        let x = input([batch, 4, hw, hw], 33, &device);
        let shortcut = input([batch, c, hw, hw], 34, &device);
        let probe = input([batch, c, hw, hw], 35, &device);
        let run = |fused: bool| {
            let bn = BatchNormConfig::new(c).init(&device);
            let g = gate(c, GateMode::Search, &device);
            let (x, r) = (
                x.clone().detach().require_grad(),
                shortcut.clone().detach().require_grad(),
            );
            let y = if fused {
                dnal_kernels::conv_bn_add(
                    &conv_train,
                    &bn,
                    g.factor(),
                    Activation::Relu,
                    x.clone(),
                    r.clone(),
                )
            } else {
                Activation::Relu
                    .apply(g.forward(bn.forward(conv_train.forward(x.clone()))) + r.clone())
            };
            let grads = (y.clone() * probe.clone()).sum().backward();
            (
                y.inner(),
                x.grad(&grads).unwrap(),
                r.grad(&grads).unwrap(),
                bn.gamma.grad(&grads).unwrap(),
                bn.beta.grad(&grads).unwrap(),
                g.alpha.grad(&grads).unwrap(),
            )
        };
        let (f, b) = (run(true), run(false));
        let what = format!("conv-bn-add train {hw}x{hw}");
        assert_close(&format!("{what} output"), f.0, b.0, 1e-4);
        assert_close(&format!("{what} input grad"), f.1, b.1, 1e-3);
        assert_close(&format!("{what} shortcut grad"), f.2, b.2, 1e-5);
        assert_close(&format!("{what} gamma grad"), f.3, b.3, 1e-4);
        assert_close(&format!("{what} beta grad"), f.4, b.4, 1e-4);
        assert_close(&format!("{what} alpha grad"), f.5, b.5, 1e-4);
    }
}

/// A pruned residual block's last unit added into some channels of a wider stream,
/// `act(stream + scatter(gate(bn(conv(x)))))`, against burn's operations one by one (an index
/// add): in inference on flex (the fused pass) and in training (values, the gradients of the
/// input, the stream, gamma, beta and the gate, and the running statistics; ReLU, ReLU6 and no
/// clamp), for a run of channels, scattered channels and the whole stream.
#[test]
fn conv_bn_add_into_matches_burn_then_the_index_add_then_relu() {
    let (ci, width, hw) = (3, 8, 8);
    let reference = |conv: &burn::nn::conv::Conv2d,
                     bn: &burn::nn::BatchNorm,
                     g: &dnal_core::ChannelGate,
                     act: Activation,
                     x: Tensor<4>,
                     stream: Tensor<4>,
                     pos: &[usize]| {
        let y = g.forward(bn.forward(conv.forward(x)));
        let at = dnal_kernels::channels::indices(pos, &y.device());
        act.apply(stream.select_assign(1, at, y, burn::tensor::IndexingUpdateOp::Add))
    };
    for pos in [vec![2, 3, 4], vec![0, 3, 5, 6], (0..width).collect()] {
        let k = pos.len();
        let conv = |device: &Device| {
            burn::nn::conv::Conv2dConfig::new([ci, k], [3, 3])
                .with_padding(burn::nn::PaddingConfig2d::Explicit(1, 1, 1, 1))
                .with_bias(false)
                .init(device)
        };
        // Inference, batch 1 and 5 (the direct kernels where the CPU has them).
        let device = Device::flex();
        let (conv_eval, bn) = (conv(&device), eval_batch_norm(k, &device));
        for batch in [1, 5] {
            let x = input([batch, ci, hw, hw], 41, &device);
            let stream = input([batch, width, hw, hw], 42, &device);
            for (mode, act) in [
                (GateMode::Bypass, Activation::Relu),
                (GateMode::Search, Activation::Relu6),
                (GateMode::Masked, Activation::Identity),
            ] {
                let g = gate(k, mode, &device);
                let fused = dnal_kernels::conv_bn_add_into(
                    &conv_eval,
                    &bn,
                    g.factor(),
                    act,
                    x.clone() * 3.0,
                    stream.clone(),
                    &pos,
                );
                let expected = reference(
                    &conv_eval,
                    &bn,
                    &g,
                    act,
                    x.clone() * 3.0,
                    stream.clone(),
                    &pos,
                );
                assert_close(
                    &format!("conv-bn-add-into eval {pos:?} batch {batch} {mode:?} {act:?}"),
                    fused,
                    expected.clone(),
                    1e-5,
                );
                // A stream nothing else holds is added into in place: the same values.
                let unique = input([batch, width, hw, hw], 42, &device);
                let in_place = dnal_kernels::conv_bn_add_into(
                    &conv_eval,
                    &bn,
                    g.factor(),
                    act,
                    x.clone() * 3.0,
                    unique,
                    &pos,
                );
                assert_close(
                    &format!("conv-bn-add-into in place {pos:?} batch {batch} {mode:?} {act:?}"),
                    in_place,
                    expected,
                    1e-5,
                );
            }
        }
        // Training: values, the gradients of the input, the stream, gamma, beta and the gate,
        // and the running statistics, for each clamp, at 8x8 and on a batch of 16x16 maps
        // large enough for the passes to run in parallel.
        let device = train_device();
        let conv_train = conv(&device);
        for (batch, side, act) in [
            (4, hw, Activation::Relu),
            (4, hw, Activation::Relu6),
            (4, hw, Activation::Identity),
            (9, 2 * hw, Activation::Relu),
        ] {
            let x = input([batch, ci, side, side], 43, &device);
            let stream = input([batch, width, side, side], 44, &device) * 2.0;
            let probe = input([batch, width, side, side], 45, &device);
            let run = |fused: bool| {
                let bn = BatchNormConfig::new(k).init(&device);
                let g = gate(k, GateMode::Search, &device);
                let (x, s) = (
                    x.clone().detach().require_grad(),
                    stream.clone().detach().require_grad(),
                );
                let y = if fused {
                    let f = g.factor();
                    dnal_kernels::conv_bn_add_into(
                        &conv_train,
                        &bn,
                        f,
                        act,
                        x.clone(),
                        s.clone(),
                        &pos,
                    )
                } else {
                    reference(&conv_train, &bn, &g, act, x.clone(), s.clone(), &pos)
                };
                let grads = (y.clone() * probe.clone()).sum().backward();
                (
                    y.inner(),
                    x.grad(&grads).unwrap(),
                    s.grad(&grads).unwrap(),
                    bn.gamma.grad(&grads).unwrap(),
                    bn.beta.grad(&grads).unwrap(),
                    g.alpha.grad(&grads).unwrap(),
                    bn.running_mean.value_sync().inner(),
                    bn.running_var.value_sync().inner(),
                )
            };
            let (f, b) = (run(true), run(false));
            let what =
                format!("conv-bn-add-into train {pos:?} batch {batch} {side}x{side} {act:?}");
            assert_close(&format!("{what} output"), f.0, b.0, 1e-4);
            assert_close(&format!("{what} input grad"), f.1, b.1, 1e-3);
            assert_close(&format!("{what} stream grad"), f.2, b.2, 1e-5);
            assert_close(&format!("{what} gamma grad"), f.3, b.3, 1e-4);
            assert_close(&format!("{what} beta grad"), f.4, b.4, 1e-4);
            assert_close(&format!("{what} alpha grad"), f.5, b.5, 1e-4);
            assert_close(&format!("{what} running mean"), f.6, b.6, 1e-5);
            assert_close(&format!("{what} running var"), f.7, b.7, 1e-5);
        }
    }
}

/// Channels picked, moved and zero-filled (`channels::select`, dnal's operation on flex)
/// against one-channel slices and a concatenation, exactly: values in inference and training
/// and the input's gradient, on planes the passes split over the threads.
#[test]
fn channel_selection_matches_slices_exactly() {
    for sources in &selections() {
        let x = input([4, 6, 32, 32], 61, &Device::flex());
        let picked = dnal_kernels::channels::select(x.clone(), sources);
        assert_close("select eval", picked, picked_by_slices(x, sources), 0.0);
        let device = train_device();
        let x = input([4, 6, 32, 32], 61, &device);
        let probe = input([4, sources.len(), 32, 32], 62, &device);
        let (y, dx) = value_and_grad(&x, &probe, |x| dnal_kernels::channels::select(x, sources));
        let (ry, rdx) = value_and_grad(&x, &probe, |x| picked_by_slices(x, sources));
        assert_close(&format!("select {sources:?}"), y, ry, 0.0);
        assert_close(&format!("select {sources:?} input grad"), dx, rdx, 0.0);
    }
}

/// The global average pool against burn's adaptive average pool to 1x1: values and input
/// gradients.
#[test]
fn global_avg_pool_matches_burn_adaptive_avg_pool() {
    let device = train_device();
    for shape in [[1, 5, 8, 8], [3, 4, 7, 7], [2, 3, 1, 1]] {
        let x = input(shape, 51, &device);
        let run = |ours: bool| {
            let x = x.clone().detach().require_grad();
            let y: Tensor<2> = if ours {
                dnal_kernels::global_avg_pool(x.clone())
            } else {
                burn::tensor::module::adaptive_avg_pool2d(x.clone(), [1, 1]).flatten(1, 3)
            };
            let probe = input([shape[0], shape[1], 1, 1], 52, &device).flatten(1, 3);
            let grads = (y.clone() * probe).sum().backward();
            (y.inner(), x.grad(&grads).unwrap())
        };
        let (ours, burn) = (run(true), run(false));
        assert_close(&format!("global pool {shape:?}"), ours.0, burn.0, 1e-6);
        assert_close(&format!("global pool grad {shape:?}"), ours.1, burn.1, 1e-7);
    }
}

/// dnal's 2x2 max-pool against burn's: values and input gradients (training) and values
/// (inference, which computes no winners), bitwise, on even and odd maps, rows of fewer and
/// more than 16 outputs, with ties (a ReLU's zeros: the first input of the window wins) and a
/// NaN; small maps pooled on the calling thread, a large batch in parallel.
#[test]
fn max_pool_matches_burn_with_ties_and_odd_maps() {
    use burn::nn::pool::MaxPool2dConfig;
    let device = train_device();
    let pool = MaxPool2dConfig::new([2, 2]).init();
    // The last shape has more outputs than `planes::SERIAL_BELOW`: the parallel path.
    let shapes = [
        ([3, 5, 8, 8], 31),
        ([2, 3, 7, 9], 32),
        ([40, 2, 4, 6], 33),
        ([8, 16, 32, 33], 34),
        ([3, 4, 28, 28], 35),
        ([2, 3, 14, 15], 36),
        ([64, 8, 70, 66], 37),
    ];
    for (shape, seed) in shapes {
        // Half the values are zero (after a ReLU), so many windows tie.
        let x = burn::tensor::activation::relu(input(shape, seed, &device));
        let probe = input(
            [shape[0], shape[1], shape[2] / 2, shape[3] / 2],
            seed + 1,
            &device,
        );
        let run = |fast: bool| {
            let x = x.clone().detach().require_grad();
            let y = if fast {
                dnal_kernels::max_pool2d(&pool, x.clone())
            } else {
                pool.forward(x.clone())
            };
            let grads = (y.clone() * probe.clone()).sum().backward();
            let dx = x.grad(&grads).expect("input gradient");
            (vec1_of(y.inner()), vec1_of(dx))
        };
        let (fast, reference) = (run(true), run(false));
        assert_eq!(fast.0, reference.0, "{shape:?}: pooled values");
        assert_eq!(fast.1, reference.1, "{shape:?}: input gradient");
        let inference = vec1_of(dnal_kernels::max_pool2d(&pool, x.clone().inner()));
        assert_eq!(
            inference, reference.0,
            "{shape:?}: pooled values in inference"
        );
    }
    // A NaN wins its window, as in burn.
    let mut values = noise(16, 34, -1.0, 1.0);
    values[5] = f32::NAN;
    let x = Tensor::<4>::from_data(TensorData::new(values, [1, 1, 4, 4]), &Device::flex());
    for y in [
        vec1_of(dnal_kernels::max_pool2d(&pool, x.clone())),
        vec1_of(dnal_kernels::max_pool2d(
            &pool,
            x.clone().to_device(&train_device()),
        )),
    ] {
        assert!(
            y[0].is_nan() && y[1..].iter().all(|v| v.is_finite()),
            "{y:?}"
        );
    }
}

fn vec1_of<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().try_to_vec::<f32>().unwrap()
}
