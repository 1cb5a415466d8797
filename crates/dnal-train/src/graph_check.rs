//! `dnal-train check --only graph`: training steps recorded and replayed as `train --graph`
//! runs them, against the same steps issued one by one on the same device.
//!
//! Each case trains a small network for [`STEPS`] batches twice from the same values: once as
//! training without `--graph` does, and once through the [`Recorder`] (warm-up steps, one
//! recorded step, replays), with the pipeline's own step ([`device_step`],
//! [`StepOut::apply`]) and optimisers. The cases cover the three kinds of phase: the weight
//! stage of a MobileNetV2 (depthwise convolutions, residual streams), the architecture stage
//! of a plain CNN (gates searching, the sparsity penalty's gradient folded into alpha's) and
//! the final stage of a ResNet pruned to scattered channels. A replay that read a stale input,
//! or a step that wrote a parameter, a velocity or a running statistic into new memory, shows
//! as losses or values that part from the plain run's.

use burn::module::{Module, ModuleVisitor, Param};
use burn::prelude::*;
use dnal_core::{Architecture, GatedModel, SparsityPenalty};
use dnal_data::HostBatch;
use dnal_kernels::Rate;
use dnal_kernels::check::{Comparison, TOLERANCE};
use dnal_zoo::{CifarResNetConfig, MobileNetV2Config, Network, PlainCnnConfig};

use crate::config::TrainConfig;
use crate::phase::{Phase, configure, optimizers};
use crate::recipes::resolve;
use crate::replay::Recorder;
use crate::replicas::{StepSpec, device_step};

/// Batches each case trains on: more than the recorder's warm-up and recorded step, so that
/// several are replays.
pub const STEPS: usize = 7;

/// Images per batch, of 3 x [`SIDE`]².
const BATCH: usize = 4;
/// Image side.
const SIDE: usize = 8;
/// Classes.
const CLASSES: usize = 10;
/// The temperature of the searching case.
const BETA: f64 = 3.0;

/// Every case on `device` (a device of a backend that records graphs: cuda or wgpu).
pub fn graph(device: &Device) -> Vec<Comparison> {
    let device = device.clone().autodiff();
    let cfg = match resolve(Some("mnist-demo"), None, &[]) {
        Ok(cfg) => cfg,
        Err(e) => return vec![failed("the demo recipe", e.to_string())],
    };
    let mut out = Vec::new();
    let mobilenet = || {
        let stages = [[1, 4, 1, 1], [2, 6, 2, 2]];
        MobileNetV2Config::imagenet_widths(CLASSES, SIDE, 4, &stages, 8).init(&device)
    };
    out.extend(case(
        "weight stage, MobileNetV2 (3 blocks)",
        &cfg,
        Phase::Weights,
        mobilenet,
        &device,
    ));
    let plain = || {
        PlainCnnConfig::new(3, SIDE, vec![4, 6], vec![0])
            .with_global_pool(true)
            .with_num_classes(CLASSES)
            .init(&device)
            .map(|net| net.with_alpha(0.2))
    };
    out.extend(case(
        "architecture stage, plain CNN 4-6, paper's penalty",
        &cfg,
        Phase::Arch,
        plain,
        &device,
    ));
    let pruned = || {
        let dense = CifarResNetConfig::new(8, CLASSES)?.init(&device)?;
        let mut arch = Architecture::full(&dense);
        for (name, gate) in arch.gates.iter_mut() {
            // Two channels of three, at offsets that differ by gate: scattered channels.
            let shift = name.len();
            gate.kept.retain(|i| (i + shift) % 3 != 0);
        }
        dense.prune(&arch)
    };
    out.extend(case(
        "final stage, ResNet-8 pruned to scattered channels",
        &cfg,
        Phase::Final,
        pruned,
        &device,
    ));
    out
}

/// One network trained both ways; `build` must give the same architecture each time (its
/// values are copied from the first).
fn case<N, E: std::fmt::Display>(
    name: &str,
    cfg: &TrainConfig,
    phase: Phase,
    build: impl Fn() -> Result<N, E>,
    device: &Device,
) -> Vec<Comparison>
where
    N: Network,
{
    let built = || {
        build()
            .map(|net| configure(cfg, phase, net).with_temperature(BETA))
            .map_err(|e| e.to_string())
    };
    let (plain, recorded) = match (built(), built()) {
        (Ok(plain), Ok(other)) => {
            // The same values in a network of its own: a clone would share the running
            // statistics' state.
            let recorded = other.load_record(plain.clone().into_record());
            (plain, configure(cfg, phase, recorded))
        }
        (Err(e), _) | (_, Err(e)) => return vec![failed(name, e)],
    };
    let penalty = match phase
        .searches()
        .then(|| SparsityPenalty::new(cfg.arch.penalty, Some(&plain.cost_model())))
        .transpose()
    {
        Ok(p) => p,
        Err(e) => return vec![failed(name, e.to_string())],
    };
    let alpha_ids = plain.alpha_ids();
    let spec = StepSpec::of(phase, &plain, penalty.as_ref(), &alpha_ids);
    let lr = |i: usize| 0.05 / (1.0 + i as f64);

    // As training without --graph steps.
    let mut optims = optimizers(cfg, phase);
    let mut net = plain;
    let mut want = Vec::with_capacity(STEPS);
    for (i, batch) in batches().into_iter().enumerate() {
        let b = batch.into_device(device);
        let out = device_step(&net, b.images, b.labels, &spec, None);
        let (next, figures) = out.apply(net, &spec, &mut optims, cfg.arch.lr, lr(i).into());
        net = next;
        want.push(figures.loss.into_scalar::<f32>());
    }
    let want_values = floats(&net);
    drop(net);

    // Recorded once and replayed, as train --graph steps.
    let mut optims = optimizers(cfg, phase);
    let mut recorder = Recorder::new(device);
    let mut step = |net: N, images, labels, rate: Rate| {
        let out = device_step(&net, images, labels, &spec, None);
        out.apply(net, &spec, &mut optims, cfg.arch.lr, rate)
    };
    let mut net = recorded;
    let mut got = Vec::with_capacity(STEPS);
    for (i, batch) in batches().into_iter().enumerate() {
        match recorder.step(net, batch, lr(i), &mut step) {
            Ok((next, figures)) => {
                net = next;
                // Read before the next replay writes over the recorded outputs.
                got.push(figures.loss.into_scalar::<f32>());
            }
            Err(e) => return vec![failed(name, e.to_string())],
        }
    }
    recorder.finish();
    let got_values = floats(&net);

    let compared = |quantity, worst| Comparison {
        case: format!("{name}, {STEPS} steps replayed"),
        quantity,
        worst,
        scale: 1.0,
        error: None,
        tolerance: TOLERANCE,
    };
    vec![
        compared("loss of each step", worst(&[got], &[want])),
        compared(
            "parameters and running statistics (each relative to its tensor's largest)",
            worst(&got_values, &want_values),
        ),
    ]
}

/// [`STEPS`] batches of fixed pseudo-random images and labels, each different.
fn batches() -> Vec<HostBatch> {
    (0..STEPS)
        .map(|b| HostBatch {
            images: (0..BATCH * 3 * SIDE * SIDE)
                .map(|i| ((i * 7 + b * 131) as f32 * 0.37).sin())
                .collect(),
            shape: [BATCH, 3, SIDE, SIDE],
            labels: (0..BATCH).map(|i| ((i * 3 + b) % CLASSES) as i64).collect(),
        })
        .collect()
}

/// The largest difference of `got` from `want`, tensor by tensor relative to the want's
/// largest magnitude (at least 1e-3); infinite where a value is not finite or the two differ
/// in shape.
fn worst(got: &[Vec<f32>], want: &[Vec<f32>]) -> f32 {
    if got.len() != want.len() {
        return f32::INFINITY;
    }
    let mut worst = 0f32;
    for (g, w) in got.iter().zip(want) {
        if g.len() != w.len() {
            return f32::INFINITY;
        }
        let scale = w.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
        for (a, b) in g.iter().zip(w) {
            let d = if a.is_finite() {
                (a - b).abs() / scale
            } else {
                f32::INFINITY
            };
            worst = worst.max(d);
        }
    }
    worst
}

/// A case that could not run.
fn failed(name: &str, error: String) -> Comparison {
    Comparison {
        case: name.to_string(),
        quantity: "steps replayed against plain steps",
        worst: f32::INFINITY,
        scale: 1.0,
        error: Some(error),
        tolerance: TOLERANCE,
    }
}

/// Every float a module holds (parameters and running statistics), in module order.
pub fn floats<M: Module>(net: &M) -> Vec<Vec<f32>> {
    #[derive(Default)]
    struct Floats(Vec<Vec<f32>>);
    impl ModuleVisitor for Floats {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let values = param.val().into_data().convert::<f32>();
            self.0
                .push(values.try_into_vec::<f32>().expect("f32 after convert"));
        }
    }
    let mut floats = Floats::default();
    net.visit(&mut floats);
    floats.0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// flex records no graphs: each case reports that it could not run, naming why, instead
    /// of passing.
    #[test]
    fn a_backend_without_graphs_fails_every_case_with_a_reason() {
        let comparisons = graph(&Device::default());
        assert_eq!(comparisons.len(), 3);
        for c in comparisons {
            assert!(!c.ok(), "{c}");
            let error = c.error.expect("a reason");
            assert!(error.contains("--graph"), "{error}");
        }
    }

    #[test]
    fn worst_is_relative_to_each_tensor_and_catches_non_finite_values() {
        let want = vec![vec![100.0, -50.0], vec![0.5, 0.25]];
        let got = vec![vec![101.0, -50.0], vec![0.5, 0.2]];
        // 1/100 in the first tensor, 0.05/0.5 in the second.
        assert!((worst(&got, &want) - 0.1).abs() < 1e-6);
        assert_eq!(worst(&want, &want), 0.0);
        assert_eq!(
            worst(&[vec![f32::NAN, 0.0]], &[vec![0.0, 0.0]]),
            f32::INFINITY
        );
        assert_eq!(worst(&[vec![0.0]], &[vec![0.0, 0.0]]), f32::INFINITY);
    }
}
