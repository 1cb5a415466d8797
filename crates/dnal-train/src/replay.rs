//! Training steps recorded once as a graph of device launches and replayed (`train --graph`,
//! cuda and wgpu): a step issued by the host costs it far more than the device's time on small
//! networks (every operation passes through autodiff, fusion and CubeCL's server), while a
//! replay is one dispatch on cuda (a CUDA graph) and a re-encoding of the recorded launches on
//! wgpu.
//!
//! A [`Recorder`] serves one epoch of a phase: it runs [`WARMUP`] steps as usual (kernels
//! compiled and tuned, memory pools filled), records the next one, and replays it for every
//! batch after. A replay reads and writes the buffers of the recording, so each batch's images
//! and labels and each step's learning rate are written into the recorded input buffers first
//! ([`dnal_kernels::overwrite`]); the weights, alphas, velocities and BatchNorm statistics are
//! updated in place by the step itself, and the figures (loss, hits, penalty) come out in the
//! recorded output buffers. Everything else the step reads stays as it was recorded for the
//! epoch: a searching phase's temperature and penalty weight may change between epochs, not
//! within one ([`replays`]). Every step, warm-up, recorded or replayed, computes what an
//! unrecorded step computes, in the same order: a run with `--graph` is the run without it, up
//! to the rounding of the kernels burn's fusion and autotune pick for each.

use burn::backend::{Backend, BackendGraph, Dispatch};
use burn::prelude::*;
use dnal_core::Granularity;
use dnal_data::HostBatch;
use dnal_kernels::{Rate, overwrite};
use dnal_zoo::Network;

use crate::config::TrainConfig;
use crate::error::{Result, TrainError};
use crate::phase::{Optimizers, Phase};

/// Steps run as usual before the recording: the first of a phase differs (no velocity yet),
/// and burn's fusion settles on its fused kernels only from the second run of a sequence on.
pub(crate) const WARMUP: usize = 3;

/// Whether the steps of `phase`, trained by `optims`, can be recorded and replayed: every
/// optimiser writes in place and takes a held rate (dnal's SGD with momentum; not burn's Adam,
/// nor SGD without momentum, whose parameters step alone through burn's operations), and a
/// searching phase's temperature stays one value through each epoch (continuation by epoch,
/// as in the paper; by iteration it changes at every step, which a replay would not see).
pub(crate) fn replays(cfg: &TrainConfig, phase: Phase, optims: &Optimizers) -> bool {
    optims.in_place()
        && (!phase.searches() || cfg.arch.continuation.granularity == Granularity::Epoch)
}

/// What a step leaves on the device for the epoch's tally.
#[derive(Clone)]
pub(crate) struct Figures {
    /// The batch's loss (with the penalty in a searching phase).
    pub loss: Tensor<1>,
    /// Its correct predictions.
    pub hits: Tensor<1>,
    /// The penalty, in a searching phase.
    pub penalty: Option<Tensor<1>>,
}

/// The recorded step's input buffers.
struct Inputs {
    images: Tensor<4>,
    /// The labels as f32 (the overwrite works on floats), cast back inside the step.
    labels: Tensor<1>,
    lr: Tensor<1>,
}

/// One epoch's recorded step (see the module's documentation).
pub(crate) struct Recorder {
    /// The network's device without autodiff, whose stream records and replays.
    device: Device,
    inputs: Option<Inputs>,
    /// Steps run since the capture was prepared.
    warm: usize,
    graph: Option<BackendGraph<Dispatch>>,
    /// The recorded step's figures, overwritten by every replay.
    output: Option<Figures>,
    /// A batch of another shape came (a last, smaller batch): the rest of the epoch is not
    /// recorded.
    done: bool,
}

impl Recorder {
    /// A recorder for the training device `device` (with or without autodiff).
    pub fn new(device: &Device) -> Self {
        Self {
            device: device.clone().inner(),
            inputs: None,
            warm: 0,
            graph: None,
            output: None,
            done: false,
        }
    }

    /// One step of `net` on `batch` at learning rate `lr`: `step` takes the network, the
    /// images (autodiff), the labels and the rate, and returns the network after forward,
    /// backward and the optimisers' steps, and the batch's figures. The rate it gets is held in
    /// a tensor, except for a batch of another shape, which runs as an ordinary step.
    pub fn step<N: Network>(
        &mut self,
        net: N,
        batch: HostBatch,
        lr: f64,
        step: &mut impl FnMut(N, Tensor<4>, Tensor<1, Int>, Rate) -> (N, Figures),
    ) -> Result<(N, Figures)> {
        let fits = self
            .inputs
            .as_ref()
            .is_none_or(|i| i.images.dims() == batch.shape);
        if self.done || !fits {
            self.finish();
            self.done = true;
            let b = batch.into_device(&self.device);
            return Ok(step(net, b.images.autodiff(), b.labels, Rate::Value(lr)));
        }
        self.refresh(batch, lr)?;
        if self.warm < WARMUP {
            self.warm += 1;
            return Ok(self.run(net, step));
        }
        let dispatch = self.device.as_dispatch();
        let net = match self.graph {
            Some(_) => net,
            None => {
                Dispatch::graph_start_capture(dispatch).map_err(|e| failed("start", e))?;
                let (net, figures) = self.run(net, step);
                let graph =
                    Dispatch::graph_stop_capture(dispatch).map_err(|e| failed("seal", e))?;
                self.graph = Some(graph);
                self.output = Some(figures);
                net
            }
        };
        let graph = self.graph.as_ref().expect("recorded above");
        // SAFETY: the recording read and wrote the input buffers (held by `self`), the
        // network's parameters, velocities and running statistics (held by `net` and the
        // optimisers, which only this recording's replays and steps of this recorder touch for
        // the rest of the epoch) and its own outputs and intermediates (held by `self` and the
        // graph). All stay alive until `finish`, and every write of an input is issued on this
        // stream, before the replay.
        #[allow(unsafe_code)]
        unsafe { Dispatch::graph_replay(dispatch, graph) }.map_err(|e| failed("replay", e))?;
        let figures = self.output.clone().expect("recorded with the graph");
        Ok((net, figures))
    }
    /// `batch` and `lr` written into the input buffers (made from the first batch).
    fn refresh(&mut self, batch: HostBatch, lr: f64) -> Result<()> {
        let b = batch.into_device(&self.device);
        let lr = Tensor::<1>::from_data(TensorData::new(vec![lr as f32], [1]), &self.device);
        let labels = b.labels.float();
        self.inputs = Some(match self.inputs.take() {
            None => {
                Dispatch::graph_prepare(self.device.as_dispatch())
                    .map_err(|e| failed("prepare", e))?;
                Inputs {
                    images: b.images,
                    labels,
                    lr,
                }
            }
            Some(i) => Inputs {
                images: overwrite(i.images, b.images),
                labels: overwrite(i.labels, labels),
                lr: overwrite(i.lr, lr),
            },
        });
        Ok(())
    }

    /// The step itself, on the input buffers.
    fn run<N: Network>(
        &self,
        net: N,
        step: &mut impl FnMut(N, Tensor<4>, Tensor<1, Int>, Rate) -> (N, Figures),
    ) -> (N, Figures) {
        let inputs = self.inputs.as_ref().expect("refreshed before a step");
        let images = inputs.images.clone().autodiff();
        let labels = inputs.labels.clone().int();
        step(net, images, labels, Rate::Held(inputs.lr.clone()))
    }

    /// Ends the recording: the graph released, or a capture prepared but never opened closed.
    pub fn finish(&mut self) {
        if self.graph.take().is_none() && self.inputs.is_some() && !self.done {
            // Closing a capture that was prepared but not opened answers an error by design;
            // the stream is free again either way.
            let _ = Dispatch::graph_stop_capture(self.device.as_dispatch());
        }
        self.output = None;
        self.inputs = None;
        self.done = true;
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.finish();
    }
}

fn failed(what: &str, e: impl std::fmt::Debug) -> TrainError {
    TrainError::from(dnal_core::CoreError::Backend(format!(
        "could not {what} the recorded training step: {e:?}; train without --graph"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::phase::optimizers;
    use crate::recipes::resolve;

    fn replayed(sets: &[&str], phase: Phase) -> bool {
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        let cfg = resolve(Some("mnist-demo"), None, &sets).unwrap();
        replays(&cfg, phase, &optimizers(&cfg, phase))
    }

    /// Every phase of the presets replays (dnal's SGD with momentum, the temperature set once
    /// an epoch); a searching phase with Adam or plain SGD for alpha, or the temperature rising
    /// at every iteration, runs its steps as they are, and the weight phases still replay,
    /// unless their own SGD has no momentum.
    #[test]
    fn searching_phases_replay_where_nothing_changes_within_an_epoch() {
        for phase in [Phase::Weights, Phase::Arch, Phase::Final] {
            assert!(replayed(&[], phase), "{phase:?}");
        }
        assert!(replayed(&["mode=\"joint\""], Phase::Joint));
        let adam = ["arch.optimizer=\"adam\""];
        let by_iteration = ["arch.continuation.granularity=\"iteration\""];
        let plain = ["arch.momentum=0"];
        for sets in [&adam[..], &by_iteration[..], &plain[..]] {
            assert!(!replayed(sets, Phase::Arch), "{sets:?}");
            assert!(!replayed(sets, Phase::Joint), "{sets:?}");
            assert!(replayed(sets, Phase::Weights), "{sets:?}");
            assert!(replayed(sets, Phase::Final), "{sets:?}");
        }
        assert!(!replayed(&["weights.momentum=0"], Phase::Weights));
        assert!(!replayed(&["final.momentum=0"], Phase::Final));
        assert!(replayed(&["final.momentum=0"], Phase::Weights));
    }
}
