//! Times dnal's depthwise convolution on the depthwise layers of MobileNetV2-CIFAR, dense
//! widths, batch 1 by default: the inference forward
//! (`dnal_kernels::cpu::depthwise_forward_affine`, the convolution with BatchNorm's affine
//! transform and ReLU6 fused) and, with the argument `grads`, the input gradient and the
//! weight gradient as well. Prints the median of `reps` timed runs (first argument, default
//! 200) of each in microseconds. Further arguments choose the layers, `CxSsT` (C channels,
//! map side S, stride T), e.g. `144x32s1 576x8s2`, `batch=N` the batch size and `k=N` the
//! filter side (3 by default, padding `N / 2`); `DNAL_ISA` caps the instruction set as
//! everywhere.
use dnal_kernels::cpu::{
    Clamp, DepthwiseGeometry, depthwise_forward_affine, depthwise_input_grad, depthwise_weight_grad,
};

dnal_kernels::global_allocator!();

fn main() {
    dnal_benches::set_up_as_the_trainer();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let reps: usize = args.first().and_then(|s| s.parse().ok()).unwrap_or(200);
    let batch: usize = args
        .iter()
        .find_map(|a| a.strip_prefix("batch=")?.parse().ok())
        .unwrap_or(1);
    let grads = args.iter().any(|a| a == "grads");
    let kernel: usize = args
        .iter()
        .find_map(|a| a.strip_prefix("k=")?.parse().ok())
        .unwrap_or(3);
    let mut layers: Vec<(usize, usize, usize)> = args
        .iter()
        .skip(1)
        .filter_map(|a| {
            let (c, rest) = a.split_once('x')?;
            let (s, t) = rest.split_once('s')?;
            Some((c.parse().ok()?, s.parse().ok()?, t.parse().ok()?))
        })
        .collect();
    if layers.is_empty() {
        // Every distinct depthwise layer of MobileNetV2-CIFAR: the expanded widths at each map
        // size, the stride-2 ones at the stages' first blocks.
        layers = vec![
            (32, 32, 1),
            (144, 32, 1),
            (144, 32, 2),
            (192, 16, 1),
            (192, 16, 2),
            (384, 8, 1),
            (576, 8, 1),
            (576, 8, 2),
            (960, 4, 1),
        ];
    }
    println!("isa {:?}, batch {batch}", dnal_kernels::isa());
    for (c, hw, stride) in layers {
        let g = DepthwiseGeometry {
            channels: c,
            in_hw: [hw, hw],
            kernel,
            stride,
            padding: kernel / 2,
        };
        let x: Vec<f32> = (0..batch * c * hw * hw)
            .map(|i| (i % 17) as f32 * 0.1 - 0.8)
            .collect();
        let w: Vec<f32> = (0..c * kernel * kernel)
            .map(|i| (i % 5) as f32 * 0.1 - 0.2)
            .collect();
        let (scale, shift) = (vec![1.5; c], vec![0.1; c]);
        let relu6 = Clamp { lo: 0.0, hi: 6.0 };
        let [oh, ow] = g.out_hw();
        let dy: Vec<f32> = (0..batch * c * oh * ow)
            .map(|i| (i % 13) as f32 * 0.1 - 0.6)
            .collect();
        // Runs of about 0.3 M outputs each, so that a run's timer is worth reading.
        let calls = (300_000 / (batch * c * hw * hw)).max(1);
        let median = |f: &dyn Fn() -> Vec<f32>| {
            let mut runs: Vec<f64> = (0..reps)
                .map(|_| {
                    let t = std::time::Instant::now();
                    for _ in 0..calls {
                        std::hint::black_box(f());
                    }
                    t.elapsed().as_secs_f64() / calls as f64
                })
                .collect();
            runs.sort_by(f64::total_cmp);
            runs[runs.len() / 2] * 1e6
        };
        let forward = median(&|| depthwise_forward_affine(&x, &w, &scale, &shift, relu6, &g));
        let mut line = format!("{c} x {hw}x{hw} stride {stride}: forward {forward:.1} us");
        if grads {
            let input = median(&|| depthwise_input_grad(&dy, &w, &g));
            let weight = median(&|| depthwise_weight_grad(&x, &dy, &g));
            line += &format!(", input grad {input:.1} us, weight grad {weight:.1} us");
        }
        println!("{line}");
    }
}
