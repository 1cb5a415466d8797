//! Every family, dense and pruned, frozen for inference: the frozen network's logits equal
//! burn's eval-mode forward on random images at batch 1 and 3, with random BatchNorm
//! statistics and affine parameters (and, in one case, searching gates), so that every
//! folding and every fused step is exercised.

mod common;

use burn::prelude::*;
use common::device;
use common::families::{self, Check, assert_logits_close, burn_logits, images};
use dnal_zoo::*;

/// Frozen against burn at batch 1 and 3.
struct Frozen;

impl Check for Frozen {
    fn check<N: Network>(&self, what: &str, net: &N) {
        let frozen = FrozenNetwork::new(net).unwrap();
        let [c, h, w] = frozen.input_shape();
        for batch in [1, 3] {
            let shape = [batch, c, h, w];
            let x = images(shape, batch as u64);
            let want = burn_logits(net, &x, shape, &device());
            assert_logits_close(what, batch, &frozen.forward(&x).unwrap(), &want);
        }
    }
}

#[test]
fn plain_cnns_freeze() {
    families::plain_cnns(&device(), &Frozen);
}

/// VGG-16 at full width: at batch 1 its layers of 256 and 512 filters, on maps down to 2x2,
/// take dnal's direct kernel spread over the threads where the CPU has AVX-512.
#[test]
fn a_full_width_vgg16_freezes() {
    let d = device();
    let net = families::randomised(PlainCnnConfig::vgg16_cifar(10).init(&d).unwrap(), 6);
    Frozen.check("VGG-16", &net);
}

/// ResNet-50 at its full size, batch 1: on two threads its strided convolutions (the 7x7
/// stem, the stride-2 3x3 and 1x1 layers, 10^8 multiply-adds each) go to `gemm`, which splits
/// them over the threads, and the stride-1 ones to the direct kernels, which split their
/// channel blocks; on one thread nothing is split, and layers of more than 128 filters run on
/// `gemm` instead (other rounding, so the logits agree within tolerance, not to the bit).
#[test]
fn a_full_size_resnet50_at_batch_1_agrees_on_one_and_two_threads() {
    let d = device();
    let net = families::randomised(BottleneckResNetConfig::resnet50(10).init(&d).unwrap(), 9);
    let frozen = FrozenNetwork::new(&net).unwrap();
    let [c, h, w] = frozen.input_shape();
    let x = images([1, c, h, w], 10);
    let on = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| frozen.forward(&x).unwrap())
    };
    let one = on(1);
    assert!(one.iter().all(|v| v.is_finite()));
    assert_logits_close("ResNet-50 on two threads", 1, &on(2), &one);
}

#[test]
fn cifar_resnets_freeze() {
    families::cifar_resnets(&device(), &Frozen);
}

#[test]
fn a_resnet_block_runs_as_two_fused_steps() {
    let net = CifarResNetConfig::new(20, 10)
        .unwrap()
        .init(&device())
        .unwrap();
    let nodes = net.inference_graph().unwrap().nodes.len();
    let frozen = FrozenNetwork::new(&net).unwrap();
    // Each block's add and ReLUs run inside its two convolutions: a stem, two convolutions per
    // block (9), the two downsampling shortcuts' channel copies, the pool, flatten and
    // classifier.
    assert_eq!(frozen.steps(), 1 + 2 * 9 + 2 + 3, "{nodes} graph nodes");
}

#[test]
fn bottleneck_resnets_freeze() {
    families::bottleneck_resnets(&device(), &Frozen);
}

#[test]
fn mobilenets_freeze() {
    families::mobilenets(&device(), &Frozen);
}

#[test]
fn supernets_freeze() {
    families::supernets(&device(), &Frozen);
}

#[test]
fn bad_inputs_are_errors_that_name_the_shape() {
    let d = device();
    let frozen = FrozenNetwork::new(&PlainCnnConfig::mnist_cnn().init(&d).unwrap()).unwrap();
    let err = frozen.forward(&[0.0; 100]).unwrap_err().to_string();
    assert!(err.contains("100") && err.contains("[1, 28, 28]"), "{err}");
    assert!(frozen.forward(&[]).is_err());
    let wrong = Tensor::<4>::zeros([2, 3, 28, 28], &d);
    let err = frozen.forward_tensor(wrong).unwrap_err().to_string();
    assert!(err.contains("[3, 28, 28]"), "{err}");
    let right = Tensor::<4>::zeros([2, 1, 28, 28], &d);
    assert_eq!(frozen.forward_tensor(right).unwrap().dims(), [2, 10]);
}
