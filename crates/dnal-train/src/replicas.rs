//! One training step, on one device or data-parallel over several.
//!
//! Data parallelism follows burn-train's multi-device strategy: every step, the global batch is
//! cut into one share per device, a replica of the network (the main network forked to that
//! device) runs forward and backward on its share on its own thread, and the gradients are
//! moved to the main device and summed there (burn's `GradientsParams::to_device` and
//! `GradientsAccumulator`), where the optimisers step once. Each replica's loss is weighted by
//! its share of the batch, so the summed gradient is the gradient of the global batch's mean
//! loss and the run is the run of one device with the same global batch, up to float
//! rounding.
//!
//! Beyond burn-train's scheme, two things make it that run:
//! - BatchNorm normalises each share with the share's own statistics (as PyTorch's
//!   DistributedDataParallel does without SyncBatchNorm), and its running statistics are the
//!   mean of the replicas' after every step: the running averages of the per-share
//!   statistics. Replicas are rebuilt from the main network every step, so every replica
//!   always holds the same weights and running statistics.
//! - The replicas run in a fixed order and their gradients are summed in that order, so a
//!   seeded data-parallel run is reproducible.

use std::collections::HashMap;

use burn::module::{ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::prelude::*;
use dnal_core::SparsityPenalty;
use dnal_data::HostBatch;
use dnal_kernels::Rate;
use dnal_zoo::Network;

use crate::phase::{Optimizers, Phase};
use crate::replay::Figures;

/// What one step needs besides the network and the batch.
pub(crate) struct StepSpec<'a> {
    /// The sparsity penalty of a searching phase.
    pub penalty: Option<&'a SparsityPenalty>,
    /// Whether the penalty stays out of the loss, its gradient added to alpha's after the
    /// backward pass ([`crate::penalty::folds`], [`StepOut::penalise`]).
    pub folded: bool,
    /// Whether the searching gates' factors enter as autodiff leaves, their gradients carried
    /// to alpha's after the backward pass ([`crate::leaves`]; with `alpha_ids`).
    pub leaves: bool,
    /// The alpha parameters, whose gradients go to their own optimiser (searching phases).
    pub alpha_ids: Option<&'a [ParamId]>,
}

impl<'a> StepSpec<'a> {
    /// The spec of `phase`'s steps of `net`: its `penalty` (a searching phase's), folded where
    /// it can be, the gates' factors as leaves where they can be, and `alpha_ids` (`net`'s)
    /// where the phase searches.
    pub fn of<N: Network>(
        phase: Phase,
        net: &N,
        penalty: Option<&'a SparsityPenalty>,
        alpha_ids: &'a [ParamId],
    ) -> Self {
        Self {
            penalty,
            folded: penalty.is_some_and(|p| crate::penalty::folds(p, net)),
            leaves: phase.searches() && crate::leaves::fold(net),
            alpha_ids: phase.searches().then_some(alpha_ids),
        }
    }
}

/// A step's results on the main device.
pub(crate) struct StepOut {
    /// Images in the batch.
    pub n: usize,
    /// The batch's mean cross-entropy plus the penalty (detached for the tally by it); without
    /// the penalty until [`StepOut::penalise`] where it is folded.
    pub loss: Tensor<1>,
    /// The penalty (none until [`StepOut::penalise`] where it is folded).
    pub penalty: Option<Tensor<1>>,
    /// Correct predictions (a count, as f32).
    pub hits: Tensor<1>,
    /// The gradients of alpha (when [`StepSpec::alpha_ids`] is set).
    pub alpha: Option<GradientsParams>,
    /// Every other gradient.
    pub rest: GradientsParams,
}

impl StepOut {
    /// Where `spec`'s penalty is folded, its gradient added to alpha's (at `net`, the network
    /// the step ran) and the penalty to the loss.
    pub fn penalise<N: Network>(&mut self, net: &N, spec: &StepSpec) {
        let (true, Some(penalty), Some(alpha)) = (spec.folded, spec.penalty, self.alpha.as_mut())
        else {
            return;
        };
        let value = crate::penalty::add_gradients(penalty, net, alpha);
        self.loss = self.loss.clone().detach() + value.clone();
        self.penalty = Some(value);
    }

    /// What follows a batch's forward and backward passes (of `net`): the penalty folded in
    /// ([`StepOut::penalise`]), then the optimisers' steps (alpha's at the architecture stage's
    /// rate `arch_lr`, the weights' at `rate`); returns the network and the batch's figures.
    pub fn apply<N: Network>(
        mut self,
        net: N,
        spec: &StepSpec,
        optims: &mut Optimizers,
        arch_lr: f64,
        rate: Rate,
    ) -> (N, Figures) {
        self.penalise(&net, spec);
        let figures = Figures {
            loss: self.loss,
            hits: self.hits,
            penalty: self.penalty,
        };
        (
            optims.step(arch_lr, rate, net, self.alpha, self.rest),
            figures,
        )
    }
}

/// The training devices of a run (autodiff), the first being the main one.
pub(crate) struct Replicas {
    devices: Vec<Device>,
}

impl Replicas {
    /// Replicas on `devices` (at least one; the same device may appear several times).
    pub fn new(devices: Vec<Device>) -> Self {
        assert!(!devices.is_empty(), "at least one training device");
        Self { devices }
    }

    /// The main training device: the network, the optimisers and the checkpoints live there.
    pub fn main(&self) -> &Device {
        &self.devices[0]
    }

    /// Forward and backward of one batch. With several replicas, `net`'s BatchNorm running
    /// statistics become the replicas' mean; its weights are left to the optimisers.
    pub fn step<N: Network>(&self, net: &mut N, batch: HostBatch, spec: &StepSpec) -> StepOut {
        if self.devices.len() == 1 {
            return replica_step(net, batch, self.main(), spec, None);
        }
        let n = batch.len();
        // Each share with its device and its weight in the global batch's mean loss.
        let mut shares: Vec<(HostBatch, Device, f64)> = batch
            .split(self.devices.len())
            .into_iter()
            .zip(self.devices.iter().cloned())
            .filter(|(share, _)| !share.is_empty())
            .map(|(share, device)| {
                let weight = share.len() as f64 / n as f64;
                (share, device, weight)
            })
            .collect();
        let others = shares.split_off(1);
        let (first_share, first_device, first_weight) =
            shares.pop().expect("a batch has at least one image");
        // Every replica is built before any runs: the main network's running statistics change
        // as it runs.
        let replicas: Vec<N> = others
            .iter()
            .map(|(_, device, _)| net.valid().train().fork(device))
            .collect();
        // The replicas' threads flush subnormals where this one does (the trainer's `main`).
        let flush = dnal_kernels::subnormals::flushed_here();
        let (first, rest) = std::thread::scope(|scope| {
            let handles: Vec<_> = replicas
                .into_iter()
                .zip(others)
                .map(|(replica, (share, device, weight))| {
                    scope.spawn(move || {
                        if flush {
                            dnal_kernels::subnormals::flush_this_thread();
                        }
                        let out = replica_step(&replica, share, &device, spec, Some(weight));
                        (replica, out)
                    })
                })
                .collect();
            let first = replica_step(net, first_share, &first_device, spec, Some(first_weight));
            let rest: Vec<(N, StepOut)> = handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
                .collect();
            (first, rest)
        });
        let main = self.main();
        let mut stats = RunningStats::of(net);
        for (replica, _) in &rest {
            stats.add(&RunningStats::of(replica), main);
        }
        *net = stats.mean().write(net.clone());
        let mut out = first;
        let mut alpha = out.alpha.take().map(|g| accumulator(net, g));
        let mut others = accumulator(net, out.rest);
        for (_, o) in rest {
            out.loss = out.loss + o.loss.to_device(main);
            out.hits = out.hits + o.hits.to_device(main);
            if let (Some(acc), Some(g)) = (alpha.as_mut(), o.alpha) {
                acc.accumulate(net, g.to_device(main, net));
            }
            others.accumulate(net, o.rest.to_device(main, net));
        }
        StepOut {
            n,
            loss: out.loss,
            penalty: out.penalty,
            hits: out.hits,
            alpha: alpha.map(|mut a| a.grads()),
            rest: others.grads(),
        }
    }
}

fn accumulator<N: Network>(net: &N, grads: GradientsParams) -> GradientsAccumulator<N> {
    let mut acc = GradientsAccumulator::new();
    acc.accumulate(net, grads);
    acc
}

/// Forward and backward of `net` on `batch` (sent to `device`), the loss weighted by `weight`
/// when given (a replica's share of the global batch).
fn replica_step<N: Network>(
    net: &N,
    batch: HostBatch,
    device: &Device,
    spec: &StepSpec,
    weight: Option<f64>,
) -> StepOut {
    let batch = batch.into_device(device);
    device_step(net, batch.images, batch.labels, spec, weight)
}

/// [`replica_step`] on a batch already on the network's device.
pub(crate) fn device_step<N: Network>(
    net: &N,
    images: Tensor<4>,
    labels: Tensor<1, Int>,
    spec: &StepSpec,
    weight: Option<f64>,
) -> StepOut {
    let installed = spec
        .alpha_ids
        .filter(|_| spec.leaves)
        .map(|_| crate::leaves::install(net));
    let logits = match &installed {
        Some((step, _)) => step.forward(images),
        None => net.forward(images),
    };
    let n = logits.dims()[0];
    let (mut loss, hits) = dnal_kernels::cross_entropy(logits, labels);
    let penalty = spec.penalty.filter(|_| !spec.folded).map(|p| p.loss(net));
    if let Some(pen) = &penalty {
        loss = loss + pen.clone();
    }
    if let Some(w) = weight {
        loss = loss.mul_scalar(w);
    }
    let mut grads = loss.backward();
    let carried = installed.map(|(_, leaves)| leaves.alpha_gradients(&mut grads));
    let mut alpha = spec
        .alpha_ids
        .map(|ids| GradientsParams::from_params(&mut grads, net, ids));
    if let (Some(carried), Some(alpha)) = (carried, alpha.as_mut()) {
        carried.add_to(alpha);
    }
    let rest = GradientsParams::from_grads(grads, net);
    StepOut {
        n,
        loss,
        penalty,
        hits,
        alpha,
        rest,
    }
}

/// The BatchNorm running statistics of a network (every `running_mean` / `running_var`), by
/// parameter id, in the order of the network's walk.
struct RunningStats {
    values: Vec<(ParamId, Tensor<1>)>,
    count: usize,
}

impl RunningStats {
    /// Read from a validation snapshot, which takes in every update of the last step.
    fn of<N: Network>(net: &N) -> Self {
        let mut reader = StatsReader {
            path: Vec::new(),
            values: Vec::new(),
        };
        net.valid().visit(&mut reader);
        Self {
            values: reader.values,
            count: 1,
        }
    }

    /// Adds `other`'s values, moved to `device`.
    fn add(&mut self, other: &RunningStats, device: &Device) {
        for ((id, sum), (other_id, v)) in self.values.iter_mut().zip(&other.values) {
            debug_assert_eq!(id, other_id, "replicas of one network");
            *sum = sum.clone() + v.clone().to_device(device);
        }
        self.count += other.count;
    }

    fn mean(self) -> Self {
        let count = self.count;
        Self {
            values: self
                .values
                .into_iter()
                .map(|(id, v)| (id, v.div_scalar(count as f64)))
                .collect(),
            count: 1,
        }
    }

    /// `net` with these values as its running statistics.
    fn write<N: Network>(self, net: N) -> N {
        let mut writer = StatsWriter {
            values: self.values.into_iter().collect(),
        };
        net.map(&mut writer)
    }
}

fn is_running_stat(path: &[String]) -> bool {
    matches!(
        path.last().map(String::as_str),
        Some("running_mean" | "running_var")
    )
}

struct StatsReader {
    path: Vec<String>,
    values: Vec<(ParamId, Tensor<1>)>,
}

impl ModuleVisitor for StatsReader {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if is_running_stat(&self.path) {
            let v = param.val();
            let numel = v.shape().num_elements();
            self.values.push((param.id, v.reshape([numel])));
        }
    }
}

struct StatsWriter {
    values: HashMap<ParamId, Tensor<1>>,
}

impl ModuleMapper for StatsWriter {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let Some(v) = self.values.remove(&param.id) else {
            return param;
        };
        let (id, old, mapper) = param.consume();
        let value = v.to_device(&old.device()).reshape(old.shape());
        Param::from_mapped_value(id, value, mapper)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dnal_zoo::{PlainCnn, PlainCnnConfig};

    fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
        t.into_data().try_to_vec::<f32>().unwrap()
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    /// Compares every gradient of `out` with the mean of `parts`' gradients.
    struct GradCheck<'a> {
        out: &'a GradientsParams,
        parts: [&'a GradientsParams; 2],
        compared: usize,
    }

    impl ModuleVisitor for GradCheck<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let Some(g) = self.out.get::<D>(param.id) else {
                assert!(self.parts[0].get::<D>(param.id).is_none());
                return;
            };
            let [a, b] = self
                .parts
                .map(|p| p.get::<D>(param.id).expect("a gradient"));
            let mean = values((a + b).div_scalar(2.0));
            let g = values(g);
            let scale = mean.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
            assert!(max_diff(&g, &mean) <= 1e-4 * scale, "gradient {}", param.id);
            self.compared += 1;
        }
    }

    /// Eight MNIST-sized images of a fixed pseudo-random pattern.
    fn batch() -> HostBatch {
        let mut state = 12345u32;
        let images = (0..8 * 28 * 28)
            .map(|_| {
                state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (state >> 8) as f32 / (1u32 << 24) as f32 - 0.5
            })
            .collect();
        HostBatch {
            images,
            shape: [8, 1, 28, 28],
            labels: (0..8).map(|i| i % 10).collect(),
        }
    }

    /// PyTorch DDP's semantics without SyncBatchNorm: each replica normalises its share with
    /// the share's statistics; the gradient is the mean of the shares' gradients and the
    /// running statistics the mean of the shares'.
    #[test]
    fn batchnorm_statistics_are_per_replica_and_averaged() {
        let device = Device::flex().autodiff();
        let config = PlainCnnConfig::mnist_cnn().with_num_classes(10);
        let net = dnal_zoo::init::seeded(PlainCnn::build(&config, &device).unwrap(), 3);
        let batch = batch();
        let spec = StepSpec {
            penalty: None,
            folded: false,
            leaves: false,
            alpha_ids: None,
        };
        let mut dp = net.valid().train();
        let replicas = Replicas::new(vec![device.clone(), device.clone()]);
        let out = replicas.step(&mut dp, batch.clone(), &spec);

        let halves = batch.split(2);
        let parts: Vec<(PlainCnn, StepOut)> = halves
            .iter()
            .map(|h| {
                let m = net.valid().train();
                let o = replica_step(&m, h.clone(), &device, &spec, None);
                (m, o)
            })
            .collect();
        let loss = |o: &StepOut| values(o.loss.clone())[0];
        let mean_loss = (loss(&parts[0].1) + loss(&parts[1].1)) / 2.0;
        assert!(
            (loss(&out) - mean_loss).abs() < 1e-5,
            "{} {mean_loss}",
            loss(&out)
        );
        // Not BatchNorm over the whole batch.
        let whole = replica_step(&net.valid().train(), batch.clone(), &device, &spec, None);
        assert!((loss(&whole) - loss(&out)).abs() > 1e-3);

        let mut check = GradCheck {
            out: &out.rest,
            parts: [&parts[0].1.rest, &parts[1].1.rest],
            compared: 0,
        };
        net.visit(&mut check);
        assert!(check.compared > 10, "{} gradients", check.compared);

        let stats = RunningStats::of(&dp).values;
        let mut expected = RunningStats::of(&parts[0].0);
        expected.add(&RunningStats::of(&parts[1].0), &device);
        let expected = expected.mean().values;
        assert!(!stats.is_empty());
        let before = RunningStats::of(&net).values;
        for (((_, got), (_, want)), (_, old)) in stats.into_iter().zip(expected).zip(before) {
            let (got, want, old) = (values(got), values(want), values(old));
            assert!(max_diff(&got, &want) < 1e-6);
            assert!(max_diff(&got, &old) > 1e-6, "the statistics moved");
        }
    }

    /// Every gradient of `a` equal to `b`'s, within `1e-5` of each gradient's largest value.
    struct SameGrads<'a> {
        a: &'a GradientsParams,
        b: &'a GradientsParams,
        compared: usize,
    }

    impl ModuleVisitor for SameGrads<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let (Some(a), Some(b)) = (self.a.get::<D>(param.id), self.b.get::<D>(param.id)) else {
                assert!(self.a.get::<D>(param.id).is_none() && self.b.get::<D>(param.id).is_none());
                return;
            };
            let (a, b) = (values(a), values(b));
            let scale = b.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
            assert!(max_diff(&a, &b) <= 1e-5 * scale, "gradient {}", param.id);
            self.compared += 1;
        }
    }

    /// A searching step with the gates' factors as leaves is the step through autodiff: the
    /// loss, alpha's gradients (through a masked channel and a saturated gate too) and every
    /// other gradient; without a penalty, and with the paper's penalty in the loss (whose
    /// gradient autodiff gives alpha, the leaves' then added to it).
    #[test]
    fn a_step_with_the_factors_as_leaves_is_the_autodiff_step() {
        use dnal_core::{GateMode, GatedModel};
        let device = Device::flex().autodiff();
        let config = PlainCnnConfig::mnist_cnn().with_num_classes(10);
        let net = dnal_zoo::init::seeded(PlainCnn::build(&config, &device).unwrap(), 5);
        // Varied alphas (one gate saturated at the temperature), a channel masked.
        let mut k = 0;
        let net = net
            .with_gate_mode(GateMode::Search)
            .with_temperature(4.0)
            .map_gates(&mut |_, gate| {
                k += 1;
                let c = gate.channels();
                let scale = if k == 2 { 100.0 } else { 0.3 };
                let alpha: Vec<f32> = (0..c).map(|i| scale * ((i * 7 + k) as f32).sin()).collect();
                let mut keep = vec![true; c];
                keep[c / 2] = k != 1;
                let mut gate = gate.with_mask(&keep);
                gate.alpha = gate.alpha.map(|a| {
                    Tensor::<1>::from_floats(alpha.as_slice(), &a.device()).require_grad()
                });
                gate
            });
        let alpha_ids = net.alpha_ids();
        let paper = SparsityPenalty::new(dnal_core::PenaltyConfig::paper(0.05), None).unwrap();
        for penalty in [None, Some(&paper)] {
            let run = |leaves: bool| {
                let spec = StepSpec {
                    penalty,
                    folded: false,
                    leaves,
                    alpha_ids: Some(&alpha_ids),
                };
                replica_step(&net.valid().train(), batch(), &device, &spec, None)
            };
            let (with, without) = (run(true), run(false));
            let loss = |o: &StepOut| values(o.loss.clone())[0];
            assert!((loss(&with) - loss(&without)).abs() <= 1e-6 * loss(&without));
            for (a, b, least) in [
                (&with.alpha, &without.alpha, 3),
                (&Some(with.rest), &Some(without.rest), 10),
            ] {
                let mut check = SameGrads {
                    a: a.as_ref().unwrap(),
                    b: b.as_ref().unwrap(),
                    compared: 0,
                };
                net.visit(&mut check);
                assert!(check.compared >= least, "{} gradients", check.compared);
            }
        }
    }
}
