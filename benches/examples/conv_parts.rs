//! Times dnal's flex convolution by part on the 3x3 layers of CIFAR networks, batch 128:
//! the forward, and forward + backward for the weight gradient alone and for both gradients.
//! Prints the fastest of `reps` (first argument, default 10) runs of each, in ms and GFLOP/s.
//! Further arguments choose the layers, `CxS` (C channels in and out, map side S) or `CIxCOxS`,
//! e.g. `256x8 13x18x28`, `batch=N` the batch size, `1x1` pointwise convolutions instead of
//! 3x3 ones, `gemm` im2col and `gemm` only (no direct kernels) and `avx2` the kernels kept to
//! AVX2 on an AVX-512 CPU.
use burn::prelude::*;
use burn::tensor::Distribution;

dnal_kernels::global_allocator!();

fn main() {
    dnal_benches::set_up_as_the_trainer();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let reps: usize = args.first().and_then(|s| s.parse().ok()).unwrap_or(10);
    let batch: usize = args
        .iter()
        .find_map(|a| a.strip_prefix("batch=")?.parse().ok())
        .unwrap_or(128);
    dnal_kernels::set_direct(!args.iter().any(|a| a == "gemm"));
    let (k, pad) = if args.iter().any(|a| a == "1x1") {
        (1, 0)
    } else {
        (3, 1)
    };
    dnal_kernels::set_avx512(!args.iter().any(|a| a == "avx2"));
    let mut layers: Vec<(usize, usize, usize)> = args
        .iter()
        .skip(1)
        .filter(|a| *a != "1x1")
        .filter_map(|a| {
            let v: Vec<usize> = a
                .split('x')
                .map(|n| n.parse().ok())
                .collect::<Option<_>>()?;
            match v[..] {
                [c, s] => Some((c, c, s)),
                [ci, co, s] => Some((ci, co, s)),
                _ => None,
            }
        })
        .collect();
    if layers.is_empty() {
        layers = [(9, 32), (16, 32), (17, 16), (32, 16), (34, 8), (64, 8)]
            .map(|(c, s)| (c, c, s))
            .to_vec();
    }
    let device = Device::flex().autodiff();
    for (ci, co, hw) in layers {
        let x = Tensor::<4>::random([batch, ci, hw, hw], Distribution::Default, &device);
        let w = Tensor::<4>::random([co, ci, k, k], Distribution::Default, &device);
        let flop = 2.0 * (batch * ci * co * k * k * hw * hw) as f64;
        let time = |f: &dyn Fn()| {
            (0..reps)
                .map(|_| {
                    let t = std::time::Instant::now();
                    f();
                    t.elapsed().as_secs_f64()
                })
                .fold(f64::INFINITY, f64::min)
        };
        let fwd = time(&|| {
            let _ = dnal_kernels::conv2d(x.clone(), w.clone(), 1, pad).into_data();
        });
        let dw = time(&|| {
            let w = w.clone().require_grad();
            let grads = dnal_kernels::conv2d(x.clone(), w.clone(), 1, pad)
                .sum()
                .backward();
            let _ = w.grad(&grads).expect("weight gradient").into_data();
        });
        let both = time(&|| {
            let (x, w) = (x.clone().require_grad(), w.clone().require_grad());
            let grads = dnal_kernels::conv2d(x.clone(), w.clone(), 1, pad)
                .sum()
                .backward();
            let _ = x.grad(&grads).expect("input gradient").into_data();
            let _ = w.grad(&grads).expect("weight gradient").into_data();
        });
        println!(
            "{ci:>3}x{co:>3}x{hw:>2}x{hw:<2} forward {:6.2} ms ({:3.0} GFLOP/s)  +dW {:6.2} ms  +dW+dx {:6.2} ms  (backward {:3.0} GFLOP/s)",
            fwd * 1e3,
            flop / fwd / 1e9,
            dw * 1e3,
            both * 1e3,
            2.0 * flop / (both - fwd) / 1e9,
        );
    }
}
